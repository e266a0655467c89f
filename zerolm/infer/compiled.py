"""The compiled decode step (Engine(compile=True)): a decode step over all slots of a KV cache,
exported with torch.export and compiled ahead of time by AOTInductor into C++ kernels and a C++
wrapper, with the model's weights frozen in. Programs are kept on disk (`program_dir`), keyed by
everything they depend on, so a later run on the same model loads its program instead of
compiling again. A program is loaded only from a folder of the user's own that no one else can
write, and only if the manifest beside it names its key and the sha256 of its bytes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.export import ExportedProgram

from zerolm.files import atomic_write_text
from zerolm.infer.kv_cache import KVCache, decode_mask
from zerolm.model.protocol import LanguageModel
from zerolm.quant import kernels
from zerolm.quant.build import library_path
from zerolm.quant.linear import quant_layers

log = logging.getLogger(__name__)

# Inductor settings of the compiled decode step: weights frozen into it as constants (it is built
# for one model's current values), every matrix-vector product in Inductor's C++ GEMM template on
# weights it packs at compile time (its kernel read a 65 MB head at 25 GB/s where ATen's read it
# at 8; with no other backend nothing is autotuned, which halves the compile time); no pattern
# matching, which would turn the step's explicit attention (model/attention.py) back into a
# fused-kernel call per layer.
COMPILE_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "pattern_matcher": False,
}


class _StepCache:
    """The cache interface model.hidden uses (begin/update/end), for one decode token per row over
    all slots of a KVCache's tensors, with the row positions (B,) a tensor and the attended span S
    the length of `span`: both stay symbolic in the exported graph, so one graph serves every
    length."""

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
    def __init__(self, model: LanguageModel):
        super().__init__()
        self.model = model

    def forward(self, ids, pos, span, k, v):
        hidden = self.model.hidden(ids, cache=_StepCache(k, v, pos, span))  # (B, 1, D)
        return self.model.logits(hidden)[:, 0]  # (B, V)


def program_dir() -> str:
    """Where compiled decode programs are kept between runs: $ZEROLM_CACHE/decode, by default
    ~/.cache/zerolm/decode."""
    return os.path.join(
        os.environ.get("ZEROLM_CACHE") or os.path.expanduser("~/.cache/zerolm"), "decode"
    )


PROGRAMS_KEPT = 4  # the most recently used programs kept on disk (each holds its model's weights)
COMPILING = ".compiling-"  # the prefix of a program's temporary folder while it compiles


def kernel_library(model: LanguageModel) -> str | None:
    """The quantized kernel library a step of `model` calls, loaded now (a program exported with
    the op inside needs it at export and at load): its path, which names its build's key; None
    for a float model or where the op is not built (the pure-torch path is then compiled in)."""
    if not quant_layers(cast(nn.Module, model)) or not kernels.load():
        return None
    return str(library_path())


def program_key(model: LanguageModel, batch: int, cache: KVCache) -> str:
    """What a compiled step depends on: the model's code, config and weights (and quantization
    record and kernel library), the batch and cache shape, the thread count and vector ISA its
    kernels were built for, torch and the settings."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    h = hashlib.sha256(
        repr(
            (
                torch.__version__,
                COMPILE_OPTIONS,
                batch,
                [tuple(t.shape) for t in cache.k],
                str(cache.k[0].dtype),
                str(cache.k[0].device),
                torch.get_num_threads(),
                str(pick_vec_isa()),
                model.cfg,
                getattr(model, "zerolm_quant", None),
                kernel_library(model),
            )
        ).encode()
    )
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # zerolm/
    code = glob.glob(os.path.join(here, "model", "*.py")) + glob.glob(
        os.path.join(here, "quant", "*.py")
    )
    for src in sorted(code) + [
        __file__,
        os.path.join(here, "infer", "kv_cache.py"),
    ]:
        with open(src, "rb") as f:
            h.update(f.read())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


