"""Structure-aware mutations of the seeds, one reader at a time.

A mutation is (kind, detail, must_fail, apply): `apply(case)` edits the copy of the seed at `case` (a file
or a folder) in place. `must_fail` says whether a reader must refuse the result: structural damage
(truncation, absurd counts, wrong types, paths outside) must be refused; a flipped bit in float data
may load (nothing in a safetensors or rwkv.cpp file could tell), so accepting it is not a failure.

Kinds, as in the issue's table: truncate, huge (counts and lengths like 2**62), dims (negative, zero,
overflowing, half width), offsets (past the end, reversed, overlapping), types (wrong dtypes and JSON
types), names (duplicate, unicode, paths outside), flip (bit flips), nest (absurd JSON nesting), pickle.
"""
from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HUGE = [2 ** 62, 2 ** 63 - 1, 2 ** 64 - 1, 2 ** 32 - 1, 2 ** 31, 65536]
BAD_JSON = [None, True, -1, 0, 2 ** 62, -(2 ** 62), 1e300, float("nan"), "x", "", [], {}, [None], {"a": 1}, "é✓\u202e"]
NEST = "[" * 100_000 + "]" * 100_000


@dataclass
class Mutation:
    kind: str
    detail: str
    must_fail: bool
    apply: Callable[[Path], None]


# -- bytes -----------------------------------------------------------------------------------------

def truncate(path: Path, at: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:at])


def flip(path: Path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def put(path: Path, offset: int, fmt: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    size = struct.calcsize(fmt)
    bits = size * 8
    signed = fmt[-1].islower()
    value = (value + (1 << bits)) % (1 << bits) if signed or value < 0 else value % (1 << bits)
    struct.pack_into(fmt.upper() if signed else fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _byte_mutations(file: Callable[[Path], Path], size: int, boundaries: list[int], header_end: int,
                    rng: random.Random, n_flips: int = 6) -> list[Mutation]:
    out = []
    for b in sorted(set(boundaries)):
        if 0 <= b < size:
            out.append(Mutation("truncate", f"cut at byte {b}", True, lambda c, b=b: truncate(file(c), b)))
    for b in (1, size // 2, size - 1):
        out.append(Mutation("truncate", f"cut at byte {b}", True, lambda c, b=b: truncate(file(c), b)))
    for _ in range(n_flips):
        bit = rng.randrange(header_end * 8) if header_end else rng.randrange(size * 8)
        out.append(Mutation("flip", f"header bit {bit}", False, lambda c, bit=bit: flip(file(c), bit)))
    for _ in range(2):
        bit = rng.randrange(header_end * 8, size * 8) if header_end < size else rng.randrange(size * 8)
        out.append(Mutation("flip", f"data bit {bit}", False, lambda c, bit=bit: flip(file(c), bit)))
    return out


# -- JSON ------------------------------------------------------------------------------------------

def json_paths(obj, prefix=()) -> list[tuple]:
    """Every path to a value inside a JSON document (dict keys and list indexes)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += json_paths(v, prefix + (i,))
    return out


def get_path(obj, path: tuple):
    for k in path:
        obj = obj[k]
    return obj


def set_path(obj, path: tuple, value):
    if not path:
        return value
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


def del_path(obj, path: tuple):
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    del cur[path[-1]]
    return obj


def json_mutations(read: Callable[[Path], object], write: Callable[[Path, object], None], doc, rng: random.Random,
                   n: int, required: Callable[[tuple], bool] = lambda p: False,
                   targeted: list[tuple[str, tuple, object]] = (),
                   deletable: Callable[[tuple], bool] = lambda p: False) -> list[Mutation]:
    """Random paths set to a value of another type or range (or deleted), plus targeted edits."""
    out = []
    paths = [p for p in json_paths(doc) if p]
    for _ in range(n):
        p = rng.choice(paths)
        old = get_path(doc, p)
        if rng.random() < 0.2:
            # a dim of 1 deleted from a shape keeps the element count: a reader may take it
            harmless = deletable(p) or isinstance(p[-1], int) and old == 1
            out.append(Mutation("types", f"delete {_show(p)}", required(p) and not harmless,
                                lambda c, p=p: write(c, del_path(read(c), p))))
        else:
            v = rng.choice(BAD_JSON)
            same = type(v) is type(old) and v == old
            out.append(Mutation("types", f"{_show(p)} = {v!r}"[:80], required(p) and not same,
                                lambda c, p=p, v=v: write(c, set_path(read(c), p, v))))
    for kind, p, v in targeted:
        out.append(Mutation(kind, f"{_show(p)} = {v!r}"[:80], True, lambda c, p=p, v=v: write(c, set_path(read(c), p, v))))
    out.append(Mutation("nest", "100,000 nested [", True, lambda c: write(c, _Raw(NEST))))
    out.append(Mutation("types", "a list, not an object", True, lambda c: write(c, [read(c)])))
    return out


class _Raw(str):
    """Text written as is, not as JSON."""


def dumps(obj) -> bytes:
    return obj.encode() if isinstance(obj, _Raw) else json.dumps(obj).encode()


def _show(p: tuple) -> str:
    return ".".join(str(k) for k in p)
