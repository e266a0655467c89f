import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import random

import pytest

from zerolm.config import ModelConfig, TokenizerConfig
from zerolm.model import build_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.train import train_tokenizer

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


def pytest_addoption(parser):
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the tests in reverse order (with -p no:randomly): the suite must not depend on "
        "its order",
    )


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
