"""Bamba and Granite-4.0-H (IBM; transformers' BambaForCausalLM and GraniteMoeHybridForCausalLM, both
llama.cpp's `granitehybrid`): Mamba-2 layers and full-attention layers by layer type, each followed by a
dense SwiGLU MLP, or (Granite MoE) a softmax top-k mixture of experts with a shared MLP beside it.

Symbols: b batch · t tokens · d model width · L layers · H attention heads (Hkv key/value heads) ·
hd = d / H · rd rotary dims · E experts, top K · f expert width · fs dense / shared MLP width ·
R the KV ring length (max_context, chosen per session).

    x = embed(ids) · embedding_multiplier                       (b, t, d)
    per layer i:
        a = rms_norm(x) · w                                     input_layernorm
        y = mamba2_i(a)                 layer type mamba / linear_attention (edgeseq.mixers.mamba2, the
                                        gated norm's eps = rms_norm_eps)
          | attention(q, k, v over the ring) Wo                 attention / full_attention: scale
                                        attention_multiplier (Granite) or hd^-1/2 (Bamba); RoPE on the
                                        first rd channels (Bamba: rd = hd/2; Granite: all, or none)
        x = x + y · residual_multiplier
        m = rms_norm(x) · w                                     post_attention_layernorm / pre_ff_layernorm
        f = (silu(m Wg) · m Wu) Wd                              dense: shared_mlp (Granite) / feed_forward
          | moe(m) + (silu(m Wg') · m Wu') Wd'                  Granite MoE: softmax over the top K router
                                                                logits (= softmax renormalised over top K)
        x = x + f · residual_multiplier
    logits = head(rms_norm(x) · w) / logits_scaling             tied or untied

Bamba has no multipliers (all 1, the attention scale hd^-1/2). Both checkpoints are read as
save_pretrained (transformers 5.25) and the hub write them: Granite's shared MLP as one
`shared_mlp.input_linear` (2fs, d) (gate rows first), the experts as `block_sparse_moe.input_linear`
(E, 2f, d), `output_linear` (E, d, f), the router `block_sparse_moe.router.layer`; transformers'
in-memory names (`experts.gate_up_proj`, `experts.down_proj`, `router.weight`) are read too.
Layer types: `layer_types` (or `layers_block_type`) with mamba | linear_attention, attention |
full_attention; Bamba's `attn_layer_indices`.

Supported: GQA/MQA, RoPE (default type) or none (`position_embedding_type` rope | nope | null), Mamba
conv bias on or off, Mamba in/out projection biases (ONNX only), time_step_limit, tied or untied head,
any multipliers. The fused flavour runs the experts as ONNX Runtime's com.microsoft MoE (mixers.moe). Left out (a clear error): hidden_act other than silu, attention or MLP biases, a head_dim
other than d / H, RoPE scaling types.

State: per Mamba layer `conv_state` (conv_dim, k-1) and `recurrent_state` (H_ssm, n, P) (the mixer's);
per attention layer the ring `key` / `value` (Hkv, max_context, hd), keys after RoPE; `position`.
GGUF: llama.cpp's granitehybrid, as its converter writes it (q and k rows permuted for llama.cpp's RoPE,
the Mamba-2 tensors as its mamba2, the MoE as granitemoe's), but where llama.cpp would not run it right:
Bamba's q/k permuted on the rotary half only (the converter permutes whole heads, and llama.cpp then
rotates other channel pairs than transformers; marked by the key edgeseq.rope_rotary_permute, so files
without it, the converter's, read back right too), a dense model's feed_forward_length and
expert_used_count, a Granite with RoPE's rope.scaling.finetuned. One family for both architectures: one
llama.cpp architecture reads back to one edgeseq family.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, gqa_attention, hybrid_state, norm_and_head, ring_state
from edgeseq.gguf_names import ArchMap, f32, u32
from edgeseq.graph import GraphBuilder
from edgeseq.kernels.attention import token_positions
from edgeseq.kernels.ops import linear, rms_norm
from edgeseq.mixers.mamba2 import Mamba2Mixer
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.tensor_table import T, Codec, Derived, Either, Row, t

MAX_CONTEXT = 4096  # the default KV ring length recorded in the manifest; sessions may choose another
MAMBA_TYPES, ATTN_TYPES = ("mamba", "linear_attention"), ("attention", "full_attention")


@dataclass
class GraniteHybridConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    attn_layers: list[int]
    attn_heads: int
    kv_heads: int
    ffn_dim: int  # the dense MLP's (Bamba intermediate_size) or the shared MLP's (shared_intermediate_size)
    d_inner: int
    ssm_heads: int
    n_groups: int
    d_state: int
    d_conv: int
    n_experts: int = 0
    top_k: int = 0
    expert_dim: int = 0  # Granite's intermediate_size (the experts'); Bamba: its MLP's
    rope: bool = True
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0: the whole head
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # None: hd^-1/2
    logits_scaling: float = 1.0
    norm_eps: float = 1e-5
    dt_min: float = 0.0
    dt_max: float | None = None
    conv_bias: bool = True
    proj_bias: bool = False
    tie_embeddings: bool = False
    bamba: bool = False  # Bamba's checkpoint names, and no multiplier keys in its GGUF
    # GGUF q/k rows: "rotary" permutes each head's rotary part only (what llama.cpp's RoPE needs; edgeseq
    # writes it, with the key edgeseq.rope_rotary_permute, where rd < hd), "head" the whole head (the
    # converter's permute: llama.cpp then rotates Bamba's half heads wrongly); the same where rd = hd
    qk_permute: str = "rotary"
    max_position_embeddings: int = 262144  # GGUF's context_length only; the ring is max_context

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attn_heads

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.attention_multiplier is None else self.attention_multiplier

    def mixer(self) -> Mamba2Mixer:
        return Mamba2Mixer(self.d_inner, self.ssm_heads, self.d_inner // self.ssm_heads, self.n_groups,
                           self.d_state, self.d_conv, self.norm_eps, self.dt_min, self.dt_max)

    def moe(self) -> MoeFeedForward:
        # GraniteMoe: softmax over the top k logits = softmax over all renormalised over the top k
        return MoeFeedForward(self.d_model, self.n_experts, self.top_k, self.expert_dim, norm_topk=True,
                              expert_bias=False, score="softmax", names=("gate", "up", "down"))


def _number(cfg, key, default, where, kind=float):
    v = cfg.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EdgeseqError(f"{where}: {key} {v!r} is not a number")
    return kind(v)


def read_granite_hybrid_config(src) -> GraniteHybridConfig:
    cfg, where = src.config, f"{src.path}/config.json"
    bamba = cfg.get("model_type") == "bamba" or "BambaForCausalLM" in (cfg.get("architectures") or [])
    n = int(cfg_get(cfg, ("num_hidden_layers",), where=where))
    if bamba and "layers_block_type" not in cfg and "layer_types" not in cfg:
        idx = cfg.get("attn_layer_indices") or []
        if not isinstance(idx, list) or any(not isinstance(i, int) or not 0 <= i < n for i in idx):
            raise UnsupportedError(f"{where}: attn_layer_indices {idx!r} must list layers 0 to {n - 1}")
        types = ["attention" if i in idx else "mamba" for i in range(n)]
    else:
        types = cfg_get(cfg, ("layer_types", "layers_block_type"), ["mamba"] * n, where)
    if not isinstance(types, list) or len(types) != n or any(x not in MAMBA_TYPES + ATTN_TYPES for x in types):
        raise UnsupportedError(f"{where}: layer_types must list num_hidden_layers ({n}) entries of "
                               f"{', '.join(MAMBA_TYPES + ATTN_TYPES)}; got {types!r}")
    attn = [i for i, x in enumerate(types) if x in ATTN_TYPES]
    if len(attn) == n:
        raise UnsupportedError(f"{where}: layer_types has no Mamba layer (llama.cpp writes such a model as "
                               "granite / granitemoe, which edgeseq does not support)")
    act = cfg_get(cfg, ("hidden_act",), "silu", where)
    if act not in ("silu", "swish"):
        raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UnsupportedError(f"{where}: {key} is not supported")
    d = int(cfg_get(cfg, ("hidden_size",), where=where))
    heads = int(cfg_get(cfg, ("num_attention_heads",), where=where))
    kv = int(cfg_get(cfg, ("num_key_value_heads",), heads, where))
    if d % heads or heads % kv:
        raise UnsupportedError(f"{where}: hidden_size {d}, num_attention_heads {heads} and num_key_value_heads {kv} "
                               "must divide evenly")
    hd = cfg.get("head_dim")
    if hd is not None and int(hd) != d // heads:
        raise UnsupportedError(f"{where}: head_dim {hd} other than hidden_size / num_attention_heads is not supported")
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict) or rp.get("rope_type", rp.get("type", "default")) != "default":
        raise UnsupportedError(f"{where}: only the default RoPE is supported (rope_parameters {rp!r})")
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if bamba:
        use_rope, rd = True, (d // heads) // 2  # transformers' Bamba hard-codes partial_rotary_factor 0.5
        rot = cfg.get("attn_rotary_emb")
        if rot is not None and int(rot) != rd:
            raise UnsupportedError(f"{where}: attn_rotary_emb {rot} other than head_dim / 2 ({rd}) is not supported "
                                   "(transformers rotates half of each head)")
    else:
        pe = cfg.get("position_embedding_type")
        if pe not in (None, "rope", "nope"):
            raise UnsupportedError(f"{where}: position_embedding_type {pe!r} is not supported (rope, nope or null)")
        use_rope, rd = pe == "rope", d // heads
    lim = cfg.get("time_step_limit") or (0.0, float("inf"))
    try:
        lo, hi = (float(x["__float__"]) if isinstance(x, dict) else float(x) for x in lim)
    except (TypeError, ValueError, KeyError):
        raise EdgeseqError(f"{where}: time_step_limit {lim!r} is not two numbers") from None
    mamba = next(i for i in range(n) if i not in attn)
    m = f"model.layers.{mamba}.mamba."
    for i in range(n):  # the weights follow the declared pattern
        want = f"model.layers.{i}.self_attn.q_proj.weight" if i in attn else f"model.layers.{i}.mamba.A_log"
        if not src.has(want):
            raise EdgeseqError(f"{src.path}: config.json's layer types put layer {i} as "
                               f"{'attention' if i in attn else 'Mamba'}, but the weights lack {want}")
    H = src.shape(m + "A_log")[0]
    di = src.shape(m + "norm.weight")[0]
    cd, _, k = src.shape(m + "conv1d.weight")
    G = int(cfg_get(cfg, ("mamba_n_groups",), 1, where))
    if G < 1 or H % G or di % G or (cd - di) % (2 * G):
        raise EdgeseqError(f"{where}: mamba_n_groups {G} does not fit {m}A_log ({H} heads) and {m}conv1d.weight")
    if bamba:
        E, K, fs = 0, 0, int(src.shape("model.layers.0.feed_forward.gate_proj.weight")[0])
        f = fs
    else:
        E = int(_number(cfg, "num_local_experts", 8, where, int))
        K = int(_number(cfg, "num_experts_per_tok", 2, where, int)) if E else 0
        if E and not 0 < K <= E:
            raise UnsupportedError(f"{where}: num_experts_per_tok {K} must be 1 to num_local_experts ({E})")
        fs = int(src.shape("model.layers.0.shared_mlp.output_linear.weight")[1])
        f = int(_number(cfg, "intermediate_size", fs, where, int))
    num = lambda key: _number(cfg, key, 1.0, where)  # noqa: E731
    return GraniteHybridConfig(
        vocab_size=int(src.shape("model.embed_tokens.weight")[0]), d_model=d, n_layer=n, attn_layers=attn,
        attn_heads=heads, kv_heads=kv, ffn_dim=fs, d_inner=di, ssm_heads=H, n_groups=G,
        d_state=(cd - di) // (2 * G), d_conv=k, n_experts=E, top_k=K, expert_dim=f, rope=use_rope,
        rope_theta=theta, rotary_dim=rd,
        embedding_multiplier=1.0 if bamba else num("embedding_multiplier"),
        residual_multiplier=1.0 if bamba else num("residual_multiplier"),
        attention_multiplier=None if bamba else num("attention_multiplier"),
        logits_scaling=1.0 if bamba else num("logits_scaling"),
        norm_eps=float(cfg_get(cfg, ("rms_norm_eps",), 1e-5 if bamba else 1e-6, where)),
        dt_min=lo, dt_max=None if hi == float("inf") else hi,
        conv_bias=src.has(m + "conv1d.bias"),
        proj_bias=src.has(m + "in_proj.bias") or src.has(m + "out_proj.bias"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) or not src.has("lm_head.weight"),
        bamba=bamba, max_position_embeddings=int(cfg.get("max_position_embeddings") or 262144))


def permute_rows(heads: int, rotary: int | None = None) -> Codec:
    """canonical (d, heads·hd) <-> llama.cpp's q/k (heads·hd, d), each head's first `rotary` rows (all by
    default, as its converter's permute does) reordered from rotate-half pairs (j, j + rotary/2) to the
    adjacent pairs (2j, 2j+1) llama.cpp's RoPE rotates; the rest of the head as it is."""
    def enc(a):
        w = np.array(a.T)  # a copy: the rows are reordered in place
        h = w.reshape(heads, w.shape[0] // heads, -1)  # (heads, hd, d)
        r = rotary or h.shape[1]
        h[:, :r] = h[:, :r].reshape(heads, 2, r // 2, -1).swapaxes(1, 2).reshape(heads, r, -1)
        return np.ascontiguousarray(h.reshape(w.shape))

    def dec(w):
        h = w.reshape(heads, w.shape[0] // heads, -1).copy()
        r = rotary or h.shape[1]
        h[:, :r] = h[:, :r].reshape(heads, r // 2, 2, -1).swapaxes(1, 2).reshape(heads, r, -1)
        return np.ascontiguousarray(h.reshape(w.shape).T)
    return Codec(enc, dec)


class GraniteHybridGguf(ArchMap):
    """llama.cpp's granitehybrid: head_count_kv per layer (0 for a Mamba layer), RoPE on when
    rope.scaling.finetuned (the converter sets it for Bamba only), the multipliers as attention.scale,
    embedding_scale, residual_scale, logit_scale (Granite only), the shared MLP as ffn_*_shexp beside the
    experts or as the plain ffn_* without them."""

    arch = "granitehybrid"
    family = "granite_hybrid"

    def supports(self, fam):
        c = fam.config
        if c.proj_bias:
            return "llama.cpp's granitehybrid has no Mamba in/out projection biases (mamba_proj_bias)"
        if not c.conv_bias:
            return "llama.cpp's granitehybrid needs the Mamba conv bias (mamba_conv_bias)"
        if not c.attn_layers:
            return "llama.cpp's granitehybrid aborts on a model without attention layers (an empty KV cache)"
        if c.dt_min != 0.0 or c.dt_max is not None:
            return "llama.cpp's granitehybrid does not clamp dt (time_step_limit)"
        if c.rope and c.rotary_dim not in (c.head_dim, c.head_dim // 2):
            return f"rotary dims {c.rotary_dim} of a {c.head_dim}-wide head"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        kv = [c.kv_heads if i in c.attn_layers else 0 for i in range(c.n_layer)]
        out = [u32("block_count", c.n_layer),
               u32("context_length", c.max_position_embeddings if c.rope else 2 ** 20),
               # without experts llama.cpp sizes the MLP by feed_forward_length: the shared MLP's width (the
               # converter writes intermediate_size, a file llama.cpp refuses when the two differ)
               u32("embedding_length", c.d_model), u32("feed_forward_length", c.expert_dim if c.n_experts else c.ffn_dim),
               u32("attention.head_count", c.attn_heads), ("attention.head_count_kv", kv, "i32s"),
               f32("rope.freq_base", c.rope_theta), f32("attention.layer_norm_rms_epsilon", c.norm_eps)]
        if not c.bamba:
            out += [u32("expert_count", c.n_experts), u32("expert_used_count", c.top_k)]
        out += [u32("vocab_size", c.vocab_size), u32("rope.dimension_count", c.rotary_dim or c.head_dim)]
        if not c.bamba:
            out += [f32("attention.scale", c.scale), f32("embedding_scale", c.embedding_multiplier),
                    f32("residual_scale", c.residual_multiplier), f32("logit_scale", c.logits_scaling),
                    u32("expert_shared_feed_forward_length", c.ffn_dim)]
        out += [u32("ssm.conv_kernel", c.d_conv), u32("ssm.state_size", c.d_state),
                u32("ssm.group_count", c.n_groups), u32("ssm.inner_size", c.d_inner),
                u32("ssm.time_step_rank", c.ssm_heads), ("rope.scaling.finetuned", bool(c.rope), "bool")]
        if self.partial(c):  # q/k permuted on the rotary part only: a reader must know (see qk_permute)
            out.append(("edgeseq.rope_rotary_permute", True, "bool"))
        return out

    @staticmethod
    def partial(c) -> bool:
        return bool(c.rope and c.qk_permute == "rotary" and c.rotary_dim and c.rotary_dim < c.head_dim)

    def config(self, g):
        a = g.arch_key
        vocab, d = g.tensor("token_embd.weight").shape
        n = g.need(a("block_count"), int)
        kv = g.need(a("attention.head_count_kv"))
        kv = [int(x) for x in (kv if isinstance(kv, (list, tuple, np.ndarray)) else [kv] * n)]
        if len(kv) != n or len({x for x in kv if x}) > 1:
            raise EdgeseqError(f"{g.path}: attention.head_count_kv must give one count per layer (0 for a Mamba "
                               "layer), the same for every attention layer")
        heads = g.need(a("attention.head_count"), int)
        E = int(g.get(a("expert_count"), 0) or 0)
        bamba = g.get(a("embedding_scale")) is None
        shared = "blk.0.ffn_down_shexp.weight" if E else "blk.0.ffn_down.weight"
        fs = int(g.tensor(shared).shape[-1])
        scale = g.get(a("attention.scale"))
        return dict(vocab_size=vocab, d_model=d, n_layer=n, attn_layers=[i for i in range(n) if kv[i]],
                    attn_heads=heads, kv_heads=max(kv) or heads, ffn_dim=fs,
                    d_inner=g.need(a("ssm.inner_size"), int), ssm_heads=g.need(a("ssm.time_step_rank"), int),
                    n_groups=int(g.get(a("ssm.group_count"), 1)), d_state=g.need(a("ssm.state_size"), int),
                    d_conv=g.need(a("ssm.conv_kernel"), int), n_experts=E,
                    top_k=int(g.get(a("expert_used_count"), 0)) if E else 0,
                    expert_dim=int(g.get(a("feed_forward_length"), fs)),
                    rope=bool(g.get(a("rope.scaling.finetuned"), False)),
                    rope_theta=float(g.get(a("rope.freq_base"), 10000.0)),
                    rotary_dim=int(g.get(a("rope.dimension_count"), d // heads)),
                    embedding_multiplier=float(g.get(a("embedding_scale"), 1.0) or 1.0),
                    residual_multiplier=float(g.get(a("residual_scale"), 1.0) or 1.0),
                    attention_multiplier=float(scale) if scale else None,
                    logits_scaling=float(g.get(a("logit_scale"), 1.0) or 1.0),
                    norm_eps=float(g.get(a("attention.layer_norm_rms_epsilon"), 1e-6)), conv_bias=True,
                    tie_embeddings="output.weight" not in g.tensors, bamba=bamba,
                    qk_permute="rotary" if g.get(a("edgeseq.rope_rotary_permute")) else "head",
                    max_position_embeddings=int(g.get(a("context_length"), 262144)))


def _half(part: int, f: int):
    """A fused gate-up (2f, d) torch weight -> the gate (part 0) or up (part 1) half as (d, f)."""
    return lambda a: np.ascontiguousarray(a[part * f:(part + 1) * f].T)


def _experts_in(part: int, f: int):
    """The experts' fused (E, 2f, d) -> the gate (part 0) or up (part 1) half as the canonical (d, E·f)
    (expert e's columns e·f..(e+1)·f, as moe.cat_in lays them)."""
    def load(a):
        E, _, d = a.shape
        return np.ascontiguousarray(a[:, part * f:(part + 1) * f, :].transpose(2, 0, 1).reshape(d, E * f))
    return load


def _experts_out(a):
    """The experts' (E, d, f) -> the canonical (E·f, d)."""
    E, d, f = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(E * f, d))


@register("GraniteMoeHybridForCausalLM", "BambaForCausalLM")
class GraniteHybrid(Family):
    name = "granite_hybrid"
    Config = GraniteHybridConfig
    gguf = GraniteHybridGguf()  # llama.cpp runs it
    prefill_chunk = 128  # attention scores grow with chunk x (ring + chunk)
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    @classmethod
    def read_config(cls, src) -> GraniteHybridConfig:
        return read_granite_hybrid_config(src)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        note = "after RoPE" if c.rope else "no RoPE"
        return hybrid_state((i in c.attn_layers for i in range(c.n_layer)), c.mixer,
                            lambda i: ring_state(i, c.kv_heads, c.head_dim, "attention", note))

    def moe_rows(self, m: str, o: str, g: str) -> list[Row]:
        """The shared MoE block's rows with Granite's names: fused 3-D experts and the router's `layer`."""
        c = self.config
        f = m + "block_sparse_moe."
        src = {"router": Either((f + "router.layer.weight", t), (f + "router.weight", t)),
               "experts_gate": Either((f + "input_linear.weight", _experts_in(0, c.expert_dim)),
                                      (f + "experts.gate_up_proj", _experts_in(0, c.expert_dim))),
               "experts_up": Either((f + "input_linear.weight", _experts_in(1, c.expert_dim)),
                                    (f + "experts.gate_up_proj", _experts_in(1, c.expert_dim))),
               "experts_down": Either((f + "output_linear.weight", _experts_out),
                                      (f + "experts.down_proj", _experts_out))}
        return [dataclasses.replace(r, ckpt=src[r.name[len(o):]], load=lambda a: a)
                for r in c.moe().tensors(f, o, g)]

    def tensors(self):
        c = self.config
        rows = [Row("embed", "model.embed_tokens.weight", gguf="token_embd.weight")]
        for i in range(c.n_layer):
            m, o, g = f"model.layers.{i}.", f"layers.{i}.", f"blk.{i}."
            rows.append(Row(o + "norm", m + "input_layernorm.weight", gguf=g + "attn_norm.weight"))
            if i in c.attn_layers:
                a = m + "self_attn."
                rd = c.rotary_dim if c.rope and c.qk_permute == "rotary" else None
                rows += [Row(o + "q", a + "q_proj.weight", t, gguf=g + "attn_q.weight", codec=permute_rows(c.attn_heads, rd)),
                         Row(o + "k", a + "k_proj.weight", t, gguf=g + "attn_k.weight", codec=permute_rows(c.kv_heads, rd)),
                         Row(o + "v", a + "v_proj.weight", t, gguf=g + "attn_v.weight", codec=T),
                         Row(o + "o", a + "o_proj.weight", t, gguf=g + "attn_output.weight", codec=T)]
            else:
                rows += c.mixer().tensors(m + "mamba.", o, g)
            ffn_norm = "pre_ff_layernorm" if c.bamba else "post_attention_layernorm"
            rows.append(Row(o + "ffn_norm", f"{m}{ffn_norm}.weight", gguf=g + "ffn_norm.weight"))
            if c.bamba:
                rows += [Row(o + n, f"{m}feed_forward.{n}_proj.weight", t, gguf=f"{g}ffn_{n}.weight", codec=T)
                         for n in ("gate", "up", "down")]
                continue
            s, x = m + "shared_mlp.", "_shexp" if c.n_experts else ""
            if c.n_experts:
                rows += self.moe_rows(m, o, g)
            p = o + ("shared_" if c.n_experts else "")
            rows += [Row(p + "gate", s + "input_linear.weight", _half(0, c.ffn_dim), gguf=f"{g}ffn_gate{x}.weight", codec=T),
                     Row(p + "up", s + "input_linear.weight", _half(1, c.ffn_dim), gguf=f"{g}ffn_up{x}.weight", codec=T),
                     Row(p + "down", s + "output_linear.weight", t, gguf=f"{g}ffn_down{x}.weight", codec=T)]
        rows.append(Derived("head_expand", c.mixer().head_expand))
        final = "model.final_layernorm.weight" if c.bamba else "model.norm.weight"
        rows.append(Row("norm_f", final, gguf="output_norm.weight"))
        if not c.tie_embeddings:
            rows.append(Row("lm_head", "lm_head.weight", t, gguf="output.weight", codec=T))
        return rows

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        mixer = c.mixer()
        moe = c.moe() if c.n_experts else None
        x = embed(b, ids)  # (b, t, d)
        if c.embedding_multiplier != 1.0:
            x = x * c.embedding_multiplier
        pos = token_positions(b, state["position"], ids, 1) if c.rope and c.attn_layers else None
        r = c.residual_multiplier
        scaled = (lambda y: y * r) if r != 1.0 else (lambda y: y)
        out = {}
        for i in range(c.n_layer):
            o, p = f"layers.{i}.", f"past_key_values.{i}."
            with b.scope(f"layers.{i}"):
                a = rms_norm(b, x, o + "norm", c.norm_eps)
                if i in c.attn_layers:
                    y, out[f"present.{i}.key"], out[f"present.{i}.value"] = gqa_attention(
                        b, a, o, state[p + "key"], state[p + "value"], state["position"], tokens, c.attn_heads,
                        c.kv_heads, c.head_dim, scale=c.scale, pos=pos, theta=c.rope_theta,
                        rotary_dim=c.rotary_dim)
                else:
                    y, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = mixer(
                        b, a, o, state[p + "conv_state"], state[p + "recurrent_state"], tokens == 1, fused)
                x = x + scaled(y)
                h = rms_norm(b, x, o + "ffn_norm", c.norm_eps)
                s = o + ("shared_" if moe else "")
                f = linear(b, linear(b, h, s + "gate").silu() * linear(b, h, s + "up"), s + "down")
                if moe:
                    f = moe(b, h, o, fused) + f
                x = x + scaled(f)
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        c = self.config
        logits = norm_and_head(b, hidden, c.norm_eps, c.vocab_size)
        return logits * (1.0 / c.logits_scaling) if c.logits_scaling != 1.0 else logits

    def quant_policy(self, name, shape):
        """Routers stay f32 (E x d each; llama.cpp's converter keeps ffn_gate_inp f32 too); head_expand is
        an exact 0/1 expansion."""
        return "f32" if name.endswith(".router") or name == "head_expand" else None
