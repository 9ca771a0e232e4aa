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

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import attention as attn
from edgeseq.kernels import rglru
from edgeseq.kernels.conv import causal_conv
from edgeseq.kernels.ops import linear, linear_t, rms_norm, split
from edgeseq.tensor_table import Row, as_is, t

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


# The two checkpoint layouts' names (`{p}` the prefix, `{i}` the layer): Hugging Face's and the
# recurrentgemma package's (Flax/PyTorch, the Griffin release)
NAMES = {
    "hf": {"embed": "{p}model.embed_tokens.weight", "final_norm": "{p}model.final_norm.weight",
           "norm": "{p}model.layers.{i}.{which}.weight", "block": "{p}model.layers.{i}.",
           "recurrent": "{p}model.layers.{i}.temporal_block.", "attention": "{p}model.layers.{i}.temporal_block.",
           "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "a_param": "rg_lru.recurrent_param", "input_w": "rg_lru.input_gate_weight",
           "input_b": "rg_lru.input_gate_bias", "a_w": "rg_lru.recurrent_gate_weight",
           "a_b": "rg_lru.recurrent_gate_bias", "conv_w": "conv_1d.weight", "conv_b": "conv_1d.bias"},
    "package": {"embed": "{p}embedder.input_embedding", "final_norm": "{p}final_norm.scale",
                "norm": "{p}blocks.{i}.{which}.scale", "block": "{p}blocks.{i}.",
                "recurrent": "{p}blocks.{i}.recurrent_block.", "attention": "{p}blocks.{i}.attention_block.",
                "q": "proj_q", "k": "proj_k", "v": "proj_v", "o": "proj_final",
                "a_param": "rg_lru.a_param", "input_w": "rg_lru.input_gate.w", "input_b": "rg_lru.input_gate.b",
                "a_w": "rg_lru.a_gate.w", "a_b": "rg_lru.a_gate.b", "conv_w": "conv_1d.w", "conv_b": "conv_1d.b"},
}


def _layout(src) -> tuple[str, str]:
    """(layout, name prefix) of a RecurrentGemma checkpoint."""
    for k in src.keys():
        for layout, names in NAMES.items():
            tail = names["embed"][3:]
            if k.endswith(tail):
                return layout, k[: -len(tail)]
    raise EdgeseqError(f"{src.path}: no embedding tensor found (looked for model.embed_tokens.weight and "
                       f"embedder.input_embedding); is this a RecurrentGemma checkpoint?")


