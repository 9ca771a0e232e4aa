"""Pieces several families share: embedding lookup, the LM head, and checkpoint-name helpers."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.attention import attention, rope
from edgeseq.kernels.ops import linear, linear_t, rms_norm
from edgeseq.state import StateTensor


def embed(b: GraphBuilder, ids: Value) -> Value:
    """(b, t) token ids -> (b, t, d) rows of the embedding."""
    return b.w("embed").gather(ids)


def norm_and_head(b: GraphBuilder, hidden: Value, eps: float, vocab: int) -> Value:
    """Final RMS norm and LM head. An untied head is stored as `lm_head` (d, vocab); a tied one reuses
    `embed` (vocab, d) through Gemm(transB=1), so the matrix exists once."""
    h = rms_norm(b, hidden, "norm_f", eps)
    if b.has_weight("lm_head"):
        return linear(b, h, "lm_head")
    return linear_t(b, h, "embed", vocab)


def gqa_attention(b: GraphBuilder, a: Value, o: str, ring_k: Value, ring_v: Value, position: Value,
                  tokens: int | None, heads: int, kv_heads: int, head_dim: int, *, scale: float | None = None,
                  pos: Value | None = None, theta: float = 10000.0, rotary_dim: int | None = None
                  ) -> tuple[Value, Value, Value]:
    """Grouped-query attention of the hybrids on the KV ring (Jamba, Bamba/Granite, Falcon-H1, Nemotron-H),
    on the normed input a (b, t, d): q/k/v = a W (+ o+"q_bias"... where the weights hold them), RoPE on the
    first `rotary_dim` channels at `pos` (b, t) when pos is given, attention over the ring (scale
    head_dim^-1/2 unless given), output projection. Returns (out (b, t, d), new ring k, new ring v)."""
    H, Hkv, hd = heads, kv_heads, head_dim

    def split(name: str, n: int) -> Value:  # (b, n, t, hd)
        return linear(b, a, o + name, o + name + "_bias").reshape(0, 0, n, hd).transpose(0, 2, 1, 3)

    q, k, v = split("q", H), split("k", Hkv), split("v", Hkv)
    if pos is not None:
        q, k = (rope(b, x, pos, hd, theta, rotary_dim or hd) for x in (q, k))
    # the prefill graphs read only the filled slots of a ring under a third full; the step graph has no
    # control flow (mobile runtimes)
    y, nk, nv = attention(b, q, k, v, ring_k, ring_v, position, H, Hkv, hd, hd ** -0.5 if scale is None else scale,
                          early_exit=tokens != 1)  # (b, H, t, hd)
    return linear(b, y.transpose(0, 2, 1, 3).reshape(0, 0, H * hd), o + "o", o + "o_bias"), nk, nv


def pick(src, candidates: list[str], what: str) -> str:
    """The first tensor name present in the checkpoint, or an error naming what was looked for."""
    for c in candidates:
        if src.has(c):
            return c
    raise EdgeseqError(f"{src.path}: missing tensor for {what}; looked for {', '.join(candidates)}")


def find_prefix(src, suffix_candidates: list[str]) -> str:
    """The checkpoint's name prefix (e.g. 'backbone.' or 'model.backbone.') before a known tensor."""
    for key in src.keys():
        for s in suffix_candidates:
            if key.endswith(s):
                return key[: len(key) - len(s)]
    raise EdgeseqError(f"{src.path}: no embedding tensor found (looked for names ending in "
                       f"{', '.join(suffix_candidates)}); is this a checkpoint of the declared architecture?")


def transposed(w: np.ndarray) -> np.ndarray:
    """torch Linear keeps (out, in); the graphs multiply x @ W with W (in, out)."""
    return np.ascontiguousarray(w.T)


def head_is_embedding(src, p: str, suffixes=("embeddings.weight", "embedding.weight", "embed_tokens.weight")) -> bool:
    """A checkpoint that stores lm_head.weight equal to the embedding is tied in all but name."""
    if not src.has("lm_head.weight"):
        return True
    e = src.get(pick(src, [p + s for s in suffixes], "the embedding"))
    return src.shape("lm_head.weight") == e.shape and bool(np.array_equal(src.get("lm_head.weight"), e))



def mixer_stack(b, x, state: dict, mixer, n_layer: int, norm_eps: float, one_token: bool, fused: bool):
    """x += mixer(rms_norm(x)) for every layer, the whole body of a model made of one mixer (Mamba,
    Mamba-2): returns (hidden (b, t, d), {present state name: value})."""
    out = {}
    for i in range(n_layer):
        o, p = f"layers.{i}.", f"past_key_values.{i}."
        with b.scope(f"layers.{i}"):
            y, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = mixer(
                b, rms_norm(b, x, o + "norm", norm_eps), o, state[p + "conv_state"], state[p + "recurrent_state"],
                one_token, fused)
            x = x + y
    return x, out


def ring_state(layer: int, kv_heads: int, head_dim: int, label: str, key_note: str = "") -> list[StateTensor]:
    """A full-attention layer's state: key and value rings of `max_context` slots (kernels/attention.py),
    allocated when a session starts."""
    return [StateTensor(layer, kind, (kv_heads, "max_context", head_dim),
                        f"{label} {kind}s, ring slot p % max_context" + (f" ({key_note})" if kind == "key" and key_note else ""))
            for kind in ("key", "value")]


def hybrid_state(attention: Iterable[bool | None], mixer: Callable, ring: Callable[[int], list[StateTensor]]
                 ) -> list[StateTensor]:
    """A hybrid stack's state in layer order: layer i holds its key and value rings, ring(i), where
    `attention` yields True; the recurrent mixer's state, mixer().state_spec(i), where False; nothing where
    None (a layer of MLP or MoE only). `mixer` is the config's factory, called only for mixer layers."""
    out = []
    for i, att in enumerate(attention):
        if att is not None:
            out += ring(i) if att else mixer().state_spec(i)
    return out
