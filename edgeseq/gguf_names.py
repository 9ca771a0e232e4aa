"""GGUF names and metadata per architecture: edgeseq's canonical weights <-> a GGUF file's tensors.

Where llama.cpp knows the architecture (mamba, mamba2, rwkv6, rwkv7) the tensor names, layouts (torch's
(out, in) for matrices, squeezed/fused as llama.cpp's converter writes them) and metadata keys are
llama.cpp's, so llama.cpp loads the file and edgeseq reads files llama.cpp's converter wrote. Every
other family (and Mamba-1 with an expand factor other than 2, which llama.cpp refuses, or layers with
biases it has no tensor for) uses the generic `edgeseq-<family>` architecture: canonical names and
layouts as the bundle stores them, the family config and the state spec as JSON metadata. New
families need no code here.

The tables live in this one module rather than in each family file: they translate between edgeseq's
canonical names (which each family owns) and llama.cpp's (which llama.cpp owns), so they change with
llama.cpp; the family files stay free of another project's naming.

Layouts: `canonical` arrays are what `Family.convert` yields (matrices (in, out)); GGUF arrays are in
numpy order of the torch layout llama.cpp expects (matrices (out, in); ggml's ne is that reversed).
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError

GENERIC_PREFIX = "edgeseq-"
GENERIC_FORMAT_VERSION = 1
CONTEXT_LENGTH = 1 << 20  # recurrent: no context limit; llama.cpp's converter writes 2**20 too

T = lambda a: np.ascontiguousarray(a.T)  # noqa: E731  (in, out) <-> (out, in)


# ---------------------------------------------------------------------------------------------------
# the per-architecture mappings
# ---------------------------------------------------------------------------------------------------

class ArchMap:
    """One llama.cpp architecture: which family, its metadata, and the tensor translation both ways."""

    arch: str
    family: str

    def supports(self, fam) -> str | None:
        """None when this family instance can be written under `arch`, else the reason it cannot."""
        return None

    def metadata(self, fam, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, object, str]]:
        """(key without the arch prefix, value, type) in the converter's order; `shapes` are the GGUF
        tensors' (numpy order), for what the config does not hold."""
        raise NotImplementedError

    def to_gguf(self, fam, weights: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def config(self, g) -> dict:
        raise NotImplementedError

    def from_gguf(self, fam, g) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def matrices(self, fam) -> dict[str, tuple[str, bool]]:
        """{canonical matrix: (GGUF tensor, transposed)} for the matrices that are the GGUF tensor itself
        or its transpose: their quantized blocks can move into MatMulNBits as they are."""
        return {}


def _u32(k, v):
    return (k, int(v), "u32")


def _f32(k, v):
    return (k, float(v), "f32")


class MambaMap(ArchMap):
    """Mamba-1 (and FalconMamba: dt, B, C normed, `ssm.dt_b_c_rms`)."""

    arch, family = "mamba", "mamba"
    _ONE = {"norm": "attn_norm.weight", "conv_bias": "ssm_conv1d.bias", "dt_bias": "ssm_dt.bias", "A": "ssm_a",
            "D": "ssm_d"}
    _MAT = {"in_proj": "ssm_in.weight", "x_proj": "ssm_x.weight", "dt_proj": "ssm_dt.weight",
            "out_proj": "ssm_out.weight"}

    def supports(self, fam):
        c = fam.config
        if c.d_inner != 2 * c.d_model:
            return f"llama.cpp's mamba needs d_inner = 2·d_model (expand 2); this model has {c.d_inner}/{c.d_model}"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        return [_u32("context_length", CONTEXT_LENGTH), _u32("embedding_length", c.d_model),
                _u32("feed_forward_length", 0), _u32("attention.head_count", 0), _u32("block_count", c.n_layer),
                _u32("ssm.conv_kernel", c.d_conv), _u32("ssm.inner_size", c.d_inner),
                _u32("ssm.state_size", c.d_state), _u32("ssm.time_step_rank", c.dt_rank),
                _f32("attention.layer_norm_rms_epsilon", c.norm_eps),
                ("ssm.dt_b_c_rms", c.mixer_rms_eps is not None, "bool")]

    def to_gguf(self, fam, weights):
        c = fam.config
        for name, a in weights:
            if name in ("embed", "norm_f", "lm_head"):
                yield _top(name, a)
                continue
            i, leaf = _layer(name)
            p = f"blk.{i}."
            if leaf == "conv":
                yield p + "ssm_conv1d.weight", a.reshape(c.d_inner, c.d_conv)  # (di, 1, k) squeezed
            elif leaf in self._MAT:
                yield p + self._MAT[leaf], T(a)
            elif leaf in self._ONE:
                yield p + self._ONE[leaf], a
            else:
                raise UnsupportedError(f"mamba weight {name} has no llama.cpp tensor")

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

    def matrices(self, fam):
        out = {"embed": ("token_embd.weight", False), "lm_head": ("output.weight", True)}
        for i in range(fam.config.n_layer):
            out.update({f"layers.{i}.{leaf}": (f"blk.{i}.{n}", True) for leaf, n in self._MAT.items()})
        return out

    def from_gguf(self, fam, g):
        c = fam.config
        yield "embed", g.array("token_embd.weight")
        for i in range(c.n_layer):
            p, o = f"blk.{i}.", f"layers.{i}."
            for leaf, n in self._ONE.items():
                if leaf != "conv_bias" or p + n in g.tensors:
                    yield o + leaf, g.array(p + n)
            yield o + "conv", g.array(p + "ssm_conv1d.weight").reshape(c.d_inner, 1, c.d_conv)
            for leaf, n in self._MAT.items():
                yield o + leaf, T(g.array(p + n))
        yield "norm_f", g.array("output_norm.weight")
        if "output.weight" in g.tensors:
            yield "lm_head", T(g.array("output.weight"))


class Mamba2Map(ArchMap):
    """Mamba-2: A and D per head as (H, 1), the gated norm as (groups, d_inner/groups), dt's bias alone."""

    arch, family = "mamba2", "mamba2"

    def metadata(self, fam, shapes):
        c = fam.config
        return [_u32("context_length", CONTEXT_LENGTH), _u32("embedding_length", c.d_model),
                _u32("feed_forward_length", 0), _u32("attention.head_count", 0), _u32("block_count", c.n_layer),
                _u32("ssm.conv_kernel", c.d_conv), _u32("ssm.inner_size", c.d_inner),
                _u32("ssm.state_size", c.d_state), _u32("ssm.time_step_rank", c.n_heads),  # llama.cpp: the heads
                _u32("ssm.group_count", c.n_groups), _f32("attention.layer_norm_rms_epsilon", c.norm_eps)]

    def supports(self, fam):
        c = fam.config
        if c.dt_min > 0 or c.dt_max is not None:
            return "llama.cpp's mamba2 has no time_step_limit clipping"
        return None

    def to_gguf(self, fam, weights):
        c = fam.config
        for name, a in weights:
            if name in ("embed", "norm_f", "lm_head"):
                yield _top(name, a)
                continue
            if name == "head_expand":
                continue  # a constant of the ONNX graph, rebuilt from the config on reading
            i, leaf = _layer(name)
            p = f"blk.{i}."
            if leaf == "norm":
                yield p + "attn_norm.weight", a
            elif leaf == "in_proj":
                yield p + "ssm_in.weight", T(a)
            elif leaf == "out_proj":
                yield p + "ssm_out.weight", T(a)
            elif leaf == "conv":
                yield p + "ssm_conv1d.weight", a.reshape(c.conv_dim, c.d_conv)
            elif leaf == "conv_bias":
                yield p + "ssm_conv1d.bias", a
            elif leaf == "dt_bias":
                yield p + "ssm_dt.bias", a
            elif leaf == "A":
                yield p + "ssm_a", a.reshape(c.n_heads, 1)
            elif leaf == "D":  # edgeseq keeps D per channel; llama.cpp per head
                yield p + "ssm_d", np.ascontiguousarray(a.reshape(c.n_heads, c.head_dim)[:, :1])
            elif leaf == "gnorm":
                yield p + "ssm_norm.weight", a.reshape(c.n_groups, c.d_inner // c.n_groups)
            else:
                raise UnsupportedError(f"mamba2 weight {name} has no llama.cpp tensor")

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

    def matrices(self, fam):
        out = {"embed": ("token_embd.weight", False), "lm_head": ("output.weight", True)}
        for i in range(fam.config.n_layer):
            out[f"layers.{i}.in_proj"] = (f"blk.{i}.ssm_in.weight", True)
            out[f"layers.{i}.out_proj"] = (f"blk.{i}.ssm_out.weight", True)
        return out

    def from_gguf(self, fam, g):
        c = fam.config
        yield "embed", g.array("token_embd.weight")
        for i in range(c.n_layer):
            p, o = f"blk.{i}.", f"layers.{i}."
            yield o + "norm", g.array(p + "attn_norm.weight")
            yield o + "in_proj", T(g.array(p + "ssm_in.weight"))
            yield o + "conv", g.array(p + "ssm_conv1d.weight").reshape(c.conv_dim, 1, c.d_conv)
            if p + "ssm_conv1d.bias" in g.tensors:
                yield o + "conv_bias", g.array(p + "ssm_conv1d.bias")
            yield o + "dt_bias", g.array(p + "ssm_dt.bias")
            yield o + "A", g.array(p + "ssm_a").reshape(c.n_heads)
            yield o + "D", np.repeat(g.array(p + "ssm_d").reshape(c.n_heads), c.head_dim)
            yield o + "gnorm", g.array(p + "ssm_norm.weight").reshape(c.d_inner)
            yield o + "out_proj", T(g.array(p + "ssm_out.weight"))
        yield "head_expand", np.kron(np.eye(c.n_heads, dtype=np.float32), np.ones((1, c.head_dim), np.float32))
        yield "norm_f", g.array("output_norm.weight")
        if "output.weight" in g.tensors:
            yield "lm_head", T(g.array("output.weight"))


LLAMA_RWKV7_GN_EPS = 64e-5  # llama.cpp's rwkv7 graph hard-codes ln_x's eps
RWKV7_MIXES = ("r", "w", "k", "v", "a", "g")  # the order of llama.cpp's time_mix_lerp_fused


class Rwkv7Map(ArchMap):
    """RWKV-7: six token-shift mixes fused into one (6, 1, 1, C) tensor; LoRA matrices as torch Linear
    weights (out, in); layer 0 carries v0/v1/v2 (unused; copies of a0/a1/a2, as llama.cpp expects)."""

    arch, family = "rwkv7", "rwkv7"
    _NORMS = {"ln1": "attn_norm", "ln2": "attn_norm_2", "att.ln_x": "time_mix_ln"}
    _MAT = {"att.receptance": "time_mix_receptance", "att.key": "time_mix_key", "att.value": "time_mix_value",
            "att.output": "time_mix_output", "ffn.key": "channel_mix_key", "ffn.value": "channel_mix_value"}
    _VEC = {"att.k_k": "time_mix_k_k", "att.k_a": "time_mix_k_a", "att.r_k": "time_mix_r_k",
            "ffn.x_k": "channel_mix_lerp_k"}

    def supports(self, fam):
        gn = getattr(fam.config, "gn_eps", LLAMA_RWKV7_GN_EPS)
        if abs(gn - LLAMA_RWKV7_GN_EPS) > 1e-12:
            return f"llama.cpp's rwkv7 fixes ln_x's group-norm eps at 64e-5; this model uses {gn}"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        r = {m: shapes[f"blk.0.time_mix_{m}1.weight"][0] for m in ("w", "a", "g")}  # (rank, C)
        # layer 0's v LoRA is a copy of its a LoRA (llama.cpp creates it at the iclr rank); the value-
        # residual rank is the other layers'
        r["v"] = shapes["blk.1.time_mix_v1.weight"][0] if c.n_layer > 1 else r["a"]
        return [_u32("context_length", CONTEXT_LENGTH), _u32("embedding_length", c.n_embd),
                _u32("block_count", c.n_layer), _f32("attention.layer_norm_epsilon", getattr(c, "ln_eps", 1e-5)),
                _u32("wkv.head_size", c.head_size), _u32("attention.decay_lora_rank", r["w"]),
                _u32("attention.iclr_lora_rank", r["a"]), _u32("attention.value_residual_mix_lora_rank", r["v"]),
                _u32("attention.gate_lora_rank", r["g"]), _u32("feed_forward_length", c.dim_ffn),
                _u32("attention.head_count", 0)]

    def to_gguf(self, fam, weights):
        mixes: dict[str, np.ndarray] = {}
        C = fam.config.n_embd
        for name, a in weights:
            if name == "embed":
                yield "token_embd.weight", a
            elif name in ("ln0.weight", "ln0.bias"):
                yield "token_embd_norm." + name.split(".")[1], a
            elif name in ("ln_out.weight", "ln_out.bias"):
                yield "output_norm." + name.split(".")[1], a
            elif name == "head":
                yield "output.weight", a  # (vocab, C) already
            else:
                i, leaf = _layer(name)
                p = f"blk.{i}."
                base, _, kind = leaf.rpartition(".")
                if base in self._NORMS:
                    yield f"{p}{self._NORMS[base]}.{kind}", a
                elif leaf in self._MAT:
                    yield f"{p}{self._MAT[leaf]}.weight", T(a)
                elif leaf in self._VEC:
                    yield f"{p}{self._VEC[leaf]}.weight", a.reshape(C)
                elif leaf.startswith("att.x_"):
                    mixes[leaf[6:]] = a
                    if len(mixes) == len(RWKV7_MIXES):
                        fused = np.stack([mixes[m].reshape(C) for m in RWKV7_MIXES]).reshape(6, 1, 1, C)
                        yield p + "time_mix_lerp_fused.weight", fused
                        mixes = {}
                elif leaf[4:] in ("w0", "a0", "v0", "w1", "a1", "v1", "g1", "w2", "a2", "v2", "g2"):
                    m = leaf[4:]
                    out = a if m.endswith("0") else T(a)  # LoRA (in, out) -> Linear weight (out, in)
                    yield f"{p}time_mix_{m}.weight", out
                    if i == 0 and m[0] == "a":  # layer 0 has no value-residual gate; llama.cpp wants one
                        yield f"{p}time_mix_v{m[1]}.weight", out
                else:
                    raise UnsupportedError(f"rwkv7 weight {name} has no llama.cpp tensor")

    def config(self, g):
        a = g.arch_key
        vocab, C = g.tensor("token_embd.weight").shape
        hs = g.need(a("wkv.head_size"), int)
        if hs <= 0 or C % hs:
            raise EdgeseqError(f"{g.path}: wkv.head_size {hs} does not divide the width {C}")
        return dict(vocab_size=vocab, n_embd=C, n_layer=g.need(a("block_count"), int), n_head=C // hs,
                    head_size=hs, dim_ffn=g.tensor("blk.0.channel_mix_key.weight").shape[0],
                    ln_eps=float(g.get(a("attention.layer_norm_epsilon"), 1e-5)), gn_eps=LLAMA_RWKV7_GN_EPS)

    def matrices(self, fam):
        out = {"embed": ("token_embd.weight", False), "head": ("output.weight", False)}
        for i in range(fam.config.n_layer):
            o, p = f"layers.{i}.", f"blk.{i}."
            out.update({o + leaf: (f"{p}{n}.weight", True) for leaf, n in self._MAT.items()})
            out.update({f"{o}att.{m}{j}": (f"{p}time_mix_{m}{j}.weight", True) for m in "wavg" for j in "12"
                        if not (m == "v" and i == 0)})
        return out

    def from_gguf(self, fam, g):
        c = fam.config
        C = c.n_embd
        yield "embed", g.array("token_embd.weight")
        yield "ln0.weight", g.array("token_embd_norm.weight")
        yield "ln0.bias", g.array("token_embd_norm.bias")
        for i in range(c.n_layer):
            p, o = f"blk.{i}.", f"layers.{i}."
            for base, n in self._NORMS.items():
                for kind in ("weight", "bias"):
                    yield f"{o}{base}.{kind}", g.array(f"{p}{n}.{kind}")
            fused = g.array(p + "time_mix_lerp_fused.weight").reshape(6, C)
            for j, m in enumerate(RWKV7_MIXES):
                yield f"{o}att.x_{m}", np.ascontiguousarray(fused[j])
            for m in ("w", "a", "v", "g"):
                if m == "v" and i == 0:
                    continue
                yield f"{o}att.{m}1", T(g.array(f"{p}time_mix_{m}1.weight"))
                yield f"{o}att.{m}2", T(g.array(f"{p}time_mix_{m}2.weight"))
                if m != "g":
                    yield f"{o}att.{m}0", g.array(f"{p}time_mix_{m}0.weight").reshape(C)
            for leaf, n in self._VEC.items():
                yield o + leaf, g.array(f"{p}{n}.weight").reshape(C)
            for leaf, n in self._MAT.items():
                yield o + leaf, T(g.array(f"{p}{n}.weight"))
        yield "ln_out.weight", g.array("output_norm.weight")
        yield "ln_out.bias", g.array("output_norm.bias")
        yield "head", g.array("output.weight")


RWKV6_LERPS = ("w", "k", "v", "r", "g")  # llama.cpp's time_mix_lerp_fused order (= edgeseq's att.maa rows)


class Rwkv6Map(ArchMap):
    """RWKV-6: the five static token-shift mixes fused (5, 1, 1, C) beside lerp_x; the token-shift LoRA
    as (5·D, C) and (5, C, D), the decay LoRA as Linear weights; the channel mix's lerps are BlinkDL's
    maa (edgeseq keeps 1 - maa); u (time_faaaa) as time_mix_first (H, N); no layer rescaling."""

    arch, family = "rwkv6", "rwkv6"
    _NORMS = {"ln1": "attn_norm", "ln2": "attn_norm_2", "att.ln_x": "time_mix_ln"}
    _MAT = {"att.receptance": "time_mix_receptance", "att.key": "time_mix_key", "att.value": "time_mix_value",
            "att.gate": "time_mix_gate", "att.output": "time_mix_output", "ffn.key": "channel_mix_key",
            "ffn.value": "channel_mix_value", "ffn.receptance": "channel_mix_receptance"}

    def supports(self, fam):
        c = fam.config
        if abs(c.ln_x_eps - LLAMA_RWKV7_GN_EPS) > 1e-12:
            return f"llama.cpp's rwkv6 fixes ln_x's group-norm eps at 64e-5; this model uses {c.ln_x_eps}"
        if getattr(c, "version", "6.0") != "6.0":
            return f"llama.cpp's rwkv6 is RWKV v6.0; this model is v{c.version}"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        return [_u32("context_length", CONTEXT_LENGTH), _u32("embedding_length", c.n_embd),
                _u32("block_count", c.n_layer), _f32("attention.layer_norm_epsilon", 1e-5),
                _u32("rescale_every_n_layers", 0), _u32("wkv.head_size", c.head_size),
                _u32("time_mix_extra_dim", c.mix_lora), _u32("time_decay_extra_dim", c.decay_lora),
                _u32("feed_forward_length", c.dim_ffn), _u32("attention.head_count", 0)]

    def to_gguf(self, fam, weights):
        c = fam.config
        C = c.n_embd
        for name, a in weights:
            if name == "embed":
                yield "token_embd.weight", a
            elif name in ("ln0.weight", "ln0.bias"):
                yield "token_embd_norm." + name.split(".")[1], a
            elif name in ("ln_out.weight", "ln_out.bias"):
                yield "output_norm." + name.split(".")[1], a
            elif name == "head":
                yield "output.weight", a
            else:
                i, leaf = _layer(name)
                p = f"blk.{i}."
                base, _, kind = leaf.rpartition(".")
                if base in self._NORMS:
                    yield f"{p}{self._NORMS[base]}.{kind}", a
                elif leaf in self._MAT:
                    yield f"{p}{self._MAT[leaf]}.weight", T(a)
                elif leaf == "att.maa_x":
                    yield p + "time_mix_lerp_x.weight", a.reshape(C)
                elif leaf == "att.maa":
                    yield p + "time_mix_lerp_fused.weight", a.reshape(5, 1, 1, C)
                elif leaf == "att.maa_w1":
                    yield p + "time_mix_w1.weight", T(a)  # (C, 5D) -> (5D, C)
                elif leaf == "att.maa_w2":
                    yield p + "time_mix_w2.weight", np.ascontiguousarray(a.transpose(0, 2, 1))  # (5, C, D)
                elif leaf == "att.decay":
                    yield p + "time_mix_decay.weight", a.reshape(C)
                elif leaf in ("att.decay_w1", "att.decay_w2"):
                    yield f"{p}time_mix_{leaf[4:]}.weight", T(a)
                elif leaf == "att.bonus":
                    yield p + "time_mix_first.weight", a.reshape(c.n_head, c.head_size)
                elif leaf in ("ffn.time_mix_k", "ffn.time_mix_r"):
                    yield f"{p}channel_mix_lerp_{leaf[-1]}.weight", (1.0 - a.astype(np.float64)).astype(np.float32)
                else:
                    raise UnsupportedError(f"rwkv6 weight {name} has no llama.cpp tensor")

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

    def matrices(self, fam):
        out = {"embed": ("token_embd.weight", False), "head": ("output.weight", False)}
        for i in range(fam.config.n_layer):
            out.update({f"layers.{i}.{leaf}": (f"blk.{i}.{n}.weight", True) for leaf, n in self._MAT.items()})
        return out

    def from_gguf(self, fam, g):
        c = fam.config
        C = c.n_embd
        yield "embed", g.array("token_embd.weight")
        yield "ln0.weight", g.array("token_embd_norm.weight")
        yield "ln0.bias", g.array("token_embd_norm.bias")
        for i in range(c.n_layer):
            p, o = f"blk.{i}.", f"layers.{i}."
            for base in ("ln1", "ln2"):
                for kind in ("weight", "bias"):
                    yield f"{o}{base}.{kind}", g.array(f"{p}{self._NORMS[base]}.{kind}")
            yield o + "att.maa_x", g.array(p + "time_mix_lerp_x.weight").reshape(C)
            yield o + "att.maa", g.array(p + "time_mix_lerp_fused.weight").reshape(5, C)
            yield o + "att.maa_w1", T(g.array(p + "time_mix_w1.weight"))
            yield o + "att.maa_w2", np.ascontiguousarray(g.array(p + "time_mix_w2.weight").transpose(0, 2, 1))
            yield o + "att.decay", g.array(p + "time_mix_decay.weight").reshape(C)
            yield o + "att.decay_w1", T(g.array(p + "time_mix_decay_w1.weight"))
            yield o + "att.decay_w2", T(g.array(p + "time_mix_decay_w2.weight"))
            yield o + "att.bonus", g.array(p + "time_mix_first.weight").reshape(c.n_head, c.head_size, 1)
            for m in ("receptance", "key", "value", "gate", "output"):
                yield f"{o}att.{m}", T(g.array(f"{p}{self._MAT['att.' + m]}.weight"))
            for kind in ("weight", "bias"):
                yield f"{o}att.ln_x.{kind}", g.array(f"{p}time_mix_ln.{kind}")
            for m in ("k", "r"):
                maa = g.array(f"{p}channel_mix_lerp_{m}.weight").reshape(C).astype(np.float64)
                yield f"{o}ffn.time_mix_{m}", (1.0 - maa).astype(np.float32)
            for m in ("key", "value", "receptance"):
                yield f"{o}ffn.{m}", T(g.array(f"{p}{self._MAT['ffn.' + m]}.weight"))
        yield "ln_out.weight", g.array("output_norm.weight")
        yield "ln_out.bias", g.array("output_norm.bias")
        yield "head", g.array("output.weight")


LLAMA_ARCHS: dict[str, ArchMap] = {m.arch: m for m in (MambaMap(), Mamba2Map(), Rwkv6Map(), Rwkv7Map())}
BY_FAMILY: dict[str, ArchMap] = {m.family: m for m in LLAMA_ARCHS.values()}


def _top(name: str, a: np.ndarray) -> tuple[str, np.ndarray]:
    if name == "embed":
        return "token_embd.weight", a
    if name == "norm_f":
        return "output_norm.weight", a
    return "output.weight", T(a)  # lm_head (d, vocab) -> (vocab, d)


def _layer(name: str) -> tuple[int, str]:
    parts = name.split(".", 2)
    if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdecimal():
        raise UnsupportedError(f"weight {name!r} is not a layer weight edgeseq knows")
    return int(parts[1]), parts[2]


def arch_for(fam) -> tuple[ArchMap | None, str | None]:
    """The llama.cpp mapping for this family instance, or (None, why the generic architecture is used)."""
    m = BY_FAMILY.get(fam.name)
    if m is None:
        return None, f"llama.cpp has no {fam.name} architecture"
    why = m.supports(fam)
    return (None, why) if why else (m, None)


# ---------------------------------------------------------------------------------------------------
# which canonical tensors of the generic architecture stay F32 (llama.cpp's names follow llama.cpp's own
# rules, in edgeseq.quant.gguf_quants.choose_type)
# ---------------------------------------------------------------------------------------------------

# SSM rates and skips, convs, token-shift and decay LoRAs, per-head bonus and decay: small, and the
# recurrence is sensitive to them (the same tensors llama.cpp keeps F32 in the archs it knows)
_GENERIC_KEEP = ("A", "D", "conv", "maa", "maa_w1", "maa_w2", "decay", "decay_w1", "decay_w2", "bonus",
                 "head_expand", "w1", "w2", "time_first", "time_decay", "log_decay")


def keep_f32(name: str, array: np.ndarray, generic: bool = True) -> bool:
    """True when a canonical tensor of an `edgeseq-*` file is stored F32 whatever the recipe."""
    return array.ndim != 2 or name.rsplit(".", 1)[-1] in _GENERIC_KEEP


# ---------------------------------------------------------------------------------------------------
# the generic architecture: edgeseq-<family>
# ---------------------------------------------------------------------------------------------------

def generic_metadata(fam) -> list[tuple[str, object, str]]:
    return [("edgeseq.format_version", GENERIC_FORMAT_VERSION, "u32"), ("edgeseq.family", fam.name, "str"),
            ("edgeseq.config", json.dumps(fam.config_json()), "str"),
            ("edgeseq.state", json.dumps([s.to_json() for s in fam.state_spec()]), "str")]


def generic_family(g) -> tuple[object, Callable, dict]:
    """(family instance, canonical weight iterator, matrices) for an `edgeseq-*` GGUF."""
    from edgeseq.families import family_by_name

    v = g.need("edgeseq.format_version", int)
    if v > GENERIC_FORMAT_VERSION:
        raise EdgeseqError(f"{g.path}: edgeseq GGUF format {v} is newer than this edgeseq reads "
                           f"({GENERIC_FORMAT_VERSION}); upgrade edgeseq")
    name = g.need("edgeseq.family", str)
    if g.architecture != GENERIC_PREFIX + name:
        raise EdgeseqError(f"{g.path}: general.architecture {g.architecture!r} does not match edgeseq.family {name!r}")
    try:
        cfg = json.loads(g.need("edgeseq.config", str))
    except ValueError as e:
        raise EdgeseqError(f"{g.path}: edgeseq.config is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise EdgeseqError(f"{g.path}: edgeseq.config is not a JSON object")
    cls = family_by_name(name, g.path)
    try:
        fam = cls.from_json(cfg)
    except TypeError as e:
        raise EdgeseqError(f"{g.path}: edgeseq.config does not fit the {name} family ({e})") from None
    # canonical layouts: only (N, K) matrices (embedding, transposed heads) have their blocks along K
    return fam, lambda: ((n, g.array(n)) for n in g.tensors), {n: (n, False) for n in g.tensors}


def family_of(g):
    """(family instance, canonical weight iterator factory, {canonical matrix: (GGUF tensor, transposed)})
    for any GGUF edgeseq reads."""
    from edgeseq.safe_io import check_config, check_layers

    arch = g.architecture
    if arch.startswith(GENERIC_PREFIX):
        fam, weights, matrices = generic_family(g)
        check_config(fam.config, g.path, max_layers=len(g.tensors))
        check_layers(fam.config, g.tensors, g.path)
        return fam, weights, matrices
    m = LLAMA_ARCHS.get(arch)
    if m is None:
        known = sorted(LLAMA_ARCHS) + [GENERIC_PREFIX + "<family>"]
        raise UnsupportedError(f"{g.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(known)}")
    from edgeseq.families import family_by_name

    cls = family_by_name(m.family, g.path)
    try:  # the metadata and tensor shapes are the file's: what does not add up is the file's fault
        config = cls.Config(**m.config(g))
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise EdgeseqError(f"{g.path}: its metadata does not describe a {arch} model ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
    check_config(config, g.path, max_layers=len(g.tensors))  # before anything loops over n_layer
    check_layers(config, g.tensors, g.path)
    fam = cls(config)
    return fam, lambda: m.from_gguf(fam, g), m.matrices(fam)


def summary(path: str) -> str:
    """`edgeseq inspect x.gguf`: architecture, family, config, tensor types, state, vocabulary."""
    from collections import Counter

    from edgeseq.gguf_file import GGUFFile

    with GGUFFile(path) as g:
        fam, _, _ = family_of(g)
        types = Counter(t.type_name for t in g.tensors.values())
        runs = "llama.cpp and edgeseq" if g.architecture in LLAMA_ARCHS else "edgeseq"
        lines = [f"gguf        {path}  (GGUF v{g.version}, {g.size / 1e6:.2f} MB, runs in {runs})",
                 f"family      {fam.name}  ({g.architecture})",
                 f"tensors     {len(g.tensors)}: " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())),
                 f"vocab       {fam.vocab_size}  tokenizer {g.get('tokenizer.ggml.model', 'none')}",
                 "config      " + ", ".join(f"{k}={v}" for k, v in fam.config_json().items()),
                 f"state       {fam.state_bytes() / 1024:.1f} KiB per sequence, {len(fam.state_spec())} tensors"]
    return "\n".join(lines)
