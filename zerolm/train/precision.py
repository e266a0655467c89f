"""Mixed precision: the autocast context of a precision, and the measured peak matmul FLOP/s
(the MFU denominator)."""

from __future__ import annotations

import contextlib
import time

import torch


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_peak_flops(
    precision: str, device: torch.device, n: int = 1024, trials: int = 5
) -> float:
    """Measured matmul FLOP/s of this device in this precision (the MFU denominator): the best of
    a few short trials, so a momentarily busy machine does not deflate it."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)  # not the global RNG: resume is exact
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t0 < 0.05:
            a @ b
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best
