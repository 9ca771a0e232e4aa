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
choose both; tests keep a margin there so that float32 and float64 choose alike.
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

    def __call__(self, b: GraphBuilder, h: Value, o: str) -> Value:
        """The feed-forward on normed input h (b, t, d) -> (b, t, d)."""
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
