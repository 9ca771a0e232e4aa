"""Every recurrence fragment of kernels/, built both ways the graphs use it (the one-token step, and
the Scan whose body is that step), against its numpy reference; and each numpy reference against its
update written out per head or per channel, once."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgeseq.graph import GraphBuilder
from edgeseq.kernels import rglru, scan, wkv4, wkv5, wkv6, wkv7

RNG = np.random.default_rng(0)
B, T, H, N = 2, 5, 3, 4


def run(build, **feeds):
    """Build a graph whose inputs are `feeds` (float32), call build(b, **inputs) -> {output: value},
    run it in ONNX Runtime and return the outputs by name."""
    b = GraphBuilder({}, name="kernel_test")
    ins = {k: b.input(k, "float32", list(v.shape)) for k, v in feeds.items()}
    outs = build(b, **ins)
    for name, value in outs.items():
        b.output(value, "out_" + name, "float32", None)
    sess = ort.InferenceSession(b.to_model().SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["out_" + n for n in outs], {k: v.astype(np.float32) for k, v in feeds.items()})
    return dict(zip(outs, got))


def rand(*shape, low=None, high=None):
    if low is not None:
        return RNG.uniform(low, high, shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


ONE_TOKEN = pytest.mark.parametrize("one_token", [False, True], ids=["scan", "step"])


@ONE_TOKEN
@pytest.mark.parametrize("reduce_axis", [-1, -2])
def test_selective_scan(one_token, reduce_axis):
    t = 1 if one_token else T
    shape = (B, t, H, N, 3)
    a, u = rand(*shape, low=0.2, high=1.0), rand(*shape)
    c = rand(B, t, H, N, 1) if reduce_axis == -2 else rand(B, t, H, 1, 3)
    h0 = rand(B, H, N, 3)
    got = run(lambda b, a, u, c, h: dict(zip(("y", "h"), scan.selective_scan(
        h, a=a, u=u, c=c, reduce_axis=reduce_axis, one_token=one_token))), a=a, u=u, c=c, h=h0)
    y, h = scan.scan_ref(a, u, c, h0, reduce_axis)
    assert np.abs(got["y"] - y).max() < 1e-5 and np.abs(got["h"] - h).max() < 1e-5


@ONE_TOKEN
def test_wkv4(one_token):
    t, C = (1 if one_token else T), 6
    k, v = rand(B, t, C), rand(B, t, C)
    aa, bb, pp = rand(B, C), rand(B, C, low=0.5, high=2.0), rand(B, C)
    u, w = rand(C), -np.exp(rand(C))
    got = run(lambda b, k, v, aa, bb, pp, u, w: dict(zip(("y", "aa", "bb", "pp"), wkv4.wkv(
        aa, bb, pp, k=k, v=v, u=u, w=w, one_token=one_token))), k=k, v=v, aa=aa, bb=bb, pp=pp, u=u, w=w)
    for i in range(B):
        y, *state = wkv4.wkv4_ref(k[i], v[i], aa[i], bb[i], pp[i], u, w)
        assert np.abs(got["y"][i] - y).max() < 1e-5
        for name, ref in zip(("aa", "bb", "pp"), state):
            assert np.abs(got[name][i] - ref).max() < 1e-5


def _per_head(r, k, v, w, S, u):
    """RWKV-5/6 written out per head: out = r·(u ⊙ kᵀv + S), S = kᵀv + w ⊙ S (w per key channel)."""
    S, ys = S.astype(np.float64).copy(), np.zeros(r.shape)
    for bi, ti, hi in np.ndindex(r.shape[:3]):
        kv = np.outer(k[bi, ti, hi], v[bi, ti, hi])
        ys[bi, ti, hi] = r[bi, ti, hi] @ (u[hi] * kv + S[bi, hi])
        S[bi, hi] = kv + w[bi, ti, hi][:, None] * S[bi, hi]
    return ys, S


@ONE_TOKEN
@pytest.mark.parametrize("version", [5, 6])
def test_wkv5_wkv6(one_token, version):
    t = 1 if one_token else T
    r, k, v = rand(B, t, H, N), rand(B, t, H, N), rand(B, t, H, N)
    u, S0 = rand(H, N, 1), rand(B, H, N, N)
    w = rand(B, t, H, N, low=0.1, high=1.0) if version == 6 else np.broadcast_to(rand(H, N, low=0.1, high=1.0),
                                                                                 (B, t, H, N))
    y_ref, S_ref = (wkv6.wkv6_ref(r, k, v, w, S0, u) if version == 6 else
                    wkv5.wkv5_ref(r, k, v, S0, u, np.ascontiguousarray(w[0, 0, :, :, None])))
    y_hand, S_hand = _per_head(r, k, v, w, S0, u)
    assert np.abs(y_ref - y_hand).max() < 1e-4 and np.abs(S_ref - S_hand).max() < 1e-4
    sq = (lambda x: x[:, 0]) if one_token else (lambda x: x)  # the step graph's inputs have no time axis

    def build(b, r, k, v, w, S, u):
        if version == 6:
            y, S = wkv6.wkv(S, r=r, k=k, v=v, w=w, u=u, one_token=one_token)
        else:
            y, S = wkv5.wkv(S, r=r, k=k, v=v, w=w, u=u, one_token=one_token)
        return {"y": y, "S": S}

    w_in = sq(w)[..., None] if version == 6 else np.ascontiguousarray(w[0, 0, :, :, None])
    got = run(build, r=sq(r), k=sq(k), v=sq(v), w=w_in, S=S0, u=u)
    assert np.abs(got["y"] - sq(y_ref)).max() < 1e-4 and np.abs(got["S"] - S_ref).max() < 1e-4


@ONE_TOKEN
def test_wkv7(one_token):
    t = 1 if one_token else T
    r, k, v, a, bb = (rand(B, t, H, N) for _ in range(5))
    w = rand(B, t, H, N, low=0.5, high=1.0)
    S0 = rand(B, H, N, N)
    y_ref, S_ref = wkv7.wkv7_ref(S0, r, w, k, v, a, bb)
    S = S0.astype(np.float64).copy()  # the rwkv package's update written out per head
    for bi, ti, hi in np.ndindex(B, t, H):
        S[bi, hi] = (S[bi, hi] * w[bi, ti, hi][None, :] + S[bi, hi] @ np.outer(a[bi, ti, hi], bb[bi, ti, hi])
                     + np.outer(v[bi, ti, hi], k[bi, ti, hi]))
        assert np.allclose(S[bi, hi] @ r[bi, ti, hi], y_ref[bi, ti, hi], atol=1e-4)
    assert np.allclose(S, S_ref, atol=1e-4)

    def build(b, S, **x):
        col = lambda z: wkv7.column(b, z, H, N, not one_token)  # noqa: E731
        row = lambda z: wkv7.row(b, z, H, N, not one_token)  # noqa: E731
        y, S = wkv7.wkv(S, r=col(x["r"]), w=row(x["w"]), k=row(x["k"]), v=col(x["v"]), a=col(x["a"]),
                        bb=row(x["bb"]), one_token=one_token)
        return {"y": y.reshape(0, 0, H * N) if not one_token else y.reshape(-1, 1, H * N), "S": S}

    feeds = {nm: z.reshape(B, t, H * N) for nm, z in zip(("r", "w", "k", "v", "a", "bb"), (r, w, k, v, a, bb))}
    got = run(build, S=S0, **feeds)
    assert np.abs(got["y"] - y_ref.reshape(B, t, H * N)).max() < 1e-4 and np.abs(got["S"] - S_ref).max() < 1e-4


@pytest.mark.parametrize("t", [1, 15, 16, 17, 40])
def test_wkv7_chunks(t):
    """wkv_chunks (the WY form in chunks of 16, the last one padded) against the numpy reference, at
    lengths around a chunk, with RWKV-7's own inputs: a = -kk, b = kk·iclr (kk unit), decays in its range."""
    H_, N_ = 3, 16
    r, k, v = (rand(B, t, H_, N_) for _ in range(3))
    # keys nearly parallel and high learning rates (half the heads): every power of the chunk's strictly lower
    # triangular L matters in (I - L)^-1; the other heads: any direction, the whole decay range
    kk = rand(B, t, H_, N_) * np.array([1.0, 0.1, 1.0], np.float32)[:, None] + np.array([0, 1, 0], np.float32)[:, None]
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    a, bb = -kk, kk * rand(B, t, H_, N_, low=0.5, high=1.0)
    logw = rand(B, t, H_, N_, low=-float(np.exp(-0.5)), high=0.0)
    S0 = rand(B, H_, N_, N_)
    y_ref, S_ref = wkv7.wkv7_ref(S0.astype(np.float64), r, np.exp(logw.astype(np.float64)), k, v, a, bb)

    def build(b, S, **x):
        y, S = wkv7.wkv_chunks(S, **x, heads=H_, size=N_)
        return {"y": y, "S": S}

    feeds = {nm: z.reshape(B, t, H_ * N_) for nm, z in zip(("r", "logw", "k", "v", "a", "bb"), (r, logw, k, v, a, bb))}
    got = run(build, S=S0, **feeds)
    scale = max(1.0, np.abs(y_ref).max())
    assert got["y"].shape == (B, t, H_ * N_)
    assert np.abs(got["y"] - y_ref.reshape(B, t, H_ * N_)).max() < 1e-5 * scale * 10
    assert np.abs(got["S"] - S_ref).max() < 1e-5 * max(1.0, np.abs(S_ref).max()) * 10