def _name(layout: str, prefix: str, key: str, i: int | None = None, **kw) -> str:
    return NAMES[layout][key].format(p=prefix, i=i, **kw)


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
        layout, p = _layout(src)
        package = layout == "package"
        name = lambda key, i=None, **kw: _name(layout, p, key, i, **kw)  # noqa: E731
        lru = lambda i, what: name("recurrent", i) + NAMES[layout][what]  # noqa: E731
        vocab, d = src.shape(name("embed"))
        layers = 0
        kinds = []
        while src.has(name("norm", layers, which="channel_pre_norm")):
            kinds.append(RECURRENT if src.has(lru(layers, "a_param")) else ATTENTION)
            layers += 1
        if not layers:
            raise EdgeseqError(f"{src.path}: no layers found (expected {name('norm', 0, which='channel_pre_norm')})")
        if RECURRENT not in kinds:
            raise UnsupportedError(f"{src.path}: no recurrent block found; edgeseq runs RecurrentGemma with "
                                   f"RG-LRU blocks")
        r = kinds.index(RECURRENT)
        heads, bw, _ = src.shape(lru(r, "input_w"))
        width = src.shape(lru(r, "a_param"))[0]
        conv_w = src.shape(lru(r, "conv_w"))
        k = conv_w[0] if package else conv_w[-1]  # package (k, W); HF Conv1d (W, 1, k)
        up = name("block", 0) + ("mlp_block.ffw_up.w" if package else "mlp_block.gate_proj.weight")
        mlp = src.shape(up)[-1] if package else src.shape(up)[0]
        cfg_heads = int(cfg_get(cfg, ("num_attention_heads", "num_heads"), heads, where))
        if cfg_heads != heads:
            raise EdgeseqError(f"{where}: num_attention_heads is {cfg_heads} but the RG-LRU gates have {heads} blocks")
        hd = d // heads
        kv = heads
        if ATTENTION in kinds:
            a = kinds.index(ATTENTION)
            kv_rows = src.shape(name("attention", a) + NAMES[layout]["k"] + ".weight")[0]
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

    @staticmethod
    def layout(src):
        layout, p = _layout(src)
        if layout == "hf" and src.has("lm_head.weight") and not np.array_equal(
                src.get("lm_head.weight"), src.get(_name(layout, p, "embed"))):
            layout = "hf+head"  # an untied head (transformers ties it unless told otherwise)
        return layout, p

    def tensors(self):
        c = self.config
        one_plus = lambda w: 1.0 + w  # noqa: E731  both layouts keep the RMS norm's scale as w, the norm uses 1 + w

        def both(key, i=None, tail="", **kw):  # {layout: name}, "hf+head" reading "hf"'s names
            out = {lay: NAMES[lay][key].format(p="{p}", i=i, **kw) + tail for lay in NAMES}
            return {"*": out["hf"], "package": out["package"]}

        def lru(i, what):
            return {"*": both("recurrent", i)["*"] + NAMES["hf"][what],
                    "package": both("recurrent", i)["package"] + NAMES["package"][what]}

        def pair(x, y):  # two tensors read together, in each layout
            return {k: [x[k], y[k]] for k in x}

        rows = [Row("embed", both("embed"))]
        for i in range(c.n_layer):
            o = f"layers.{i}."
            rows += [Row(o + "norm", both("norm", i, which="temporal_pre_norm"), one_plus),
                     Row(o + "mlp_norm", both("norm", i, which="channel_pre_norm"), one_plus)]
            if c.kind(i) == RECURRENT:
                t_ = both("recurrent", i)
                for n in ("linear_y", "linear_x", "linear_out"):
                    rows += [Row(o + n, {k: v + n + ".weight" for k, v in t_.items()}, t),
                             Row(o + n + "_bias", {k: v + n + ".bias" for k, v in t_.items()})]
                # the package keeps the conv as (k, W), tap j multiplying x[t-(k-1)+j]; Conv1d as (W, 1, k)
                rows += [Row(o + "conv", lru(i, "conv_w"), {"*": as_is, "package": lambda w: t(w)[:, None, :]}),
                         Row(o + "conv_bias", lru(i, "conv_b"), shape=(c.lru_width,)),
                         Row(o + "gate_w", pair(lru(i, "input_w"), lru(i, "a_w")), rglru.fuse_gate_weight),
                         Row(o + "gate_b", pair(lru(i, "input_b"), lru(i, "a_b")), rglru.fuse_gate_bias),
                         Row(o + "neg_c", lru(i, "a_param"), rglru.neg_c)]
            else:
                a_ = both("attention", i)
                for p in "qkvo":
                    proj = {k: v + NAMES["package" if k == "package" else "hf"][p] for k, v in a_.items()}
                    rows += [Row(o + f"{p}_proj", {k: v + ".weight" for k, v in proj.items()}, t),
                             Row(o + f"{p}_proj_bias", {k: v + ".bias" for k, v in proj.items()}, optional=True)]
            m = {k: v + "mlp_block." for k, v in both("block", i).items()}
            # package: ffw_up w (2, d, F) applied as x @ w[c] (c = 0 the gate, 1 the up projection);
            # HF: gate and up share their input: one (d, 2F) matrix
            rows += [Row(o + "gate_up", {"*": [m["*"] + "gate_proj.weight", m["*"] + "up_proj.weight"],
                                         "package": m["package"] + "ffw_up.w"},
                         {"*": lambda g, u: np.concatenate([t(g), t(u)], axis=1),
                          "package": lambda w: np.ascontiguousarray(np.concatenate([w[0], w[1]], axis=1))}),
                     Row(o + "gate_up_bias", {"*": [m["*"] + "gate_proj.bias", m["*"] + "up_proj.bias"],
                                              "package": m["package"] + "ffw_up.b"},
                         {"*": lambda g, u: np.concatenate([g, u]), "package": lambda b: b.reshape(-1)}),
                     Row(o + "down", {k: v + ("ffw_down.weight" if k == "package" else "down_proj.weight")
                                      for k, v in m.items()}, t),
                     Row(o + "down_bias", {k: v + ("ffw_down.bias" if k == "package" else "down_proj.bias")
                                           for k, v in m.items()})]
        rows += [Row("norm_f", both("final_norm"), one_plus),
                 Row("lm_head", {"hf+head": "lm_head.weight"}, t)]  # only when untied
        return rows

    # -- graphs ----------------------------------------------------------------------------------
    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        position = state["position"]  # int64 (b,): the graph assembly declares it (uses_position)
        x = b.w("embed").gather(ids)  # (b, t, d)
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        pos = attn.token_positions(b, position, ids, 1)  # (b, t) absolute positions
        # 0 where a token starts a sequence (the RG-LRU reset), else 1: (b, t, 1)
        keep = pos.gt(b.const(0, np.int64)).unsqueeze(2).cast("float32")
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


