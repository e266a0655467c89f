"""File modes: everything zerolm writes ends with the umask's usual mode (0644/0755 under umask
022), not tempfile's or safetensors' private 0600/0700. Each job runs in a subprocess with its own
umask, so the test process's umask is never touched."""

import json
import os
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run_under_umask(umask: int, script: str, cwd: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert r.returncode == 0, r.stderr[-3000:]


def modes(root: Path) -> dict[str, str]:
    """'f'/'d' + octal permission bits of everything under root, by relative path."""
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("d" if stat.S_ISDIR(st.st_mode) else "f") + oct(
            stat.S_IMODE(st.st_mode)
        )
    return out


def assert_modes(root: Path, file_mode: int, dir_mode: int) -> None:
    found = modes(root)
    want = {"d": "d" + oct(dir_mode), "f": "f" + oct(file_mode)}
    wrong = {k: v for k, v in found.items() if v != want[v[0]]}
    assert found and not wrong, wrong


@pytest.mark.slow
def test_a_whole_job_under_umask_022_writes_0644_files_and_0755_directories(tmp_path):
    """prepare -> 2-step pretrain (checkpoint, model, tokenizer, log, config) -> HF export ->
    import."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5))) for _ in range(40)]
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(words, k=30))}) + "\n" for _ in range(60))
    )
    out = tmp_path / "out"
    run_under_umask(
        0o022,
        f"""
        from zerolm.cli import main
        from zerolm.interop.hf import export_hf
        from zerolm.model import load_model
        from zerolm.tokenizer import Tokenizer
        out = {str(out)!r}
        tiny = ["--tokenizer.vocab_size=300", "--tokenizer.min_frequency=1", "--data.dedup=none"]
        assert main(["prepare", "docs.jsonl", "--out", out + "/prep", "--quiet", *tiny]) == 0
        assert main(["pretrain", "docs.jsonl", "--out", out + "/run", "--quiet", *tiny,
                     "--model.preset=llama", "--model.d_model=16", "--model.n_layers=1",
                     "--model.n_heads=2", "--model.max_seq_len=64",
                     "--train.steps=2", "--train.batch_size=2", "--train.eval_batches=1"]) == 0
        tok = Tokenizer.load(out + "/run/model")
        export_hf(load_model(out + "/run/model"), out + "/hf", tok)
        assert main(["import", out + "/hf", "--out", out + "/imported"]) == 0
        tok.save(out + "/tok")
    """,
        tmp_path,
    )
    found = modes(out)
    for must in (
        "run/model/model.safetensors",
        "run/model/config.json",
        "run/model/tokenizer.json",
        "hf/model.safetensors",
        "imported/model.safetensors",
        "imported/tokenizer.json",
        "tok/tokenizer.json",
        "prep/shards",
        "run/train_log.jsonl",
    ):
        assert must in found, sorted(found)
    assert any("checkpoints/step-" in k and k.endswith("model.safetensors") for k in found), sorted(
        found
    )
    assert_modes(out, 0o644, 0o755)


def test_atomic_writes_follow_a_umask_of_027(tmp_path):
    run_under_umask(
        0o027,
        """
        import torch
        from safetensors.torch import save_file
        from zerolm.files import atomic_dir, atomic_write_text
        atomic_write_text("out/a/b.txt", "x")
        atomic_write_text("out/a/b.txt", "y")  # replacing keeps the mode too
        with atomic_dir("out/d") as tmp:
            # safetensors writes 0600 itself
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "c.json").write_text("{}")
    """,
        tmp_path,
    )
    assert (tmp_path / "out/a/b.txt").read_text() == "y"
    assert_modes(tmp_path / "out", 0o640, 0o750)
