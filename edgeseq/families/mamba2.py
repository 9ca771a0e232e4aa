"""Mamba-2: state-space duality (SSD) layers with a scalar decay per head.

Symbols (Dao & Gu 2024): b batch · t tokens · d model width · di inner width · H heads · P head dim
(di = H·P) · G groups (B and C are shared by H/G heads) · n state size · k conv width.

    per layer:  [z, xBC, dt] = in_proj(rms_norm(x))
                xBC = silu(conv(xBC));  [x, B, C] = split(xBC)          x (b, t, H, P), B, C (b, t, G, n)
                dt = softplus(dt + dt_bias), clipped to time_step_limit  (b, t, H)
                h_t = exp(dt·A) · h_{t-1} + B_t ⊗ (dt·x_t)              h (b, H, n, P)
                y_t = C_t · h_t + D · x_t                               (b, H, P)
                x += out_proj( group_rms_norm(y · silu(z)) )

The mixer (its weights, state and graph) is edgeseq.mixers.mamba2, shared with Zamba2; this file is
the model around it: config, embedding, the layer stack, the head.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, find_prefix, head_is_embedding, mixer_stack, norm_and_head, pick
from edgeseq.gguf_names import CONTEXT_LENGTH, ArchMap, f32, u32
from edgeseq.graph import GraphBuilder
from edgeseq.mixers.mamba2 import Mamba2Mixer
from edgeseq.tensor_table import T, Derived, Row, t

EMBED_SUFFIXES = ["embeddings.weight", "embedding.weight"]


@dataclass
class Mamba2Config:
    vocab_size: int
    d_model: int
    n_layer: int
    d_inner: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int
    norm_eps: float = 1e-5
    dt_min: float = 0.0  # time_step_limit; (0, None) means no clipping
    dt_max: float | None = None
    tie_embeddings: bool = False

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def mixer(self) -> Mamba2Mixer:
        return Mamba2Mixer(self.d_inner, self.n_heads, self.head_dim, self.n_groups, self.d_state, self.d_conv,
                           self.norm_eps, self.dt_min, self.dt_max)


class Mamba2Gguf(ArchMap):
    """Mamba-2: A and D per head as (H, 1), the gated norm as (groups, d_inner/groups), dt's bias alone."""

    arch = "mamba2"

    def metadata(self, fam, shapes):
        c = fam.config
        return [u32("context_length", CONTEXT_LENGTH), u32("embedding_length", c.d_model),
                u32("feed_forward_length", 0), u32("attention.head_count", 0), u32("block_count", c.n_layer),
                u32("ssm.conv_kernel", c.d_conv), u32("ssm.inner_size", c.d_inner),
                u32("ssm.state_size", c.d_state), u32("ssm.time_step_rank", c.n_heads),  # llama.cpp: the heads
                u32("ssm.group_count", c.n_groups), f32("attention.layer_norm_rms_epsilon", c.norm_eps)]

    def supports(self, fam):
        c = fam.config
        if c.dt_min > 0 or c.dt_max is not None:
            return "llama.cpp's mamba2 has no time_step_limit clipping"
        return None

    def config(self, g):
        a = g.arch_key
        vocab, d = g.tensor("token_embd.weight").shape
        d_inner, heads = g.need(a("ssm.inner_size"), int), g.need(a("ssm.time_step_rank"), int)
        if heads <= 0 or d_inner % heads:
            raise EdgeseqError(f"{g.path}: ssm.time_step_rank {heads} does not divide ssm.inner_size {d_inner}")
        return dict(vocab_size=vocab, d_model=d, n_layer=g.need(a("block_count"), int), d_inner=d_inner,
                    n_heads=heads, head_dim=d_inner // heads, n_groups=int(g.get(a("ssm.group_count"), 1)),
                    d_state=g.need(a("ssm.state_size"), int), d_conv=g.need(a("ssm.conv_kernel"), int),
                    norm_eps=float(g.get(a("attention.layer_norm_rms_epsilon"), 1e-5)),
                    tie_embeddings="output.weight" not in g.tensors)


