"""`edgeseq eval` (quant/evaluate.py): perplexity and bits per byte streamed through the state, and the
CLI's --quant/--block-size on export. The reference: the same model's logits over the whole text in
one call, scored here with plain numpy."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.errors import EdgeseqError
from edgeseq.exporters.export import export
from edgeseq.quant.evaluate import compare_text, evaluate_text

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
V5 = FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"
TEXT = "Ünïcödé at the cut: ÀÉÎ — the quick brown fox\njumps over the lazy dog.\n" * 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "b"
    return edgeseq.load(export(str(V5), str(out)))


def _direct(model, data: bytes):
    ids = list(data)  # byte-level model
    lg = model.session().logits_all(ids[:-1]).astype(np.float64)
    lp = lg - lg.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    nll = -lp[np.arange(len(ids) - 1), ids[1:]].sum()
    return len(ids) - 1, nll


@pytest.mark.parametrize("piece,chunk", [(1 << 20, 256), (50, 7), (13, 64)])  # cuts inside characters, too
def test_streamed_equals_whole_text(model, tmp_path, piece, chunk):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    n, nll = _direct(model, TEXT.encode())
    r = evaluate_text(model, str(f), chunk=chunk, piece_bytes=piece)
    assert r["tokens"] == n and r["bytes"] == n  # byte-level: every predicted token is one byte
    assert abs(r["nll"] - nll) < 1e-6 * nll
    assert abs(r["ppl"] - math.exp(nll / n)) < 1e-6 * r["ppl"]
    assert abs(r["bpb"] - nll / math.log(2) / n) < 1e-6 * r["bpb"]


def test_max_tokens_counts_the_scored_bytes(model, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    n, nll = _direct(model, TEXT.encode()[:101])
    r = evaluate_text(model, str(f), chunk=30, max_tokens=100, piece_bytes=40)
    assert r["tokens"] == 100 and r["bytes"] == 100
    assert abs(r["nll"] - nll) < 1e-6 * nll


def test_bad_text_is_an_error(model, tmp_path):
    with pytest.raises(EdgeseqError, match="no such text file"):
        evaluate_text(model, str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe def")
    with pytest.raises(EdgeseqError, match="not UTF-8"):
        evaluate_text(model, str(bad))
    one = tmp_path / "one.txt"
    one.write_text("a")
    with pytest.raises(EdgeseqError, match="at least two tokens"):
        evaluate_text(model, str(one))


def _cli(*args):
    env = {**os.environ, "EDGESEQ_MODEL": ""}
    return subprocess.run([sys.executable, "-m", "edgeseq.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_cli_export_int4_and_eval(tmp_path):
    out = tmp_path / "b4"
    r = _cli("export", V5, "-o", out, "--quant", "int4", "--block-size", "64")
    assert r.returncode == 0, r.stderr
    m = edgeseq.load(str(out))
    assert m.manifest["quant"]["recipe"] == "int4" and m.manifest["quant"]["block_size"] == 64
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = _cli("eval", out, "--text", f, "--chunk", "40")
    assert r.returncode == 0, r.stderr
    fields = r.stdout.split()
    got = dict(zip(fields[0::2], fields[1::2]))
    want = evaluate_text(m, str(f))
    assert int(got["tokens"]) == want["tokens"] and abs(float(got["perplexity"]) - want["ppl"]) < 1e-3 * want["ppl"]
    assert abs(float(got["bits/byte"]) - want["bpb"]) < 1e-3
    r = _cli("export", V5, "-o", tmp_path / "bad", "--quant", "int4", "--block-size", "48")
    assert r.returncode == 1 and "--block-size 48" in r.stderr and not (tmp_path / "bad").exists()


def test_eval_of_a_gguf_equals_the_bundle(model, tmp_path):
    """`edgeseq eval` takes a GGUF file too (edgeseq.load of a .gguf: the GGUF runtime): the f32 GGUF
    of the same checkpoint scores the same text as its bundle."""
    gw = pytest.importorskip("edgeseq.exporters.gguf_writer")
    g = tmp_path / "m.gguf"
    gw.export_gguf(str(V5), str(g), quant="f32")
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    a = evaluate_text(edgeseq.load(str(g)), str(f), chunk=64)
    b = evaluate_text(model, str(f), chunk=64)
    assert a["tokens"] == b["tokens"] and abs(a["nll"] - b["nll"]) < 1e-5 * b["nll"]


def test_compare_text_scores_each_model_as_evaluate_text(model, tmp_path):
    """compare_text streams several models through a text at once: each one's perplexity is
    evaluate_text's, and the KL from the reference is 0 for the reference itself, positive and equal
    to numpy's for a quantized model."""
    q = edgeseq.load(export(str(V5), str(tmp_path / "int8"), quant="int8"))
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = compare_text({"f32": model, "int8": q}, str(f), chunk=64, piece_bytes=50)
    for name, m in (("f32", model), ("int8", q)):
        want = evaluate_text(m, str(f), chunk=64, piece_bytes=50)
        assert r[name]["tokens"] == want["tokens"] and r[name]["bytes"] == want["bytes"]
        assert abs(r[name]["nll"] - want["nll"]) < 1e-6 * want["nll"]
    ids = list(TEXT.encode("utf-8"))

    def logp(m):  # 64 tokens a call through one session, as compare_text feeds them
        s = m.session()
        lg = np.concatenate([s.logits_all(ids[a:min(a + 64, len(ids) - 1)]) for a in range(0, len(ids) - 1, 64)])
        lg = lg.astype(np.float64) - lg.max(-1, keepdims=True)
        return lg - np.log(np.exp(lg).sum(-1, keepdims=True))

    r = compare_text({"f32": model, "int8": q}, str(f), chunk=64)
    p, lq = logp(model), logp(q)
    assert r["f32"]["kl"] == 0.0
    assert r["int8"]["kl"] > 0 and abs(r["int8"]["kl"] - (np.exp(p) * (p - lq)).sum(-1).mean()) < 1e-4 * r["int8"]["kl"]
    with pytest.raises(EdgeseqError, match="no models"):
        compare_text({}, str(f))
