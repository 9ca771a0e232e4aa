"""RWKV-7 "Goose" (x070), from rwkv.cpp .bin files, BlinkDL .pth files or Hugging Face directories in
the fla-hub layout (`RWKV7ForCausalLM`, flash-linear-attention's model class): time mix with the WKV-7
generalized delta rule, a squared-ReLU channel mix.

Symbols: b batch · t tokens · C width (n_embd) · H heads · N head size (C = H·N) · F channel-mix width.

    x = ln0(emb[id])
    per layer:
      xx = ln1(x); d = shift(xx) - xx;  x_● = xx + d·mix_●  for ● in r, w, k, v, a, g
      r, k, v = W_r x_r, W_k x_k, W_v x_v
      w = exp(-e^{-1/2} · sigmoid(w0 + tanh(x_w w1) w2))       decay in (e^{-e^{-1/2}}, 1)
      a = sigmoid(a0 + x_a a1 a2)                               in-context learning rate
      g = sigmoid(x_g g1) g2                                    output gate
      kk = normalize(k·k_k) per head;  k = k·(1 + (a-1)·k_a)
      v = v + (v_first - v)·sigmoid(v0 + x_v v1 v2)    (layer 0: v_first = v; the value residual)
      S = S·(diag(w) + (-kk)(kk·a)ᵀ) + v kᵀ;  y = S r                        (kernels/wkv7.py)
      y = group_norm(y, H groups, eps 64e-5) + (Σ_head r·k·r_k)·v
      x += W_o (y·g)
      xx = ln2(x); k = relu(W_k (xx + (shift(xx) - xx)·x_k))²;  x += W_v k
    logits = head(ln_out(x))

v_first is layer 0's value of the same token, an activation (b, t, C) passed down the layers: no state.
Both flavours build the same graphs: ONNX Runtime's LinearAttention has no rule with a per-key decay
vector and an a ≠ b rank-one term, so the recurrence is plain ops (step) or a standard Scan (prefill).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.rwkv_common import LN_EPS, embed_ln0, head, matrix_state_spec, token_shift
from edgeseq.gguf_names import CONTEXT_LENGTH, LLAMA_GN_EPS, ArchMap, f32, u32
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv7
from edgeseq.kernels.ops import group_norm, layer_norm
from edgeseq.tensor_table import T, Copy, Either, Fused, Row, Zeros, as_is, reshape, shaped, t

MIXES = ("r", "w", "k", "v", "a", "g")  # the order of rwkv.cpp's fused att.x_rwkvag
LORAS = ("w", "a", "v", "g")
GN_EPS = 64e-5  # ln_x: 1e-5 · head_size_divisor² (8²), as the reference


def _first(i: int) -> bool:
    return i == 0


def _not_first(i: int) -> bool:
    return i != 0


@dataclass
class Rwkv7Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    head_size: int
    dim_ffn: int
    ln_eps: float = LN_EPS  # the layer norms' eps (fla: norm_eps)
    gn_eps: float = GN_EPS  # ln_x's group-norm eps (fla: head_dim · norm_eps)


def _is_fla(src) -> bool:
    """A model directory (no stored_by) in flash-linear-attention's (fla-hub) `RWKV7ForCausalLM` layout."""
    return src.stored_by is None and src.has("model.embeddings.weight") and src.has(
        "model.layers.0.attn.r_k")


def _fla_config(src, n_head: int, head_size: int) -> dict:
    """The fla config keys edgeseq honours, checked: anything that changes the computation and that
    edgeseq does not implement is an error naming the key."""
    cfg = src.config
    where = f"{src.path}/config.json"
    if cfg.get("norm_first", True) is False:
        raise UnsupportedError(f"{where}: norm_first = false (no pre-norm after the embedding) is not supported")
    if cfg.get("hidden_act", "sqrelu") != "sqrelu":
        raise UnsupportedError(f"{where}: hidden_act {cfg['hidden_act']!r}; RWKV-7 uses sqrelu")
    vd = cfg.get("value_dim")
    if vd is not None and any(v != n_head * head_size for v in (vd if isinstance(vd, list) else [vd])):
        raise UnsupportedError(f"{where}: value_dim {vd} differs from hidden_size; not supported")
    if cfg.get("attn"):
        raise UnsupportedError(f"{where}: hybrid attention layers ('attn') are not supported")
    eps = float(cfg.get("norm_eps", LN_EPS))
    return {"ln_eps": eps, "gn_eps": head_size * eps}


