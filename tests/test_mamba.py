"""Mamba-1 and FalconMamba: exported bundles against transformers' MambaForCausalLM /
FalconMambaForCausalLM in float64, both graph flavours, every graph kind, and the state contract."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import (
    SEQ_LEN,
    TOL,
    Built,
    check_chunked_and_repeated_prefill,
    check_flavour_ops,
    check_graphs_with_plain_onnxruntime,
    check_low_memory,
    check_prefill_all_matches_hf,
    check_prefill_then_steps,
    check_state_size_constant,
    check_state_spec,
    check_step_matches_hf,
    hf_logits64,
    make_falcon_mamba,
    make_mamba,
    max_diff,
    random_ids,
    write_state_spaces,
)

# name: (builder, config). Each varies what the others keep fixed.
CONFIGS = {
    # expand 3, tied head, byte vocabulary, dt rank 5, conv width 4
    "expand3-tied": ("mamba", dict(hidden_size=32, expand=3, state_size=8, conv_kernel=4, time_step_rank=5)),
    # odd vocabulary with a tokenizer, untied head, biases on in/out proj, no conv bias, conv width 3
    "v301-untied-bias": ("mamba", dict(vocab_size=301, tokenizer_vocab=301, hidden_size=48, state_size=16,
                                       conv_kernel=3, time_step_rank=4, tie_word_embeddings=False,
                                       use_bias=True, use_conv_bias=False)),
    # FalconMamba: weightless RMS norms on dt, B, C
    "falcon": ("falcon", dict(hidden_size=32, state_size=12, conv_kernel=4, time_step_rank=3)),
    # the original state-spaces layout (backbone.embedding, pytorch_model.bin, no "architectures"),
    # conv width 2 (a state of one column), d_state 4
    "state-spaces": ("state-spaces", dict(hidden_size=32, state_size=4, conv_kernel=2, time_step_rank=3)),
}
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Built:
    kind, cfg = CONFIGS[request.param]
    d = tmp_path_factory.mktemp(f"mamba-{request.param}")
    builder = make_falcon_mamba if kind == "falcon" else make_mamba
    hf_dir = builder(d / "hf", seed=3, **cfg)
    ckpt = write_state_spaces(hf_dir, d / "state-spaces") if kind == "state-spaces" else hf_dir
    c = Built(ckpt, d, random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=7), hf_source=hf_dir)
    c.name, c.kind = request.param, kind
    # the reference must not be degenerate, or agreement would prove little
    assert c.ref.std() > 0.5 and len(set(c.ref.argmax(-1).tolist())) > 8
    return c


def expected_state(hf_config) -> dict[str, tuple]:
    """Mamba-1's state per layer: the conv's last K-1 inputs (d_inner, K-1), the SSM state (d_inner, n)."""
    di = hf_config.intermediate_size
    out = {}
    for i in range(hf_config.num_hidden_layers):
        out[f"past_key_values.{i}.conv_state"] = (1, di, hf_config.conv_kernel - 1)
        out[f"past_key_values.{i}.recurrent_state"] = (1, di, hf_config.state_size)
    return out


# -- numbers against transformers --------------------------------------------------------------

@FLAVOURS
def test_step_matches_hf(case, portable):
    check_step_matches_hf(case, portable)


@FLAVOURS
def test_prefill_all_matches_hf(case, portable):
    check_prefill_all_matches_hf(case, portable)


@FLAVOURS
@pytest.mark.parametrize("t", [1, 2, 40])
def test_prefill_then_steps_equals_steps(case, portable, t):
    check_prefill_then_steps(case, portable, t)


@FLAVOURS
def test_chunked_and_repeated_prefill(case, portable):
    check_chunked_and_repeated_prefill(case, portable)


@FLAVOURS
def test_graphs_with_plain_onnxruntime(case, portable):
    check_graphs_with_plain_onnxruntime(case, portable)


@FLAVOURS
def test_low_memory(case, portable):
    check_low_memory(case, portable)


# -- the state contract ------------------------------------------------------------------------

@FLAVOURS
def test_state_spec_names_and_shapes(case, portable):
    check_state_spec(case, portable, expected_state(case.hf.config))


@FLAVOURS
def test_state_matches_hf_cache(case, portable):
    """After the sequence, the state equals HF's cache: the conv state is the last K-1 of HF's K
    columns, the SSM state has HF's (d_inner, d_state) layout."""
    s = case.model(portable).session()
    s.prefill(case.ids)
    conv, rec = case.cache64
    st = s.state()
    for i in range(case.hf.config.num_hidden_layers):
        c, r = st[f"past_key_values.{i}.conv_state"], st[f"past_key_values.{i}.recurrent_state"]
        assert max_diff(c, conv[i][..., 1:]) < TOL * max(1.0, np.abs(conv[i]).max())
        assert max_diff(r, rec[i]) < TOL * max(1.0, np.abs(rec[i]).max())


@FLAVOURS
def test_state_size_constant_over_many_steps(case, portable):
    check_state_size_constant(case, portable)


def test_flavours_use_the_ops_they_promise(case):
    check_flavour_ops(case, linear_attention=False)


# -- configuration reading ---------------------------------------------------------------------

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
    configuration really exercises the dt/B/C norms that test_step_matches_hf checks."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = {k: v for k, v in case.hf.config.to_dict().items() if k not in ("architectures", "model_type")}
    plain = MambaForCausalLM(MambaConfig(**cfg)).eval()
    result = plain.load_state_dict(case.hf.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert max_diff(hf_logits64(plain, case.ids), case.ref) > 1e-2
