"""The gated delta rule (kernels/gdn.py): the one-token step, the Scan of that step and ONNX Runtime's
LinearAttention (gated_delta) against the float64 numpy reference, and that reference against
transformers' own recurrent function (Qwen3.5's torch fallback), value heads sharing key heads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseq.graph import GraphBuilder
from edgeseq.kernels import gdn

RNG = np.random.default_rng(0)
B, T, H, DK, DV = 2, 6, 3, 4, 5


def run(build, **feeds):
    import onnxruntime as ort

    b = GraphBuilder({}, name="gdn_test")
    ins = {k: b.input(k, "float32", list(v.shape)) for k, v in feeds.items()}
    outs = build(b, **ins)
    for name, value in outs.items():
        b.output(value, "out_" + name, "float32", None)
    sess = ort.InferenceSession(b.to_model().SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["out_" + n for n in outs], {k: v.astype(np.float32) for k, v in feeds.items()})
    return dict(zip(outs, got))


def l2(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def inputs(t):
    """q, k L2-normalised (q scaled), v, g <= 0, beta in (0, 1), a non-zero initial state; float32 values."""
    q = (l2(RNG.standard_normal((B, t, H, DK))) * DK ** -0.5).astype(np.float32)
    k = l2(RNG.standard_normal((B, t, H, DK))).astype(np.float32)
    v = RNG.standard_normal((B, t, H, DV)).astype(np.float32)
    g = -RNG.uniform(0.01, 1.5, (B, t, H)).astype(np.float32)
    beta = RNG.uniform(0.1, 0.95, (B, t, H)).astype(np.float32)
    S0 = RNG.standard_normal((B, H, DK, DV)).astype(np.float32)
    return q, k, v, g, beta, S0


@pytest.mark.parametrize("mode", ["scan", "step", "fused"])
def test_gdn_graph_vs_reference(mode):
    t = 1 if mode == "step" else T
    q, k, v, g, beta, S0 = inputs(t)
    y_ref, S_ref = gdn.gdn_ref(S0.astype(np.float64), q, k, v, g, beta)

    def build(b, S, q, k, v, g, beta):
        if mode == "fused":
            y, S = gdn.linear_attention(q, k, v, state=S, log_decay=g, beta=beta, heads=H, scale=1.0)
            return {"y": y, "S": S}
        one = mode == "step"
        shape = (lambda n: (-1, H, 1, n)) if one else (lambda n: (0, 0, H, 1, n))
        y, S = gdn.gdn(S, q=q.reshape(*shape(DK)), k=k.reshape(*shape(DK)), v=v.reshape(*shape(DV)),
                       decay=g.exp().reshape(*shape(1)), beta=beta.reshape(*shape(1)), one_token=one)
        return {"y": y.reshape(B, t, H * DV), "S": S}

    got = run(build, S=S0, q=q.reshape(B, t, H * DK), k=k.reshape(B, t, H * DK), v=v.reshape(B, t, H * DV),
              g=g, beta=beta)
    assert np.abs(got["y"] - y_ref.reshape(B, t, H * DV)).max() < 1e-5
    assert np.abs(got["S"] - S_ref).max() < 1e-5
    assert np.abs(S_ref - S0).max() > 0.1  # the update moved the state


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_reference_vs_transformers(kv_heads):
    """Qwen3.5's torch_recurrent_gated_delta_rule (L2 norm and 1/sqrt(dk) inside, key heads repeated for
    the value heads) equals gdn_ref fed the normalised, repeated inputs."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    rep = H // kv_heads
    qr = RNG.standard_normal((B, T, kv_heads, DK))
    kr = RNG.standard_normal((B, T, kv_heads, DK))
    v = RNG.standard_normal((B, T, H, DV))
    g = -RNG.uniform(0.01, 1.5, (B, T, H))
    beta = RNG.uniform(0.1, 0.95, (B, T, H))
    S0 = RNG.standard_normal((B, H, DK, DV))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731  (it computes in float32)
    with torch.no_grad():
        y_t, S_t = torch_recurrent_gated_delta_rule(as_t(qr), as_t(kr), as_t(v), as_t(g), as_t(beta),
                                                    initial_state=as_t(S0), output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True)
    q = np.repeat(l2(qr), rep, axis=2) * DK ** -0.5
    k = np.repeat(l2(kr), rep, axis=2)
    y_ref, S_ref = gdn.gdn_ref(S0, q, k, v, g, beta)
    assert np.abs(y_t.double().numpy() - y_ref).max() < 1e-5
    assert np.abs(S_t.double().numpy() - S_ref).max() < 1e-5
    assert np.abs(y_ref).max() > 0.1
