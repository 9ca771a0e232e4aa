"""The benchmark harness (benchmarks/harness, run as benchmarks/bench.py): one round of the edgeseq system
on a tiny shape writes a valid results file, and `compare` prints ratios of two such files (and of two
systems of one file: the harness's own edgeseq run a second time as `edgeseq@twin`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("bench")
    out = []
    for name, twin in (("a", ["--edgeseq-python", sys.executable, "--edgeseq-label", "twin"]), ("b", [])):
        f = d / f"{name}.json"
        bench("run", "--models", "rwkv7-tiny", "--systems", "edgeseq", *twin, "--rounds", "1", "--decode", "8",
              "--prefill", "16", "--threads", "1", "--work", str(d / "work"), "--out", str(f))
        out.append(f)
    return out


def test_run_writes_results(results):
    r = json.loads(results[0].read_text())
    assert r["machine"]["nproc"] >= 1 and r["git"]["commit"]
    assert r["models"]["rwkv7-tiny"]["family"] == "rwkv7"
    assert {x["system"] for x in r["runs"]} == {"edgeseq", "edgeseq@twin"}
    for run in r["runs"]:
        assert "error" not in run, run["error"]
        assert run["decode_tps"] > 0 and run["prefill_tps"] > 0
        assert run["peak"] >= run["mem_load"]["rss"] >= run["mem_imports"]["rss"] > 0
        assert run["mem_256"]["rss"] > 0 and set(run["canary"]) == {"prefill", "decode"}
        assert isinstance(run["contended"], bool) and 0 <= run["canary"]["decode"]["foreign"]
    rows = {row["system"]: row for row in r["summary"]}
    assert rows["edgeseq"]["decode_tps"]["n"] == 1 and rows["edgeseq"]["rounds"] == 1


def test_compare_two_files(results):
    out = bench("compare", *map(str, results)).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("| rwkv7-tiny")]
    assert len(rows) == 1 and "edgeseq → edgeseq" in rows[0]
    assert all("×" in ln for ln in rows) and "bootstrap" in out


def test_compare_systems_of_one_file(results):
    out = bench("compare", str(results[0])).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("| rwkv7-tiny")]
    assert len(rows) == 1 and "edgeseq@twin → edgeseq" in rows[0] and "per-round" in out
