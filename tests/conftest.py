import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import random

import pytest


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
        help="run the tests in reverse order (with -p no:randomly): the suite must not depend on its order",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Name the shuffled order's seed even under -q, so a failure that depends on the order can be replayed."""
    if config.pluginmanager.has_plugin("randomly") and not config.getoption("--reverse"):
        seed = config.getoption("randomly_seed", None)
        terminalreporter.write_line(f"test order: shuffled; replay it with --randomly-seed={seed}")
