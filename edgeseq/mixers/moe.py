"""Mixture-of-experts feed-forward, in standard ops: the routers and experts of transformers'
Lfm2MoeSparseMoeBlock (sigmoid), Qwen3-MoE/Qwen3-Next/Qwen3.5-MoE and GraniteMoe (softmax, top k
renormalised), Jamba (softmax, not renormalised), NemotronH (sigmoid, ungated relu² experts).

Symbols: b batch · t tokens · d model width · E experts · k experts per token · f expert width.

    s = sigmoid(h Wr)  or  softmax(h Wr)            (b, t, E) router scores (`score`)
    chosen = the k largest of s + expert_bias       (the bias picks; it does not weigh)
    w = s on the chosen, 0 elsewhere;  w = w / (Σw + 1e-6) when norm_topk_prob;  w = w · routed_scaling
    out = Σ_e w_e · (silu(h W1_e) · h W3_e) W2_e    gated experts (`gated`, the default)
    out = Σ_e w_e · act(h W3_e) W2_e                ungated experts (`act`: "relu2" is relu(x)²)

Softmax over the top k logits (GraniteMoe) is softmax over all E renormalised over the top k: the same
weights, so it is `score="softmax", norm_topk=True` (its 1e-6 is below float32's reach of Σw ≈ 1).
Shared experts and their gates are plain MLPs beside this block: the families compose them.

The choice is a rank, not a TopK: expert e is chosen when fewer than k experts score above it (one
comparison of every pair: E² per token, plain elementwise ops). Every expert runs on every token
and the unchosen ones are weighed by 0: exact, E/k times the work of a sparse kernel, no data-dependent
shapes (mobile runtimes). The experts are three plain matrices (d, E·f), (d, E·f), (E·f, d) (expert e's
slice e·f..(e+1)·f), so the weights quantize as any MatMul's (MatMulNBits). Ties between the k-th and (k+1)-th scores
choose both; tests keep a margin there so that float32 and float64 choose alike. This is the portable flavour,
and the fused flavour's wherever the contrib ops below do not compute what the reference does.

Fused flavour (`fused=True`): ONNX Runtime's com.microsoft MoE (f32 experts) or QMoE (int8/int4 experts)
computes only the k chosen experts per token. Both apply a softmax to `router_probs`, pick its top k and,
with normalize_routing_weights, renormalise over them (no 1e-6: a relative 1e-6 on w). So:

    softmax routing          router_probs = h Wr                      exact (Qwen3-MoE/-Next/3.5-MoE, Granite, Jamba)
    sigmoid, renormalised    router_probs = log sigmoid(h Wr)          softmax(log s) = s / Σ_E s: same top k,
                                                                      and renormalised over it, s / Σ_k s
    choice bias, or sigmoid  MoE: no (its weights are the softmax of the scores it chooses by);
      not renormalised       QMoE: router_probs = s + bias chooses, router_weights = s weighs (renormalised
                             or not): exact, so LFM2-MoE and NemotronH use QMoE under int8/int4
    relu² experts            no: the CPU kernel has relu, gelu, silu, swiglu, identity (relu2 is CUDA only)

Gated experts are activation "swiglu" with alpha 1, beta 0 (g·sigmoid(g)·u = silu(g)·u), which the CPU kernel
takes only interleaved (swiglu_fusion 1: fc1 (E, 2f, d) rows g0, u0, g1, u1, ...); ungated silu is "silu".
fc1/fc3 are (E, f, d), fc2 (E, d, f): the graph reshapes and transposes the canonical matrices into that
(ONNX Runtime folds those nodes into initializers when the session starts: the shared weights file keeps one
layout for both flavours and the quantizer; it folds up to 1 GiB per tensor, so larger expert stacks keep the
dense form, see `_folds`). QMoE reads the bytes the int8/int4 recipe wrote for MatMulNBits
(per output row, blocks along the input), regrouped per expert the same way; it needs one bit width and one
block for the three matrices, a block that divides d and f, and (int4) an even number of blocks per expert row
of fc2, else the experts stay MatMulNBits in the dense form. QMoE gets no accuracy_level (onnxruntime 1.30
rejects the attribute; 1.32's default, 0, keeps f32 activations for int4, its int8 kernel always rounds them to
int8). Routed scaling
multiplies the op's output. The op takes (b, t, d) and one router row per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.ops import linear
from edgeseq.tensor_table import T, Codec, Row, t


def cat_in(*mats: np.ndarray) -> np.ndarray:
    """Per-expert torch Linear weights (f, d) as one (d, E·f) matrix: expert e's columns e·f..(e+1)·f."""
    return np.ascontiguousarray(np.concatenate([m.T for m in mats], axis=1))


def cat_out(*mats: np.ndarray) -> np.ndarray:
    """Per-expert torch Linear weights (d, f) as one (E·f, d) matrix: expert e's rows e·f..(e+1)·f."""
    return np.ascontiguousarray(np.concatenate([m.T for m in mats], axis=0))


