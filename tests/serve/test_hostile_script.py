"""bench/hostile.py --quick against a real `zerolm serve` subprocess on 127.0.0.1 (issue 18's
acceptance): one run of the script, then each section's verdict from its JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # one ~1 min run of the whole script, shared by the tests below


@pytest.fixture(scope="module")
def report(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "bench/hostile.py", "--quick", "--model", str(model_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1])


def brief(section: dict) -> str:
    return json.dumps({k: v for k, v in section.items() if k != "table"}, ensure_ascii=False)[:3000]


def test_report_shape(report):
    assert set(report) >= {
        "machine",
        "poison",
        "fuzz",
        "schemathesis",
        "streams64",
        "big_prompt",
        "slow_clients",
        "shutdown",
        "all_ok",
    }
    assert (
        report["machine"]["cores"] >= 1
        and report["machine"]["torch"]
        and len(report["machine"]["loadavg_end"]) == 3
    )
    assert report["all_ok"] == all(
        report[s]["ok"] for s in report if isinstance(report[s], dict) and "ok" in report[s]
    )


def test_poison_gets_4xx_or_a_defined_200_and_live_generations_stay_intact(report):
    p = report["poison"]
    assert p["poison_5xx"] == 0 and p["all_intact"] and p["ok"], brief(p)
    assert all(v["live_intact"] == 8 and v["well_defined"] for v in p["variants"]), brief(p)


def test_fuzz_table_has_no_5xx_and_every_canary_succeeds(report):
    f = report["fuzz"]
    assert f["fuzz_cases"] >= 60 and f["fuzz_5xx"] == 0 and f["canaries_ok"] == f["fuzz_cases"], (
        brief(f)
    )
    assert f["expectations_failed"] == [], brief(
        f
    )  # the statuses issue 18 names: 400, 401, 405 + Allow, 413


def test_schemathesis_finds_no_server_error(report):
    s = report["schemathesis"]
    assert s["examples"] > 0 and s["st_5xx"] == 0 and s["ok"], brief(s)


def test_concurrent_streams_equal_their_solo_runs(report):
    s = report["streams64"]
    assert s["equal"] == s["streams"] and s["ok"], brief(s)


def test_a_1mib_prompt_does_not_stall_other_streams(report):
    b = report["big_prompt"]
    assert b["big_status"] is not None and 400 <= b["big_status"] < 500, brief(b)
    # the acceptance figure (< 50 ms, the bench's "ok") is for an idle machine; the suite shares 2
    # busy cores, so the test's bound only guards against the old stall (1.2 s: the prompt
    # tokenized on the event loop)
    assert b["max_gap_ms"] < 300, brief(b)


def test_slow_clients_past_the_fd_limit_leave_probes_answered(report):
    s = report["slow_clients"]
    assert s["probes_answered"] == s["probes"] and s["log_bytes"] < 1_000_000 and s["ok"], brief(s)


def test_sigterm_ends_the_server_despite_clients_that_never_read(report):
    s = report["shutdown"]
    assert not s["killed"] and s["ok"], brief(s)
