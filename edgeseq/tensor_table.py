"""A family's tensors as one declarative table: each row names a canonical weight, where each checkpoint
layout keeps it (and how to read it from there), and its llama.cpp GGUF tensor with a transform and the
transform's inverse. One table drives checkpoint conversion, GGUF writing and GGUF reading, the way
gguf-py's TensorNameMap drives llama.cpp's converter.

    Row("layers.{i}.in_proj", "{p}layers.{i}.mixer.in_proj.weight", T, gguf="blk.{i}.ssm_in.weight", codec=T)

Names hold `{i}` (the layer) and, on the checkpoint side, `{p}` (the checkpoint's name prefix). Canonical
arrays are what the graphs read (matrices (in, out)); checkpoint arrays are as stored; GGUF arrays are
in numpy order of the torch layout llama.cpp expects (matrices (out, in)).

Row kinds:
    Row       one canonical tensor from one (or several) checkpoint tensors, one GGUF tensor or none
    Derived   a canonical constant computed from the config (in no checkpoint and no GGUF file)
    Fused     one GGUF tensor holding several canonical ones (llama.cpp's fused token-shift mixes)
    Copy      a GGUF tensor llama.cpp wants that is a copy of another (written, ignored on reading)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError

Array = np.ndarray


# ---------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------

def t(a: Array) -> Array:
    """A 2-D matrix transposed: torch Linear's (out, in) <-> the graphs' (in, out)."""
    return np.ascontiguousarray(a.T)


def as_is(a: Array) -> Array:
    return a


def reshape(*shape: int) -> Callable[[Array], Array]:
    return lambda a: np.ascontiguousarray(a.reshape(shape))


def one_minus(a: Array) -> Array:
    """1 - a, computed in float64 so that the round trip is exact to one rounding."""
    return (1.0 - a.astype(np.float64)).astype(np.float32)


@dataclass(frozen=True)
class Codec:
    """canonical -> GGUF (`enc`) and back (`dec`); `dec(enc(a)) == a` for every canonical tensor (a test
    checks every row of every table)."""

    enc: Callable[[Array], Array]
    dec: Callable[[Array], Array]
    transposed: bool = False  # enc is a plain transpose: quantized GGUF blocks can move into MatMulNBits

    def then(self, other: "Codec") -> "Codec":
        return Codec(lambda a: other.enc(self.enc(a)), lambda a: self.dec(other.dec(a)))


SAME = Codec(as_is, as_is)
T = Codec(t, t, transposed=True)


def shaped(gguf: Sequence[int], canonical: Sequence[int]) -> Codec:
    """A reshape between the GGUF shape and the canonical one."""
    return Codec(reshape(*gguf), reshape(*canonical))


ONE_MINUS = Codec(one_minus, one_minus)


# ---------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Zeros:
    """A tensor some checkpoints leave out because it is zero (fla's bias-free norms): zeros shaped like
    checkpoint tensor `like`."""

    like: str


@dataclass(frozen=True)
class Either:
    """The first of several (checkpoint name, load) alternatives the checkpoint has."""

    options: tuple[tuple[str, Callable[[Array], Array]], ...]

    def __init__(self, *options):
        object.__setattr__(self, "options", tuple(o if isinstance(o, tuple) else (o, as_is) for o in options))


# checkpoint name(s): several are passed to `load` together
Source = Union[str, Sequence[str], Zeros, Either, None]


@dataclass(frozen=True)
class Row:
    name: str                              # canonical name, `{i}` for the layer
    ckpt: Source | Mapping[str, Source] = None   # checkpoint name(s), or {layout: name(s)}
    load: Callable[..., Array] | Mapping[str, Callable[..., Array]] = as_is  # stored array(s) -> canonical
    gguf: str | None = None                # llama.cpp's name; None: the tensor has no llama.cpp counterpart
    codec: Codec = SAME
    optional: bool = False                 # absent from some checkpoints (biases); absent -> not yielded
    layers: Callable[[int], bool] | None = None  # the layers that have it (default: all)
    # the canonical shape the config implies, for tensors no graph op checks (fused ops take them as they
    # come): a checkpoint or GGUF that holds another is refused, naming the tensor
    shape: tuple[int, ...] | None = None

    def source(self, layout: str | None) -> Source:
        return self.ckpt.get(layout, self.ckpt.get("*")) if isinstance(self.ckpt, Mapping) else self.ckpt

    def loader(self, layout: str | None) -> Callable[..., Array]:
        return self.load.get(layout, self.load.get("*", as_is)) if isinstance(self.load, Mapping) else self.load


@dataclass(frozen=True)
class Derived:
    name: str
    make: Callable[[], Array]


@dataclass(frozen=True)
class Fused:
    gguf: str
    parts: tuple[str, ...]                 # canonical names, `{i}` for the layer
    enc: Callable[[list[Array]], Array]
    dec: Callable[[Array], list[Array]]


@dataclass(frozen=True)
class Copy:
    gguf: str
    of: str                                # the canonical tensor it copies
    codec: Codec = SAME
    layers: Callable[[int], bool] | None = None


Entry = Union[Row, Derived, Fused, Copy]


def _has_layer(pattern: str) -> bool:
    return "{i}" in pattern


@dataclass
class Table:
    """A family instance's rows, with `{i}` expanded over `n_layer` layers."""

    entries: list[Entry]
    n_layer: int
    _items: list[tuple[Entry, int | None]] = field(init=False, repr=False)
    _by_name: dict[str, tuple[Entry, int | None]] = field(init=False, repr=False)

    def __post_init__(self):
        self._items = self._expand()
        self._by_name = {_fmt(e.name, i): (e, i) for e, i in self._items if isinstance(e, (Row, Derived))}

    def _expand(self) -> list[tuple[Entry, int | None]]:
        """Entries in table order; a per-layer entry once per layer, layer by layer where it stands."""
        out: list[tuple[Entry, int | None]] = []
        run: list[Entry] = []

        def flush():
            for layer in range(self.n_layer):
                for e in run:
                    if getattr(e, "layers", None) is None or e.layers(layer):
                        out.append((e, layer))
            run.clear()

        for e in self.entries:
            pattern = e.name if isinstance(e, (Row, Derived)) else e.gguf
            if _has_layer(pattern):
                run.append(e)
            else:
                flush()
                out.append((e, None))
        flush()
        return out

    # -- checkpoint -> canonical -------------------------------------------------------------------
    def convert(self, src, layout: str | None = None, prefix: str = "") -> Iterator[tuple[str, Array]]:
        """(canonical name, array) for every row, read from checkpoint `src` in `layout`, one at a time."""
        for e, i in self._items:
            if isinstance(e, Derived):
                yield _fmt(e.name, i), e.make()
            elif isinstance(e, Row):
                names = e.source(layout)
                fmt = lambda n: n.format(i=i, p=prefix)  # noqa: E731
                if names is None:
                    continue
                if isinstance(names, (Zeros, Either)):
                    yield _fmt(e.name, i), _read(src, names, fmt)
                    continue
                names = [fmt(names)] if isinstance(names, str) else [fmt(n) for n in names]
                if e.optional and not all(src.has(n) for n in names):
                    continue
                arrays = [src.get(n) for n in names]
                yield _fmt(e.name, i), _made(e, i, e.loader(layout), arrays, src.path, names)

    # -- canonical <-> GGUF ------------------------------------------------------------------------
    def to_gguf(self, weights: Iterable[tuple[str, Array]], arch: str) -> Iterator[tuple[str, Array]]:
        """GGUF tensors from canonical ones, in the canonical stream's order; fused tensors when their
        last part arrives, copies right after their original."""
        fused: dict[str, tuple[Fused, int | None]] = {}
        copies: dict[str, list[tuple[Copy, int | None]]] = {}
        for e, i in self._items:
            if isinstance(e, Fused):
                for part in e.parts:
                    fused[_fmt(part, i)] = (e, i)
            elif isinstance(e, Copy):
                copies.setdefault(_fmt(e.of, i), []).append((e, i))
        pending: dict[tuple[str, int | None], dict[str, Array]] = {}
        for name, a in weights:
            if name in fused:
                e, i = fused[name]
                got = pending.setdefault((e.gguf, i), {})
                got[name] = a
                if len(got) == len(e.parts):
                    yield _fmt(e.gguf, i), e.enc([got[_fmt(p, i)] for p in e.parts])
                    del pending[(e.gguf, i)]
                continue
            entry = self._by_name.get(name)
            if entry is None:
                raise UnsupportedError(f"{arch} weight {name} has no llama.cpp tensor")
            e, i = entry
            if isinstance(e, Derived):
                continue  # rebuilt from the config on reading
            if e.gguf is None:
                raise UnsupportedError(f"{arch} weight {name} has no llama.cpp tensor")
            yield _fmt(e.gguf, i), e.codec.enc(a)
            for c, j in copies.get(name, ()):
                yield _fmt(c.gguf, j), c.codec.enc(a)
        if pending:
            (g, i), got = next(iter(pending.items()))
            raise EdgeseqError(f"{arch}: {_fmt(g, i)} is missing some of its parts (got {sorted(got)})")

    def from_gguf(self, g) -> Iterator[tuple[str, Array]]:
        """Canonical tensors from GGUF file `g` (edgeseq.gguf_file.GGUFFile), in table order."""
        for e, i in self._items:
            if isinstance(e, Derived):
                yield _fmt(e.name, i), e.make()
            elif isinstance(e, Row):
                if e.gguf is None:
                    continue
                n = _fmt(e.gguf, i)
                if e.optional and n not in g.tensors:
                    continue
                yield _fmt(e.name, i), _made(e, i, e.codec.dec, [g.array(n)], g.path, [f"tensor {n}"])
            elif isinstance(e, Fused):
                for part, a in zip(e.parts, e.dec(g.array(_fmt(e.gguf, i)))):
                    yield _fmt(part, i), np.ascontiguousarray(a)

    def matrices(self) -> dict[str, tuple[str, bool]]:
        """{canonical matrix: (GGUF tensor, transposed)} for the rows whose GGUF tensor is the canonical
        one as it is or transposed: their quantized blocks can move into MatMulNBits unchanged. A GGUF
        tensor that more than one row reads is left out (its float values are needed anyway)."""
        out, reads = {}, Counter()
        for e, i in self._items:
            if isinstance(e, (Row, Fused)) and e.gguf is not None:
                reads[_fmt(e.gguf, i)] += 1
            if isinstance(e, Row) and e.gguf is not None and (e.codec is SAME or e.codec.transposed):
                out[_fmt(e.name, i)] = (_fmt(e.gguf, i), e.codec.transposed)
        return {n: m for n, m in out.items() if reads[m[0]] == 1}

    def gguf_names(self) -> set[str]:
        """Every GGUF tensor name this table writes."""
        out = set()
        for e, i in self._items:
            if isinstance(e, (Fused, Copy)) or (isinstance(e, Row) and e.gguf is not None):
                out.add(_fmt(e.gguf, i))
        return out


def _made(e: Row, i: int | None, fn: Callable[..., Array], arrays: list[Array], path: str,
          names: list[str]) -> Array:
    """Row e's canonical array from the stored one(s): a stored shape the transform cannot take, or a
    result of another shape than the row declares, is an error naming the file and the stored tensors."""
    def stored() -> str:
        return f"{path}: " + ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(names, arrays))

    try:
        out = fn(*arrays)
    except ValueError as err:  # a reshape or concatenation the stored shapes do not fit
        raise EdgeseqError(f"{stored()} does not fit this model's config (as {_fmt(e.name, i)}: "
                           f"{str(err)[:120]})") from None
    if e.shape is not None and tuple(out.shape) != tuple(e.shape):
        raise EdgeseqError(f"{stored()} gives {_fmt(e.name, i)} of shape {tuple(out.shape)}; this model's config "
                           f"needs {tuple(e.shape)}")
    return out


