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


def test_export_gguf_carries_the_chat_template_option(bundle, tmp_path):
    """export -o x.gguf --chat-template NAME writes that template as tokenizer.chat_template; none writes none."""
    from edgeseq.chat_template import NAMES
    from edgeseq.gguf_file import GGUFFile

    ckpt = bundle.parent / "ckpt"
    for name in ("chatml", "none"):
        out = tmp_path / f"{name}.gguf"
        r = cli("export", ckpt, "-o", out, "--chat-template", name)
        assert r.returncode == 0, r.stderr
        with GGUFFile(str(out)) as g:
            got = g.get("tokenizer.chat_template")
        assert got == (NAMES["chatml"]["jinja"] if name == "chatml" else None), name


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


def test_eval_bar_counts_tokens_of_max_tokens(bundle, tmp_path):
    """eval --max-tokens N: the bar's total is N tokens and it advances by the tokens scored (through the
    prefill_all graph, or step by step for engines without it); the scores are the plain evaluation's."""
    import io

    import numpy as np
    import pexpect
    from tqdm import tqdm

    import edgeseq
    from edgeseq.cli import _Counted
    from edgeseq.quant.evaluate import evaluate_text

    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 30)
    m = edgeseq.load(bundle, threads=1)
    for n in (300, 10_000):  # cut short, and a text shorter than N (the bar stops at the text's end)
        want = evaluate_text(m, str(text), chunk=50, max_tokens=n)
        bar = tqdm(total=n, file=io.StringIO(), disable=False)
        assert evaluate_text(_Counted(m, bar.update), str(text), chunk=50, max_tokens=n) == want
        assert bar.n == want["tokens"] == min(n, want["tokens"])

    class StepOnly:  # a session without the prefill_all graph, as llama.cpp's
        def __init__(self, s):
            self.step = s.step

    class StepModel:
        tokenizer = m.tokenizer

        def session(self):
            return StepOnly(m.session())

    bar = tqdm(total=120, file=io.StringIO(), disable=False)
    got = evaluate_text(_Counted(StepModel(), bar.update), str(text), chunk=50, max_tokens=120)
    want = evaluate_text(m, str(text), chunk=50, max_tokens=120)
    assert bar.n == got["tokens"] == 120 and np.isclose(got["nll"], want["nll"], rtol=1e-4)
    # at a terminal the bar shows: of N tokens, not of the file's bytes
    env = {**os.environ, "EDGESEQ_MODEL": "", "COLUMNS": "100"}
    p = pexpect.spawn(sys.executable, ["-m", "edgeseq", "eval", str(bundle), "--text", str(text), "-n", "300",
                                       "--threads", "1"], env=env, encoding="utf-8", timeout=120)
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0, p.before
    assert "/300 [" in p.before and "tok" in p.before and "tokens 300 " in p.before
    assert f"/{text.stat().st_size}" not in p.before


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
