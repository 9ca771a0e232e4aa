"""Mamba-2: exported bundles against transformers' Mamba2ForCausalLM in float64, both graph
flavours, every graph kind, and the state contract."""
from __future__ import annotations

import copy
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
    make_mamba2,
    max_diff,
    random_ids,
    write_state_spaces,
)

# name: (layout, config). num_heads * head_dim = expand * hidden_size.
CONFIGS = {
    # two groups of B/C shared by four heads each, untied head, conv width 4
    "groups2-untied": ("hf", dict(hidden_size=32, expand=2, num_heads=8, head_dim=8, n_groups=2, state_size=8,
                                  conv_kernel=4, tie_word_embeddings=False)),
    # odd vocabulary with a tokenizer, tied head, head dim 16, three groups, d_state 16, conv width 3,
    # biases on in/out proj, no conv bias, and dt clipped by time_step_limit
    "v301-tied-dtlimit": ("hf", dict(vocab_size=301, tokenizer_vocab=301, hidden_size=48, expand=2, num_heads=6,
                                     head_dim=16, n_groups=3, state_size=16, conv_kernel=3,
                                     tie_word_embeddings=True, use_bias=True, use_conv_bias=False,
                                     time_step_limit=(0.0, 0.05))),
    # expand 3, twelve heads in four groups, d_state 4, conv width 2 (a one-column conv state)
    "expand3-groups4": ("hf", dict(hidden_size=32, expand=3, num_heads=12, head_dim=8, n_groups=4, state_size=4,
                                   conv_kernel=2, tie_word_embeddings=False)),
    # the original state-spaces layout (ssm_cfg {"layer": "Mamba2", ...}, pytorch_model.bin)
    "state-spaces": ("state-spaces", dict(hidden_size=32, expand=2, num_heads=4, head_dim=16, n_groups=1,
                                          state_size=8, conv_kernel=4, tie_word_embeddings=True)),
}
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Built:
    layout, cfg = CONFIGS[request.param]
    d = tmp_path_factory.mktemp(f"mamba2-{request.param}")
    hf_dir = make_mamba2(d / "hf", seed=4, **cfg)
    ckpt = write_state_spaces(hf_dir, d / "state-spaces") if layout == "state-spaces" else hf_dir
    c = Built(ckpt, d, random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=8), hf_source=hf_dir)
    c.name, c.layout = request.param, layout
    # the reference must not be degenerate, or agreement would prove little
    assert c.ref.std() > 0.5 and len(set(c.ref.argmax(-1).tolist())) > 8
    return c


def expected_state(hf_config) -> dict[str, tuple]:
    """Mamba-2's state per layer: the conv's last K-1 inputs over x, B and C (d_inner + 2 G n, K-1),
    and the SSD state (H, n, P), the layout of ONNX Runtime's LinearAttention (d_k = n, d_v = P)."""
    c = hf_config
    di = int(c.expand * c.hidden_size)
    out = {}
    for i in range(c.num_hidden_layers):
        out[f"past_key_values.{i}.conv_state"] = (1, di + 2 * c.n_groups * c.state_size, c.conv_kernel - 1)
        out[f"past_key_values.{i}.recurrent_state"] = (1, c.num_heads, c.state_size, c.head_dim)
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


@FLAVOURS
def test_state_size_constant_over_many_steps(case, portable):
    check_state_size_constant(case, portable)


def test_flavours_use_the_ops_they_promise(case):
    check_flavour_ops(case)


# -- configuration reading ---------------------------------------------------------------------

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
    really exercises the Clip that test_step_matches_hf checks."""
    assert case.hf.config.time_step_limit[1] == 0.05
    free = copy.deepcopy(case.hf64)
    for layer in free.backbone.layers:
        layer.mixer.time_step_limit = (0.0, float("inf"))
    assert max_diff(hf_logits64(free, case.ids), case.ref) > 1e-2
