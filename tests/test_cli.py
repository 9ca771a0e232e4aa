"""The command line end to end: export, inspect, run, chat, bench, eval, and its errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
make_demo_model = load_script(ROOT / "examples" / "make_demo_model.py")


def cli(*args, input=None, cwd=None):
    env = {**os.environ, "EDGESEQ_MODEL": ""}
    return subprocess.run([sys.executable, "-m", "edgeseq.cli", *map(str, args)], input=input, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_demo_model.main(str(d / "ckpt"), d=64, layers=2, heads=2, head_dim=64, d_state=16)
    r = cli("export", d / "ckpt", "-o", d / "bundle")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    return d / "bundle"


def test_inspect_lists_state(bundle):
    r = cli("inspect", bundle)
    assert r.returncode == 0, r.stderr
    assert "mamba2" in r.stdout
    assert "past_key_values.1.recurrent_state" in r.stdout
    assert "['batch', 2, 16, 64]" in r.stdout


def test_run_streams_and_reports(bundle):
    r1 = cli("run", bundle, "--prompt", "Hello", "--max-tokens", "12", "--seed", "3", "--temperature", "0.9",
             "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--threads", "1")
    r2 = cli("run", bundle, "--prompt", "Hello", "--max-tokens", "12", "--seed", "3", "--temperature", "0.9",
             "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--threads", "1")
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout.startswith("Hello")
    assert r1.stdout == r2.stdout  # seeded sampling is reproducible
    assert "decode 12 tok" in r1.stderr and "tok/s" in r1.stderr and "peak RSS" in r1.stderr


def test_chat_commands_and_state_carry(bundle, tmp_path):
    state = tmp_path / "s.state"
    script = f"hello\n/save {state}\nagain\n/load {state}\n/reset\n/quit\n"
    r = cli("chat", bundle, "-n", "4", "--seed", "0", input=script)
    assert r.returncode == 0, r.stderr
    assert "plain continuation" in r.stderr
    assert "[saved state at position" in r.stdout and state.exists()
    assert "[loaded state at position" in r.stdout and "[state reset]" in r.stdout


def test_bench_and_eval(bundle, tmp_path):
    r = cli("bench", bundle, "--threads", "1", "--prompt-tokens", "32", "--decode-tokens", "8")
    assert r.returncode == 0, r.stderr
    for key in ("prefill", "decode", "state", "peak RSS"):
        assert key in r.stdout
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)
    r = cli("eval", bundle, "--text", text, "--chunk", "50")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout


def test_errors_exit_nonzero_and_write_nothing(bundle, tmp_path):
    r = cli("export", tmp_path / "missing", "-o", tmp_path / "out")
    assert r.returncode == 1 and "error:" in r.stderr and "missing" in r.stderr
    assert not (tmp_path / "out").exists()
    before = sorted(os.listdir(bundle))
    r = cli("export", bundle.parent / "ckpt", "-o", bundle)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert sorted(os.listdir(bundle)) == before
    r = cli("export", bundle.parent / "ckpt", "-o", tmp_path / "q", "--quant", "int3")
    assert r.returncode == 1 and "int3" in r.stderr
    r = cli("run", tmp_path / "nope", "--prompt", "x")
    assert r.returncode == 1 and "no such file" in r.stderr
    # with no MODEL the shipped demo model runs: tests/test_demo_models.py
    assert [p for p in os.listdir(tmp_path) if p.startswith(".edgeseq-export")] == []
