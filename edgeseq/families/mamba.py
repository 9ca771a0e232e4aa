"""Mamba-1 (and FalconMamba): selective state-space layers.

Symbols (Gu & Dao 2023, Algorithm 2):  b batch · t tokens · d model width · di inner width (expand·d)
· n state size (d_state) · r dt rank · k conv width.

    per layer:  x += out_proj( ssm( silu(conv(in_x)) ) * silu(z) ),   [in_x, z] = in_proj(rms_norm(x))
    ssm:        dt = softplus(dt_proj(x_proj_dt) + dt_bias)           (b, t, di)
                h_t = exp(dt·A) ⊙ h_{t-1} + (dt·x) ⊗ B_t              (b, di, n)
                y_t = h_t · C_t + D ⊙ x_t                             (b, di)
    FalconMamba: dt, B and C pass through a weightless RMS norm (eps = mixer_rms_eps) first.

Checkpoint layouts: HF `MambaForCausalLM` / `FalconMambaForCausalLM` (`backbone.embeddings`) and the
original state-spaces release (`backbone.embedding`, config with d_model / n_layer / ssm_cfg).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, find_prefix, head_is_embedding, mixer_stack, norm_and_head, pick
from edgeseq.gguf_names import CONTEXT_LENGTH, ArchMap, f32, u32
from edgeseq.graph import GraphBuilder
from edgeseq.mixers.mamba1 import Mamba1Mixer
from edgeseq.tensor_table import T, Row, t

EMBED_SUFFIXES = ["embeddings.weight", "embedding.weight"]


@dataclass
class MambaConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    norm_eps: float = 1e-5
    mixer_rms_eps: float | None = None  # FalconMamba's norms on dt, B, C; None for Mamba
    tie_embeddings: bool = True

    def mixer(self) -> Mamba1Mixer:
        return Mamba1Mixer(self.d_inner, self.d_state, self.d_conv, self.dt_rank, rms_eps=self.mixer_rms_eps)


class MambaGguf(ArchMap):
    """Mamba-1 (and FalconMamba: dt, B, C normed, `ssm.dt_b_c_rms`)."""

    arch = "mamba"

    def supports(self, fam):
        c = fam.config
        if c.d_inner != 2 * c.d_model:
            return f"llama.cpp's mamba needs d_inner = 2·d_model (expand 2); this model has {c.d_inner}/{c.d_model}"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        return [u32("context_length", CONTEXT_LENGTH), u32("embedding_length", c.d_model),
                u32("feed_forward_length", 0), u32("attention.head_count", 0), u32("block_count", c.n_layer),
                u32("ssm.conv_kernel", c.d_conv), u32("ssm.inner_size", c.d_inner),
                u32("ssm.state_size", c.d_state), u32("ssm.time_step_rank", c.dt_rank),
                f32("attention.layer_norm_rms_epsilon", c.norm_eps),
                ("ssm.dt_b_c_rms", c.mixer_rms_eps is not None, "bool")]

    def config(self, g):
        a = g.arch_key
        rms = bool(g.get(a("ssm.dt_b_c_rms"), False))
        vocab, d = g.tensor("token_embd.weight").shape
        return dict(vocab_size=vocab, d_model=d, n_layer=g.need(a("block_count"), int),
                    d_inner=g.need(a("ssm.inner_size"), int), d_state=g.need(a("ssm.state_size"), int),
                    d_conv=g.need(a("ssm.conv_kernel"), int), dt_rank=g.need(a("ssm.time_step_rank"), int),
                    norm_eps=float(g.get(a("attention.layer_norm_rms_epsilon"), 1e-5)),
                    # llama.cpp norms dt, B, C with the layer eps; FalconMamba's checkpoints declare 1e-6
                    mixer_rms_eps=1e-6 if rms else None, tie_embeddings="output.weight" not in g.tensors)


@register("MambaForCausalLM", "FalconMambaForCausalLM", "MambaLMHeadModel")
class Mamba(Family):
    name = "mamba"
    gguf = MambaGguf()  # llama.cpp runs it
    Config = MambaConfig
    prefill_chunk = 64  # prefill speed level from 16 to 128 at 130m; activations grow with it

    @classmethod
    def read_config(cls, src) -> MambaConfig:
        cfg, where = src.config, f"{src.path}/config.json"
        ssm_cfg = cfg.get("ssm_cfg") or {}
        if ssm_cfg.get("layer", "Mamba1") not in ("Mamba1", "Mamba"):
            raise UnsupportedError(f"{where}: ssm_cfg.layer is {ssm_cfg['layer']!r}, not a Mamba-1 layer")
        if cfg.get("rms_norm") is False:
            raise UnsupportedError(f"{where}: rms_norm=false (LayerNorm Mamba) is not supported")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (only silu)")
        p = find_prefix(src, EMBED_SUFFIXES)
        vocab, d_model = src.shape(pick(src, [p + s for s in EMBED_SUFFIXES], "the embedding"))
        layers = sum(1 for k in src.keys() if k.endswith(".mixer.A_log"))
        d_inner, d_state = src.shape(f"{p}layers.0.mixer.A_log")
        d_conv = src.shape(f"{p}layers.0.mixer.conv1d.weight")[-1]
        dt_rank = src.shape(f"{p}layers.0.mixer.dt_proj.weight")[1]
        falcon = "FalconMamba" in " ".join(cfg.get("architectures", [])) or cfg.get("model_type") == "falcon_mamba"
        declared = cfg_get(cfg, ("num_hidden_layers", "n_layer"), layers, where)
        if declared != layers:
            raise UnsupportedError(f"{where}: declares {declared} layers, the weights hold {layers}")
        return MambaConfig(
            vocab_size=vocab, d_model=d_model, n_layer=layers, d_inner=d_inner, d_state=d_state, d_conv=d_conv,
            dt_rank=dt_rank, norm_eps=float(cfg_get(cfg, ("layer_norm_epsilon", "norm_epsilon"), 1e-5, where)),
            mixer_rms_eps=float(cfg.get("mixer_rms_eps", 1e-6)) if falcon else None,
            tie_embeddings=head_is_embedding(src, p),
        )

    def state_spec(self) -> list[StateTensor]:
        mixer = self.config.mixer()
        return [t for i in range(self.config.n_layer) for t in mixer.state_spec(i)]

    def layout(self, src):
        p = find_prefix(src, EMBED_SUFFIXES)
        return ("hf" if src.has(p + "embeddings.weight") else "state-spaces"), p

    def tensors(self):
        c = self.config
        rows = [Row("embed", {"hf": "{p}embeddings.weight", "state-spaces": "{p}embedding.weight"},
                    gguf="token_embd.weight"),
                Row("layers.{i}.norm", "{p}layers.{i}.norm.weight", gguf="blk.{i}.attn_norm.weight"),
                *c.mixer().tensors("{p}layers.{i}.mixer."),
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
        # dt_proj: fan-in = dt rank (48 at 130m), and its output goes through softplus into exp(dt·A):
        # an error there scales the whole state's decay. 8 bits under int4.
        return "int8" if name.endswith(".dt_proj") else None

