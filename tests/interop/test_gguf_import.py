"""`import_gguf` against transformers' GGUF loader on the same files: the real SmolLM2 Q4_1 file,
tiny random llama / qwen2 / qwen3 / gpt2 models converted by llama.cpp's own convert_hf_to_gguf.py
(the reference for llama's Q/K permutation), every tensor type the `gguf` package can quantize, and
the K-quants made by llama-quantize."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from zerolm.interop.gguf_import import import_gguf
from zerolm.interop.hf import import_hf
from zerolm.interop.hf_decoder import TO_HF, _to_hf_state
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # transformers loads, converter subprocesses
transformers = pytest.importorskip("transformers")
TEST_CACHE = Path(os.environ.get("ZEROLM_TEST_CACHE", Path.home() / ".cache" / "zerolm-test"))
LLAMA_CPP_SRC = TEST_CACHE / "llama.cpp-0.3.36" / "src"  # next to bin/ (scripts/build_llama_cpp.sh)
TEXTS = ["The capital of France is", "床前明月光，疑是地上霜。", "def f(x):\n    return x * 2"]
ARCHS = ("llama", "qwen2", "qwen3", "gpt2")


def hf_gguf(path: Path):
    """transformers' own GGUF reader on the file: the independent reference."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def max_logit_diff(model, ref, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids) - ref(ids).logits).abs().max())


