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
from typing import Iterator

import numpy as np

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.rwkv_common import LN_EPS, embed_ln0, head, matrix_state_spec, token_shift, transposed
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv7
from edgeseq.kernels.ops import group_norm, layer_norm

MIXES = ("r", "w", "k", "v", "a", "g")  # the order of rwkv.cpp's fused att.x_rwkvag
LORAS = ("w", "a", "v", "g")
GN_EPS = 64e-5  # ln_x: 1e-5 · head_size_divisor² (8²), as the reference


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


class FlaNames:
    """Presents a flash-linear-attention (fla-hub) `RWKV7ForCausalLM` checkpoint under BlinkDL's names
    and shapes, so one `convert` serves both layouts. fla's RWKV7Attention computes the same model as
    BlinkDL's x070 (its decay -e^{-1/2}·sigmoid(·) is BlinkDL's -softplus(-·)-1/2 through exp(-exp(·)));
    it keeps each LoRA as `lora.0` (rank, C), an activation, `lora.2` (out, rank) + bias, where BlinkDL
    keeps x1 (C, rank), x2 (rank, out) and the bias as x0. Mapping (fla → BlinkDL):

        model.embeddings / model.norm / lm_head      emb / ln_out / head
        model.layers.{i}.pre_norm|attn_norm|ffn_norm  blocks.{i}.ln0|ln1|ln2
        attn.x_{r,w,k,v,a,g}, k_k, k_a, r_k           att.x_*, k_k, k_a, r_k
        attn.{r,k,v,o}_proj                           att.receptance|key|value|output
        attn.{w,a,v,g}_lora.lora.{0,2}.weight, .2.bias   att.{w,a,v,g}{1,2} (transposed), {w,a,v}0
        attn.g_norm                                   att.ln_x
        ffn.x_k, ffn.key, ffn.value                   ffn.x_k, ffn.key, ffn.value
    Older fla files keep the six mixes as one `attn.x_x` (6, C), in r, w, k, v, a, g order."""

    stored_by = "fla"

    def __init__(self, src):
        self.src, self.path, self.config = src, src.path, src.config
        self._map: dict[str, tuple] = {}  # BlinkDL name -> (fla name, transform)
        ident = lambda a: a  # noqa: E731
        t = lambda a: np.ascontiguousarray(a.T)  # noqa: E731
        put = lambda name, fla, fn=ident: self._map.__setitem__(name, (fla, fn))  # noqa: E731
        put("emb.weight", "model.embeddings.weight")
        put("head.weight", "lm_head.weight" if src.has("lm_head.weight") else "model.embeddings.weight")
        for n in ("weight", "bias"):
            put(f"ln_out.{n}", f"model.norm.{n}")
        i = 0
        while src.has(f"model.layers.{i}.attn_norm.weight"):
            f, b = f"model.layers.{i}.", f"blocks.{i}."
            for ours, theirs in (("ln0", "pre_norm"), ("ln1", "attn_norm"), ("ln2", "ffn_norm"), ("att.ln_x", "attn.g_norm")):
                for n in ("weight", "bias"):
                    put(f"{b}{ours}.{n}", f"{f}{theirs}.{n}")
            for j, m in enumerate(MIXES):
                if src.has(f"{f}attn.x_x"):
                    put(f"{b}att.x_{m}", f"{f}attn.x_x", lambda a, j=j: a.reshape(len(MIXES), -1)[j])
                else:
                    put(f"{b}att.x_{m}", f"{f}attn.x_{m}")
            for n in ("k_k", "k_a", "r_k"):
                put(f"{b}att.{n}", f"{f}attn.{n}")
            for ours, theirs in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
                put(f"{b}att.{ours}.weight", f"{f}attn.{theirs}.weight")
            for m in LORAS:
                put(f"{b}att.{m}1", f"{f}attn.{m}_lora.lora.0.weight", t)
                put(f"{b}att.{m}2", f"{f}attn.{m}_lora.lora.2.weight", t)
                put(f"{b}att.{m}0", f"{f}attn.{m}_lora.lora.2.bias")
            for n in ("x_k", "key.weight", "value.weight"):
                put(f"{b}ffn.{n}", f"{f}ffn.{n}")
            i += 1

    @staticmethod
    def applies(src) -> bool:
        return src.has("model.embeddings.weight") and src.has("model.layers.0.attn.r_k")

    def keys(self):
        return [k for k, (fla, _) in self._map.items() if self.src.has(fla) or k.endswith(".bias")]

    def has(self, name):
        return name in self._map and (self.src.has(self._map[name][0]) or self._bias_default(name))

    def _bias_default(self, name):
        # norm_bias = False: fla's LayerNorms have no bias, which is a zero bias here
        fla = self._map[name][0]
        return fla.endswith("norm.bias") and self.src.has(fla[:-4] + "weight")

    def shape(self, name):
        return tuple(self.get(name).shape)

    def get(self, name):
        if name not in self._map:
            raise UnsupportedError(f"{self.path}: the fla RWKV7 layout has no tensor for {name!r}")
        fla, fn = self._map[name]
        if not self.src.has(fla) and self._bias_default(name):
            return np.zeros(self.src.shape(fla[:-4] + "weight"), np.float32)
        return fn(self.src.get(fla))


def _as_blinkdl(src):
    # a model directory (no stored_by) in the fla layout
    return FlaNames(src) if getattr(src, "stored_by", None) is None and FlaNames.applies(src) else src


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


