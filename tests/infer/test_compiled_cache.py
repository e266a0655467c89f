"""The compiled-decode cache trusts only what it wrote: a program is loaded only from a folder no
one else can write, and only if its manifest names this model's key and its file's sha256. Compiling
takes 20-60 s, so the tests share one compiled program (copied around) and compile as little as
possible."""

import json
import logging
import os
import shutil

import pytest
import torch

from zerolm.config import ModelConfig
from zerolm.infer.compiled import program_key, saved_program_problem
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.kv_cache import KVCache
from zerolm.infer.sampling import SamplingParams
from zerolm.model import build_model

pytestmark = pytest.mark.slow  # three compiles in all
PROMPT = [5, 6, 7, 8]
REQ = GenerateRequest(max_new_tokens=6, sampling=SamplingParams(temperature=0))


def tiny(seed):
    cfg = ModelConfig(preset="gpt2", d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    return build_model(cfg, vocab_size=61, seed=seed).eval()


def key_of(model):
    return program_key(model, 1, KVCache.for_model(model, 1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Model A and a private cache folder holding its compiled program (the one compile most tests
    share)."""
    folder = tmp_path_factory.mktemp("cache")
    folder.chmod(0o700)
    a = tiny(1)
    Engine(a, compile=True, program_dir=str(folder)).generate([PROMPT], REQ)
    assert sorted(p.name for p in folder.iterdir()) == [f"{key_of(a)}.json", f"{key_of(a)}.pt2"]
    return a, folder


def test_another_models_program_at_the_key_is_not_loaded_but_compiled_afresh(
    saved, tmp_path, caplog
):
    a, folder = saved
    b = tiny(2)
    assert Engine(a).generate([PROMPT], REQ) != Engine(b).generate(
        [PROMPT], REQ
    )  # A's program would show
    ka, kb = key_of(a), key_of(b)
    for ext in (".pt2", ".json"):  # A's program and manifest, planted at B's key
        shutil.copy(folder / f"{ka}{ext}", tmp_path / f"{kb}{ext}")
    engine = Engine(b, compile=True, program_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        assert engine.generate([PROMPT], REQ) == Engine(b).generate([PROMPT], REQ)
    assert engine.compiled and "could not load" in caplog.text and "another key" in caplog.text
    assert "loaded the compiled decode step" not in caplog.text
    assert json.loads((tmp_path / f"{kb}.json").read_text())["key"] == kb  # replaced by B's own
    assert saved_program_problem(str(tmp_path / f"{kb}.pt2"), kb) is None


def test_the_window_cache_is_reused_and_a_shorter_request_after_a_longer_gives_its_own(saved):
    a, folder = saved
    engine = Engine(a, compile=True, program_dir=str(folder))  # loads the program: no compile
    long, short = [9, 3, 7, 1, 4, 2, 8], [5]
    want = [Engine(a).generate([p], REQ) for p in (long, short, PROMPT)]
    assert [engine.generate([p], REQ) for p in (long, short, PROMPT)] == want
    cache = engine._spare[1]
    assert cache.max_len == a.cfg.max_seq_len and cache.lengths == [len(PROMPT) + 5]
    engine.generate([short], REQ)
    assert engine._spare[1] is cache  # the same tensors, not a new window per request


def test_a_changed_or_unlisted_program_fails_verification(tmp_path):
    path, key = tmp_path / "k.pt2", "k"
    path.write_bytes(b"a program")
    assert "no manifest" in saved_program_problem(str(path), key)
    (tmp_path / "k.json").write_text(json.dumps({"key": key, "sha256": "0" * 64}))
    assert "sha256" in saved_program_problem(str(path), key)
    (tmp_path / "k.json").write_text("[]")
    assert "manifest" in saved_program_problem(str(path), key)


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "another user's"])
def test_a_cache_folder_others_can_write_is_not_loaded_from(saved, tmp_path, caplog, how):
    a, folder = saved
    shared = tmp_path / "shared"
    shutil.copytree(folder, shared)
    if how == "another user's":
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(shared, os.getuid() + 4321, -1)
        shared.chmod(0o755)
    else:
        shared.chmod(0o770 if how == "group-writable" else 0o707)
    engine = Engine(a, compile=True, program_dir=str(shared))
    # probed with the real compiler (cached for the process)
    torch._inductor.cpu_vec_isa.pick_vec_isa()
    # with no C++ compiler the refusal costs no compile: not loading leaves eager decoding
    with (
        torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}),
        caplog.at_level(logging.INFO),
    ):
        assert engine.generate([PROMPT], REQ) == Engine(a).generate([PROMPT], REQ)
    assert "loaded the compiled decode step" not in caplog.text
    fix = "set ZEROLM_CACHE" if how == "another user's" else f"chmod go-w {shared}"
    assert fix in caplog.text and str(shared) in caplog.text


def test_an_unreplaceable_cache_entry_costs_one_compile_per_process(tmp_path, caplog):
    a = tiny(1)
    blocker = tmp_path / f"{key_of(a)}.pt2"
    blocker.mkdir()  # a directory at the program's path: os.replace cannot put a file there
    blocker.chmod(0o555)
    eager = Engine(a).generate([PROMPT], REQ)
    with caplog.at_level(logging.INFO):
        first = Engine(a, compile=True, program_dir=str(tmp_path))
        assert first.generate([PROMPT], REQ) == eager and first.compiled
        second = Engine(a, compile=True, program_dir=str(tmp_path))
        assert second.generate([PROMPT], REQ) == eager and second.compiled
    assert caplog.text.count("compiling the decode step for") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(blocker) in warnings[0] and "remove it" in warnings[0]
    assert blocker.is_dir()
