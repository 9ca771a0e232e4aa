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

import numpy as np

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.rwkv_common import blocks, head, lerp, matrix_state_spec, token_shift
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv5
from edgeseq.kernels.ops import group_norm, layer_norm, silu
from edgeseq.tensor_table import Row, reshape, t

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
        by = src.stored_by
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

    def tensors(self):
        c = self.config
        C, H, N = c.n_embd, c.n_head, c.head_size
        b = "blocks.{i}."
        vec = reshape(C)  # (1, 1, C) in .pth; rwkv.cpp: (C,)
        norm = lambda ours, theirs: [Row(f"{ours}.{n}", f"{theirs}.{n}") for n in ("weight", "bias")]  # noqa: E731
        per_key = lambda a: np.broadcast_to(a.reshape(H, -1, 1), (H, N, 1))  # noqa: E731  one per head: over N
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731

        # att.decay w and att.bonus u as (H, N, 1), att.log_decay log w as (H*N). rwkv.cpp stores time_decay
        # already as w = exp(-exp(decay)): exactly the factor the step multiplies the state's key rows by,
        # so it is kept; the fused flavour's LinearAttention wants log w per key channel, and the log of a
        # value that underflowed to 0 is clipped to -1e30 (exp gives 0 again) rather than -inf, which would
        # turn 0·(-inf) into NaN. A BlinkDL .pth holds the raw time_decay, (H, N) for v5.2, one per head for
        # v5.0/5.1; log w = -exp(decay) is computed directly (float64), so it never meets log(0), and is
        # kept finite (-1e30) for the same reason.
        def log_w(raw):
            with np.errstate(over="ignore"):
                return np.maximum(per_key(-np.exp(raw.astype(np.float64))), -1e30)

        def log_of(w):
            with np.errstate(divide="ignore"):
                return np.maximum(np.log(per_key(w)), -1e30)

        v52 = c.version == "5.2"
        # v5.2's bonus u (time_faaaa) is used as is (rwkv.cpp only unsqueezed it to (H, N, 1)); v5.0/5.1
        # store its log, time_first, one per head, which rwkv.cpp stored as exp(time_first): the bonus itself
        bonus = {"*": lambda a: f32(per_key(a.astype(np.float64) if v52 else np.exp(a.astype(np.float64)))),
                 "rwkv.cpp": lambda a: f32(per_key(a))}
        return [
            Row("embed", "emb.weight"),
            *norm("ln0", "blocks.0.ln0"),
            *norm("layers.{i}.ln1", b + "ln1"),
            *norm("layers.{i}.ln2", b + "ln2"),
            *(Row(f"layers.{{i}}.att.time_mix_{m}", f"{b}att.time_mix_{m}", vec)
              for m in (("k", "v", "r", "g") if c.gate else ("k", "v", "r"))),
            Row("layers.{i}.att.decay", b + "att.time_decay",
                {"*": lambda a: f32(np.exp(log_w(a))), "rwkv.cpp": lambda a: f32(per_key(a))}),
            Row("layers.{i}.att.log_decay", b + "att.time_decay",
                {"*": lambda a: f32(log_w(a).reshape(H * N)), "rwkv.cpp": lambda a: f32(log_of(a).reshape(H * N))}),
            Row("layers.{i}.att.bonus", b + ("att.time_faaaa" if v52 else "att.time_first"), bonus),
            *(Row(f"layers.{{i}}.att.{m}", f"{b}att.{m}.weight", t)
              for m in ("receptance", "key", "value", "output") + (("gate",) if c.gate else ())),
            *norm("layers.{i}.att.ln_x", b + "att.ln_x"),
            *(Row(f"layers.{{i}}.ffn.time_mix_{m}", f"{b}ffn.time_mix_{m}", vec) for m in ("k", "r")),
            # (in, out) for MatMul: key (C, F), value (F, C)
            *(Row(f"layers.{{i}}.ffn.{m}", f"{b}ffn.{m}.weight", t) for m in ("key", "value", "receptance")),
            *norm("ln_out", "ln_out"),
            Row("head", "head.weight"),  # (vocab, C) as stored; rwkv_common.head reads it transposed
        ]

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
