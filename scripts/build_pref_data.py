"""Build the bundled preference pairs in ``zerolm/data/prefs/`` (a packaging-time tool).

Its outputs are committed, so nothing here runs when zerolm is installed or used, and nothing is
fetched at run time. Source: the four ``task.json`` files of BIG-bench's ``hhh_alignment`` task
(Anthropic's helpful / honest / harmless evaluation, Askell et al. 2021), as shipped in the PyPI
sdist ``bigbench==1.0.0`` (Apache-2.0). Only those files are read.

Each example is ``{"input": prompt, "target_scores": {response: 1, response: 0}}``; it becomes
``{"prompt": input, "chosen": the response scored 1, "rejected": the one scored 0,
"source": "hhh_alignment/<subset>", "id": "<subset>-<index>"}``. Text is kept as is (stripped of
surrounding whitespace only). An example without exactly one 1 and one 0 is an error.

    python scripts/build_pref_data.py [--sdist bigbench-1.0.0.tar.gz]   # default: pip download it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "zerolm" / "data" / "prefs"
SUBSETS = ("harmless", "helpful", "honest", "other")
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/{}/task.json"


def convert(task: dict, subset: str) -> list[dict]:
    rows = []
    for i, ex in enumerate(task["examples"]):
        scores = ex["target_scores"]
        good = [r for r, s in scores.items() if s == 1]
        bad = [r for r, s in scores.items() if s == 0]
        if len(good) != 1 or len(bad) != 1 or len(scores) != 2:
            raise ValueError(
                f"{subset} example {i}: expected one response scored 1 and one scored 0, "
                f"got {scores}"
            )
        rows.append(
            {
                "prompt": ex["input"].strip(),
                "chosen": good[0].strip(),
                "rejected": bad[0].strip(),
                "source": f"hhh_alignment/{subset}",
                "id": f"{subset}-{i}",
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", help="path of bigbench-1.0.0.tar.gz (default: pip download it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else None
        if sdist is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "bigbench==1.0.0",
                    "-d",
                    tmp,
                ],
                check=True,
            )
            sdist = Path(tmp) / "bigbench-1.0.0.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        rows, canary = [], None
        with tarfile.open(sdist) as tar:
            for subset in SUBSETS:
                task = json.load(tar.extractfile(MEMBER.format(subset)))
                canary = canary or task.get("canary")
                rows += convert(task, subset)
    OUT.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    (OUT / "hhh.jsonl.xz").write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    counts = {s: sum(r["source"].endswith(s) for r in rows) for s in SUBSETS}
    (OUT / "LICENSES.md").write_text(
        f"""# Bundled preference pairs: provenance and licence

`hhh.jsonl.xz` is built at packaging time by `scripts/build_pref_data.py` and committed; nothing is
downloaded at run time. UTF-8 JSON Lines, xz-compressed; each line is
`{{"prompt", "chosen", "rejected", "source", "id"}}`. Read it with
`zerolm.data.prefs.read_builtin_pairs("hhh")`.

## `hhh.jsonl.xz`: human-written chosen/rejected pairs (English), {len(rows)} pairs

- **Source:** the `hhh_alignment` task of BIG-bench (helpful, honest and harmless responses,
  written by Anthropic; Askell et al. 2021, "A General Language Assistant as a Laboratory for
  Alignment"), files \
`bigbench/benchmark_tasks/hhh_alignment/{{harmless,helpful,honest,other}}/task.json`
  of the PyPI sdist `bigbench==1.0.0` (sha256 `{digest}`). Only those four files are used.
- **Counts:** {", ".join(f"{k} {v}" for k, v in counts.items())}.
- **Conversion:** prompt = `input`; chosen / rejected = the response scored 1 / 0 in \
`target_scores`;
  whitespace around each text stripped, nothing else changed.
- **Licence:** Apache License 2.0 (the licence of the BIG-bench repository, google/BIG-bench); its
  text is in `LICENSE-APACHE-2.0.txt` beside this file. Copyright the BIG-bench authors.
- **Note from the source:** the task files carry the canary string "{canary}": the BIG-bench
  authors ask that benchmark data not be used in training corpora. zerolm uses these pairs for
  preference training as its issue tracker asks; do not report BIG-bench hhh_alignment scores of a
  model aligned on them.
""",
        encoding="utf-8",
    )
    print(f"wrote {len(rows)} pairs to {OUT / 'hhh.jsonl.xz'}", file=sys.stderr)


if __name__ == "__main__":
    main()
