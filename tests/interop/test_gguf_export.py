"""GGUF export (zerolm/interop/gguf_export.py) read back by two independent readers of the same
file: transformers' GGUF loader (logits within 1e-4 for f32, 2e-2 for f16) and llama.cpp's own
tools (the same greedy continuation as `zerolm generate --temperature 0`; q8_0 and q4_0 decode, with
their mean KL to the f32 export printed). Bad input is a one-line error that leaves no file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from zerolm.cli import main
from zerolm.config import LoRAConfig, TrainConfig
from zerolm.interop.gguf_export import export_gguf
from zerolm.interop.hf import import_hf
from zerolm.model import load_model, save_model
from zerolm.tokenizer import Tokenizer
from zerolm.train.batches import Stream
from zerolm.train.losses import lm_loss
from zerolm.train.trainer import Trainer
from zerolm.transforms.lora import apply_lora

transformers = pytest.importorskip("transformers")

TOL = {"f32": 1e-4, "f16": 2e-2}
TEXT = [  # what the tokenizer and the models are trained on
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "Hello there! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
]
# prefixes of the training text, Chinese and English: the trained models continue them with wide
# margins (checked per step below), so no near-tie can flip a greedy choice between engines
PROMPTS = ["床前明月光，", "白日依山尽，", "Hello there! How", "The quick brown", "举头望明月，"]
MARGIN = 1.0  # top-1 minus top-2 logit; f32 engines differ by ~1e-5 here, f16 GELU tables ~1e-3
# transformers' GGUF reader takes GPT-2's positions from n_positions' default (1024), not the
# file's context_length: a gpt2 export it reads back must have max_seq_len 1024
SHAPES = {
    "llama": dict(d_model=64, n_kv_heads=2, max_seq_len=64),
    "gpt2": dict(d_model=64, max_seq_len=1024),
}


def _batches(tok: Tokenizer, seq: int = 48, batch: int = 16):
    stream = [i for t in TEXT for i in (tok.eos_id, *tok.encode(t))]
    data = torch.tensor(stream * 3)
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.stack(
            [data[s : s + seq + 1] for s in torch.randint(0, len(stream), (batch,), generator=g)]
        )
        yield x[:, :-1], x[:, 1:]


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_tokenizer, tmp_path_factory):
    """preset -> a zerolm model directory: 300 Trainer steps on TEXT (loss ~0.03)."""
    tok, root, made = tiny_tokenizer(texts=TEXT * 20), tmp_path_factory.mktemp("trained"), {}

    def make(preset: str) -> Path:
        if preset not in made:
            model = tiny_model(preset, vocab_size=tok.vocab_size, **SHAPES[preset])
            cfg = TrainConfig(steps=300, lr=3e-3, warmup_steps=20, precision="fp32")
            trainer = Trainer(
                model,
                cfg,
                root / f"run-{preset}",
                batches=Stream(_batches(tok)),
                loss_fn=lm_loss,
                progress=False,
            )
            for _ in range(cfg.steps):
                trainer.train_step()
            save_model(model.eval(), root / preset, tok)
            made[preset] = root / preset
        return made[preset]

    return make


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _round_trip(model, tok, tmp_path: Path) -> dict[str, float]:
    """Max |logit difference| of transformers' reading of the f32 and f16 exports, per dtype."""
    ids, diffs = _ids(model.cfg.vocab_size), {}
    want = model(ids)
    for dtype in TOL:
        path = export_gguf(model, tmp_path / f"m-{dtype}.gguf", tok, dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32
        ).eval()
        diffs[dtype] = (hf(ids).logits - want).abs().max().item()
    print(f"max logit difference: {diffs}")
    return diffs


