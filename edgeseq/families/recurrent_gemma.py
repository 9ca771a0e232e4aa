"""RecurrentGemma (Griffin): RG-LRU recurrent blocks and local multi-query attention, (rec, rec, attn)…

Symbols (De et al. 2024): b batch · t tokens · d model width · W lru width · H heads (attention heads
and RG-LRU gate blocks) · Hkv key/value heads (1: MQA) · hd head dim (d / H) · R attention window
· k conv width · F MLP width.

    x = embed[ids] · bf16(sqrt(d))                 the normaliser is rounded to bfloat16, as HF and the
                                                   reference package compute it
    per layer:  h = rms_norm(x) · (1 + w)          (w stored as 1 + w)
      recurrent:  y = gelu_tanh(h @ Wy);  u = conv(h @ Wx)  (b, t, W);  u = rg_lru(u)   see kernels.rglru
                  x += (u · y) @ Wout
      attention:  q, k, v = h @ Wq, Wk, Wv; RoPE on the first hd/2 channels of q and k (rotate-half)
                  local attention over the window: the ring of R keys/values (kernels.attention)
                  x += attn @ Wo (+ bias)
      x += down(gelu_tanh(gate(rms_norm(x))) · up(rms_norm(x)))                    GeGLU, with biases
    logits = cap · tanh((rms_norm(x) @ embedᵀ) / cap)                              soft-cap 30

State: per recurrent layer the conv state (b, W, k-1) and the RG-LRU state (b, W); per attention layer
the key and value rings (b, Hkv, R, hd), R = the window; the graphs take `position` (int64 (1,)), the
absolute position of the first token, which places keys in the ring and resets the RG-LRU at 0.

Checkpoint layouts: Hugging Face (`model.layers.{i}.temporal_block.…`) and the `recurrentgemma`
package's PyTorch state dict (`blocks.{i}.recurrent_block.…`, `embedder.input_embedding`, …).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import transposed
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import attention as attn
from edgeseq.kernels import rglru
from edgeseq.kernels.conv import causal_conv
from edgeseq.kernels.ops import linear, linear_t, rms_norm, split

RECURRENT, ATTENTION = "recurrent", "attention"


def bf16_round(x: float) -> float:
    """float32 -> nearest bfloat16 (round to nearest even), as torch's .to(torch.bfloat16)."""
    bits = int(np.array(x, np.float32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array(bits, np.uint32).view(np.float32))


@dataclass
class RecurrentGemmaConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    lru_width: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_width: int
    window: int
    conv_width: int
    block_types: list[str] = field(default_factory=lambda: [RECURRENT, RECURRENT, ATTENTION])
    logits_soft_cap: float = 30.0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # channels of each head that RoPE rotates (partial_rotary_factor · hd)
    embed_scale: float = 1.0  # bf16(sqrt(d)) or 1 when the checkpoint does not scale
    attention_bias: bool = False

    def kind(self, i: int) -> str:
        return self.block_types[i % len(self.block_types)]


class _Names:
    """Tensor names of one checkpoint layout (Hugging Face or the recurrentgemma package)."""

    def __init__(self, package: bool, prefix: str = ""):
        self.package = package
        self.p = prefix

    def embed(self):
        return self.p + ("embedder.input_embedding" if self.package else "model.embed_tokens.weight")

    def final_norm(self):
        return self.p + ("final_norm.scale" if self.package else "model.final_norm.weight")

    def block(self, i):
        return f"{self.p}blocks.{i}." if self.package else f"{self.p}model.layers.{i}."

    def norm(self, i, which):  # which: temporal_pre_norm | channel_pre_norm
        return self.block(i) + which + (".scale" if self.package else ".weight")

    def temporal(self, i, kind):
        if self.package:
            return self.block(i) + ("recurrent_block." if kind == RECURRENT else "attention_block.")
        return self.block(i) + "temporal_block."

    def attn(self, i, proj):  # proj: q | k | v | o
        if self.package:
            return self.temporal(i, ATTENTION) + {"q": "proj_q", "k": "proj_k", "v": "proj_v", "o": "proj_final"}[proj]
        return self.temporal(i, ATTENTION) + f"{proj}_proj"

    def lru(self, i, what):  # what: a_param | input_w | input_b | a_w | a_b
        t = self.temporal(i, RECURRENT) + "rg_lru."
        if self.package:
            return t + {"a_param": "a_param", "input_w": "input_gate.w", "input_b": "input_gate.b",
                        "a_w": "a_gate.w", "a_b": "a_gate.b"}[what]
        return t + {"a_param": "recurrent_param", "input_w": "input_gate_weight", "input_b": "input_gate_bias",
                    "a_w": "recurrent_gate_weight", "a_b": "recurrent_gate_bias"}[what]

    def conv(self, i, what):  # what: w | b
        t = self.temporal(i, RECURRENT) + "conv_1d."
        return t + (what if self.package else {"w": "weight", "b": "bias"}[what])


def _layout(src) -> _Names:
    for k in src.keys():
        if k.endswith("embedder.input_embedding"):
            return _Names(True, k[: -len("embedder.input_embedding")])
        if k.endswith("model.embed_tokens.weight"):
            return _Names(False, k[: -len("model.embed_tokens.weight")])
    raise EdgeseqError(f"{src.path}: no embedding tensor found (looked for model.embed_tokens.weight and "
                       f"embedder.input_embedding); is this a RecurrentGemma checkpoint?")


@register("RecurrentGemmaForCausalLM", "Griffin")
class RecurrentGemma(Family):
    name = "recurrent_gemma"
    Config = RecurrentGemmaConfig
    uses_position = True
    prefill_chunk = 256

    @classmethod
    def read_config(cls, src) -> RecurrentGemmaConfig:
        """Dimensions from tensor shapes; hyper-parameters the weights do not imply (window, soft-cap,
        embedding scale, RoPE) from config.json, with RecurrentGemma v1's values (the package's
        2B/9B presets) as defaults, so a package checkpoint needs no config.json."""
        cfg, where = src.config or {}, f"{src.path}/config.json"
        n = _layout(src)
        vocab, d = src.shape(n.embed())
        layers = 0
        kinds = []
        while src.has(n.norm(layers, "channel_pre_norm")):
            kinds.append(RECURRENT if src.has(n.lru(layers, "a_param")) else ATTENTION)
            layers += 1
        if not layers:
            raise EdgeseqError(f"{src.path}: no layers found (expected {n.norm(0, 'channel_pre_norm')})")
        if RECURRENT not in kinds:
            raise UnsupportedError(f"{src.path}: no recurrent block found; edgeseq runs RecurrentGemma with "
                                   f"RG-LRU blocks")
        r = kinds.index(RECURRENT)
        heads, bw, _ = src.shape(n.lru(r, "input_w"))
        width = src.shape(n.lru(r, "a_param"))[0]
        conv_w = src.shape(n.conv(r, "w"))
        k = conv_w[0] if n.package else conv_w[-1]  # package (k, W); HF Conv1d (W, 1, k)
        up = n.block(0) + ("mlp_block.ffw_up.w" if n.package else "mlp_block.gate_proj.weight")
        mlp = src.shape(up)[-1] if n.package else src.shape(up)[0]
        cfg_heads = int(cfg_get(cfg, ("num_attention_heads", "num_heads"), heads, where))
        if cfg_heads != heads:
            raise EdgeseqError(f"{where}: num_attention_heads is {cfg_heads} but the RG-LRU gates have {heads} blocks")
        hd = d // heads
        kv = heads
        if ATTENTION in kinds:
            a = kinds.index(ATTENTION)
            kv_rows = src.shape(n.attn(a, "k") + ".weight")[0]
            if kv_rows % hd:
                raise EdgeseqError(f"{src.path}: key projection has {kv_rows} rows, not a multiple of the head "
                                   f"dim {hd}")
            kv = kv_rows // hd
        rope = cfg.get("rope_parameters") or {}
        partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") != "default":
            raise UnsupportedError(f"{where}: rope_type {rope['rope_type']!r} is not supported (only default)")
        act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedError(f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
        scale = bool(cfg_get(cfg, ("embeddings_scale_by_sqrt_dim",), True, where))
        cap = float(cfg_get(cfg, ("logits_soft_cap",), 30.0, where) or 0.0)
        pattern = [RECURRENT if t in ("recurrent", "linear_attention") else ATTENTION
                   for t in cfg_get(cfg, ("block_types",), [RECURRENT, RECURRENT, ATTENTION], where)]
        if [pattern[i % len(pattern)] for i in range(layers)] != kinds:
            pattern = kinds  # the tensors decide; config's pattern only names a cycle
        return RecurrentGemmaConfig(
            vocab_size=vocab, d_model=d, n_layer=layers, lru_width=width, n_heads=heads, n_kv_heads=kv,
            head_dim=hd, mlp_width=mlp, window=int(cfg_get(cfg, ("attention_window_size", "sliding_window"),
                                                           2048, where)),
            conv_width=k, block_types=pattern, logits_soft_cap=cap,
            norm_eps=float(cfg_get(cfg, ("rms_norm_eps",), 1e-6, where)), rope_theta=theta,
            rotary_dim=int(hd * partial), embed_scale=bf16_round(d ** 0.5) if scale else 1.0,
            attention_bias=bool(cfg.get("attention_bias", False)))

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        out = []
        for i in range(c.n_layer):
            if c.kind(i) == RECURRENT:
                out.append(StateTensor(i, "conv_state", (c.lru_width, c.conv_width - 1), "last k-1 inputs of the conv"))
                out.append(StateTensor(i, "recurrent_state", (c.lru_width,), "RG-LRU state h"))
            else:
                ring = (c.n_kv_heads, c.window, c.head_dim)
                out.append(StateTensor(i, "key", ring, "key ring: position p in slot p % window, after RoPE"))
                out.append(StateTensor(i, "value", ring, "value ring: position p in slot p % window"))
        return out

    def convert(self, src) -> Iterator[tuple[str, np.ndarray]]:
        c = self.config
        n = _layout(src)
        yield "embed", src.get(n.embed())
        for i in range(c.n_layer):
            o = f"layers.{i}."
            # both checkpoints keep the RMS norm's scale as w with the norm multiplying by (1 + w)
            yield o + "norm", 1.0 + src.get(n.norm(i, "temporal_pre_norm"))
            yield o + "mlp_norm", 1.0 + src.get(n.norm(i, "channel_pre_norm"))
            t = n.temporal(i, c.kind(i))
            if c.kind(i) == RECURRENT:
                for name in ("linear_y", "linear_x", "linear_out"):
                    yield o + name, transposed(src.get(t + name + ".weight"))
                    yield o + name + "_bias", src.get(t + name + ".bias")
                w = src.get(n.conv(i, "w"))
                # the package keeps the conv as (k, W), tap j multiplying x[t-(k-1)+j]; Conv1d as (W, 1, k)
                yield o + "conv", np.ascontiguousarray(w.T[:, None, :]) if n.package else w
                yield o + "conv_bias", src.get(n.conv(i, "b"))
                gw, gb = rglru.fuse_gate_weights(src.get(n.lru(i, "input_w")), src.get(n.lru(i, "a_w")),
                                                 src.get(n.lru(i, "input_b")), src.get(n.lru(i, "a_b")))
                yield o + "gate_w", gw
                yield o + "gate_b", gb
                yield o + "neg_c", rglru.neg_c(src.get(n.lru(i, "a_param")))
            else:
                for p in ("q", "k", "v", "o"):
                    yield o + f"{p}_proj", transposed(src.get(n.attn(i, p) + ".weight"))
                    if src.has(n.attn(i, p) + ".bias"):
                        yield o + f"{p}_proj_bias", src.get(n.attn(i, p) + ".bias")
            m = n.block(i) + "mlp_block."
            if n.package:
                # ffw_up: w (2, d, F) applied as x @ w[c]: c = 0 the gate, 1 the up projection
                up_w, up_b = src.get(m + "ffw_up.w"), src.get(m + "ffw_up.b").reshape(2, -1)
                yield o + "gate_up", np.ascontiguousarray(np.concatenate([up_w[0], up_w[1]], axis=1))
                yield o + "gate_up_bias", np.concatenate([up_b[0], up_b[1]])
                yield o + "down", transposed(src.get(m + "ffw_down.weight"))
                yield o + "down_bias", src.get(m + "ffw_down.bias")
            else:
                # gate and up share their input: one (d, 2F) matrix
                yield o + "gate_up", np.ascontiguousarray(np.concatenate(
                    [transposed(src.get(m + "gate_proj.weight")), transposed(src.get(m + "up_proj.weight"))], axis=1))
                yield o + "gate_up_bias", np.concatenate([src.get(m + "gate_proj.bias"), src.get(m + "up_proj.bias")])
                yield o + "down", transposed(src.get(m + "down_proj.weight"))
                yield o + "down_bias", src.get(m + "down_proj.bias")
        yield "norm_f", 1.0 + src.get(n.final_norm())
        if not n.package and src.has("lm_head.weight"):
            head = src.get("lm_head.weight")
            if not np.array_equal(head, src.get(n.embed())):
                yield "lm_head", transposed(head)

    # -- graphs ----------------------------------------------------------------------------------
    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        position = state["position"]  # int64 (1,): the graph assembly declares it (uses_position)
        x = b.w("embed").gather(ids)  # (b, t, d)
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        pos = attn.token_positions(b, position, ids, 1)  # (t,) absolute positions
        # 0 where a token starts a sequence (the RG-LRU reset), else 1: (1, t, 1)
        keep = b.op("Greater", pos, b.const(0, np.int64)).unsqueeze(0, 2).cast("float32")
        out = {}
        for i in range(c.n_layer):
            o = f"layers.{i}."
            h = rms_norm(b, x, o + "norm", c.norm_eps)
            if c.kind(i) == RECURRENT:
                y = linear(b, h, o + "linear_y", o + "linear_y_bias").gelu("tanh")  # gelu_pytorch_tanh
                u = linear(b, h, o + "linear_x", o + "linear_x_bias")  # (b, t, W)
                u, out[f"present.{i}.conv_state"] = causal_conv(
                    b, u.transpose(0, 2, 1), state[f"past_key_values.{i}.conv_state"], o + "conv",
                    o + "conv_bias", c.lru_width, c.conv_width, silu=False, fused=fused)
                u = u.transpose(0, 2, 1)  # (b, t, W)
                gx, ga = rglru.gates(u, weight=b.w(o + "gate_w"), bias=b.w(o + "gate_b"), heads=c.n_heads,
                                     width=c.lru_width)
                a, u = rglru.inputs(u, gx=gx, ga=ga, neg_c=b.w(o + "neg_c"), keep=keep)
                u, out[f"present.{i}.recurrent_state"] = rglru.recurrence(
                    state[f"past_key_values.{i}.recurrent_state"], a=a, u=u, one_token=tokens == 1)
                t_out = linear(b, u * y, o + "linear_out", o + "linear_out_bias")
            else:
                t_out, out[f"present.{i}.key"], out[f"present.{i}.value"] = self._attention(
                    b, h, o, state[f"past_key_values.{i}.key"], state[f"past_key_values.{i}.value"], position, pos)
            x = x + t_out
            g, up = split(b, linear(b, rms_norm(b, x, o + "mlp_norm", c.norm_eps), o + "gate_up", o + "gate_up_bias"),
                          [c.mlp_width, c.mlp_width])
            x = x + linear(b, g.gelu("tanh") * up, o + "down", o + "down_bias")
        return x, out

    def _attention(self, b, h, o, ring_k, ring_v, position, pos):
        c = self.config
        H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim

        def heads(v, n):  # (b, t, n*hd) -> (b, n, t, hd)
            return v.reshape(0, 0, n, hd).transpose(0, 2, 1, 3)

        q = heads(linear(b, h, o + "q_proj", o + "q_proj_bias"), H)
        k = heads(linear(b, h, o + "k_proj", o + "k_proj_bias"), KV)
        v = heads(linear(b, h, o + "v_proj", o + "v_proj_bias"), KV)
        q = attn.rope(b, q, pos, hd, c.rope_theta, c.rotary_dim)
        k = attn.rope(b, k, pos, hd, c.rope_theta, c.rotary_dim)
        y, new_k, new_v = attn.attention(b, q, k, v, ring_k, ring_v, position, H, KV, hd, hd ** -0.5,
                                         window=c.window)
        y = y.transpose(0, 2, 1, 3).reshape(0, 0, H * hd)  # (b, t, d)
        return linear(b, y, o + "o_proj", o + "o_proj_bias"), new_k, new_v

    def head(self, b: GraphBuilder, hidden: str) -> str:
        c = self.config
        x = rms_norm(b, hidden, "norm_f", c.norm_eps)
        logits = linear(b, x, "lm_head") if b.has_weight("lm_head") else linear_t(b, x, "embed", c.vocab_size)
        if c.logits_soft_cap:
            cap = c.logits_soft_cap
            logits = (logits / cap).tanh() * cap
        return logits


