"""Zyphra's shared transformer blocks (Zamba, Zamba2): a few attention + MLP blocks whose weights are
shared by every hybrid layer that uses them, each use reading the layer's input concatenated with the
original embedding, optionally with per-use LoRA adapters (Zamba2).

    a = rms_norm(concat(x, e))                      (b, t, 2d)
    q/k/v = a W + a A_u B_u                          per-use LoRA when the checkpoint has adapters
    q, k = rope(q, k)                                Zamba2's use_mem_rope
    o = attention(q, k, v over the KV ring) W_o      full attention: a ring of max_context per layer

The checkpoint layout is transformers' (`model.layers.{i}.shared_transf(ormer).…`).
"""
from __future__ import annotations

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.attention import attention, rope
from edgeseq.kernels.ops import linear

P = "model."
MAX_CONTEXT = 4096  # the default KV ring length recorded in the manifest; sessions may choose another
GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


BLOCK_TENSORS = ("input_layernorm.weight", "pre_ff_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "feed_forward.gate_up_proj.weight", "feed_forward.down_proj.weight")


def shared_blocks(src, hybrid: list[int], nmb: int, module: str = "shared_transformer", tensors=BLOCK_TENSORS):
    """Which stored weights each use of a shared block reads. Tied checkpoints store block k once, at
    its first use (hybrid layer k); later uses cycle through them. transformers ties them only when
    tie_word_embeddings is set: otherwise every hybrid layer keeps (and uses) its own block, so a
    layer that stores different tensors gets its own stored block; identical copies are stored once."""
    def st(i):
        return f"{P}layers.{i}.{module}."

    use_block, block_layer, adapter_layer = [], [], []
    for u, i in enumerate(hybrid):
        first = hybrid[u % nmb]
        own = src.has(st(i) + tensors[2])
        if not own and not src.has(st(first) + tensors[2]):
            raise EdgeseqError(f"{src.path}: no weights for the shared block of hybrid layer {i} "
                               f"(looked for {st(i)}* and {st(first)}*)")
        adapter_layer.append(i if own else first)
        src_layer = i
        if not own or (i != first and all(np.array_equal(src.get(st(i) + t), src.get(st(first) + t))
                                          for t in tensors)):
            src_layer = first
        if src_layer not in block_layer:
            block_layer.append(src_layer)
        use_block.append(block_layer.index(src_layer))
    return use_block, block_layer, adapter_layer


def lora(b: GraphBuilder, x: Value, y: Value, name: str | None) -> Value:
    """y + (x A) B when the export wrote the adapter `name` (A (in, r), B (r, out))."""
    if name is None or not b.has_weight(name + "_a"):
        return y
    return y + x @ b.w(name + "_a") @ b.w(name + "_b")


def heads(x: Value, n: int, hd: int) -> Value:
    """(b, t, n*hd) -> (b, n, t, hd)."""
    return x.reshape(0, 0, n, hd).transpose(0, 2, 1, 3)


def shared_attention(b: GraphBuilder, a: str, blk: str, use: str | None, ring_k: str, ring_v: str, position: str,
                     pos: str | None, heads_q: int, heads_kv: int, hd: int, scale: float, rope_theta: float,
                     tokens: int | None = None):
    """q/k/v of the normed block input a (b, t, in) with the block's weights and the use's adapters,
    RoPE when `pos` is given, attention over the ring, o_proj. Returns (out (b, t, d), rings)."""
    q, k, v = (lora(b, a, linear(b, a, blk + n), use and use + n) for n in "qkv")
    q, k, v = heads(q, heads_q, hd), heads(k, heads_kv, hd), heads(v, heads_kv, hd)
    if pos is not None:
        q, k = rope(b, q, pos, hd, rope_theta), rope(b, k, pos, hd, rope_theta)
    # the prefill graphs (which also decode) read only the filled slots of a ring under a third full;
    # the step graph stays free of control flow (mobile runtimes)
    o, nk, nv = attention(b, q, k, v, ring_k, ring_v, position, heads_q, heads_kv, hd, scale,
                          early_exit=tokens != 1)
    o = o.transpose(0, 2, 1, 3).reshape(0, 0, heads_q * hd)
    return linear(b, o, blk + "o"), nk, nv
