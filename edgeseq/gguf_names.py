"""GGUF architectures: which family each is, its metadata keys both ways, and the generic architecture.

Where llama.cpp knows the architecture (mamba, mamba2, rwkv6, rwkv7) the tensor names, layouts (torch's
(out, in) for matrices, squeezed/fused as llama.cpp's converter writes them) and metadata keys are
llama.cpp's, so llama.cpp loads the file and edgeseq reads files llama.cpp's converter wrote. The tensor
names and transforms are the `gguf` column of each family's tensor table (edgeseq.tensor_table); this
module holds what is not per tensor: the metadata, the config read back from it, and what llama.cpp's
architecture cannot express (`supports`). Every
other family (and Mamba-1 with an expand factor other than 2, which llama.cpp refuses, or layers with
biases it has no tensor for) uses the generic `edgeseq-<family>` architecture: canonical names and
layouts as the bundle stores them, the family config and the state spec as JSON metadata. New
families need no code here.

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

    def config(self, g) -> dict:
        raise NotImplementedError

    # the tensors: the family's table (edgeseq.tensor_table) holds the GGUF names and transforms
    def to_gguf(self, fam, weights: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        return fam.table().to_gguf(weights, self.arch)

    def from_gguf(self, fam, g) -> Iterator[tuple[str, np.ndarray]]:
        return fam.table().from_gguf(g)

    def matrices(self, fam) -> dict[str, tuple[str, bool]]:
        """{canonical matrix: (GGUF tensor, transposed)} for the matrices that are the GGUF tensor itself
        or its transpose: their quantized blocks can move into MatMulNBits as they are."""
        return fam.table().matrices()


def _u32(k, v):
    return (k, int(v), "u32")


def _f32(k, v):
    return (k, float(v), "f32")


class MambaMap(ArchMap):
    """Mamba-1 (and FalconMamba: dt, B, C normed, `ssm.dt_b_c_rms`)."""

    arch, family = "mamba", "mamba"

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


LLAMA_RWKV7_GN_EPS = 64e-5  # llama.cpp's rwkv7 graph hard-codes ln_x's eps


class Rwkv7Map(ArchMap):
    """RWKV-7: six token-shift mixes fused into one (6, 1, 1, C) tensor; LoRA matrices as torch Linear
    weights (out, in); layer 0 carries v0/v1/v2 (unused; copies of a0/a1/a2, as llama.cpp expects)."""

    arch, family = "rwkv7", "rwkv7"

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

    def config(self, g):
        a = g.arch_key
        vocab, C = g.tensor("token_embd.weight").shape
        hs = g.need(a("wkv.head_size"), int)
        if hs <= 0 or C % hs:
            raise EdgeseqError(f"{g.path}: wkv.head_size {hs} does not divide the width {C}")
        return dict(vocab_size=vocab, n_embd=C, n_layer=g.need(a("block_count"), int), n_head=C // hs,
                    head_size=hs, dim_ffn=g.tensor("blk.0.channel_mix_key.weight").shape[0],
                    ln_eps=float(g.get(a("attention.layer_norm_epsilon"), 1e-5)), gn_eps=LLAMA_RWKV7_GN_EPS)


class Rwkv6Map(ArchMap):
    """RWKV-6: the five static token-shift mixes fused (5, 1, 1, C) beside lerp_x; the token-shift LoRA
    as (5·D, C) and (5, C, D), the decay LoRA as Linear weights; the channel mix's lerps are BlinkDL's
    maa (edgeseq keeps 1 - maa); u (time_faaaa) as time_mix_first (H, N); no layer rescaling."""

    arch, family = "rwkv6", "rwkv6"

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


LLAMA_ARCHS: dict[str, ArchMap] = {m.arch: m for m in (MambaMap(), Mamba2Map(), Rwkv6Map(), Rwkv7Map())}
BY_FAMILY: dict[str, ArchMap] = {m.family: m for m in LLAMA_ARCHS.values()}


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