@register("rwkv7", "RWKV7ForCausalLM", "Rwkv7ForCausalLM")
class Rwkv7(Family):
    name = "rwkv7"
    Config = Rwkv7Config
    time_state_layout = "key_value"  # state-tuning files keep (key, value) per head: read_time_state

    @classmethod
    def read_config(cls, src) -> Rwkv7Config:
        src = _as_blinkdl(src)
        if getattr(src, "stored_by", None) not in ("rwkv.cpp", "blinkdl", "fla"):
            raise UnsupportedError(f"{src.path}: RWKV-7 is read from rwkv.cpp .bin files, BlinkDL .pth files and "
                                   f"fla-layout (RWKV7ForCausalLM) directories; this layout is none of them")
        vocab, C = src.shape("emb.weight")
        layers = sum(1 for k in src.keys() if re.fullmatch(r"blocks\.\d+\.ln1\.weight", k))
        n_head, head_size = src.shape("blocks.0.att.r_k")  # (H, N), as the reference reads it
        if n_head * head_size != C:
            raise UnsupportedError(f"{src.path}: att.r_k is {(n_head, head_size)}, which does not tile n_embd {C}")
        extra = _fla_config(src, n_head, head_size) if src.stored_by == "fla" else {}
        return Rwkv7Config(vocab_size=vocab, n_embd=C, n_layer=layers, n_head=n_head, head_size=head_size,
                           dim_ffn=src.shape("blocks.0.ffn.key.weight")[0], **extra)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        return matrix_state_spec(c.n_layer, c.n_embd, c.n_head, c.head_size, "N value, N key")

    def convert(self, src) -> Iterator[tuple[str, np.ndarray]]:
        src = _as_blinkdl(src)
        c = self.config
        C = c.n_embd
        rwkv_cpp = src.stored_by == "rwkv.cpp"
        yield "embed", src.get("emb.weight")
        yield "ln0.weight", src.get("blocks.0.ln0.weight")
        yield "ln0.bias", src.get("blocks.0.ln0.bias")
        for i in range(c.n_layer):
            s, o = f"blocks.{i}.", f"layers.{i}."
            for n in ("ln1", "ln2", "att.ln_x"):
                yield f"{o}{n}.weight", src.get(f"{s}{n}.weight")
                yield f"{o}{n}.bias", src.get(f"{s}{n}.bias")
            if rwkv_cpp:
                # rwkv.cpp fuses the six token-shift mixes into one (6, 1, C) tensor; the graph uses them one by one
                mixes = src.get(s + "att.x_rwkvag").reshape(len(MIXES), C)
                for j, m in enumerate(MIXES):
                    yield f"{o}att.x_{m}", np.ascontiguousarray(mixes[j])
            else:
                for m in MIXES:
                    yield f"{o}att.x_{m}", src.get(f"{s}att.x_{m}").reshape(C)  # (1, 1, C) -> (C,)
            for m in LORAS:
                if m == "v" and i == 0:
                    continue  # layer 0 makes v_first; it has no value-residual gate
                # the .pth keeps LoRA matrices (in, out) already: (C, rank) and (rank, C); rwkv.cpp stores both
                # transposed, so they are turned back to the (in, out) the graph multiplies with
                fix = transposed if rwkv_cpp else np.ascontiguousarray
                yield f"{o}att.{m}1", fix(src.get(f"{s}att.{m}1"))
                yield f"{o}att.{m}2", fix(src.get(f"{s}att.{m}2"))
                if m != "g":
                    yield f"{o}att.{m}0", src.get(f"{s}att.{m}0").reshape(C)  # (1, 1, C) -> (C,)
            for n in ("k_k", "k_a", "r_k"):  # (1, 1, C) and (H, N): per-channel vectors in the graph
                yield f"{o}att.{n}", src.get(f"{s}att.{n}").reshape(C)
            for n in ("receptance", "key", "value", "output"):
                yield f"{o}att.{n}", transposed(src.get(f"{s}att.{n}.weight"))
            yield o + "ffn.x_k", src.get(s + "ffn.x_k").reshape(C)
            yield o + "ffn.key", transposed(src.get(s + "ffn.key.weight"))
            yield o + "ffn.value", transposed(src.get(s + "ffn.value.weight"))
        yield "ln_out.weight", src.get("ln_out.weight")
        yield "ln_out.bias", src.get("ln_out.bias")
        yield "head", src.get("head.weight")  # (vocab, C) as stored: rwkv_common.head reads it with Gemm(transB=1)

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
        w = (w * -math.exp(-0.5)).exp()  # the decay, in (exp(-e^-0.5), 1)
        a = (W("a0") + xa @ W("a1") @ W("a2")).sigmoid()  # the in-context learning rate
        g = (xg @ W("g1")).sigmoid() @ W("g2")
        kk = (k * W("k_k")).reshape(0, 0, H, N)
        kk = (kk / b.op("ReduceL2", kk, b.ints([-1]), keepdims=1).maximum(1e-12)).reshape(0, 0, C)  # F.normalize
        k = k * (1.0 + (a - 1.0) * W("k_a"))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * (W("v0") + xv @ W("v1") @ W("v2")).sigmoid()
        one = tokens == 1
        col = lambda x: wkv7.column(b, x, H, N, not one)  # noqa: E731
        row = lambda x: wkv7.row(b, x, H, N, not one)  # noqa: E731
        y, S = wkv7.wkv(S, r=col(r), w=row(w), k=row(k), v=col(v), a=col(-kk), bb=row(kk * a), one_token=one)
        y = y.reshape(*((-1, 1, C) if one else (0, 0, C)))  # (b, t, C)
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