Program = Callable[..., torch.Tensor]  # a loaded step: (ids, pos, span, k, v) -> (B, V) logits
_MEMORY: dict[tuple[str, str], Program] = {}  # (path, key) -> a program not kept on disk
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _manifest(path: str) -> str:
    return path[: -len(".pt2")] + ".json"


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def saved_program_problem(path: str, key: str) -> str | None:
    """Why the program at `path` is not the one for `key` (None: it is): its manifest beside it must
    name `key` and the sha256 of the file's bytes, both written when it was compiled and saved."""
    try:
        with open(_manifest(path), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "it has no manifest"
    except (OSError, ValueError) as e:
        return f"its manifest is unreadable ({e})"
    if not isinstance(manifest, dict):
        return "its manifest is not a JSON object"
    if manifest.get("key") != key:
        return "its manifest names another key (another model's or settings' program)"
    if manifest.get("sha256") != _sha256(path):
        return "its bytes do not match the sha256 in its manifest"
    return None


def untrusted_cache(folder: str) -> str | None:
    """Why programs must not be loaded from `folder` (None: they may): a loaded program runs as
    native code, so the folder must be the user's own and writable by no one else. Creates it
    (0700)."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError as e:
        return (
            f"the compiled-decode cache {folder} cannot be created ({e.strerror}): set "
            "ZEROLM_CACHE=DIR to a folder of your own"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return (
            f"the compiled-decode cache {folder} belongs to another user, so it is not used: "
            "set ZEROLM_CACHE=DIR to a folder of your own"
        )
    if st.st_mode & 0o022:
        return (
            f"the compiled-decode cache {folder} is writable by other users, so it is not used: "
            f"run `chmod go-w {folder}` or set ZEROLM_CACHE=DIR to a folder of your own"
        )
    return None


def load_or_compile(
    model: LanguageModel, ids: torch.Tensor, cache: KVCache, folder: str | None = None
) -> Program:
    """The compiled step of `model` for next tokens `ids` (B, 1) over all of `cache`'s slots: loaded
    from `folder` (default program_dir()) if a previous run saved it there and it verifies (its
    manifest names this key and the file's sha256), else compiled and saved there with its
    manifest. Where nothing can be kept (an untrusted or read-only folder, an entry that cannot be
    replaced) that is warned about once, and the program is compiled once per process and kept in
    memory."""
    folder = folder or program_dir()
    key = program_key(model, ids.shape[0], cache)
    path = os.path.join(folder, key + ".pt2")
    if (path, key) in _MEMORY:
        return _MEMORY[path, key]
    problem = untrusted_cache(folder)
    if problem is None and os.path.isfile(path):
        program = _load_saved(path, key, ids.shape[0])
        if program is not None:
            return program
    problem = problem or _unwritable(folder, path)
    if problem is not None:
        _warn_once(problem + " (meanwhile the decode step is compiled once per process)")
    log.info(
        "compiling the decode step for batch size %d (20-60 s; a C++ compiler is needed)",
        ids.shape[0],
    )
    return _compile(_export(model, ids, cache), folder, path, key, problem)


def _load_saved(path: str, key: str, batch: int) -> Program | None:
    """The program saved at `path` if it verifies and loads; None (with a warning) if not."""
    bad = saved_program_problem(path, key)
    try:
        if bad is None:
            program = torch._inductor.aoti_load_package(path)
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: kept
            log.info("loaded the compiled decode step for batch size %d from %s", batch, path)
            return program
    except Exception as e:  # a damaged file: compile afresh over it
        bad = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    log.warning("could not load %s: %s; compiling again", path, bad)
    return None


def _unwritable(folder: str, path: str) -> str | None:
    """Why a program compiled now cannot be kept at `path` in `folder` (None: it can)."""
    blocked = [p for p in (path, _manifest(path)) if os.path.lexists(p) and not os.path.isfile(p)]
    if blocked:  # e.g. a directory there: os.replace cannot put a file in its place
        return (
            f"the compiled-decode cache entry {blocked[0]} is not a file and cannot be replaced: "
            "remove it"
        )
    if not os.access(folder, os.W_OK):
        return (
            f"the compiled-decode cache {folder} is not writable, so compiled steps are not kept "
            "for later runs: set ZEROLM_CACHE=DIR to a writable folder"
        )
    return None


def _export(model: LanguageModel, ids: torch.Tensor, cache: KVCache) -> ExportedProgram:
    """The decode step over all of `cache`'s slots as an exported graph, its span symbolic."""
    k, v = [torch.zeros_like(t) for t in cache.k], [torch.zeros_like(t) for t in cache.v]
    S = torch.export.Dim("S", min=2, max=cache.max_len - 1)
    pos, span = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device), torch.empty(2)
    with torch.no_grad():
        return torch.export.export(
            _DecodeStep(model),
            (ids, pos, span, k, v),
            dynamic_shapes=({}, {}, {0: S}, [{}] * len(k), [{}] * len(v)),
        )


def _compile(
    exported: ExportedProgram, folder: str, path: str, key: str, problem: str | None
) -> Program:
    """Compile the step with AOTInductor; saved at `path` with its manifest when nothing stands
    in the way (`problem` None), else kept in memory for this process."""
    # a private (0700) folder, in the cache's when the result is kept there
    with tempfile.TemporaryDirectory(prefix=COMPILING, dir=None if problem else folder) as tmp:
        step = os.path.join(tmp, "step.pt2")
        # a copy of the options: AOTInductor adds its own keys to the dict it is given (and so to
        # the key)
        torch._inductor.aoti_compile_and_package(
            exported, package_path=step, inductor_configs=dict(COMPILE_OPTIONS)
        )
        if problem is None:
            try:
                digest = _sha256(step)
                os.replace(step, path)  # atomic: another process sees the whole file or none
                atomic_write_text(_manifest(path), json.dumps({"key": key, "sha256": digest}))
                log.info("saved the compiled decode step to %s", path)
                _prune(folder)
                return torch._inductor.aoti_load_package(path)
            except OSError as e:
                _warn_once(
                    f"the compiled-decode cache entry {path} cannot be written ({e.strerror}): "
                    "remove it (meanwhile the decode step is compiled once per process)"
                )
        _MEMORY[path, key] = program = torch._inductor.aoti_load_package(
            step if os.path.exists(step) else path
        )
        while len(_MEMORY) > PROGRAMS_KEPT:  # each holds its model's weights
            del _MEMORY[next(iter(_MEMORY))]
    return program


def _prune(folder: str) -> None:
    """Keep the PROGRAMS_KEPT most recently used programs in `folder`, with their manifests; remove
    what compiles killed a day ago or more left behind."""
    for left in glob.glob(os.path.join(folder, COMPILING + "*")):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(left) > 86400:
                shutil.rmtree(left)
    with contextlib.suppress(OSError):  # another process may be pruning too
        kept = glob.glob(os.path.join(folder, "*.pt2"))
        for f in sorted(kept, key=os.path.getmtime, reverse=True)[PROGRAMS_KEPT:]:
            os.remove(f)
            with contextlib.suppress(FileNotFoundError):
                os.remove(_manifest(f))
