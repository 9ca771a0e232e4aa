"""The shipped demo models (edgeseq/demo/: byte-level RWKV-7 and Mamba-2 trained on the KJV Bible by
examples/train_demo.py) end to end: export, the runtime, and the default model of the command line.

The references come from outside edgeseq, computed by the training script in fp32 from the shipped f16
weights: for RWKV-7, flash-linear-attention's RWKV7ForCausalLM on the H100 (its recurrent and its chunk
kernel); for Mamba-2, transformers' Mamba2ForCausalLM. They are stored beside the tests
(tests/data/demo/) and in each model's eval.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq import demo

DATA = Path(__file__).resolve().parent / "data"
HELD = DATA / "kjv_heldout.txt"


def golden(name: str) -> dict:
    with open(DATA / "demo" / f"{name}_golden.json") as f:
        return json.load(f)


def training_eval(name: str) -> dict:
    with open(os.path.join(demo.path(name), "eval.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Each demo exported (f32) through the demo cache, which points at a temporary folder."""
    from edgeseq.exporters.demo import demo_bundle

    old = os.environ.get("EDGESEQ_CACHE")
    os.environ["EDGESEQ_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield {n: demo_bundle(n) for n in demo.NAMES}
    finally:
        if old is None:
            del os.environ["EDGESEQ_CACHE"]
        else:
            os.environ["EDGESEQ_CACHE"] = old


def test_shipped_files():
    held = HELD.read_bytes()
    assert 0 < len(held) <= 300_000
    for name in demo.NAMES:
        d = demo.path(name)
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        assert size <= 8_000_000, f"{name}: {size} bytes"
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["vocab_size"] == 256 and cfg["dtype"] == "float16"
        ev = training_eval(name)
        assert ev["bytes"] == len(held) and ev["prefix_bytes"] <= len(held)
        assert 0.5 < ev["nats_per_byte"] < 1.5  # trained: a uniform guess is ln 256 = 5.55
    with pytest.raises(edgeseq.EdgeseqError, match="no demo model named"):
        demo.path("rwkv99")


@pytest.mark.parametrize("name", demo.NAMES)
def test_greedy_matches_reference(bundles, name):
    g = golden(name)
    s = edgeseq.load(bundles[name]).session()
    logits = s.prefill(list(g["prompt"].encode()))
    out = []
    for _ in range(len(g["greedy_ids"])):
        out.append(int(np.argmax(logits)))
        logits = s.step(out[-1])
    assert bytes(out) == bytes(g["greedy_ids"]), (bytes(out), g["greedy_text"])


def test_rwkv7_logits_match_fla(bundles):
    """The first 64 held-out bytes: edgeseq's prefill against fla's recurrent kernel (fp32) and its chunk
    kernel (less exact: it differs from fla's own recurrent kernel by 0.012)."""
    ids = list(HELD.read_bytes()[:64])
    logits = edgeseq.load(bundles["rwkv7"]).session().logits_all(ids)
    rec = np.load(DATA / "demo" / "rwkv7_ref_logits_recurrent.npy")
    chunk = np.load(DATA / "demo" / "rwkv7_ref_logits_chunk.npy")
    assert logits.shape == rec.shape == (64, 256)
    assert np.abs(logits - rec).max() < 1e-4
    assert np.abs(logits - chunk).max() < 0.05


def test_mamba2_golden_is_transformers():
    """The stored Mamba-2 continuation is what transformers' own model writes (fp32, CPU, uncached)."""
    import torch
    import transformers
    m = transformers.Mamba2ForCausalLM.from_pretrained(demo.path("mamba2"), dtype=torch.float32).eval()
    g = golden("mamba2")
    ids = list(g["prompt"].encode())
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(m(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert ids[len(g["prompt"]):] == g["greedy_ids"][:16]


def heldout_nll(bundle: str, n_bytes: int) -> float:
    """Nats per byte over the first n_bytes of the held-out text, streamed through the state (byte 0 is
    context, bytes 1..n-1 are scored), as the training script counts them."""
    ids = list(HELD.read_bytes()[:n_bytes])
    s = edgeseq.load(bundle).session()
    nll = 0.0
    for a in range(0, len(ids) - 1, 1024):
        inp = ids[a:min(a + 1024, len(ids) - 1)]
        lg = s.logits_all(inp).astype(np.float64)
        mx = lg.max(-1, keepdims=True)
        logp = lg - mx - np.log(np.exp(lg - mx).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(inp)), ids[a + 1:a + 1 + len(inp)]].sum())
    return nll / (len(ids) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", demo.NAMES)
def test_heldout_loss_matches_training(bundles, name):
    ev = training_eval(name)
    got = heldout_nll(bundles[name], ev["prefix_bytes"])
    assert abs(got - ev["prefix_nats_per_byte"]) <= 0.01 * ev["prefix_nats_per_byte"], (got, ev)


def test_cli_default_model_is_the_demo(tmp_path):
    env = {**os.environ, "EDGESEQ_MODEL": "", "EDGESEQ_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "edgeseq.cli", "run", "--prompt", "And God said", "-n", "24", "--temperature", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("And God said" + golden("rwkv7")["greedy_text"][:24])
    assert "demo model" in r.stderr
    made = os.listdir(tmp_path)
    assert len(made) == 1 and made[0].startswith("demo-rwkv7-f32-"), made  # no temporary folder left
    manifest = tmp_path / made[0] / "edgeseq.json"
    stamp = manifest.stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert manifest.stat().st_mtime_ns == stamp  # reused, not exported again
