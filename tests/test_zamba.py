"""Zamba (v1): what is special to it: its configuration, the KV ring's stop / slide at max_context, the
memory of a long conversation, and the command line's options for it. The common checks (transformers'
ZambaForCausalLM in float64, both flavours, the state contract, plain onnxruntime, save/load/fork, GGUF)
run over the cases registered in tests/families.py (ZAMBA_CONFIGS), in tests/test_conformance.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeseq
from conftest import TOL, max_diff, random_ids, step_all
from edgeseq.errors import EdgeseqError
# tests/make_golden.py, tests/pi and test_gguf_runtime build Zamba models from these
from families import ZAMBA_CONFIGS as CONFIGS, make_zamba  # noqa: F401


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, family_case):
    return family_case(f"zamba/{request.param}")


def test_config_read_from_checkpoint(case):
    hc = case.hf.config
    man = json.loads((case.bundle(False) / "edgeseq.json").read_text())
    assert man["family"] == "zamba" and man["max_context"] == 4096
    cfg = man["config"]
    assert (cfg["n_heads"], cfg["dt_rank"], cfg["d_conv"]) == (hc.n_mamba_heads, hc.mamba_dt_rank, hc.mamba_d_conv)
    hybrid = [i for i, t in enumerate(hc.layers_block_type) if t == "hybrid"]
    assert cfg["hybrid_layers"] == hybrid
    assert len(cfg["block_layer"]) == (1 if hc.tie_word_embeddings else len(hybrid))


def test_stop_and_slide_at_max_context(case):
    m = edgeseq.load(case.bundle(False), max_context=20)
    s = m.session()
    ref = case.ref[19]
    assert max_diff(s.prefill(case.ids[:20]), ref) < TOL * max(1.0, float(np.abs(ref).max()))  # as conformance
    with pytest.raises(EdgeseqError, match="context full: 20 tokens"):
        s.step(case.ids[20])
    slide = edgeseq.load(case.bundle(True), max_context=20, on_full="slide")
    stepped = step_all(slide.session(), case.ids)
    assert max_diff(stepped[:20], case.ref[:20]) < TOL
    assert max_diff(slide.session().prefill(case.ids[:50]), stepped[49]) < TOL  # 50 > 20 in one call


@pytest.mark.slow
@pytest.mark.parametrize("case", ["2heads"], indirect=True)
def test_rss_flat_from_512_to_4096_tokens(case):
    """The KV ring of max_context 8192 is allocated (and written) when the session starts: feeding
    the conversation from token 512 to token 4096 must not grow the process's memory. (A whole 256-token
    prefill slice runs before the first reading, so its activations are already in the process.) Measured
    in a fresh process: a pytest worker whose heap a few hundred earlier tests fragmented grew 17-30 MB
    here from where its free chunks happened to lie, not from the session."""
    import subprocess
    import sys

    ids = random_ids(256, 4096, seed=11)
    code = f"""
import json, numpy as np, edgeseq
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
ids = {ids!r}
m = edgeseq.load({str(case.bundle(False))!r}, max_context=8192)
s = m.session()
ring = sum(v.nbytes for k, v in s.state().items() if k.endswith((".key", ".value")))
s.prefill(ids[:448])
for t in ids[448:512]:
    s.step(t)
before = rss_mb()
s.prefill(ids[512:4032])
for t in ids[4032:]:
    logits = s.step(t)
print(json.dumps(dict(ring=ring, before=before, after=rss_mb(), position=s.position,
                      finite=bool(np.isfinite(logits).all()))))
"""
    r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  timeout=300).stdout.strip().splitlines()[-1])
    ring, before, after = r["ring"], r["before"], r["after"]
    assert ring == 2 * 2 * 4 * 8192 * 16 * 4  # 2 hybrid layers x key/value x (Hkv, 8192, hd) float32
    assert r["position"] == 4096 and r["finite"]
    print(f"RSS at token 512: {before:.1f} MB, at 4096: {after:.1f} MB (ring {ring / 2**20:.0f} MiB)")
    assert after - before < 0.25 * ring / 2**20 + 2, (before, after)  # far less than even a quarter ring


@pytest.mark.parametrize("case", ["2heads"], indirect=True)
def test_cli_max_context_and_on_full(case):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgeseq.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    bundle = case.bundle(False)
    r = cli("run", bundle, "--prompt", "Hello", "--max-tokens", "30", "--seed", "1", "--max-context", "16")
    assert r.returncode == 1 and "context full: 16 tokens" in r.stderr and "--on-full slide" in r.stderr, r.stderr
    r = cli("run", bundle, "--prompt", "Hello", "--max-tokens", "30", "--seed", "1", "--max-context", "16",
            "--on-full", "slide", "--temperature", "0")
    assert r.returncode == 0 and "decode 30 tok" in r.stderr, r.stderr
    r = cli("bench", bundle, "--prompt-tokens", "40", "--decode-tokens", "8", "--max-context", "64")
    assert r.returncode == 0 and "decode" in r.stdout, r.stderr
