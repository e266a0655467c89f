"""Build and load the C++ quantized-linear op (csrc/qlinear.cpp, torch.ops.zerolm.qlinear).

The op is compiled once per machine by its own g++ (no ninja, no setuptools extension), with
-march=native (or $ZEROLM_MARCH) so it uses the CPU's AVX-512 VNNI where there is one. The
library goes into a user cache keyed by everything that changes the binary (source, torch,
compiler, flags, CPU), so a new torch or a home directory shared with another CPU gets its own
build, never a stale or illegal one:
  $XDG_CACHE_HOME/zerolm/kernels/<key>/qlinear.so   (XDG_CACHE_HOME defaults to ~/.cache)
scripts/setup.sh builds it; `python -m zerolm.quant.build` (re)builds it by hand and checks it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "qlinear.cpp"
# -march: the CPU it is built for; ZEROLM_MARCH=x86-64-v3 (say) builds a portable library, whose
# kernels are the plain C++ loops where the CPU lacks AVX-512 VNNI (the tests build one this way)
MARCH = os.environ.get("ZEROLM_MARCH", "native")
FLAGS = ["-O3", f"-march={MARCH}", "-shared", "-fPIC", "-std=c++20", "-fopenmp"]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zerolm" / "kernels"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native means a library built elsewhere may not run here."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor()


def library_path(cxx: str | None = None) -> Path | None:
    """Where the library for this source, torch, compiler and CPU lives (built or not)."""
    cxx = cxx or compiler()
    if cxx is None:
        return None
    st = Path(cxx).resolve().stat()
    parts = [
        hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        torch.__version__,
        str(torch._C._GLIBCXX_USE_CXX11_ABI),
        f"{Path(cxx).resolve()}:{st.st_size}:{int(st.st_mtime)}",
        " ".join(FLAGS),
        _cpu_flags(),
    ]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_root() / key / "qlinear.so"


def command(cxx: str, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths  # heavy import: only when building

    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [f"-I{p}" for p in include_paths()]
    defs = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    # link torch's own libgomp (same soname as the system's, so one OpenMP runtime and thread pool)
    libs = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10"]
    return [cxx, *FLAGS, *defs, *incs, str(SOURCE), "-o", str(out), *libs]


def build(force: bool = False) -> Path | None:
    """Compile the op if it is not built yet (or `force`); its path, or None without a compiler.
    Raises RuntimeError with the compiler's output if compiling fails."""
    cxx = compiler()
    out = library_path(cxx)
    if cxx is None or out is None:
        return None
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # then rename: never half a library
    os.close(fd)
    try:
        res = subprocess.run(command(cxx, Path(tmp)), capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _self_check() -> str:
    """Compare the freshly loaded op with the pure-torch path on a random int8 and int4 matrix."""
    from zerolm.quant import formats, kernels

    if not kernels.load():
        return "not loaded"
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 256, generator=g), torch.randn(37, 256, generator=g)
    worst = 0.0
    schemes: tuple[tuple[int, formats.Scheme], ...] = ((8, "sym"), (4, "sym"), (4, "asym"))
    for bits, scheme in schemes:
        q = formats.quantize(w, bits, 32, scheme)
        with kernels.path("op"):
            got = kernels.linear(x, *q, bits)
        with kernels.path("torch"):
            want = kernels.linear(x, *q, bits)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return f"ok (largest difference from the torch path {worst:.1e} of the largest output)"


def main() -> None:
    try:
        path = build(force="--force" in sys.argv)
    except RuntimeError as e:
        sys.exit(f"zerolm: {e}")
    if path is None:
        sys.exit("zerolm: no C++ compiler (g++ or $CXX) found; the pure-torch path will be used")
    print(path)
    print("self-check:", _self_check())


if __name__ == "__main__":
    main()
