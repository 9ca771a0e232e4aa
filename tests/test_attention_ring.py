"""The attention ring (kernels/attention.py) against plain full-sequence attention in numpy.

A sequence of N tokens is fed through the ONNX graph in calls of various lengths, the rings and the
position carried from call to call; every call's output must equal causal attention over the whole
sequence (with the sliding window min(window, R)), computed here without any ring. Calls longer
than the ring, and many wrap-arounds, included. RoPE is checked against transformers' own."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from edgeseq.graph import GraphBuilder
from edgeseq.kernels.attention import attention, attention_ref, rope, token_positions

F = TensorProto.FLOAT


def build(hq, hkv, hd, scale, window=None, softcap=None, early_exit=False, batch=1):
    b = GraphBuilder({}, name="attn")
    q = b.input("q", F, [batch, hq, "T", hd])
    k = b.input("k", F, [batch, hkv, "T", hd])
    v = b.input("v", F, [batch, hkv, "T", hd])
    rk = b.input("ring_k", F, [batch, hkv, "R", hd])  # R symbolic: set by the arrays fed
    rv = b.input("ring_v", F, [batch, hkv, "R", hd])
    pos = b.input("position", TensorProto.INT64, ["rows"])  # (batch,), or (1,) for every row
    out, nk, nv = attention(b, q, k, v, rk, rv, pos, hq, hkv, hd, scale, window=window, softcap=softcap,
                            early_exit=early_exit)
    b.output(out, "out", F, [batch, hq, "T", hd])
    b.output(nk, "new_k", F, [batch, hkv, "R", hd])
    b.output(nv, "new_v", F, [batch, hkv, "R", hd])
    return ort.InferenceSession(b.to_model().SerializeToString(), providers=["CPUExecutionProvider"])


def full_attention(q, k, v, scale, W, softcap=None):
    """Causal attention over the whole sequence, query p seeing keys (p-W, p]; float64."""
    hq, n, _ = q.shape
    g = hq // k.shape[0]
    out = np.zeros(q.shape)
    for h in range(hq):
        s = q[h] @ k[h // g].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        p = np.arange(n)
        ok = (p[None] <= p[:, None]) & (p[None] > p[:, None] - W)
        s = np.where(ok, s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        out[h] = e / e.sum(-1, keepdims=True) @ v[h // g]
    return out


CASES = {
    # name: (Hq, Hkv, hd, R, window, softcap, call lengths)
    "mha-fits": (4, 4, 8, 64, None, None, [5, 1, 1, 20, 1, 3]),  # never fills: exact full attention
    "gqa-wraps": (4, 2, 8, 8, None, None, [3, 1, 1, 1, 6, 1, 1, 2, 9, 1, 1, 1, 1, 5]),  # slides past R
    "mqa-window-longcalls": (4, 1, 16, 8, 8, None, [13, 1, 1, 20, 2, 1, 17, 1]),  # calls longer than R
    "window-lt-ring-softcap": (2, 2, 8, 16, 5, 3.0, [1, 7, 1, 1, 30, 1, 4, 1]),
    "steps-only": (6, 3, 4, 4, None, None, [1] * 23),
}


@pytest.mark.parametrize("early_exit", [False, True], ids=["full-ring", "early-exit"])
@pytest.mark.parametrize("inplace", [False, True], ids=["separate", "inplace"])
@pytest.mark.parametrize("name", list(CASES))
def test_ring_equals_full_sequence_attention(name, inplace, early_exit):
    """inplace: the rings' input and output bound to one buffer each (as edgeseq's session does), so
    ONNX Runtime's ScatterElements writes the new slots into the ring it read. early_exit: while the
    ring is less than a third full, the If branch that reads only its filled slots."""
    hq, hkv, hd, R, window, cap, calls = CASES[name]
    n = sum(calls)
    rng = np.random.default_rng(len(name))
    q = rng.standard_normal((hq, n, hd)).astype(np.float32)
    k = rng.standard_normal((hkv, n, hd)).astype(np.float32)
    v = rng.standard_normal((hkv, n, hd)).astype(np.float32)
    scale = hd ** -0.5
    W = R if window is None else min(window, R)
    want = full_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scale, W, cap)
    sess = build(hq, hkv, hd, scale, window, cap, early_exit)
    rk = np.zeros((1, hkv, R, hd), np.float32)
    rv = np.zeros_like(rk)
    p = 0
    ring_ov = [ort.OrtValue.ortvalue_from_numpy(rk.copy()), ort.OrtValue.ortvalue_from_numpy(rv.copy())]
    for t in calls:
        sl = slice(p, p + t)
        feeds = {"q": q[None, :, sl], "k": k[None, :, sl], "v": v[None, :, sl], "position": np.array([p], np.int64)}
        if inplace:
            io = sess.io_binding()
            for n, a in feeds.items():
                io.bind_cpu_input(n, np.ascontiguousarray(a))
            for (i, o), ov in zip((("ring_k", "new_k"), ("ring_v", "new_v")), ring_ov):
                io.bind_ortvalue_input(i, ov)
                io.bind_ortvalue_output(o, ov)
            io.bind_output("out")
            sess.run_with_iobinding(io)
            out = io.copy_outputs_to_cpu()[-1]  # bound last
            rk2, rv2 = ring_ov[0].numpy().copy(), ring_ov[1].numpy().copy()
        else:
            out, rk2, rv2 = sess.run(None, {**feeds, "ring_k": rk, "ring_v": rv})
        assert np.abs(out[0] - want[:, sl]).max() < 2e-5, (name, p, t)
        # the numpy ring reference agrees too, and the rings hold the last R tokens at their slots
        ref_out, ref_k, ref_v = attention_ref(q[None, :, sl], k[None, :, sl], v[None, :, sl], rk, rv, p, scale,
                                              window, cap)
        assert np.abs(out - ref_out).max() < 2e-5
        assert np.array_equal(rk2, ref_k) and np.array_equal(rv2, ref_v)
        rk, rv, p = rk2, rv2, p + t
        for pos in range(max(0, p - R), p):
            assert np.array_equal(rk[0, :, pos % R], k[:, pos]) and np.array_equal(rv[0, :, pos % R], v[:, pos])
    assert not (np.abs(want[:, -1]).sum() == 0)


@pytest.mark.parametrize("early_exit", [False, True], ids=["full-ring", "early-exit"])
@pytest.mark.parametrize("spread", ["wide", "short"])
@pytest.mark.parametrize("name", ["gqa-wraps", "window-lt-ring-softcap"])
def test_rows_at_different_positions_share_a_call(name, spread, early_exit):
    """position (b,): three rows with their own histories and positions in one call give each row's
    result alone (the numpy reference), for one token and for a chunk; a (1,) position still gives
    every row the same one. wide: a fresh row, one mid-ring, one past the ring's length; short: all
    under a third of the ring (the early exit's branch, where the rows behind the fullest one must not
    see the stale slots it reads)."""
    hq, hkv, hd, R, window, cap, _ = CASES[name]
    scale = hd ** -0.5
    sess = build(hq, hkv, hd, scale, window, cap, early_exit, batch=3)
    rng = np.random.default_rng(7)
    positions = np.array([0, 3, 2 * R + 1] if spread == "wide" else [0, 2, 1], np.int64)
    rk = rng.standard_normal((3, hkv, R, hd)).astype(np.float32)  # row 0's ring is fresh: zeros
    rv = rng.standard_normal((3, hkv, R, hd)).astype(np.float32)
    rk[0], rv[0] = 0, 0
    for t in (1, 4):
        q = rng.standard_normal((3, hq, t, hd)).astype(np.float32)
        k = rng.standard_normal((3, hkv, t, hd)).astype(np.float32)
        v = rng.standard_normal((3, hkv, t, hd)).astype(np.float32)
        feeds = {"q": q, "k": k, "v": v, "ring_k": rk, "ring_v": rv}
        out, nk, nv = sess.run(None, {**feeds, "position": positions})
        for r, p0 in enumerate(positions):
            ref_out, ref_k, ref_v = attention_ref(q[r:r + 1], k[r:r + 1], v[r:r + 1], rk[r:r + 1], rv[r:r + 1],
                                                  int(p0), scale, window, cap)
            assert np.abs(out[r:r + 1] - ref_out).max() < 2e-5, (r, t)
            assert np.array_equal(nk[r:r + 1], ref_k) and np.array_equal(nv[r:r + 1], ref_v), (r, t)
        same, *_ = sess.run(None, {**feeds, "position": np.array([3], np.int64)})
        ref_out, _, _ = attention_ref(q, k, v, rk, rv, 3, scale, window, cap)
        assert np.abs(same - ref_out).max() < 2e-5


def test_window_changes_the_result():
    """A control: the window is not a no-op, so the cases above exercise it."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 20, 8)) for _ in range(3))
    assert np.abs(full_attention(q, k, v, 0.3, 20) - full_attention(q, k, v, 0.3, 5))[:, 10:].max() > 1e-2


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_rope_matches_transformers(rotary_dim):
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hd, base, p0, T = 16, 10000.0, 37, 5
    b = GraphBuilder({}, name="rope")
    x = b.input("x", F, [1, 2, "T", hd])
    pos = b.input("position", TensorProto.INT64, [1])
    b.output(rope(b, x, token_positions(b, pos, x, 2), hd, base, rotary_dim), "y", F, [1, 2, "T", hd])
    sess = ort.InferenceSession(b.to_model().SerializeToString(), providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(1).standard_normal((1, 2, T, hd)).astype(np.float32)
    got = sess.run(None, {"x": xs, "position": np.array([p0], np.int64)})[0]

    rd = rotary_dim or hd
    inv = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    ang = torch.arange(p0, p0 + T).float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[None]
    xt = torch.from_numpy(xs)
    xr, xp = xt[..., :rd], xt[..., rd:]
    yr, _ = apply_rotary_pos_emb(xr, xr, emb.cos(), emb.sin())
    want = torch.cat([yr, xp], -1).numpy()
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - xs).max() > 1e-2  # it rotated something