class Rwkv7Gguf(ArchMap):
    """RWKV-7: six token-shift mixes fused into one (6, 1, 1, C) tensor; LoRA matrices as torch Linear
    weights (out, in); layer 0 carries v0/v1/v2 (unused; copies of a0/a1/a2, as llama.cpp expects)."""

    arch = "rwkv7"

    def supports(self, fam):
        gn = getattr(fam.config, "gn_eps", LLAMA_GN_EPS)
        if abs(gn - LLAMA_GN_EPS) > 1e-12:
            return f"llama.cpp's rwkv7 fixes ln_x's group-norm eps at 64e-5; this model uses {gn}"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        r = {m: shapes[f"blk.0.time_mix_{m}1.weight"][0] for m in ("w", "a", "g")}  # (rank, C)
        # layer 0's v LoRA is a copy of its a LoRA (llama.cpp creates it at the iclr rank); the value-
        # residual rank is the other layers'
        r["v"] = shapes["blk.1.time_mix_v1.weight"][0] if c.n_layer > 1 else r["a"]
        return [u32("context_length", CONTEXT_LENGTH), u32("embedding_length", c.n_embd),
                u32("block_count", c.n_layer), f32("attention.layer_norm_epsilon", getattr(c, "ln_eps", 1e-5)),
                u32("wkv.head_size", c.head_size), u32("attention.decay_lora_rank", r["w"]),
                u32("attention.iclr_lora_rank", r["a"]), u32("attention.value_residual_mix_lora_rank", r["v"]),
                u32("attention.gate_lora_rank", r["g"]), u32("feed_forward_length", c.dim_ffn),
                u32("attention.head_count", 0)]

    def config(self, g):
        a = g.arch_key
        vocab, C = g.tensor("token_embd.weight").shape
        hs = g.need(a("wkv.head_size"), int)
        if hs <= 0 or C % hs:
            raise EdgeseqError(f"{g.path}: wkv.head_size {hs} does not divide the width {C}")
        return dict(vocab_size=vocab, n_embd=C, n_layer=g.need(a("block_count"), int), n_head=C // hs,
                    head_size=hs, dim_ffn=g.tensor("blk.0.channel_mix_key.weight").shape[0],
                    ln_eps=float(g.get(a("attention.layer_norm_epsilon"), 1e-5)), gn_eps=LLAMA_GN_EPS)


