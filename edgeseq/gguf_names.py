"""GGUF architectures: the map a family declares for llama.cpp's architecture, and the generic one.

Where llama.cpp knows the architecture (mamba, mamba2, rwkv6, rwkv7), the family declares an `ArchMap`
(`Family.gguf`, in its own file): its metadata keys both ways and what the architecture cannot express
(`supports`); the tensor names, layouts (torch's (out, in) for matrices, squeezed/fused as llama.cpp's
converter writes them) and transforms are the `gguf` column of the family's tensor table
(edgeseq.tensor_table). So llama.cpp loads the files edgeseq writes, and edgeseq reads the files
llama.cpp's converter writes. Every other family (and a model its architecture cannot express, such as
Mamba-1 with an expand factor other than 2) uses the generic `edgeseq-<family>` architecture: canonical
names and layouts as the bundle stores them, the family config and the state spec as JSON metadata.

Layouts: canonical arrays are what `Family.convert` yields (matrices (in, out)); GGUF arrays are in
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
# llama.cpp's architectures: declared by the families (Family.gguf)
# ---------------------------------------------------------------------------------------------------

class ArchMap:
    """One llama.cpp architecture: its metadata both ways and what it cannot express. A family declares
    its map as `Family.gguf`; the tensors are the `gguf` column of the family's table."""

    arch: str
    family: str = ""  # set from the family that declares the map

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


def u32(k, v):
    return (k, int(v), "u32")


def f32(k, v):
    return (k, float(v), "f32")


LLAMA_GN_EPS = 64e-5  # llama.cpp's rwkv6 and rwkv7 graphs hard-code ln_x's group-norm eps


def llama_archs() -> dict[str, ArchMap]:
    """{llama.cpp architecture: its map}, from the families that declare one (`Family.gguf`)."""
    from edgeseq.families import all_families

    out = {}
    for cls in all_families():
        if cls.gguf is not None:
            cls.gguf.family = cls.name
            out[cls.gguf.arch] = cls.gguf
    return out


def __getattr__(name: str):  # LLAMA_ARCHS and BY_FAMILY, computed when first asked for
    if name == "LLAMA_ARCHS":
        return llama_archs()
    if name == "BY_FAMILY":
        return {m.family: m for m in llama_archs().values()}
    raise AttributeError(name)


def arch_for(fam) -> tuple[ArchMap | None, str | None]:
    """The llama.cpp mapping for this family instance, or (None, why the generic architecture is used)."""
    m = type(fam).gguf
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
    return fam, lambda src=g: ((n, src.array(n)) for n in src.tensors), {n: (n, False) for n in g.tensors}


def family_of(g):
    """(family instance, canonical weight iterator factory, {canonical matrix: (GGUF tensor, transposed)})
    for any GGUF edgeseq reads. The factory reads `g`, or what it is given in its place (an object with
    `array(name)`, `tensors` and `path`)."""
    from edgeseq.safe_io import check_config, check_layers

    arch = g.architecture
    if arch.startswith(GENERIC_PREFIX):
        fam, weights, matrices = generic_family(g)
        check_config(fam.config, g.path, max_layers=len(g.tensors))
        check_layers(fam.config, g.tensors, g.path)
        return fam, weights, matrices
    archs = llama_archs()
    m = archs.get(arch)
    if m is None:
        known = sorted(archs) + [GENERIC_PREFIX + "<family>"]
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
    return fam, lambda src=g: m.from_gguf(fam, src), m.matrices(fam)


def summary(path: str) -> str:
    """`edgeseq inspect x.gguf`: architecture, family, config, tensor types, state, vocabulary."""
    from collections import Counter

    from edgeseq.gguf_file import GGUFFile

    with GGUFFile(path) as g:
        fam, _, _ = family_of(g)
        types = Counter(t.type_name for t in g.tensors.values())
        runs = "llama.cpp and edgeseq" if g.architecture in llama_archs() else "edgeseq"
        lines = [f"gguf        {path}  (GGUF v{g.version}, {g.size / 1e6:.2f} MB, runs in {runs})",
                 f"family      {fam.name}  ({g.architecture})",
                 f"tensors     {len(g.tensors)}: " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())),
                 f"vocab       {fam.vocab_size}  tokenizer {g.get('tokenizer.ggml.model', 'none')}",
                 "config      " + ", ".join(f"{k}={v}" for k, v in fam.config_json().items()),
                 f"state       {fam.state_bytes() / 1024:.1f} KiB per sequence, {len(fam.state_spec())} tensors"]
    return "\n".join(lines)
