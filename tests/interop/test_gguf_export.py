"""GGUF export (zerolm/interop/gguf_export.py) read back by two independent readers of the same
file: transformers' GGUF loader (logits within 1e-4 for f32, 2e-2 for f16) and llama.cpp's own
tools (the same greedy continuation as `zerolm generate --temperature 0`; q8_0 and q4_0 decode, with
their mean KL to the f32 export printed). Bad input is a one-line error that leaves no file."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

import pytest
import torch

from zerolm.cli import main
from zerolm.config import LoRAConfig, TrainConfig
from zerolm.interop.gguf_export import export_gguf
from zerolm.interop.gguf_tokenizer import llama_cpp_adds
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
# top-1 minus top-2 logit a compared greedy step must have: f32 engines differ by ~1e-4 logits
# (more on gpt2: llama.cpp's GELU is an f16 table), so a lead this large cannot flip
MARGIN = {"tiny": 1.0, "smollm2": 0.1}
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


def _as_stored(model, dtype: str):
    """The model with the values the `dtype` file stores: matrices rounded to f16, the rest f32."""
    if dtype == "f32":
        return model
    rounded = copy.deepcopy(model)
    for p in rounded.parameters():
        if p.dim() >= 2:
            p.data = p.data.half().float()
    return rounded


@torch.no_grad()
def _round_trip(model, tok, tmp_path: Path) -> dict[str, float]:
    """Max |logit difference| between transformers' reading of the f32 and f16 exports and zerolm
    on the weights each file stores (the f16 file's distance to the f32 weights is printed too)."""
    ids, diffs = _ids(model.cfg.vocab_size), {}
    want = model(ids)
    for dtype in TOL:
        path = export_gguf(model, tmp_path / f"m-{dtype}.gguf", tok, dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32
        ).eval()
        got = hf(ids).logits
        diffs[dtype] = (got - _as_stored(model, dtype)(ids)).abs().max().item()
        diffs[f"{dtype} vs f32 weights"] = (got - want).abs().max().item()
    print(f"max logit difference: {diffs}")
    return diffs


def _check(diffs: dict[str, float]) -> None:
    assert all(diffs[d] <= TOL[d] for d in TOL), diffs


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_trained_models_round_trip_through_transformers(trained, preset, tmp_path):
    path = trained(preset)
    diffs = _round_trip(load_model(path), Tokenizer.load(path), tmp_path)
    _check(diffs)
    # for these small models the f16 file is within 2e-2 of the f32 model itself, too (SmolLM2's
    # 30 layers of f16 rounding move its logits by ~0.14: there only the stored weights compare)
    assert diffs["f16 vs f32 weights"] <= TOL["f16"], diffs


@pytest.mark.slow
@pytest.mark.parametrize("arch,config", [("qwen2", {}), ("qwen3", dict(head_dim=128))])
def test_imported_qwen_models_round_trip(hf_decoder, arch, config, tmp_path):
    """Qwen2 (q/k/v biases, NEOX rope) and Qwen3 (q/k norms; transformers' reader assumes
    head_dim 128, so that is what this one has: key_length != d_model/n_heads is exercised).
    Tensors only: the tokenizer's part is the trained models' and SmolLM2's."""
    model = import_hf(hf_decoder(arch, **config), tmp_path / "z")
    with torch.no_grad():  # transformers initialises norms to ones, biases to zeros: perturb them
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    _check(_round_trip(model, None, tmp_path))  # tensors only: SmolLM2's vocabulary is slow to read


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


# ------------------------------------------------------------------ llama.cpp


HELD_OUT = (  # other orders and mixes of the training text's words: not a training document
    "疑是地上霜，举头望明月。低头思故乡，床前明月光。更上一层楼，欲穷千里目。"
    "How are you? The lazy dog jumps over the quick brown fox. Thank you, I am fine today! "
) * 6


@torch.no_grad()
def _safe_steps(model, tok: Tokenizer, prompt: str, n: int, margin: float) -> int:
    """How many greedy steps (up to n, or to the first stop token) have a top-1 lead of at least
    `margin` logits: there no engine's rounding can change the choice."""
    ids = tok.completion_ids([prompt])[0]
    for step in range(n):
        top = model(torch.tensor([ids]))[0, -1].topk(2)
        if (top.values[0] - top.values[1]).item() < margin:
            return step
        ids.append(int(top.indices[0]))
        if ids[-1] in tok.stop_ids:
            return step + 1
    return n


def _llama_simple(bin_dir: Path, gguf: Path, prompt: str, n: int) -> str:
    """llama.cpp's greedy continuation: its simple example (greedy sampler, no warm-up, no chat),
    stdout = the prompt's tokens (special ones included) and the generated text."""
    cmd = [str(bin_dir / "llama-simple"), "-m", str(gguf), "-n", str(n), prompt]
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-1500:]
    return r.stdout.decode("utf-8").removesuffix("\n")