def _check(diffs: dict[str, float]) -> None:
    assert all(diffs[d] <= TOL[d] for d in TOL), diffs


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_trained_models_round_trip_through_transformers(trained, preset, tmp_path):
    path = trained(preset)
    _check(_round_trip(load_model(path), Tokenizer.load(path), tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("arch,config", [("qwen2", {}), ("qwen3", dict(head_dim=128))])
def test_imported_qwen_models_round_trip(hf_decoder, arch, config, tmp_path):
    """Qwen2 (q/k/v biases, NEOX rope) and Qwen3 (q/k norms; transformers' reader assumes
    head_dim 128, so that is what this one has: key_length != d_model/n_heads is exercised)."""
    model = import_hf(hf_decoder(arch, **config), tmp_path / "z")
    with torch.no_grad():  # transformers initialises norms to ones, biases to zeros: perturb them
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    _check(_round_trip(model, Tokenizer.load(tmp_path / "z"), tmp_path))


@pytest.mark.slow
def test_smollm2_round_trip_and_q8_0_speed(smollm2_hf, tmp_path):
    model = import_hf(smollm2_hf, tmp_path / "z")
    tok = Tokenizer.load(tmp_path / "z")
    _check(_round_trip(model, tok, tmp_path))
    start = time.perf_counter()
    path = export_gguf(model, tmp_path / "q8.gguf", tok, "q8_0")
    seconds = time.perf_counter() - start
    print(f"SmolLM2 q8_0 export: {seconds:.1f} s, {path.stat().st_size:,} bytes")
    assert seconds < 30


# ------------------------------------------------------------------ bad input


def _refused(tmp_path: Path, model, match: str, dtype: str = "f16", tok=None) -> None:
    out = tmp_path / "bad" / "m.gguf"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=match) as e:
        export_gguf(model, out, tok, dtype)
    assert "\n" not in str(e.value)
    assert not any(out.parent.iterdir()), "a refused export left a file behind"


def test_bad_input_is_one_line_and_leaves_no_file(tiny_model, tmp_path):
    _refused(tmp_path, tiny_model("llama", d_model=40, n_heads=4), "blocks of 32", "q4_0")
    _refused(tmp_path, tiny_model("llama"), "unknown GGUF dtype 'q3_k'", "q3_k")
    window = tiny_model("llama", sliding_window=8)
    _refused(tmp_path, window, r"sliding_window=8 .*max_seq_len=64")
    yarn = tiny_model("llama", rope_scaling="yarn", rope_factor=2.0, rope_original_max_len=32)
    _refused(tmp_path, yarn, "rope_scaling='yarn'")
    lora = apply_lora(tiny_model("llama"), LoRAConfig(rank=2))
    _refused(tmp_path, lora, "merge LoRA adapters")
    _refused(tmp_path, tiny_model("simple"), "preset 'simple' to GGUF: llama.cpp runs")
    post = tiny_model("gpt2", norm_placement="post")
    _refused(tmp_path, post, r"norm_placement='post' \(needs 'pre'\)")
    _refused(tmp_path, tiny_model("bert"), "cannot export a bert model.*decoder-only")
    relu = tiny_model("gpt2", ffn="relu")
    _refused(tmp_path, relu, r"ffn='relu' \(needs 'gelu'\)")


def test_cli_writes_one_summary_line_or_one_error(trained, tmp_path, capsys):
    path = trained("llama")
    out = tmp_path / "m.gguf"
    argv = ["export", str(path), "--format", "gguf", "--dtype", "q8_0", "--out", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"{out.stat().st_size:,} bytes" in line
    assert "llama.cpp llama (q8_0)" in line and "tokenizer; chat template included" in line
    assert main([*argv[:5], "q5_k", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown --dtype 'q5_k'" in err
    assert not (tmp_path / "x.gguf").exists()


def test_cli_ollama_writes_gguf_and_modelfile(trained, tmp_path, capsys):
    out = tmp_path / "ollama"
    argv = ["export", str(trained("llama")), "--format", "ollama", "--out", str(out)]
    assert main(argv) == 0
    assert "Modelfile" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./model.gguf")
