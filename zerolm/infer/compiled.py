"""The compiled decode step (Engine(compile=True)): a decode step over all slots of a KV cache,
exported with torch.export and compiled ahead of time by AOTInductor into C++ kernels and a C++
wrapper, with the model's weights frozen in. Programs are kept on disk (`program_dir`), keyed by
everything they depend on, so a later run on the same model loads its program instead of
compiling again.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import tempfile

import torch

from zerolm.infer.kv_cache import KVCache, decode_mask

log = logging.getLogger(__name__)

# Inductor settings of the compiled decode step: weights frozen into it as constants (it is built
# for one model's current values), every matrix-vector product in Inductor's C++ GEMM template on
# weights it packs at compile time (its kernel read a 65 MB head at 25 GB/s where ATen's read it
# at 8; with no other backend nothing is autotuned, which halves the compile time); no pattern
# matching, which would turn the step's explicit attention (model/attention.py) back into a
# fused-kernel call per layer.
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
                   "pattern_matcher": False}


class _StepCache:
    """The cache interface model.hidden uses (begin/update/end), for one decode token per row over
    all slots of a KVCache's tensors, with the row positions (B,) a tensor and the attended span S
    the length of `span`: both stay symbolic in the exported graph, so one graph serves every length."""

    def __init__(self, k, v, pos, span):
        self.k, self.v, self.pos, self.span = k, v, pos, span

    def begin(self, rows, T, window=0):
        positions = self.pos[:, None]  # (B, 1)
        return positions, decode_mask(positions, self.span.shape[0], window)

    def update(self, layer, k, v):
        b, S = torch.arange(k.shape[0], device=k.device), self.span.shape[0]
        self.k[layer][b, :, self.pos] = k[:, :, 0]  # (B, K, Dh) into each row's own position
        self.v[layer][b, :, self.pos] = v[:, :, 0]
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def end(self):
        pass


class _DecodeStep(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, pos, span, k, v):
        hidden = self.model.hidden(ids, cache=_StepCache(k, v, pos, span))  # (B, 1, D)
        return self.model.logits(hidden)[:, 0]  # (B, V)


def program_dir() -> str:
    """Where compiled decode programs are kept between runs: $ZEROLM_CACHE/decode, by default
    ~/.cache/zerolm/decode."""
    return os.path.join(os.environ.get("ZEROLM_CACHE") or os.path.expanduser("~/.cache/zerolm"), "decode")


PROGRAMS_KEPT = 4  # the most recently used programs kept on disk (each holds its model's weights)


def program_key(model, batch: int, cache: KVCache) -> str:
    """What a compiled step depends on: the model's code, config and weights, the batch and cache
    shape, the thread count and vector ISA its kernels were built for, torch and the settings."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    h = hashlib.sha256(repr((torch.__version__, COMPILE_OPTIONS, batch, [tuple(t.shape) for t in cache.k],
                             str(cache.k[0].dtype), str(cache.k[0].device), torch.get_num_threads(),
                             str(pick_vec_isa()), model.cfg)).encode())
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # zerolm/
    for src in sorted(glob.glob(os.path.join(here, "model", "*.py"))) + [__file__, os.path.join(here, "infer", "kv_cache.py")]:
        with open(src, "rb") as f:
            h.update(f.read())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def load_or_compile(model, ids: torch.Tensor, cache: KVCache, folder: str | None = None):
    """The compiled step of `model` for next tokens `ids` (B, 1) over all of `cache`'s slots: loaded
    from `folder` (default program_dir()) if a previous run saved it, else compiled and saved there."""
    folder = folder or program_dir()
    path = os.path.join(folder, program_key(model, ids.shape[0], cache) + ".pt2")
    if os.path.exists(path):
        try:
            program = torch._inductor.aoti_load_package(path)
            os.utime(path)  # recently used: kept
            log.info("loaded the compiled decode step for batch size %d from %s", ids.shape[0], path)
            return program
        except Exception as e:  # a damaged file: compile afresh over it
            log.warning("could not load %s (%s); compiling again", path, e)
    log.info("compiling the decode step for batch size %d (20-60 s; a C++ compiler is needed)", ids.shape[0])
    k, v = [torch.zeros_like(t) for t in cache.k], [torch.zeros_like(t) for t in cache.v]
    S = torch.export.Dim("S", min=2, max=cache.max_len - 1)
    pos, span = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device), torch.empty(2)
    with torch.no_grad():
        program = torch.export.export(_DecodeStep(model), (ids, pos, span, k, v),
                                      dynamic_shapes=({}, {}, {0: S}, [{}] * len(k), [{}] * len(v)))
    with contextlib.suppress(OSError):
        os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        log.warning("%s is not writable: the compiled decode step will not be kept for later runs "
                    "(ZEROLM_CACHE=DIR names another folder)", folder)
        with tempfile.TemporaryDirectory() as tmp:  # the loaded program needs no file afterwards
            path = os.path.join(tmp, "step.pt2")
            torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=COMPILE_OPTIONS)
            return torch._inductor.aoti_load_package(path)
    tmp = f"{path[:-4]}.{os.getpid()}.tmp.pt2"
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=COMPILE_OPTIONS)
        os.replace(tmp, path)  # atomic: another process sees the whole file or none
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    log.info("saved the compiled decode step to %s", path)
    _prune(folder)
    return torch._inductor.aoti_load_package(path)


def _prune(folder: str) -> None:
    """Keep the PROGRAMS_KEPT most recently used programs in `folder`."""
    with contextlib.suppress(OSError):  # another process may be pruning too
        kept = [f for f in glob.glob(os.path.join(folder, "*.pt2")) if not f.endswith(".tmp.pt2")]
        for f in sorted(kept, key=os.path.getmtime, reverse=True)[PROGRAMS_KEPT:]:
            os.remove(f)
