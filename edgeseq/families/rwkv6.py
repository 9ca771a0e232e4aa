"""RWKV-6 ("Finch", v6.0) from BlinkDL `.pth` files, rwkv.cpp files and Hugging Face `Rwkv6ForCausalLM`
directories (the RWKV organisation's layout: HF RWKV-4 names, `rwkv.blocks.{i}.attention.time_maa_x`, …,
renamed to BlinkDL's by rwkv_common.hf_view; values as BlinkDL stores them): v5.2's matrix-state time mix with data-dependent
token-shift mixing and a data-dependent decay per token; the channel mix of v4/v5.

Symbols: b batch · t tokens · C width (n_embd) · H heads · N head size (C = H·N) · F dim_ffn ·
D_m the token-shift LoRA width (time_maa_w1 is (C, 5·D_m)) · D_d the decay LoRA width.

    per layer:  xx = ln1(x);  sx = (previous token's xx, state shift_att) - xx
                m = tanh((xx + sx·maa_x) W1) (b, t, 5, D_m) · W2 (5, D_m, C)  -> m_w, m_k, m_v, m_r, m_g
                x_j = xx + sx·(maa_j + m_j)          for j in w, k, v, r, g
                r, k, v = W_{r,k,v} x_{r,k,v};  g = silu(W_g x_g)
                d = time_decay + tanh(x_w Wd1) Wd2;  w = exp(-exp(d))        per (token, channel)
                out_t = r_t · (u ⊙ k_tᵀ v_t + S_{t-1});  S_t = k_tᵀ v_t + w_t ⊙ S_{t-1}   (kernels/wkv6.py)
                x += W_o (group_norm(out, H groups, ln_x; eps 64e-5) * g)
                x = channel_mix(x)   (rwkv_common; v6's maa_{k,r} enter as time_mix = 1 - maa)

u = time_faaaa per (head, key channel). The state S is (b, H, N, N) (key × value), rwkv5's layout,
shared by both flavours. Step: plain ops. Prefill: a Scan (portable) or LinearAttention with the
per-token log-decay -exp(d) plus the bonus outside (fused).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.rwkv_common import LN_EPS, blocks, head, hf_view, matrix_state_spec, token_shift
from edgeseq.gguf_names import CONTEXT_LENGTH, LLAMA_GN_EPS, ArchMap, f32, u32
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv6
from edgeseq.kernels.ops import group_norm, layer_norm, silu
from edgeseq.tensor_table import T, Codec, Row, as_is, one_minus, reshape, shaped, t

# ln_x's group-norm eps: BlinkDL's training code and the rwkv package use 1e-5 * head_size_divisor**2
# (divisor 8) = 64e-5 for v6 (rwkv/model.py: F.group_norm(..., eps=64e-5) in att_*_v6_0).
LN_X_EPS = 64e-5
MIX_ORDER = ("w", "k", "v", "r", "g")  # the order of time_maa_w2's 5 slices (and the package's unbind)


@dataclass
class Rwkv6Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    head_size: int
    dim_ffn: int
    mix_lora: int  # D_m
    decay_lora: int  # D_d
    version: str = "6.0"
    ln_x_eps: float = LN_X_EPS


class Rwkv6Gguf(ArchMap):
    """RWKV-6: the five static token-shift mixes fused (5, 1, 1, C) beside lerp_x; the token-shift LoRA
    as (5·D, C) and (5, C, D), the decay LoRA as Linear weights; the channel mix's lerps are BlinkDL's
    maa (edgeseq keeps 1 - maa); u (time_faaaa) as time_mix_first (H, N); no layer rescaling."""

    arch = "rwkv6"

    def supports(self, fam):
        c = fam.config
        if abs(c.ln_x_eps - LLAMA_GN_EPS) > 1e-12:
            return f"llama.cpp's rwkv6 fixes ln_x's group-norm eps at 64e-5; this model uses {c.ln_x_eps}"
        if getattr(c, "version", "6.0") != "6.0":
            return f"llama.cpp's rwkv6 is RWKV v6.0; this model is v{c.version}"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        return [u32("context_length", CONTEXT_LENGTH), u32("embedding_length", c.n_embd),
                u32("block_count", c.n_layer), f32("attention.layer_norm_epsilon", 1e-5),
                u32("rescale_every_n_layers", 0), u32("wkv.head_size", c.head_size),
                u32("time_mix_extra_dim", c.mix_lora), u32("time_decay_extra_dim", c.decay_lora),
                u32("feed_forward_length", c.dim_ffn), u32("attention.head_count", 0)]

    def config(self, g):
        a = g.arch_key
        vocab, C = g.tensor("token_embd.weight").shape
        hs = g.need(a("wkv.head_size"), int)
        if hs <= 0 or C % hs:
            raise EdgeseqError(f"{g.path}: wkv.head_size {hs} does not divide the width {C}")
        if g.get(a("rescale_every_n_layers"), 0):
            raise UnsupportedError(f"{g.path}: rescale_every_n_layers {g.get(a('rescale_every_n_layers'))} (halved "
                                   f"weights, an fp16 device trick) is not supported; convert with rescale 0")
        return dict(vocab_size=vocab, n_embd=C, n_layer=g.need(a("block_count"), int), n_head=C // hs,
                    head_size=hs, dim_ffn=g.tensor("blk.0.channel_mix_key.weight").shape[0],
                    mix_lora=g.tensor("blk.0.time_mix_w1.weight").shape[0] // 5,
                    decay_lora=g.tensor("blk.0.time_mix_decay_w1.weight").shape[0])


@register("rwkv6", "Rwkv6ForCausalLM")
class Rwkv6(Family):
    name = "rwkv6"
    gguf = Rwkv6Gguf()  # llama.cpp runs it
    Config = Rwkv6Config
    time_state_layout = "value_key"  # state-tuning files keep (value, key) per head: read_time_state

    @classmethod
    def read_config(cls, src) -> Rwkv6Config:
        src = cls.source(src)
        if src.stored_by not in ("blinkdl", "hf", "rwkv.cpp"):
            raise UnsupportedError(f"{src.path}: RWKV-6 is read from BlinkDL .pth files, rwkv.cpp files and HF "
                                   f"Rwkv6ForCausalLM directories; this layout is none of them")
        a = "blocks.0.att."
        for n in ("time_maa_x", "time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2", "time_faaaa",
                  "gate.weight", "ln_x.weight"):
            if not src.has(a + n):
                raise EdgeseqError(f"{src.path}: missing {a + n}; not an RWKV v6.0 checkpoint")
        vocab, C = src.shape("emb.weight")
        layers = 0
        while src.has(f"blocks.{layers}.ln1.weight"):
            layers += 1
        H, N = src.shape(a + "time_faaaa")[:2] if len(src.shape(a + "time_faaaa")) >= 2 else (0, 0)
        if H * N != C or src.shape(a + "key.weight")[0] != C:
            raise UnsupportedError(f"{src.path}: time_faaaa {src.shape(a + 'time_faaaa')} and key.weight "
                                   f"{src.shape(a + 'key.weight')} do not split n_embd {C} into heads")
        # rwkv.cpp's converter stored the LoRA matrices (out, in): see tensors()
        stored_t = src.stored_by == "rwkv.cpp"
        w1 = src.shape(a + "time_maa_w1")[::-1 if stored_t else 1]
        if len(w1) != 2 or w1[1] % 5:
            raise UnsupportedError(f"{src.path}: time_maa_w1 {w1} is not (C, 5·D)")
        return Rwkv6Config(vocab_size=vocab, n_embd=C, n_layer=layers, n_head=H, head_size=N,
                           dim_ffn=src.shape("blocks.0.ffn.key.weight")[0], mix_lora=w1[1] // 5,
                           decay_lora=src.shape(a + "time_decay_w1")[0 if stored_t else 1],
                           **(_hf_eps(src) if src.stored_by == "hf" else {}))

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        return matrix_state_spec(c.n_layer, c.n_embd, c.n_head, c.head_size)

    source = staticmethod(hf_view)  # HF directories under BlinkDL's names

    def tensors(self):
        """BlinkDL's names (HF directories are renamed to them by rwkv_common.hf_view). rwkv.cpp's converter
        (python/convert_pytorch_to_ggml.py, its v6.0 branch) squeezed the time_* tensors (reshaped here
        anyway) and turned the LoRA matrices into the (out, in) layout its ggml_mul_mat calls read
        (rwkv_graph.inc, rwkv_att_v6): time_maa_w1 (C, 5·D_m) -> (5·D_m, C), time_maa_w2 (5, D_m, C) ->
        (5, C, D_m), and *both* decay LoRA matrices, because its test `'.time_decay_w' in k` matches
        time_decay_w1 (C, D_d) -> (D_d, C) and time_decay_w2 (D_d, C) -> (C, D_d). GGUF: llama.cpp's rwkv6
        (the channel mix's lerps are BlinkDL's maa, where edgeseq keeps 1 - maa; no layer rescaling)."""
        c = self.config
        C, H, N, D = c.n_embd, c.n_head, c.head_size, c.mix_lora
        vec, row = reshape(C), shaped((C,), (C,))  # time_* vectors are (1, 1, C) in .pth files
        swap = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))  # noqa: E731
        b, g = "blocks.{i}.", "blk.{i}."

        def norm(ours, blink, gguf):
            return [Row(f"{ours}.{n}", f"{blink}.{n}", gguf=f"{gguf}.{n}") for n in ("weight", "bias")]

        def lora(name, theirs, load=as_is):  # (in, out) already in the .pth; (out, in) in rwkv.cpp
            return Row(f"layers.{{i}}.att.{name}", f"{b}att.{theirs}", {"*": load, "rwkv.cpp": lambda a: load(t(a))},
                       gguf=f"{g}time_mix_{name.replace('maa_', '')}.weight", codec=T)

        one_minus_c = Codec(one_minus, lambda a: one_minus(a.reshape(C)))
        return [
            Row("embed", "emb.weight", gguf="token_embd.weight"),
            *norm("ln0", "blocks.0.ln0", "token_embd_norm"),
            *norm("layers.{i}.ln1", b + "ln1", g + "attn_norm"),
            *norm("layers.{i}.ln2", b + "ln2", g + "attn_norm_2"),
            Row("layers.{i}.att.maa_x", b + "att.time_maa_x", vec, gguf=g + "time_mix_lerp_x.weight", codec=row),
            # the five static mixes stacked (5, C) in time_maa_w2's order, added to the LoRA's (b, t, 5, C)
            Row("layers.{i}.att.maa", [f"{b}att.time_maa_{m}" for m in MIX_ORDER],
                lambda *a: np.stack([x.reshape(C) for x in a]), gguf=g + "time_mix_lerp_fused.weight",
                codec=shaped((5, 1, 1, C), (5, C))),
            lora("maa_w1", "time_maa_w1", reshape(C, 5 * D)),
            Row("layers.{i}.att.maa_w2", b + "att.time_maa_w2", {"*": reshape(5, D, C), "rwkv.cpp": swap},
                gguf=g + "time_mix_w2.weight", codec=Codec(swap, swap)),
            # raw: d = decay + LoRA; w = exp(-exp(d))
            Row("layers.{i}.att.decay", b + "att.time_decay", vec, gguf=g + "time_mix_decay.weight", codec=row),
            lora("decay_w1", "time_decay_w1"),
            lora("decay_w2", "time_decay_w2"),
            Row("layers.{i}.att.bonus", b + "att.time_faaaa", reshape(H, N, 1), gguf=g + "time_mix_first.weight",
                codec=shaped((H, N), (H, N, 1))),  # u, used as is
            *(Row(f"layers.{{i}}.att.{n}", f"{b}att.{n}.weight", t, gguf=f"{g}time_mix_{n}.weight", codec=T)
              for n in ("receptance", "key", "value", "gate", "output")),
            *norm("layers.{i}.att.ln_x", b + "att.ln_x", g + "time_mix_ln"),
            # v6 mixes xx + (shifted - xx)·maa; rwkv_common.lerp computes shifted + (xx - shifted)·mix, the
            # same value for mix = 1 - maa (computed in float64; the two roundings differ by ~1 ulp)
            *(Row(f"layers.{{i}}.ffn.time_mix_{m}", f"{b}ffn.time_maa_{m}", lambda a: one_minus(a.reshape(C)),
                  gguf=f"{g}channel_mix_lerp_{m}.weight", codec=one_minus_c) for m in ("k", "r")),
            *(Row(f"layers.{{i}}.ffn.{n}", f"{b}ffn.{n}.weight", t, gguf=f"{g}channel_mix_{n}.weight", codec=T)
              for n in ("key", "value", "receptance")),
            *norm("ln_out", "ln_out", "output_norm"),
            Row("head", "head.weight", gguf="output.weight"),  # (vocab, C); rwkv_common.head reads it transposed
        ]

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        return blocks(b, ids, state, self.config.n_layer, self._time_mix, tokens, fused)

    def _time_mix(self, b, x, prev, s, o, tokens, fused):
        c = self.config
        H, N, C, D = c.n_head, c.head_size, c.n_embd, c.mix_lora
        xx = layer_norm(b, x, o + "ln1.weight", o + "ln1.bias", LN_EPS)
        shifted, new_prev = token_shift(b, xx, prev, tokens)  # (b, t, C), shifted is (b, 1, C) for a step
        sx = shifted - xx
        # data-dependent mixes: tanh(x_x W1) -> (b, t, 5, 1, D) @ W2 (5, D, C) -> (b, t, 5, C)
        lora = ((xx + sx * b.w(o + "att.maa_x")) @ b.w(o + "att.maa_w1")).tanh().reshape(0, 0, 5, 1, D)
        mix = (lora @ b.w(o + "att.maa_w2")).squeeze(3) + b.w(o + "att.maa")  # (b, t, 5, C)
        mixed = xx.unsqueeze(2) + sx.unsqueeze(2) * mix
        xw, xk, xv, xr, xg = (z.squeeze(2) for z in mixed.split([1] * 5, axis=2))
        r, k, v, g = (z @ b.w(f"{o}att.{name}")
                      for z, name in ((xr, "receptance"), (xk, "key"), (xv, "value"), (xg, "gate")))
        d = b.w(o + "att.decay") + (xw @ b.w(o + "att.decay_w1")).tanh() @ b.w(o + "att.decay_w2")
        log_w = -d.exp()  # (b, t, C): log of the decay w = exp(-exp(d))
        u = b.w(o + "att.bonus")
        if fused and tokens != 1:
            y, s = wkv6.linear_attention(r, k, v, state=s, bonus=u, log_decay=log_w, heads=H, size=N)
        else:  # plain ops in both flavours: the step itself for one token, a Scan of it for several
            one = tokens == 1
            heads = (-1, H, N) if one else (0, 0, H, N)  # (b, t, C) -> (b, [t,] H, N)
            y, s = wkv6.wkv(s, r=r.reshape(*heads), k=k.reshape(*heads), v=v.reshape(*heads),
                            w=log_w.reshape(*heads, 1).exp(), u=u, one_token=one)
            y = y.reshape(*((-1, 1, C) if one else (0, 0, C)))
        y = group_norm(b, y, H, C, o + "att.ln_x.weight", o + "att.ln_x.bias", c.ln_x_eps)
        return x + (y * g.silu()) @ b.w(o + "att.output"), new_prev, s

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return head(b, hidden, self.config.vocab_size)

    def quant_policy(self, name, shape):
        # the token-shift and decay LoRAs (small; the decay sits inside exp(-exp(.))): f32, as llama.cpp
        # keeps time_mix_w1/w2 and time_mix_decay_w1/w2
        return "f32" if name.endswith(("att.maa_w1", "att.maa_w2", "att.decay_w1", "att.decay_w2")) else None


def _hf_eps(src) -> dict:
    """HF Rwkv6Config: ln_x's eps is 1e-5 · head_size_divisor² (as BlinkDL's), the layer norms' eps
    layer_norm_epsilon (1e-5, which the graphs use; anything else is refused rather than ignored)."""
    cfg = getattr(src, "config", None) or {}
    if float(cfg.get("layer_norm_epsilon", LN_EPS)) != LN_EPS:
        raise UnsupportedError(f"{src.path}/config.json: layer_norm_epsilon {cfg['layer_norm_epsilon']} "
                               f"(edgeseq's RWKV-6 graphs use {LN_EPS})")
    return {"ln_x_eps": 1e-5 * float(cfg.get("head_size_divisor", 8)) ** 2}
