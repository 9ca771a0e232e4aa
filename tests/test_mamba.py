"""Mamba-1 and FalconMamba: what is special to them. The common checks (transformers' logits in float64,
both flavours, every graph kind, the state contract, plain onnxruntime, save/load/fork, GGUF) run over
the cases registered in tests/families.py (MAMBA_CONFIGS), in tests/test_conformance.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TOL, hf_logits64, max_diff
from families import MAMBA_CONFIGS as CONFIGS

FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, family_case):
    return family_case(f"mamba/{request.param}")


@FLAVOURS
def test_state_matches_hf_cache(case, portable):
    """After the sequence, the state equals HF's cache: the conv state is the last K-1 of HF's K
    columns, the SSM state is HF's (d_inner, d_state) transposed."""
    s = case.model(portable).session()
    s.prefill(case.ids)
    conv, rec = case.cache64
    st = s.state()
    for i in range(case.hf.config.num_hidden_layers):
        c, r = st[f"past_key_values.{i}.conv_state"], st[f"past_key_values.{i}.recurrent_state"]
        assert max_diff(c, conv[i][..., 1:]) < TOL * max(1.0, np.abs(conv[i]).max())
        assert max_diff(r, rec[i].transpose(0, 2, 1)) < TOL * max(1.0, np.abs(rec[i]).max())


def test_config_read_from_checkpoint(case):
    hc = case.hf.config
    manifest = json.loads((case.bundle(False) / "edgeseq.json").read_text())
    cfg = manifest["config"]
    assert manifest["family"] == "mamba"
    assert (cfg["vocab_size"], cfg["d_model"], cfg["n_layer"]) == (hc.vocab_size, hc.hidden_size,
                                                                  hc.num_hidden_layers)
    assert (cfg["d_inner"], cfg["d_state"], cfg["d_conv"], cfg["dt_rank"]) == (
        hc.intermediate_size, hc.state_size, hc.conv_kernel, hc.time_step_rank)
    assert cfg["tie_embeddings"] == bool(hc.tie_word_embeddings)
    assert (cfg["mixer_rms_eps"] is not None) == (case.kind == "falcon")
    if case.kind == "state-spaces":
        assert manifest["architecture"] == "MambaLMHeadModel"
    if manifest["vocab_size"] > 256:
        assert manifest["tokenizer"]["kind"] == "hf"
        assert (case.bundle(False) / "tokenizer.json").is_file()
    else:
        assert manifest["tokenizer"] == {"kind": "bytes"}


@pytest.mark.parametrize("case", ["falcon"], indirect=True)
def test_falcon_norms_matter(case):
    """A control: the same weights run as plain Mamba give other logits, so the FalconMamba
    configuration really exercises the dt/B/C norms that the conformance suite's step test checks."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = {k: v for k, v in case.hf.config.to_dict().items() if k not in ("architectures", "model_type")}
    plain = MambaForCausalLM(MambaConfig(**cfg)).eval()
    result = plain.load_state_dict(case.hf.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert max_diff(hf_logits64(plain, case.ids), case.ref) > 1e-2