def random_ids(vocab: int, n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# Runs llama.cpp's converter on a tiny HF model with SmolLM2's tokenizer. Two things it needs that
# are beside the point here: the sentencepiece module (imported even for BPE vocabularies) and a
# known hash of the tokenizer (ours is transformers' rebuild of SmolLM2's): it is told "smollm".
DRIVER = """import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
script, sys.argv = sys.argv[1] + "/convert_hf_to_gguf.py", sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def convert(tmp_path_factory):
    """convert(hf_dir, name) -> llama.cpp's convert_hf_to_gguf.py output (f32) for hf_dir."""
    if not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"no llama.cpp source at {LLAMA_CPP_SRC}: `bash scripts/build_llama_cpp.sh`")
    stub = tmp_path_factory.mktemp("stub")
    (stub / "sentencepiece.py").write_text("class SentencePieceProcessor: ...\n")
    (stub / "driver.py").write_text(DRIVER)
    made: dict = {}

    def run(hf_dir: Path, name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp("gguf") / f"{name}.gguf"
            env = {**os.environ, "PYTHONPATH": str(stub)}
            cmd = [sys.executable, stub / "driver.py", LLAMA_CPP_SRC, hf_dir, "--outtype", "f32"]
            cmd += ["--outfile", out]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
            made[name] = out
        return made[name]

    return run


@pytest.fixture(scope="module")
def tiny_llama(hf_decoder, convert):
    """A tiny random HF llama (rows of 256: every block size fits) and its converted GGUF."""
    hf_dir = hf_decoder("llama", hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    return hf_dir, convert(hf_dir, "tiny-llama")  # its own name: convert() caches by name


def requantize(src: Path, dst: Path, qtype: Q) -> Path:
    """src's model metadata and tensors, its block matrices quantized to qtype by the gguf package
    (the 49k-row embedding stays F32 and the tokenizer is left out, both slow to read and write
    and beside the point; SmolLM2's file has a Q8_0 embedding)."""
    reader = GGUFReader(src)
    meta = {k: f for k, f in reader.fields.items() if not k.startswith(("GGUF.", "tokenizer."))}
    writer = GGUFWriter(dst, arch=meta.pop("general.architecture").contents())
    for key, f in meta.items():
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub)
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if t.name.startswith("blk.") and w.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(t.name, quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def assert_matches_transformers(path: Path, arch: str, tol: float = 1e-4) -> float:
    """zerolm's import equals transformers' dequantised weights, and its logits are within tol."""
    model, ref = import_gguf(path), hf_gguf(path)
    cfg = model.cfg
    mine = _to_hf_state(arch, model, TO_HF[arch](cfg))
    theirs = {k: v for k, v in ref.state_dict().items() if k in mine}
    assert set(mine) - {"lm_head.weight"} <= set(theirs)
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k
    diff = max_logit_diff(model, ref, random_ids(cfg.vocab_size))
    print(f"{path.name}: max |logit diff| vs transformers {diff:.2e}")
    assert diff < tol
    return diff


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_models_match_transformers_and_the_hf_source(arch, hf_decoder, convert):
    """llama.cpp's converter writes the file (llama: Q/K rows permuted); the import gives the HF
    source's own logits back, and transformers' GGUF reader's."""
    # gpt2: the converter reads n_ctx; transformers' GGUF reader sizes wpe by its default 1024
    hf_dir = hf_decoder(arch, **(dict(n_ctx=1024, n_positions=1024) if arch == "gpt2" else {}))
    path = convert(hf_dir, arch)
    assert_matches_transformers(path, arch)
    ids = random_ids(import_hf(hf_dir).cfg.vocab_size, seed=1)
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    diff = max_logit_diff(import_gguf(path), source.eval(), ids)
    assert diff < 1e-4, diff


def test_llama3_rope_scaling_comes_back_from_rope_freqs(hf_decoder, convert, tmp_path):
    """The converter turns Llama 3's rope_scaling into a rope_freqs tensor (transformers' GGUF
    reader ignores it): the import reads it back, with the HF source's logits."""
    rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    rope |= dict(original_max_position_embeddings=8192, rope_type="llama3", rope_theta=500000.0)
    hf_dir = Path(shutil.copytree(hf_decoder("llama"), tmp_path / "llama3"))
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_scaling", None)
    config |= dict(rope_parameters=rope, rope_theta=rope["rope_theta"])
    (hf_dir / "config.json").write_text(json.dumps(config))
    model = import_gguf(convert(hf_dir, "llama3"))
    cfg = model.cfg
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len) == ("llama3", 8.0, 8192)
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    diff = max_logit_diff(model, source.eval(), random_ids(cfg.vocab_size, n=256))
    assert diff < 2e-5, diff  # without the scaling: 3e-4 (the low frequencies barely turn)


@pytest.mark.parametrize(
    "qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name
)
def test_every_tensor_type_the_package_quantizes(qtype, tiny_llama, tmp_path):
    path = requantize(tiny_llama[1], tmp_path / f"llama-{qtype.name}.gguf", qtype)
    blocks = {t.tensor_type for t in GGUFReader(path).tensors if t.name.endswith("_up.weight")}
    assert blocks == {qtype}
    assert_matches_transformers(path, "llama")


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"])
def test_k_quants_from_llama_quantize(qtype, tiny_llama, llama_cpp, tmp_path):
    """llama.cpp's own quantizer makes the K-quant file (the gguf package cannot)."""
    out = tmp_path / f"llama-{qtype}.gguf"
    if not (llama_cpp / "llama-quantize").is_file():
        pytest.skip(f"{llama_cpp} has no llama-quantize: rerun `bash scripts/build_llama_cpp.sh`")
    cmd = [llama_cpp / "llama-quantize", "--pure", tiny_llama[1], out, qtype]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    types = {t.tensor_type.name for t in GGUFReader(out).tensors if len(t.shape) == 2}
    assert types == {qtype}, types
    assert_matches_transformers(out, "llama")


# ------------------------------------------------------------------ the real SmolLM2 file


def zerolm(*args):
    cmd = [sys.executable, "-m", "zerolm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def imported(smollm2_gguf, tmp_path_factory):
    """(the zerolm model directory `zerolm import --from gguf` made, its stdout)."""
    out = tmp_path_factory.mktemp("smollm2-gguf") / "model"
    r = zerolm("import", "--from", "gguf", smollm2_gguf, "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )


def test_smollm2_import_is_fast_and_says_what_it_imported(imported):
    line = imported[1]
    assert line.count("\n") == 1 and "134,515,008 parameters" in line and "tied head" in line
    assert "9 heads / 3 kv, head_dim 64" in line and "chat template: the model's own" in line
    seconds = float(re.search(r" in ([\d.]+) s;", line).group(1))
    print(f"SmolLM2 Q4_1 GGUF import: {seconds:.1f} s")
    assert seconds < 30


def test_smollm2_logits_match_transformers_gguf_loader(imported, smollm2_gguf):
    tok = Tokenizer.load(imported[0])
    model, ref = load_model(imported[0]), hf_gguf(smollm2_gguf)
    worst = 0.0
    for text in TEXTS:
        worst = max(worst, max_logit_diff(model, ref, torch.tensor([tok.encode(text)])))
    print(f"SmolLM2 Q4_1: max |logit diff| vs transformers {worst:.2e}")
    assert worst < 1e-4


def test_smollm2_token_ids_are_transformers_gguf_tokenizer_ids(imported, hf_tok):
    tok = Tokenizer.load(imported[0])
    for text in [*TEXTS, "<|im_start|>user\nHi there!<|im_end|>\n", "  spaces\t\ttabs 12345"]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text


def test_smollm2_generate_continues_the_capital_of_france_with_paris(imported):
    r = zerolm(
        "generate", "--model", imported[0], "--temperature", "0", "--max-new-tokens", "4",
        "The capital of France is",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris"), r.stdout


def test_smollm2_chat_uses_the_gguf_chat_template(imported, hf_tok):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = zerolm(
        "chat", "--model", imported[0], "--prompt", question[0]["content"], "--temperature", "0",
        "--show-prompt",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = re.search(r"^prompt \((\d+) tokens\): (.*)$", r.stderr, re.M)
    want = hf_tok.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert shown is not None and json.loads(shown.group(2)) == want
    assert "<|im_start|>assistant\n" in want and "Paris" in r.stdout, r.stdout
