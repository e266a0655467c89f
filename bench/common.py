"""Shared by the benchmarks: what machine the figures were measured on."""

from __future__ import annotations

import platform


def cpu_info() -> dict:
    """CPU model and whether it has AMX (the fast bf16 path); Linux /proc/cpuinfo, else platform."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return {"cpu": platform.processor()}
    name = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), ""
    )
    return {"cpu": name, "amx_bf16": " amx_bf16" in text}