def _read(src, spec, fmt) -> Array:
    """A Zeros or Either source read from checkpoint `src` (`fmt` fills in the layer and prefix)."""
    if isinstance(spec, Zeros):
        return np.zeros(src.shape(fmt(spec.like)), np.float32)
    present = lambda o: src.has(fmt(o.like if isinstance(o, Zeros) else o))  # noqa: E731
    name, load = next((o for o in spec.options if present(o[0])), spec.options[0])
    return _read(src, name, fmt) if isinstance(name, Zeros) else load(src.get(fmt(name)))


def _fmt(pattern: str, i: int | None) -> str:
    return pattern if i is None else pattern.format(i=i)


class Renamed:
    """A checkpoint seen under another layout's names (a TensorSource): for layouts that differ from the
    reference one only in names, declared as (old, new) substring replacements."""

    def __init__(self, src, replacements: Sequence[tuple[str, str]], stored_by: str):
        self.src, self.path, self.config, self.stored_by = src, src.path, src.config, stored_by
        self._map = {}
        for k in src.keys():
            n = k
            for a, z in replacements:
                n = n.replace(a, z)
            self._map[n] = k

    def keys(self):
        return list(self._map)

    def has(self, name):
        return name in self._map

    def shape(self, name):
        return self.src.shape(self._map.get(name, name))

    def get(self, name):
        return self.src.get(self._map.get(name, name))
