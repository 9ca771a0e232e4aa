"""Attention over a fixed-size key/value ring: the attention layers of the hybrid families (Zamba,
Zamba2: full attention over a ring of `max_context` tokens; RecurrentGemma: local attention over a
ring of its window).

Symbols: b batch · Hq query heads · Hkv key/value heads (Hq = g·Hkv: GQA, MQA when Hkv = 1) ·
hd head dim · T new tokens in this call · R ring length · p0 the absolute position of each row's first
new token (the graph input `position`, int64 (b,): one per row, so rows at different positions share a
call; (1,) gives every row the same one, as bundles before per-row positions fed it).

The ring contract (DESIGN: state spec): `ring_k`, `ring_v` (b, Hkv, R, hd), zeros initially; the
token at absolute position p lives in slot p % R; keys are stored after RoPE. Before this call a row's
ring holds positions p0-R .. p0-1 (the ones >= 0); slot j holds position p0-1 - ((p0-1-j) mod R).

    attention(b, q, k, v, ring_k, ring_v, position, q_heads, kv_heads, head_dim, scale,
              window=None, softcap=None, early_exit=False) -> (out, new_ring_k, new_ring_v)

        q (b, Hq, T, hd), k / v (b, Hkv, T, hd), rings (b, Hkv, R, hd), position (b,) or (1,) int64.
        out (b, Hq, T, hd): new token i (position p = p0+i) attends causally to the absolute positions
        [p - W + 1, p] among the ring's and the new tokens, W = min(window, R) (W = R when window is
        None): a ring of R tokens can hold no more. Full attention is exact while p < R; past that
        the ring slides (the session decides whether it may). Scores are q·k·scale, soft-capped as
        cap·tanh(s / cap) when `softcap` is given, then softmax in float32.
        new rings: the last min(T, R) new keys/values written at their slots; the others kept. Any
        T works, T > R included (a prefill longer than the ring), and R may be a symbolic dim.
        early_exit: an If picks, for one token while every row's ring is under a third full, attention
        over a copy of the slots filled in the fullest row only (decode cost then follows the tokens
        fed, not R); chunks and
        fuller rings read the whole ring. Off by default (a step graph must stay free of control flow).
        In place: the ring inputs are read only by this fragment (two MatMuls, no copy), and the
        ScatterElements that writes the new slots runs after both (its indices depend on `out`), so
        a runtime may bind a ring's input and output to one buffer: ONNX Runtime then writes T
        slots instead of copying the ring (edgeseq's session does; separate buffers work too).

    rope(b, x, pos, head_dim, base, rotary_dim=None, *, inv_freq=None) -> x with rotary embedding applied
        x (b, H, T, hd), pos (b, T) int64 absolute positions: the rotate-half (GPT-NeoX / Llama) form
        on the first `rotary_dim` channels (all by default), the rest passed through; `inv_freq` gives
        the frequencies outright (transformers' "proportional" RoPE: zeros past the rotated part).

    token_positions(b, position, x, axis) -> (b, T) int64: p0 + arange(T) per row, T = x.shape[axis].

Everything is standard ONNX (opset 21): the same graph serves the fused and portable flavours.
`attention_ref` is the plain numpy reference of the same ring computation.
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import GraphBuilder, Value

NEG = -1e30  # masked score: finite so that a fully masked row (never built here) could not make NaN


def token_positions(b: GraphBuilder, position: Value, x: Value, axis: int) -> Value:
    """(b, T) int64 absolute positions of the T tokens along `axis` of x: each row's position + arange(T)
    ((1, T) for a (1,) position)."""
    t = x.dims(axis, axis + 1).squeeze(0)
    return position.unsqueeze(1) + b.arange(0, t).unsqueeze(0)


def rope(b: GraphBuilder, x: Value, pos: Value, head_dim: int, base: float, rotary_dim: int | None = None,
         *, inv_freq: np.ndarray | None = None) -> Value:
    """Rotary embedding (rotate-half form) of x (b, H, T, hd) at positions pos (b, T). `inv_freq` (rd/2,)
    given: those frequencies (base unused) on the first rd = 2 len(inv_freq) channels."""
    if inv_freq is not None:
        inv_freq = np.asarray(inv_freq, np.float32)
        rd = 2 * len(inv_freq)
    else:
        rd = rotary_dim or head_dim
        # as transformers computes it: inv_freq in float32 from an integer arange
        inv_freq = (1.0 / (base ** (np.arange(0, rd, 2, dtype=np.int64).astype(np.float32) / rd))).astype(np.float32)
    ang = pos.cast("float32").unsqueeze(2) * b.const(inv_freq)  # (b, T, rd/2)
    ang = b.concat(ang, ang, axis=-1).unsqueeze(1)  # (b, 1, T, rd): every head
    cos, sin = ang.cos(), ang.sin()
    xr, xp = x.split([rd, head_dim - rd], axis=-1) if rd < head_dim else (x, None)
    x1, x2 = xr.split([rd // 2, rd // 2], axis=-1)
    y = xr * cos + b.concat(-x2, x1, axis=-1) * sin  # rotate_half
    return b.concat(y, xp, axis=-1) if xp is not None else y


def _attend(b: GraphBuilder, ring_k, ring_v, ring_pos, L, qg, k, v, new_pos, T, W, g, scale, softcap) -> Value:
    """Scores of qg (b, Hkv, g*T, hd) against the ring's keys (b, Hkv, L, hd) at positions ring_pos (b, L)
    and against the new keys side by side (the ring is read where it lies, never concatenated), the
    mask (valid: position >= 0, causal, within W), softmax, values: (b, Hkv, g*T, hd)."""
    kpos = b.concat(ring_pos, new_pos, axis=1).unsqueeze(1)  # (b, 1, L+T)
    qpos = new_pos.unsqueeze(2)  # (b, T, 1)
    valid = kpos.ge(b.const(0, np.int64)) & kpos.le(qpos)
    valid = valid & kpos.gt(qpos - W)  # (b, T, L+T)
    if g > 1:
        valid = valid.tile(1, g, 1)  # rows ordered (group member, token) like qg
    valid = valid.unsqueeze(1)  # (b, 1, g*T, L+T): every kv head
    s_ring = qg @ ring_k.transpose(0, 1, 3, 2)  # (b, Hkv, g*T, L)
    s_new = qg @ k.transpose(0, 1, 3, 2)  # (b, Hkv, g*T, T)
    s = b.concat(s_ring, s_new, axis=-1) * scale  # (b, Hkv, g*T, L+T)
    if softcap:
        s = (s * (1.0 / softcap)).tanh() * softcap
    s = valid.where(s, NEG)
    # L and T come in as (1,) tensors derived from static shapes where they are static, so a graph
    # with static shapes folds them (no Shape op of a Range's data-dependent output)
    p_ring, p_new = s.softmax(-1).split(b.concat(L, T, axis=0), axis=-1, parts=2)
    return p_ring @ ring_v + p_new @ v  # (b, Hkv, g*T, hd)


def attention(b: GraphBuilder, q: Value, k: Value, v: Value, ring_k: Value, ring_v: Value, position: Value,
              q_heads: int, kv_heads: int, head_dim: int, scale: float, *, window: int | None = None,
              softcap: float | None = None, early_exit: bool = False) -> tuple[Value, Value, Value]:
    """Attention of T new tokens over the ring plus themselves; see the module docstring."""
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not share {kv_heads} key/value heads evenly")
    g = q_heads // kv_heads
    i64 = lambda v_: b.const(v_, np.int64)  # noqa: E731
    R = ring_k.dims(2, 3)  # (1,)
    T = k.dims(2, 3)  # (1,)
    j = b.arange(0, R.squeeze(0)).unsqueeze(0)  # (1, R) slot index
    p0 = position  # (b,)
    pm1 = (p0 - i64([1])).unsqueeze(1)  # (b, 1)
    ring_pos = pm1 - (pm1 - j).mod(R)  # (b, R) position held; < 0: empty
    new_pos = token_positions(b, position, k, 2)  # (b, T)
    W = R if window is None else R.minimum(i64([int(window)]))
    qg = q.reshape(0, kv_heads, -1, head_dim)  # (b, Hkv, g*T, hd): q head = kv head*g + m
    if not early_exit:
        o = _attend(b, ring_k, ring_v, ring_pos, R, qg, k, v, new_pos, T, W, g, scale, softcap)
    else:
        # one token (decode) while the ring is less than a third full: the ring holds positions
        # 0..p0-1 in slots 0..p0-1, so attend to a copy of those p0 slots instead of reading all R (a
        # copy costs two passes over what it takes: past a third the full ring is cheaper). Chunks of
        # several tokens always take the full ring, so their activations, the large ones, are the
        # same from the first chunk on and the process's memory does not grow with the position.
        def short(ring_k, ring_v, ring_pos, R, top, *rest):  # slots 0..top-1: filled in the fullest row
            sb = top.b  # (a row at a smaller position finds its later slots empty: ring_pos < 0)
            return _attend(sb, ring_k.slice(0, top, axis=2), ring_v.slice(0, top, axis=2),
                           ring_pos.slice(0, top, axis=1), top, *rest, g, scale, softcap)

        def full(ring_k, ring_v, ring_pos, R, top, *rest):
            return _attend(top.b, ring_k, ring_v, ring_pos, R, *rest, g, scale, softcap)

        top = p0.max(keepdims=True)  # (1,) the largest position of the call's rows
        short_now = T.eq(i64([1])) & (top * i64([3])).lt(R)  # (1,)
        o = b.if_(short_now.squeeze(0), short, full, args=(ring_k, ring_v, ring_pos, R, top, qg, k, v, new_pos, T, W))
    out = o.reshape(0, q_heads, -1, head_dim)  # (b, Hq, T, hd)

    # the last m = min(T, R) new keys/values go to their slots (p0 + i) % R, distinct slots: a
    # ScatterElements over the ring. Its indices depend (trivially: + 0) on the attention output, so
    # it runs after every read of the old ring; a runtime may then bind the ring's input and output
    # to one buffer, and ONNX Runtime updates m slots in place instead of copying the ring.
    m = T.minimum(R)
    first = T - m  # (1,)
    i = b.arange(first.squeeze(0), T.squeeze(0)).unsqueeze(0)  # (1, m)
    after = out.max(keepdims=False).isnan().cast("int64") * i64(0)
    slots = (i + p0.unsqueeze(1)).mod(R) + after  # (b, m), or (1, m) for a (1,) position
    upd_k = k.slice(first, T, axis=2)  # (b, Hkv, m, hd)
    upd_v = v.slice(first, T, axis=2)
    upd_shape = b.concat(k.dims(0, 2), m, b.ints([head_dim]), axis=0)  # (b, Hkv, m, hd)
    idx = slots.unsqueeze(1, 3).expand(upd_shape)
    new_k = ring_k.scatter(idx, upd_k, axis=2)
    new_v = ring_v.scatter(idx, upd_v, axis=2)
    return out, new_k, new_v


# -- numpy reference ----------------------------------------------------------------------------
def attention_ref(q, k, v, ring_k, ring_v, p0: int, scale: float, window: int | None = None,
                  softcap: float | None = None):
    """The ring computation in plain numpy (float64), for the tests and by-hand checks."""
    bsz, hq, T, hd = q.shape
    hkv, R = k.shape[1], ring_k.shape[2]
    g = hq // hkv
    W = R if window is None else min(window, R)
    slot_pos = np.array([p0 - 1 - ((p0 - 1 - j) % R) for j in range(R)])
    kpos = np.concatenate([slot_pos, p0 + np.arange(T)])
    K, V = np.concatenate([ring_k, k], 2), np.concatenate([ring_v, v], 2)
    out = np.zeros(q.shape)
    for h in range(hq):
        s = q[:, h] @ K[:, h // g].transpose(0, 2, 1) * scale  # (b, T, R+T)
        if softcap:
            s = softcap * np.tanh(s / softcap)
        qp = (p0 + np.arange(T))[:, None]
        ok = (kpos[None] >= 0) & (kpos[None] <= qp) & (kpos[None] > qp - W)
        s = np.where(ok, s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (e / e.sum(-1, keepdims=True)) @ V[:, h // g]
    nk, nv = ring_k.copy(), ring_v.copy()
    for i in range(max(0, T - R), T):
        nk[:, :, (p0 + i) % R], nv[:, :, (p0 + i) % R] = k[:, :, i], v[:, :, i]
    return out, nk, nv