@register("rwkv7", "RWKV7ForCausalLM", "Rwkv7ForCausalLM")
class Rwkv7(Family):
    name = "rwkv7"
    gguf = Rwkv7Gguf()  # llama.cpp runs it
    Config = Rwkv7Config
    time_state_layout = "key_value"  # state-tuning files keep (key, value) per head: read_time_state

    @classmethod
    def read_config(cls, src) -> Rwkv7Config:
        layout, _ = cls.layout(src)
        if layout not in ("rwkv.cpp", "blinkdl", "fla"):
            raise UnsupportedError(f"{src.path}: RWKV-7 is read from rwkv.cpp .bin files, BlinkDL .pth files and "
                                   f"fla-layout (RWKV7ForCausalLM) directories; this layout is none of them")
        fla = layout == "fla"
        vocab, C = src.shape("model.embeddings.weight" if fla else "emb.weight")
        block = r"model\.layers\.\d+\.attn_norm\.weight" if fla else r"blocks\.\d+\.ln1\.weight"
        layers = sum(1 for k in src.keys() if re.fullmatch(block, k))
        r_k = src.shape("model.layers.0.attn.r_k" if fla else "blocks.0.att.r_k")
        if len(r_k) != 2 or r_k[0] * r_k[1] != C:
            raise UnsupportedError(f"{src.path}: att.r_k is {r_k}, which does not tile n_embd {C} into heads")
        n_head, head_size = r_k  # (H, N), as the reference reads it
        extra = _fla_config(src, n_head, head_size) if fla else {}
        return Rwkv7Config(vocab_size=vocab, n_embd=C, n_layer=layers, n_head=n_head, head_size=head_size,
                           dim_ffn=src.shape("model.layers.0.ffn.key.weight" if fla else "blocks.0.ffn.key.weight")[0],
                           **extra)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        return matrix_state_spec(c.n_layer, c.n_embd, c.n_head, c.head_size, "N value, N key")

    @staticmethod
    def layout(src):
        return ("fla" if _is_fla(src) else src.stored_by), ""

    def tensors(self):
        """Three checkpoint layouts: BlinkDL's .pth (the reference's names), rwkv.cpp's .bin (BlinkDL's names;
        the six token-shift mixes fused as att.x_rwkvag (6, 1, C) and the LoRA matrices transposed) and fla's
        (LoRAs as `lora.0` (rank, C), an activation, `lora.2` (out, rank) + bias, where BlinkDL keeps x1 (C,
        rank), x2 (rank, out) and the bias as x0; norms without bias when norm_bias is false; older files
        keep the six mixes as one attn.x_x (6, C)). fla's RWKV7Attention computes BlinkDL's x070 (its decay
        -e^{-1/2}·sigmoid(·) is BlinkDL's -softplus(-·)-1/2 through exp(-exp(·))). GGUF: llama.cpp's rwkv7."""
        C = self.config.n_embd
        vec, row = reshape(C), shaped((C,), (C,))  # (1, 1, C) and (H, N) are per-channel vectors in the graph
        b, f, g = "blocks.{i}.", "model.layers.{i}.", "blk.{i}."

        def norm(ours, blink, fla, gguf):
            return [Row(f"{ours}.{n}", {"*": f"{blink}.{n}", "fla": Either(f"{fla}.{n}", Zeros(f"{fla}.weight"))
                                        if n == "bias" else f"{fla}.{n}"}, gguf=f"{gguf}.{n}") for n in ("weight", "bias")]

        def mix(j, m):
            fused = lambda a: np.ascontiguousarray(a.reshape(len(MIXES), C)[j])  # noqa: E731
            return Row(f"layers.{{i}}.att.x_{m}", {"*": f"{b}att.x_{m}", "rwkv.cpp": b + "att.x_rwkvag",
                                                     "fla": Either((f"{f}attn.x_{m}", vec), (f + "attn.x_x", fused))},
                       {"*": vec, "rwkv.cpp": fused})

        def lora(m, j):  # x1 (C, rank) and x2 (rank, out), (in, out) in the .pth; transposed in rwkv.cpp and fla
            return Row(f"layers.{{i}}.att.{m}{j}", {"*": f"{b}att.{m}{j}", "fla": f"{f}attn.{m}_lora.lora.{j - 1}.weight"
                       if j == 1 else f"{f}attn.{m}_lora.lora.2.weight"}, {"*": as_is, "rwkv.cpp": t, "fla": t},
                       gguf=f"{g}time_mix_{m}{j}.weight", codec=T, layers=None if m != "v" else _not_first)

        rows = [Row("embed", {"*": "emb.weight", "fla": "model.embeddings.weight"}, gguf="token_embd.weight"),
                *norm("ln0", "blocks.0.ln0", "model.layers.0.pre_norm", "token_embd_norm")]
        rows += [*norm("layers.{i}.ln1", b + "ln1", f + "attn_norm", g + "attn_norm"),
                 *norm("layers.{i}.ln2", b + "ln2", f + "ffn_norm", g + "attn_norm_2"),
                 *norm("layers.{i}.att.ln_x", b + "att.ln_x", f + "attn.g_norm", g + "time_mix_ln"),
                 *(mix(j, m) for j, m in enumerate(MIXES))]
        for m in LORAS:  # layer 0 makes v_first; it has no value-residual gate
            rows += [lora(m, 1), lora(m, 2)]
            if m != "g":
                rows.append(Row(f"layers.{{i}}.att.{m}0", {"*": f"{b}att.{m}0", "fla": f"{f}attn.{m}_lora.lora.2.bias"},
                                vec, gguf=f"{g}time_mix_{m}0.weight", codec=row,
                                layers=None if m != "v" else _not_first))
        rows += [Row(f"layers.{{i}}.att.{n}", {"*": f"{b}att.{n}", "fla": f"{f}attn.{n}"}, vec,
                     gguf=f"{g}time_mix_{n}.weight", codec=row) for n in ("k_k", "k_a", "r_k")]
        rows += [Row(f"layers.{{i}}.att.{n}", {"*": f"{b}att.{n}.weight", "fla": f"{f}attn.{fla}_proj.weight"}, t,
                     gguf=f"{g}time_mix_{n}.weight", codec=T)
                 for n, fla in (("receptance", "r"), ("key", "k"), ("value", "v"), ("output", "o"))]
        rows += [Row("layers.{i}.ffn.x_k", {"*": b + "ffn.x_k", "fla": f + "ffn.x_k"}, vec,
                     gguf=g + "channel_mix_lerp_k.weight", codec=row),
                 *(Row(f"layers.{{i}}.ffn.{n}", {"*": f"{b}ffn.{n}.weight", "fla": f"{f}ffn.{n}.weight"}, t,
                       gguf=f"{g}channel_mix_{n}.weight", codec=T) for n in ("key", "value")),
                 # llama.cpp wants the six mixes fused (r, w, k, v, a, g order) and, in layer 0, a value-
                 # residual LoRA it never uses: copies of the in-context learning rate's
                 Fused(g + "time_mix_lerp_fused.weight", tuple(f"layers.{{i}}.att.x_{m}" for m in MIXES),
                       lambda parts: np.stack([a.reshape(C) for a in parts]).reshape(6, 1, 1, C),
                       lambda a: list(a.reshape(6, C))),
                 *(Copy(f"{g}time_mix_v{j}.weight", f"layers.{{i}}.att.a{j}", T if j else row, layers=_first)
                   for j in (1, 2, 0))]
        rows += [*norm("ln_out", "ln_out", "model.norm", "output_norm"),
                 # (vocab, C) as stored: rwkv_common.head reads it with Gemm(transB=1)
                 Row("head", {"*": "head.weight", "fla": Either("lm_head.weight", "model.embeddings.weight")},
                     gguf="output.weight")]
        return rows

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        x = embed_ln0(b, ids, c.ln_eps)  # (b, t, C)
        out, v_first = {}, None
        for i in range(c.n_layer):
            o, p = f"layers.{i}.", f"past_key_values.{i}."
            xx = layer_norm(b, x, o + "ln1.weight", o + "ln1.bias", c.ln_eps)
            shifted, out[f"present.{i}.shift_att"] = token_shift(b, xx, state[p + "shift_att"], tokens)
            att, v_first, out[f"present.{i}.wkv"] = self._time_mix(b, i, xx, shifted, state[p + "wkv"], v_first,
                                                                    tokens)
            x = x + att
            xx = layer_norm(b, x, o + "ln2.weight", o + "ln2.bias", c.ln_eps)
            shifted, out[f"present.{i}.shift_ffn"] = token_shift(b, xx, state[p + "shift_ffn"], tokens)
            k = ((xx + (shifted - xx) * b.w(o + "ffn.x_k")) @ b.w(o + "ffn.key")).relu()
            x = x + (k * k) @ b.w(o + "ffn.value")  # relu(k)² (the squared-ReLU channel mix)
        return x, out

    def _time_mix(self, b: GraphBuilder, i: int, xx, shifted, S, v_first, tokens):
        """Returns (the block's output (b, t, C), v_first, new WKV state)."""
        c = self.config
        H, N, C = c.n_head, c.head_size, c.n_embd
        o = f"layers.{i}.att."
        W = lambda name: b.w(o + name)  # noqa: E731
        d = shifted - xx
        xr, xw, xk, xv, xa, xg = (xx + d * W(f"x_{m}") for m in MIXES)
        r, k, v = xr @ W("receptance"), xk @ W("key"), xv @ W("value")
        w = (W("w0") + (xw @ W("w1")).tanh() @ W("w2")).sigmoid()
        logw = w * -math.exp(-0.5)
        w = logw.exp()  # the decay, in (exp(-e^-0.5), 1)
        a = (W("a0") + xa @ W("a1") @ W("a2")).sigmoid()  # the in-context learning rate
        g = (xg @ W("g1")).sigmoid() @ W("g2")
        kk = (k * W("k_k")).reshape(0, 0, H, N)
        kk = (kk / kk.l2(-1).maximum(1e-12)).reshape(0, 0, C)  # F.normalize
        k = k * (1.0 + (a - 1.0) * W("k_a"))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * (W("v0") + xv @ W("v1") @ W("v2")).sigmoid()
        one = tokens == 1

        def per_token(S, r, w, k, v, a, bb):
            col = lambda x: wkv7.column(b, x, H, N, not one)  # noqa: E731
            row = lambda x: wkv7.row(b, x, H, N, not one)  # noqa: E731
            y, S = wkv7.wkv(S, r=col(r), w=row(w), k=row(k), v=col(v), a=col(a), bb=row(bb), one_token=one)
            return y.reshape(*((-1, 1, C) if one else (0, 0, C))), S  # (b, t, C)

        def chunked(S, r, logw, k, v, a, bb):
            return wkv7.wkv_chunks(S, r=r, logw=logw, k=k, v=v, a=a, bb=bb, heads=H, size=N)

        if one:
            y, S = per_token(S, r, w, k, v, -kk, kk * a)
        else:  # a prompt's slice: in chunks; a shorter call (a token decoded through this graph): token by token
            long = r.dims(1, 2).ge(b.const(wkv7.CHUNK, np.int64)).squeeze(0)
            y, S = b.if_(long, lambda S, r, logw, w, *x: chunked(S, r, logw, *x),
                         lambda S, r, logw, w, *x: per_token(S, r, w, *x), args=(S, r, logw, w, k, v, -kk, kk * a),
                         name="wkv7")
        y = group_norm(b, y, H, C, o + "ln_x.weight", o + "ln_x.bias", c.gn_eps)
        rk = (r * k * W("r_k")).reshape(0, 0, H, N).sum(-1)  # (b, t, H, 1)
        y = (y + (rk * v.reshape(0, 0, H, N)).reshape(0, 0, C)) * g
        return y @ W("output"), v_first, S

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return head(b, hidden, self.config.vocab_size, self.config.ln_eps)

    def quant_policy(self, name, shape):
        # LoRA matrices (rank 32-64): the decay LoRA (w1, w2) f32, as llama.cpp keeps time_mix_w1/w2;
        # the in-context learning rate, value-residual and gate LoRAs (a, v, g) at 8 bits
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("w1", "w2"):
            return "f32"
        return "int8" if leaf in ("a1", "a2", "v1", "v2", "g1", "g2") else None
