"""What a checkpoint must match to be resumed: a flat dict of settings and data hashes, kept in
each checkpoint's config.json under "run". Resuming compares it key by key and names what changed.

Kept: the seed, the model config, the training settings that change the trajectory (batch size,
accumulation, lr and its schedule, optimizer), the tokenizer and data, and a stage's own section.
Left out: `train.steps` (training longer is a legitimate resume), and logging, evaluation,
checkpoint, thread, compile and non-finite-policy settings (they do not change the weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from zerolm.data.prepare import _inputs_fingerprint
from zerolm.data.sources import list_files
from zerolm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EXACT_TRAIN_KEYS = (
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "schedule",
    "decay_fraction",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
)
_HASHES = (
    "data.fingerprint",
    "data.shards",
    "tokenizer.sha256",
    "tokenizer.source",
)  # shown shortened


def flat(prefix: str, section) -> dict:
    """{'prefix.key': value} for a config dataclass (tuples as lists, so they compare after
    JSON)."""
    return {
        f"{prefix}.{k}": list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(section).items()
    }


def trainer_fingerprint(model_cfg, train_cfg) -> dict:
    """The model config and the training settings that decide the trajectory."""
    return {
        **flat("model", model_cfg),
        **{f"train.{k}": getattr(train_cfg, k) for k in EXACT_TRAIN_KEYS},
    }


def files_summary(paths) -> str:
    """'N file(s), B bytes, <hash of paths, sizes and mtimes>' of the files (or directories) named:
    what a stage reads, compared by the rule `prepare` uses to decide to rebuild."""
    files = []
    for p in map(Path, paths):
        files += (
            sorted(f for f in p.rglob("*") if f.is_file())
            if p.is_dir()
            else [p]
            if p.is_file()
            else []
        )
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:8]
    return f"{len(files)} file(s), {sum(s[1] for s in stats)} bytes, {digest}"


def stage_fingerprint(cfg, tok=None, sections: tuple[str, ...] = ()) -> dict:
    """The seed, the tokenizer's sha and the named config sections (e.g. 'sft', 'lora') of a stage,
    with the files each section reads (its data, val_data, source and target)."""
    fp = {"seed": cfg.seed}
    if tok is not None:
        fp["tokenizer.sha256"] = tok.sha256
    for name in sections:
        section = getattr(cfg, name)
        fp.update(flat(name, section))
        for key in ("data", "val_data", "source", "target"):
            if paths := getattr(section, key, None):
                fp[f"{name}.{key}.files"] = files_summary(
                    [paths] if isinstance(paths, str) else paths
                )
    return fp


def pretrain_data_fingerprint(cfg) -> dict:
    """The inputs of `prepare`, computable before it runs: prepare rebuilds the tokenizer and shards
    when these change, so a resume must compare them first."""
    files = list_files(cfg.data.inputs)
    fp = {
        "seed": cfg.seed,
        **flat("data", cfg.data),
        "data.fingerprint": _inputs_fingerprint(cfg.data),
        "data.files": f"{len(files)} file(s), {sum(f.stat().st_size for f in files)} bytes",
        **flat("tokenizer", cfg.tokenizer),
    }
    if cfg.tokenizer.path:
        fp["tokenizer.source"] = Tokenizer.load(cfg.tokenizer.path).sha256
    return fp


def read_fingerprint(checkpoint: str | Path) -> dict | None:
    """The fingerprint a checkpoint recorded (None: written before zerolm kept one)."""
    path = Path(checkpoint) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")).get("run") if path.is_file() else None


def _show(key: str, value) -> str:
    return value[:8] if key in _HASHES and isinstance(value, str) else repr(value)


def changes(saved: dict, current: dict) -> list[str]:
    """'KEY changed A -> B' for every key both record with different values."""
    keys = [k for k in current if k in saved and saved[k] != current[k]]
    if "data.fingerprint" in keys and any(
        k.startswith("data.") and k != "data.fingerprint" for k in keys
    ):
        keys.remove(
            "data.fingerprint"
        )  # hashes what the named data setting or file count says better
    return [
        f"{k} changed {_show(k, saved[k])} -> {_show(k, current[k])}"
        + (
            " (input files modified, or a bundled corpus changed)"
            if k == "data.fingerprint"
            else ""
        )
        for k in keys
    ]


def check_resume(checkpoint: str | Path, current: dict, allow: bool) -> list[str]:
    """Compare `current` with what `checkpoint` recorded. A change raises ValueError naming it,
    unless `allow` (train.resume_changed): then it is logged and returned, to be recorded."""
    saved = read_fingerprint(checkpoint)
    if saved is None:
        log.warning(
            "%s records no run fingerprint (an older zerolm): resuming without checking that the "
            "data and settings are unchanged",
            checkpoint,
        )
        return []
    found = changes(saved, current)
    if found and not allow:
        raise ValueError(
            f"cannot resume from {checkpoint}: {'; '.join(found)}. Resume with the run's own data "
            "and settings, train into a new --out, or continue anyway with --resume-changed "
            "(--train.resume_changed=true)"
        )
    if found:
        log.warning(
            "resuming from %s although %s (train.resume_changed)", checkpoint, "; ".join(found)
        )
    return found