@register("Mamba2ForCausalLM", "Mamba2LMHeadModel")
class Mamba2(Family):
    name = "mamba2"
    gguf = Mamba2Gguf()  # llama.cpp runs it
    Config = Mamba2Config

    @classmethod
    def read_config(cls, src) -> Mamba2Config:
        cfg, where = src.config, f"{src.path}/config.json"
        ssm_cfg = cfg.get("ssm_cfg") or {}
        p = find_prefix(src, EMBED_SUFFIXES)
        m = f"{p}layers.0.mixer."
        vocab, d_model = src.shape(pick(src, [p + s for s in EMBED_SUFFIXES], "the embedding"))
        layers = sum(1 for k in src.keys() if k.endswith(".mixer.A_log"))
        n_heads = src.shape(m + "A_log")[0]
        d_inner = src.shape(m + "norm.weight")[0]
        conv_dim, _, d_conv = src.shape(m + "conv1d.weight")  # (di + 2·G·n, 1, k)
        groups = int(cfg_get({**ssm_cfg, **cfg}, ("n_groups", "ngroups"), 1, where))
        d_state = (conv_dim - d_inner) // (2 * groups)
        in_rows = src.shape(m + "in_proj.weight")[0]
        if in_rows != d_inner + conv_dim + n_heads:
            raise UnsupportedError(f"{where}: in_proj has {in_rows} rows, expected {d_inner + conv_dim + n_heads}; "
                                   f"Mamba-2 layers with an extra gated MLP (d_ssm < d_inner) are not supported")
        if cfg.get("rms_norm") is False or ssm_cfg.get("rmsnorm") is False:
            raise UnsupportedError(f"{where}: Mamba-2 without RMS norms is not supported")
        if ssm_cfg.get("norm_before_gate"):
            raise UnsupportedError(f"{where}: norm_before_gate=true is not supported")
        limit = cfg.get("time_step_limit") or ssm_cfg.get("dt_limit") or (0.0, float("inf"))
        lo, hi = _float(limit[0]), _float(limit[1])
        return Mamba2Config(
            vocab_size=vocab, d_model=d_model, n_layer=layers, d_inner=d_inner, n_heads=n_heads,
            head_dim=d_inner // n_heads, n_groups=groups, d_state=d_state, d_conv=d_conv,
            norm_eps=float(cfg_get(cfg, ("layer_norm_epsilon", "norm_epsilon"), 1e-5, where)),
            dt_min=lo, dt_max=None if hi == float("inf") else hi, tie_embeddings=head_is_embedding(src, p))

    def state_spec(self) -> list[StateTensor]:
        mixer = self.config.mixer()
        return [t for i in range(self.config.n_layer) for t in mixer.state_spec(i)]

    def layout(self, src):
        p = find_prefix(src, EMBED_SUFFIXES)
        return ("hf" if src.has(p + "embeddings.weight") else "state-spaces"), p

    def tensors(self):
        c = self.config
        mixer = c.mixer()
        rows = [Row("embed", {"hf": "{p}embeddings.weight", "state-spaces": "{p}embedding.weight"},
                    gguf="token_embd.weight"),
                Row("layers.{i}.norm", "{p}layers.{i}.norm.weight", gguf="blk.{i}.attn_norm.weight"),
                *mixer.tensors("{p}layers.{i}.mixer."),
                Derived("head_expand", mixer.head_expand),  # a constant of the graphs, in no file
                Row("norm_f", "{p}norm_f.weight", gguf="output_norm.weight")]
        if not c.tie_embeddings:
            rows.append(Row("lm_head", "lm_head.weight", t, gguf="output.weight", codec=T))
        return rows

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        return mixer_stack(b, embed(b, ids), state, c.mixer(), c.n_layer, c.norm_eps, tokens == 1, fused)

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)

    def quant_policy(self, name, shape):
        return "f32" if name == "head_expand" else None  # an exact 0/1 expansion, not a learned matrix


def _float(v) -> float:
    """transformers writes infinity in config.json as {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float("inf") if v is None else float(v)