@dataclass(frozen=True)
class MoeFeedForward:
    d_model: int
    n_experts: int
    top_k: int
    expert_dim: int
    norm_topk: bool = True
    scaling: float = 1.0
    expert_bias: bool = True
    score: str = "sigmoid"  # or "softmax"
    gated: bool = True  # silu(h W_gate) * h W_up; False: act(h W_up)
    act: str = "silu"  # the ungated experts' activation: "silu" or "relu2"
    names: tuple[str, str, str] = ("w1", "w3", "w2")  # per-expert checkpoint names: gate, up, down
    bias_name: str = "expert_bias"  # the checkpoint name of the choice bias under `m`

    def __post_init__(self):
        if self.score not in ("sigmoid", "softmax") or self.act not in ("silu", "relu2"):
            raise ValueError(f"MoeFeedForward: score {self.score!r}, act {self.act!r}")

    def tensors(self, m: str, o: str, g: str | None = None) -> list[Row]:
        """Canonical rows under `o`; transformers' per-expert checkpoint names under `m` (`…feed_forward.`);
        llama.cpp's under `g` (`blk.{i}.`; None: no GGUF names), the experts stacked (E, out, in)."""
        E, f, d = self.n_experts, self.expert_dim, self.d_model
        gg = (lambda n: g + n) if g is not None else (lambda n: None)
        # canonical (d, E·f) <-> llama.cpp's (E, f, d); canonical (E·f, d) <-> (E, d, f)
        into = Codec(lambda a: np.ascontiguousarray(a.reshape(d, E, f).transpose(1, 2, 0)),
                     lambda a: np.ascontiguousarray(a.transpose(2, 0, 1).reshape(d, E * f)))
        out = Codec(lambda a: np.ascontiguousarray(a.reshape(E, f, d).transpose(0, 2, 1)),
                    lambda a: np.ascontiguousarray(a.transpose(0, 2, 1).reshape(E * f, d)))
        rows = [Row(o + "router", m + "gate.weight", t, gguf=gg("ffn_gate_inp.weight"), codec=T)]
        if self.expert_bias:
            rows.append(Row(o + "expert_bias", m + self.bias_name, lambda a: a.astype(np.float32),
                            gguf=gg("exp_probs_b.bias")))
        gate, up, down = self.names
        mats = (("gate", gate, cat_in, into),) if self.gated else ()
        for n, w, load, codec in (*mats, ("up", up, cat_in, into), ("down", down, cat_out, out)):
            rows.append(Row(f"{o}experts_{n}", [f"{m}experts.{e}.{w}.weight" for e in range(E)], load,
                            gguf=gg(f"ffn_{n}_exps.weight"), codec=codec))
        return rows

    def __call__(self, b: GraphBuilder, h: Value, o: str, fused: bool = False) -> Value:
        """The feed-forward on normed input h (b, t, d) -> (b, t, d); `fused`: the contrib op where exact."""
        if fused and self.act != "relu2":
            q = self._quantized(b, o)
            if q is not None and self._folds(q[0]):
                return self._qmoe(b, h, o, *q)
            if (not self.expert_bias and (self.score == "softmax" or self.norm_topk) and not self._placeholders(b, o)
                    and self._folds(32)):
                return self._moe(b, h, o)
        r = linear(b, h, o + "router")  # (b, t, E)
        s = r.sigmoid() if self.score == "sigmoid" else r.softmax(-1)
        r = s + b.w(o + "expert_bias") if self.expert_bias else s
        above = r.unsqueeze(-2).gt(r.unsqueeze(-1)).cast("float32").sum(-1, keepdims=False)  # (b, t, E)
        w = s * above.lt(float(self.top_k)).cast("float32")
        if self.norm_topk:
            w = w / (w.sum(-1) + 1e-6)
        if self.scaling != 1.0:
            w = w * self.scaling
        E, f = self.n_experts, self.expert_dim
        u = linear(b, h, o + "experts_up")  # (b, t, E·f)
        if self.gated:
            y = linear(b, h, o + "experts_gate").silu() * u
        else:
            y = u.silu() if self.act == "silu" else u.relu() * u.relu()
        y = (y.reshape(0, 0, E, f) * w.unsqueeze(-1)).reshape(0, 0, E * f)  # each expert's part weighed
        return linear(b, y, o + "experts_down")  # the weighed sum over the experts in one MatMul

    # -- fused flavour ------------------------------------------------------------------------------
    def _mats(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.gated else ("up", "down")

    def _placeholders(self, b: GraphBuilder, o: str) -> bool:
        """The experts were quantized (their float names are placeholders the MatMulNBits rewrite replaces)."""
        return any(b.weights[f"{o}experts_{n}"].offset == -1 for n in self._mats())

    def _folds(self, bits: int) -> bool:
        """ONNX Runtime folds the layout nodes into initializers only up to 1 GiB per node output (its
        constant folding's limit); past that it would redo the interleave and transposes on every call
        (Qwen3.5-35B-A3B's f32 fc1, 2 GiB: a 3.9 s decode step against 0.48 s dense), so the dense form."""
        return self.n_experts * 2 * self.expert_dim * self.d_model * bits // 8 <= 1 << 30

    def _attrs(self, act: str) -> dict:
        a = dict(k=self.top_k, activation_type=act, normalize_routing_weights=int(self.norm_topk))
        if act == "swiglu":  # silu(g)·u: the kernel's default alpha/beta are not promised to be 1 and 0
            a.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
        return a

    def _finish(self, y: Value) -> Value:
        return y * self.scaling if self.scaling != 1.0 else y

    def _moe(self, b: GraphBuilder, h: Value, o: str) -> Value:
        """f32 experts on com.microsoft MoE (softmax routing, or sigmoid routing renormalised)."""
        E, f, d = self.n_experts, self.expert_dim, self.d_model
        r = linear(b, h, o + "router").reshape(-1, E)  # (b·t, E) one router row per token
        if self.score == "sigmoid":
            r = -((-r).softplus())  # log sigmoid: the kernel's softmax of it is s / Σ_E s
        # canonical (d, E·f) -> the kernel's (E, f, d); canonical (E·f, d) -> (E, d, f)
        per_expert = lambda n: b.w(o + "experts_" + n).reshape(d, E, f, 1)  # noqa: E731
        if self.gated:  # interleave gate and up rows: (d, E, f, 2) -> (E, 2f, d)
            fc1 = b.op("Concat", per_expert("gate"), per_expert("up"), axis=-1).reshape(d, E, 2 * f)
        else:
            fc1 = per_expert("up").reshape(d, E, f)
        fc1 = fc1.transpose(1, 2, 0)
        fc2 = b.w(o + "experts_down").reshape(E, f, d).transpose(0, 2, 1)
        act = "swiglu" if self.gated else "silu"
        return self._finish(b.op("MoE", h, r, fc1, None, fc2, domain="com.microsoft", **self._attrs(act)))

    def _quantized(self, b: GraphBuilder, o: str):
        """(bits, block) when the int8/int4 recipe wrote every expert matrix in a form QMoE reads, else None."""
        E, f, d = self.n_experts, self.expert_dim, self.d_model
        found = set()
        for n in self._mats():
            name, k = f"{o}experts_{n}", (E * f if n == "down" else d)
            if not all(b.has_weight(name + x) for x in (".q", ".scales", ".zp")):
                return None
            rows = d if n == "down" else E * f
            scales = b.weights[name + ".scales"]  # (rows, K/block) f32, stored in whatever shape
            nblk = int(np.prod(scales.shape)) // rows
            if nblk == 0 or k % nblk or scales.dtype != "float32":
                return None
            block = k // nblk
            found.add((b.weights[name + ".q"].nbytes * 8 // (rows * k), block))
        if len(found) != 1:
            return None
        bits, block = found.pop()
        if d % block or f % block or (bits == 4 and (f // block) % 2):
            return None  # QMoE's blocks must divide d and f; an int4 fc2 zero-point byte may not span experts
        return bits, block

    def _qmoe(self, b: GraphBuilder, h: Value, o: str, bits: int, block: int) -> Value:
        """int8/int4 experts on com.microsoft QMoE, reading the MatMulNBits bytes regrouped per expert."""
        E, f, d = self.n_experts, self.expert_dim, self.d_model
        r = linear(b, h, o + "router").reshape(-1, E)  # (b·t, E)
        weigh = None
        if self.score == "sigmoid" or self.expert_bias:
            weigh = r.sigmoid() if self.score == "sigmoid" else r.softmax(-1)  # the weights, gathered
            r = weigh + b.w(o + "expert_bias").reshape(1, E) if self.expert_bias else r  # chooses

        def rows(n: str, part: str) -> Value:
            """Gate/up bytes per output row (E·f, X) -> (E, f, 1, X)."""
            return b.w(f"{o}experts_{n}.{part}").reshape(E, f, 1, -1)

        def fc1(part: str) -> Value:
            if self.gated:  # interleaved g0, u0, g1, u1, ... rows
                return b.op("Concat", rows("gate", part), rows("up", part), axis=2).reshape(E, 2 * f, -1)
            return rows("up", part).reshape(E, f, -1)

        def fc2(part: str) -> Value:
            """Down's rows are d, each E·f/block blocks along the experts: (d, E, X) -> (E, d, X)."""
            return b.w(f"{o}experts_down.{part}").reshape(d, E, -1).transpose(1, 0, 2)

        ins = [h, r, fc1("q"), fc1("scales"), None, fc2("q"), fc2("scales"), None, None, None, None,
               fc1("zp"), fc2("zp"), None]
        if weigh is not None:
            ins.append(weigh)
        y = b.op("QMoE", *ins, domain="com.microsoft", expert_weight_bits=bits, block_size=block,
                 **self._attrs("swiglu" if self.gated else "silu"))
        return self._finish(y)