@ONE_TOKEN
def test_rglru(one_token):
    t, W = (1 if one_token else T), H * N
    x = rand(B, t, W)
    input_w, a_w = rand(H, N, N) * 0.5, rand(H, N, N) * 0.5
    input_b, a_b, a_param = rand(H, N), rand(H, N), rand(W)
    h0 = rand(B, W)
    positions = np.arange(t) + (0 if one_token else 3)
    positions[0] = 0 if not one_token else positions[0]  # a reset at the first token of the scanned call
    gate_w, gate_b = rglru.fuse_gate_weight(input_w, a_w), rglru.fuse_gate_bias(input_b, a_b)
    keep = (positions != 0).astype(np.float32).reshape(1, t, 1)

    def build(b, x, h, gate_w, gate_b, neg_c, keep):
        gx, ga = rglru.gates(x, weight=gate_w, bias=gate_b, heads=H, width=W)
        a, u = rglru.inputs(x, gx=gx, ga=ga, neg_c=neg_c, keep=keep)
        y, h = rglru.recurrence(h, a=a, u=u, one_token=one_token)
        return {"y": y, "h": h}

    got = run(build, x=x, h=h0, gate_w=gate_w, gate_b=gate_b, neg_c=rglru.neg_c(a_param), keep=keep)
    y, h = rglru.rglru_ref(x, positions, h0, input_w, input_b, a_w, a_b, a_param)
    assert np.abs(got["y"] - y).max() < 1e-5 and np.abs(got["h"] - h).max() < 1e-5
