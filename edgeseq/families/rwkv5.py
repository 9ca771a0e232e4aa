"""RWKV-5 (v5.2, "Eagle"): time mix with a matrix-valued state per head, then the shared channel mix.

Symbols: b batch · t tokens · C width (n_embd) · H heads · N head size (C = H·N) · F dim_ffn.

    per layer:  xx = ln1(x);  shifted = previous token's xx (state shift_att)
                r, k, v = W_{r,k,v} lerp(xx, shifted, time_mix_{r,k,v})        (b, t, H, N)
                g = silu(W_g lerp(xx, shifted, time_mix_g))
                out_t = r_t · (u ⊙ k_tᵀ v_t + S_{t-1});  S_t = k_tᵀ v_t + w ⊙ S_{t-1}   (kernels/wkv5.py)
                x += W_o (group_norm(out, H groups, ln_x; eps see LN_X_EPS) * g)
                x = channel_mix(x)                                           (rwkv_common)

w = exp(-exp(time_decay)) and u = time_faaaa, both per (head, key channel). The state S is
(b, H, N, N) (key × value), LinearAttention's layout, shared by both flavours.

Sources: rwkv.cpp `.bin` files (v5.2 only; time_decay stored already as w, time_* squeezed) and BlinkDL
`.pth` files (v5.0, v5.1, v5.2; raw time_decay, (1, 1, C) mixes). The older versions, as the rwkv
package reads them: v5.1 keeps one decay per head (time_decay (H,)) and the bonus as `time_first`,
u = exp(time_first) per head; v5.0 is v5.1 without the gate (y goes to W_o straight from ln_x). Per-head
values are broadcast to (H, N, 1), so one graph serves every version.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.rwkv_common import blocks, head, lerp, matrix_state_spec, token_shift, transposed
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv5
from edgeseq.kernels.ops import group_norm, layer_norm, silu

LN_EPS = 1e-5
# ln_x's group-norm eps depends on the runtime the weights were made for: BlinkDL's training code and the
# rwkv package use 1e-5 * head_size_divisor**2 = 64e-5 for v5.2, while rwkv.cpp normalises with 1e-5
# (its fixtures' expected logits only match with 1e-5: max |diff| 3e-6 vs 1.09 with 64e-5). An rwkv.cpp
# file is exported to reproduce rwkv.cpp; a BlinkDL .pth file the rwkv package's 64e-5 (every v5 version).
LN_X_EPS = {"rwkv.cpp": 1e-5, "pth": 64e-5}


@dataclass
class Rwkv5Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    head_size: int
    dim_ffn: int
    version: str = "5.2"
    ln_x_eps: float = 1e-5
    gate: bool = True  # v5.0 has none


@register("rwkv5")
class Rwkv5(Family):
    name = "rwkv5"
    Config = Rwkv5Config
    time_state_layout = "value_key"  # state-tuning files keep (value, key) per head: read_time_state

    @classmethod
    def read_config(cls, src) -> Rwkv5Config:
        by = getattr(src, "stored_by", None)
        if by not in ("rwkv.cpp", "blinkdl"):
            raise UnsupportedError(f"{src.path}: RWKV-5 is read from rwkv.cpp .bin and BlinkDL .pth files only")
        a = "blocks.0.att."
        vocab, C = src.shape("emb.weight")
        layers = sum(1 for k in src.keys() if k.endswith(".att.ln_x.weight"))
        decay = tuple(src.shape(a + "time_decay"))
        gate = src.has(a + "gate.weight")
        if by == "rwkv.cpp":
            # rwkv.cpp's converter stores time_decay as w = exp(-exp(decay)): (H, N, 1) for v5.2, (H, 1) for
            # v5.1 (a gate, one decay per head), (H, 1, 1) for v5.0 (no gate); v5.0/5.1's time_first as
            # exp(time_first), (H, 1, 1); v5.2's time_faaaa unsqueezed to (H, N, 1)
            H = decay[0] if decay else 0
            if len(decay) == 3 and decay[1] > 1 and decay[2] == 1 and gate and src.has(a + "time_faaaa"):
                N, version = decay[1], "5.2"
            elif decay in ((H, 1), (H, 1, 1)) and H and C % H == 0 and src.has(a + "time_first"):
                N, version = C // H, "5.1" if gate else "5.0"
                if (len(decay) == 2) != gate:
                    raise UnsupportedError(f"{src.path}: time_decay {decay} with{'' if gate else 'out'} a gate is "
                                           f"not what rwkv.cpp's converter writes for v5.0 or v5.1")
            else:
                raise UnsupportedError(f"{src.path}: unexpected RWKV-5 time_decay {decay} in an rwkv.cpp file "
                                       f"(v5.2: (H, N, 1) with time_faaaa; v5.0/5.1: (H, 1, 1) / (H, 1) with "
                                       f"time_first)")
        else:
            # the rwkv package's test: a (H, N) decay with N > 1 is v5.2, else one decay per head (v5.0/5.1)
            if any(k.endswith(".att.time_state") for k in src.keys()):
                raise UnsupportedError(f"{src.path}: state-tuned RWKV-5 (att.time_state) is not supported")
            H = decay[0] if decay else 0
            per_channel = len(decay) > 1 and decay[1] > 1
            version = "5.2" if per_channel else ("5.1" if gate else "5.0")
            if len(decay) > 2 or (not per_channel and int(np.prod(decay)) != H):
                raise UnsupportedError(f"{src.path}: unexpected RWKV-5 time_decay shape {decay}")
            if H == 0 or C % H:
                raise UnsupportedError(f"{src.path}: time_decay {decay} does not split n_embd {C} into heads")
            N = C // H
            if per_channel and decay[1] != N:
                raise UnsupportedError(f"{src.path}: time_decay {decay} does not split n_embd {C} into heads")
            if not (src.has(a + "time_faaaa") or src.has(a + "time_first")):
                raise UnsupportedError(f"{src.path}: RWKV-5 without time_faaaa or time_first")
            if version == "5.2" and not gate:
                raise UnsupportedError(f"{src.path}: RWKV v5.2 decay without a gate: unknown variant")
        if H * N != C:
            raise UnsupportedError(f"{src.path}: time_decay {decay} does not split n_embd {C} into heads")
        att = src.shape(a + "key.weight")[0]
        if att != C:
            raise UnsupportedError(f"{src.path}: attention width {att} differs from n_embd {C}; not supported")
        return Rwkv5Config(vocab_size=vocab, n_embd=C, n_layer=layers, n_head=H, head_size=N,
                           dim_ffn=src.shape("blocks.0.ffn.key.weight")[0], version=version,
                           ln_x_eps=LN_X_EPS["rwkv.cpp" if by == "rwkv.cpp" else "pth"], gate=gate)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        return matrix_state_spec(c.n_layer, c.n_embd, c.n_head, c.head_size)

    def convert(self, src) -> Iterator[tuple[str, np.ndarray]]:
        c = self.config
        yield "embed", src.get("emb.weight")
        yield "ln0.weight", src.get("blocks.0.ln0.weight")
        yield "ln0.bias", src.get("blocks.0.ln0.bias")
        for i in range(c.n_layer):
            s, o = f"blocks.{i}.", f"layers.{i}."
            for n in ("ln1", "ln2"):
                yield f"{o}{n}.weight", src.get(f"{s}{n}.weight")
                yield f"{o}{n}.bias", src.get(f"{s}{n}.bias")
            for m in ("k", "v", "r", "g") if c.gate else ("k", "v", "r"):  # (1, 1, C) in .pth; rwkv.cpp: (C,)
                yield f"{o}att.time_mix_{m}", src.get(f"{s}att.time_mix_{m}").reshape(c.n_embd)
            yield from self._decay_bonus(src, s, o)
            for m in ("receptance", "key", "value", "output") + (("gate",) if c.gate else ()):
                yield f"{o}att.{m}", transposed(src.get(f"{s}att.{m}.weight"))
            yield o + "att.ln_x.weight", src.get(f"{s}att.ln_x.weight")
            yield o + "att.ln_x.bias", src.get(f"{s}att.ln_x.bias")
            for m in ("k", "r"):
                yield f"{o}ffn.time_mix_{m}", src.get(f"{s}ffn.time_mix_{m}").reshape(c.n_embd)
            for m in ("key", "value", "receptance"):  # (in, out) for MatMul: key (C, F), value (F, C)
                yield f"{o}ffn.{m}", transposed(src.get(f"{s}ffn.{m}.weight"))
        yield "ln_out.weight", src.get("ln_out.weight")
        yield "ln_out.bias", src.get("ln_out.bias")
        yield "head", src.get("head.weight")  # (vocab, C) as stored; rwkv_common.head reads it transposed

    def _decay_bonus(self, src, s, o):
        """att.decay w and att.bonus u as (H, N, 1), att.log_decay log w as (H*N) float32."""
        c = self.config
        H, N = c.n_head, c.head_size
        a = s + "att."
        if getattr(src, "stored_by", None) == "rwkv.cpp":
            # rwkv.cpp stores time_decay already as w = exp(-exp(decay)), (H, N, 1): exactly the factor the
            # step multiplies the state's key rows by, so it is kept. The fused flavour's LinearAttention
            # wants log w = -exp(decay) per key channel (H*N); log of a value that underflowed to 0 is
            # clipped to -1e30 (exp gives 0 again) rather than -inf, which would turn 0·(-inf) into NaN.
            w = np.broadcast_to(src.get(a + "time_decay").reshape(H, -1, 1), (H, N, 1)).astype(np.float32)
            yield o + "att.decay", w
            with np.errstate(divide="ignore"):
                yield o + "att.log_decay", np.maximum(np.log(w), -1e30).reshape(H * N).astype(np.float32)
            # v5.2's bonus u (time_faaaa) is used as is, rwkv.cpp only unsqueezed it to (H, N, 1); v5.0/5.1's
            # time_first was stored as exp(time_first), which is the bonus itself, one per head
            u = src.get(a + ("time_faaaa" if c.version == "5.2" else "time_first"))
            yield o + "att.bonus", np.broadcast_to(u.reshape(H, -1, 1), (H, N, 1)).astype(np.float32)
            return
        # BlinkDL .pth: raw time_decay, (H, N) for v5.2, one per head for v5.0/5.1 (broadcast over N).
        # log w = -exp(decay) is computed directly (in float64), so it never meets log(0); it is kept
        # finite (-1e30) for the same 0·(-inf) reason as above.
        with np.errstate(over="ignore"):
            log_w = -np.exp(src.get(a + "time_decay").astype(np.float64)).reshape(H, -1, 1)
        log_w = np.broadcast_to(np.maximum(log_w, -1e30), (H, N, 1))
        yield o + "att.decay", np.exp(log_w).astype(np.float32)
        yield o + "att.log_decay", log_w.reshape(H * N).astype(np.float32)
        if c.version == "5.2":  # v5.2's bonus, used as is
            u = src.get(a + "time_faaaa").astype(np.float64)
        else:  # v5.0/5.1 store its log, one per head
            u = np.exp(src.get(a + "time_first").astype(np.float64))
        yield o + "att.bonus", np.broadcast_to(u.reshape(H, -1, 1), (H, N, 1)).astype(np.float32)

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        return blocks(b, ids, state, self.config.n_layer, self._time_mix, tokens, fused)

    def _time_mix(self, b, x, prev, s, o, tokens, fused):
        c = self.config
        H, N, C = c.n_head, c.head_size, c.n_embd
        xx = layer_norm(b, x, o + "ln1.weight", o + "ln1.bias", LN_EPS)
        shifted, new_prev = token_shift(b, xx, prev, tokens)
        mats = (("r", "receptance"), ("k", "key"), ("v", "value")) + ((("g", "gate"),) if c.gate else ())
        r, k, v, *g = (lerp(b, xx, shifted, f"{o}att.time_mix_{m}") @ b.w(f"{o}att.{name}") for m, name in mats)
        u, w = b.w(o + "att.bonus"), b.w(o + "att.decay")
        if fused and tokens != 1:
            log_w = k * 0.0 + b.w(o + "att.log_decay")  # (b, t, H*N): the constant decay, per token
            y, s = wkv5.linear_attention(r, k, v, state=s, bonus=u, log_decay=log_w, decay_last=w, heads=H, size=N)
        else:  # plain ops in both flavours: the step itself for one token, a Scan of it for several
            one = tokens == 1
            heads = (-1, H, N) if one else (0, 0, H, N)  # (b, t, C) -> (b, [t,] H, N)
            y, s = wkv5.wkv(s, r=r.reshape(*heads), k=k.reshape(*heads), v=v.reshape(*heads), u=u, w=w,
                            one_token=one)
            y = y.reshape(*((-1, 1, C) if one else (0, 0, C)))
        y = group_norm(b, y, H, C, o + "att.ln_x.weight", o + "att.ln_x.bias", c.ln_x_eps)
        if g:  # v5.1/v5.2: silu gate; v5.0 has none
            y = y * g[0].silu()
        y = y @ b.w(o + "att.output")
        return x + y, new_prev, s

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return head(b, hidden, self.config.vocab_size)

    def quant_policy(self, name, shape):
        # int4: the embedding and the time mix's projections (r, k, v, g, output) at 8 bits, the channel mix
        # at 4. Measured on rwkv.cpp's trained v5.1/v5.2 fixtures (docs/quantization.md): per weight, 4-bit
        # rounding moves the output distribution (KL from f32) 15-25x as much in the embedding and up to 7x
        # as much in the time mix as in the channel mix. All at 4 bits, int4 cost v5.1 +5.4 % perplexity over
        # the held-out tail (Q4_0 +2.0 %); with these at 8 bits, +0.8 %
        return "int8" if name == "embed" or ".att." in name else None

    def quant_block(self, bits, block):
        # 8-bit matrices in blocks of 16: at accuracy level 4 the activations' int8 rounding (per block) was
        # half of int8's cost on the v5.1 fixture (KL from f32 over 20,000 bytes: 0.73e-3 at level 4, 0.36e-3
        # at level 0, 0.52e-3 in blocks of 16); int8 +0.20 % perplexity in blocks of 32, +0.07 % in 16 (Q8_0
        # -0.06 %)
        return min(block, 16) if bits == 8 else block
