"""prepare streams: peak memory grows with the number of documents kept, not with their text."""

import json
import random
import subprocess
import sys
import textwrap

import pytest


def _peak_rss_mb(tmp_path, name, n_docs, doc_words):
    src = tmp_path / f"{name}.jsonl"
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    with open(src, "w") as f:
        for i in range(n_docs):
            f.write(
                json.dumps({"text": f"{i} " + " ".join(rng.choices(words, k=doc_words))}) + "\n"
            )
    code = textwrap.dedent(f"""
        import resource
        from zerolm.config import load_config
        from zerolm.data.prepare import prepare
        cfg = load_config(None, {{"out_dir": {str(tmp_path / name)!r},
                                  "data": {{"inputs": [{str(src)!r}], "dedup": "exact"}},
                                  "tokenizer": {{"vocab_size": 1000}}}})
        prepare(cfg, progress=False)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip()), src.stat().st_size / 2**20


@pytest.mark.slow
def test_memory_does_not_grow_with_text_size(tmp_path):
    # same documents, 4x as many: every per-document working set is the same, only the total differs
    small, small_mb = _peak_rss_mb(tmp_path, "small", 100, 5000)  # ~3 MB of text
    large, large_mb = _peak_rss_mb(tmp_path, "large", 400, 5000)  # ~12 MB
    # holding the text (or its tokens) would add at least the difference in size
    assert large - small < 0.5 * (large_mb - small_mb), (small, large, small_mb, large_mb)