def _zerolm_generate(model_dir: Path, prompt: str, n: int, capsys) -> str:
    argv = ["generate", "--model", str(model_dir), "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", str(n), prompt]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def _same_greedy(llama_cpp, model_dir: Path, gguf: Path, prompts, n: int, margin: float, capsys):
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    compared = 0
    for prompt in prompts:
        steps = _safe_steps(model, tok, prompt, n, margin)
        if steps == 0:
            continue
        ours = _zerolm_generate(model_dir, prompt, steps, capsys)
        head = tok.completion_ids([prompt])[0][: -len(tok.encode(prompt))]
        bos, add_bos, _ = llama_cpp_adds(tok)
        added = [bos] if add_bos else []
        assert head[: len(added)] == added
        # what zerolm puts before a text and llama.cpp does not add (zerolm's <|eos|>) is typed
        typed = "".join(tok.token_str(i) for i in head[len(added) :])
        theirs = _llama_simple(llama_cpp, gguf, typed + prompt, steps)
        # llama.cpp prints the prompt's tokens, the special ones included
        assert theirs == "".join(tok.token_str(i) for i in head) + ours, (prompt, steps)
        compared += steps
    print(f"{model_dir.name}: {compared} greedy tokens compared (steps with a lead >= {margin})")
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_llama_cpp_continues_trained_models_as_zerolm_does(llama_cpp, trained, preset, capsys):
    path = trained(preset)
    gguf = export_gguf(
        load_model(path), path.parent / f"{preset}.gguf", Tokenizer.load(path), "f32"
    )
    compared = _same_greedy(llama_cpp, path, gguf, PROMPTS, 16, MARGIN["tiny"], capsys)
    assert compared >= 25  # the margins hold for (nearly) the whole continuations


@pytest.mark.slow
def test_llama_cpp_continues_smollm2_as_zerolm_does(llama_cpp, smollm2_hf, tmp_path, capsys):
    prompts = ["The capital of France is", "中国的首都是", "Water boils at", "一年有", "Once upon"]
    model = import_hf(smollm2_hf, tmp_path / "z")
    gguf = export_gguf(model, tmp_path / "smol.gguf", Tokenizer.load(tmp_path / "z"), "f32")
    compared = _same_greedy(llama_cpp, tmp_path / "z", gguf, prompts, 12, MARGIN["smollm2"], capsys)
    assert compared >= 15


def _mean_kl(bin_dir: Path, base: Path, gguf: Path) -> float:
    """llama-perplexity's mean KL to `base`. Its logger can drop its last lines at exit (a
    worker thread, never joined: llama.cpp issue 22142), so a run without them is repeated."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "--kl-divergence-base", str(base)]
    for _ in range(10):  # a loaded machine drops them more often: 5 were seen to fail
        r = subprocess.run([*cmd, "--kl-divergence"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-1500:]
        lines = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Mean    KLD:")]
        if lines:
            return float(lines[0].split()[2])
    raise AssertionError(f"no 'Mean KLD' line in 10 runs: {(r.stdout + r.stderr)[-1500:]}")


@pytest.mark.slow
def test_llama_cpp_runs_q8_0_and_q4_0_exports(llama_cpp, trained, tmp_path):
    path = trained("llama")
    model, tok = load_model(path), Tokenizer.load(path)
    files = {
        d: export_gguf(model, tmp_path / f"m-{d}.gguf", tok, d) for d in ("f32", "q8_0", "q4_0")
    }
    (tmp_path / "held_out.txt").write_text(HELD_OUT, encoding="utf-8")
    base = tmp_path / "f32.kld"
    cmd = [str(llama_cpp / "llama-perplexity"), "-m", str(files["f32"]), "-c", "64"]
    cmd += ["-f", str(tmp_path / "held_out.txt"), "--kl-divergence-base", str(base)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    kl = {d: _mean_kl(llama_cpp, base, files[d]) for d in ("q8_0", "q4_0")}
    sizes = {d: f.stat().st_size for d, f in files.items()}
    print(f"mean KL to the f32 export on held-out text: {kl}; bytes: {sizes}")
    assert all(0 <= v < float("inf") for v in kl.values()) and kl["q8_0"] < kl["q4_0"]
    for d in ("q8_0", "q4_0"):  # they decode: the prompt comes back with a continuation
        assert len(_llama_simple(llama_cpp, files[d], PROMPTS[0], 8)) > len(PROMPTS[0])
