"""Mamba-2: what is special to it. The common checks (transformers' logits in float64, both flavours,
every graph kind, the state contract, plain onnxruntime, save/load/fork, GGUF) run over the cases
registered in tests/families.py (MAMBA2_CONFIGS), in tests/test_conformance.py."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from conftest import TOL, hf_logits64, max_diff
from families import MAMBA2_CONFIGS as CONFIGS

FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, family_case):
    return family_case(f"mamba2/{request.param}")


@FLAVOURS
def test_state_matches_hf_cache(case, portable):
    """After the sequence, the state equals HF's cache: the conv state is the last K-1 of HF's K
    columns; HF keeps the SSD state as (H, P, n), edgeseq as (H, n, P)."""
    s = case.model(portable).session()
    s.prefill(case.ids)
    conv, rec = case.cache64
    st = s.state()
    for i in range(case.hf.config.num_hidden_layers):
        c, r = st[f"past_key_values.{i}.conv_state"], st[f"past_key_values.{i}.recurrent_state"]
        assert max_diff(c, conv[i][..., 1:]) < TOL * max(1.0, np.abs(conv[i]).max())
        want = rec[i].transpose(0, 1, 3, 2)
        assert max_diff(r, want) < TOL * max(1.0, np.abs(want).max())


def test_config_read_from_checkpoint(case):
    hc = case.hf.config
    manifest = json.loads((case.bundle(False) / "edgeseq.json").read_text())
    cfg = manifest["config"]
    assert manifest["family"] == "mamba2"
    assert (cfg["vocab_size"], cfg["d_model"], cfg["n_layer"]) == (hc.vocab_size, hc.hidden_size,
                                                                  hc.num_hidden_layers)
    assert (cfg["d_inner"], cfg["n_heads"], cfg["head_dim"], cfg["n_groups"], cfg["d_state"], cfg["d_conv"]) == (
        int(hc.expand * hc.hidden_size), hc.num_heads, hc.head_dim, hc.n_groups, hc.state_size, hc.conv_kernel)
    assert cfg["tie_embeddings"] == bool(hc.tie_word_embeddings)
    if case.layout == "state-spaces":
        assert manifest["architecture"] == "Mamba2LMHeadModel"
    lo, hi = hc.time_step_limit
    assert cfg["dt_min"] == lo and cfg["dt_max"] == (None if hi == float("inf") else hi)


@pytest.mark.parametrize("case", ["v301-tied-dtlimit"], indirect=True)
def test_dt_limit_matters(case):
    """A control: with time_step_limit lifted HF gives other logits, so the clipping configuration
    really exercises the Clip that the conformance suite's step test checks."""
    assert case.hf.config.time_step_limit[1] == 0.05
    free = copy.deepcopy(case.hf64)
    for layer in free.backbone.layers:
        layer.mixer.time_step_limit = (0.0, float("inf"))
    assert max_diff(hf_logits64(free, case.ids), case.ref) > 1e-2
