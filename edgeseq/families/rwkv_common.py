"""Pieces every RWKV version shares: embedding + ln0, token shift, the v4-v6 channel mix, the head,
and undoing what rwkv.cpp's converter did to some tensors.

Symbols: b batch · t tokens · C model width (n_embd) · F channel-mix width (dim_ffn).
Token shift: each block mixes the current token's normed input with the previous token's; the
previous one is state (`shift_att`, `shift_ffn`: (b, C)), carried between calls.
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.ops import layer_norm, linear_t
from edgeseq.tensor_table import Renamed

LN_EPS = 1e-5


def embed_ln0(b: GraphBuilder, ids: Value, eps: float = LN_EPS) -> Value:
    """(b, t) ids -> (b, t, C): embedding rows through blocks.0.ln0 (stored as `ln0`)."""
    return layer_norm(b, b.w("embed").gather(ids), "ln0.weight", "ln0.bias", eps)


def token_shift(b: GraphBuilder, xx: Value, prev: Value, tokens: int | None) -> tuple[Value, Value]:
    """xx (b, t, C) and the previous token's xx (b, C) -> (shifted (b, t, C), new prev (b, C))."""
    prev3 = prev.unsqueeze(1)  # (b, 1, C)
    if tokens == 1:
        return prev3, xx.squeeze(1)
    shifted = b.concat(prev3, xx, axis=1).slice(0, -1, axis=1)  # (b, t+1, C) -> (b, t, C)
    return shifted, xx.gather(-1, axis=1)  # (b, C): a scalar index drops the axis


def lerp(b: GraphBuilder, xx: Value, shifted: Value, mix: str) -> Value:
    """xx * mix + shifted * (1 - mix) = shifted + (xx - shifted) * mix."""
    return shifted + (xx - shifted) * b.w(mix)


def channel_mix(b: GraphBuilder, x: Value, prev: Value, o: str, tokens: int | None) -> tuple[Value, Value]:
    """RWKV-4/5/6 FFN: r = sigmoid(Wr xr), k = relu(Wk xk)^2, x + r * (Wv k). Returns (x, new prev)."""
    xx = layer_norm(b, x, o + "ln2.weight", o + "ln2.bias", LN_EPS)
    shifted, new_prev = token_shift(b, xx, prev, tokens)
    xk = lerp(b, xx, shifted, o + "ffn.time_mix_k")
    xr = lerp(b, xx, shifted, o + "ffn.time_mix_r")
    r = (xr @ b.w(o + "ffn.receptance")).sigmoid()
    k = (xk @ b.w(o + "ffn.key")).relu()
    return x + r * ((k * k) @ b.w(o + "ffn.value")), new_prev


def head(b: GraphBuilder, hidden: Value, vocab: int, eps: float = LN_EPS) -> Value:
    """ln_out and the head (stored (vocab, C) as in the checkpoint: Gemm(transB=1))."""
    h = layer_norm(b, hidden, "ln_out.weight", "ln_out.bias", eps)
    return linear_t(b, h, "head", vocab)


def transposed(w: np.ndarray) -> np.ndarray:
    """torch Linear keeps (out, in); the graphs multiply x @ W with W (in, out)."""
    return np.ascontiguousarray(w.T)


# Hugging Face RWKV checkpoints (`rwkv.blocks.{i}.attention.time_mix_key`, …) hold BlinkDL's tensors
# (raw time_decay, (1, 1, C) mixes) under other names: these replacements give BlinkDL's
# (`blocks.{i}.att.time_mix_k`, …), so the tables' BlinkDL column serves both layouts
HF_NAMES = [("rwkv.embeddings.", "emb."), ("rwkv.ln_out.", "ln_out."), ("rwkv.blocks.", "blocks."),
            (".pre_ln.", ".ln0."), (".attention.", ".att."), (".feed_forward.", ".ffn."),
            ("time_mix_key", "time_mix_k"), ("time_mix_value", "time_mix_v"),
            ("time_mix_receptance", "time_mix_r"), ("time_mix_gate", "time_mix_g")]


def hf_view(src):
    """A Hugging Face RWKV directory (no stored_by) seen under BlinkDL's names; any other source as it is."""
    if src.stored_by is None and src.has("rwkv.embeddings.weight"):
        return Renamed(src, HF_NAMES, "hf")
    return src


def read_time_state(family, src) -> dict[str, np.ndarray]:
    """An RWKV state-tuning file (`blocks.{i}.att.time_state`, one (H, N, N) matrix per layer) as
    {state input name: (1, H, N, N) float32}: the bundle's initial `wkv` state.

    Every loader of these files (the rwkv package for v5/v6, ChatRWKV-style demos for v7) puts
    `time_state.transpose(1, 2)` into its state. The files therefore keep (value, key) for v5/v6, whose
    reference state is (key, value), and (key, value) for v7, whose reference state is (value, key);
    edgeseq's state follows each reference's layout, so it transposes in both cases. `src` is the file
    as a TensorSource (the exporter reads it: a .pth needs torch, which families never import)."""
    from edgeseq.errors import EdgeseqError

    path = src.path
    if family.time_state_layout not in ("value_key", "key_value"):
        raise EdgeseqError(f"{path}: state-tuning files are not supported for {family.name} yet")
    spec = {s.input_name: s for s in family.state_spec() if s.kind == "wkv"}
    out = {}
    for i in range(family.config.n_layer):
        key = f"blocks.{i}.att.time_state"
        if not src.has(key):
            raise EdgeseqError(f"{path}: missing {key}; a state-tuning file holds one per layer")
        a = src.get(key)
        want = spec[f"past_key_values.{i}.wkv"].shape
        if a.shape != want:
            raise EdgeseqError(f"{path}: {key} is {tuple(a.shape)}, this model's wkv state is {want}")
        out[f"past_key_values.{i}.wkv"] = np.ascontiguousarray(a.transpose(0, 2, 1), dtype=np.float32)[None]
    extra = [k for k in src.keys() if not k.endswith(".att.time_state")]
    if extra:
        raise EdgeseqError(f"{path}: unexpected tensor {extra[0]!r} in a state-tuning file")
    return out


def blocks(b: GraphBuilder, ids: str, state: dict, n_layer: int, time_mix, tokens: int | None, fused: bool):
    """The RWKV-5/6 stack: embedding + ln0, then per layer `time_mix` (the version's attention:
    (b, x, prev, wkv, prefix, tokens, fused) -> (x, prev, wkv)) and the shared channel mix."""
    x = embed_ln0(b, ids)  # (b, t, C)
    out = {}
    for i in range(n_layer):
        o, p = f"layers.{i}.", f"past_key_values.{i}."
        x, out[f"present.{i}.shift_att"], out[f"present.{i}.wkv"] = time_mix(
            b, x, state[p + "shift_att"], state[p + "wkv"], o, tokens, fused)
        x, out[f"present.{i}.shift_ffn"] = channel_mix(b, x, state[p + "shift_ffn"], o, tokens)
    return x, out


def matrix_state_spec(n_layer: int, n_embd: int, n_head: int, head_size: int, layout: str = "N key, N value"):
    """RWKV-5/6/7's state per layer: both token shifts and the per-head matrix state."""
    from edgeseq.state import StateTensor

    out = []
    for i in range(n_layer):
        out.append(StateTensor(i, "shift_att", (n_embd,), "previous token's ln1 output (time mix)"))
        out.append(StateTensor(i, "wkv", (n_head, head_size, head_size), f"WKV state S (H, {layout})"))
        out.append(StateTensor(i, "shift_ffn", (n_embd,), "previous token's ln2 output (channel mix)"))
    return out
