"""Pieces several families share: embedding lookup, the LM head, and checkpoint-name helpers."""
from __future__ import annotations

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.graph import GraphBuilder, Value
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
