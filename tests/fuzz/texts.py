"""Fuzz targets for text formats: an RWKV World vocabulary and a tokenizer.json (each parsed, then a sample
encoded and decoded)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from fuzz.mutations import Mutation, dumps, json_mutations


SAMPLE = "And God said: é ✓ 😀\n\nthe end"


# -- tokenizers ------------------------------------------------------------------------------------

def world_mutations(file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    lines = seed.read_bytes().split(b"\n")

    def line(i, new):
        def apply(c):
            ls = file(c).read_bytes().split(b"\n")
            ls[i] = new
            file(c).write_bytes(b"\n".join(ls))
        return apply
    i = rng.randrange(256, len(lines) - 1)
    out = [Mutation("types", "a line not UTF-8", True, line(i, b"300 'a\xff' 2")),
           Mutation("huge", "a 100 KB literal", True, line(i, b"300 '" + b"a" * 100_000 + b"' 100000")),
           Mutation("huge", "a 1 MB line of brackets", True, line(i, b"300 " + b"(" * 1_000_000 + b" 1")),
           Mutation("types", "code, not a literal", True, line(i, b"300 __import__('os').system('true') 4")),
           Mutation("types", "a tuple literal", True, line(i, b"300 (1, 2) 2")),
           Mutation("dims", "a wrong length", True, line(i, b"300 'ab' 3")),
           Mutation("dims", "a negative id", False, line(i, b"-3 'ab' 2")),
           Mutation("types", "no length", True, line(i, b"300 'ab'")),
           Mutation("names", "a duplicate id", False, line(i, lines[i - 1])),
           Mutation("truncate", "empty file", False, lambda c: file(c).write_bytes(b"")),
           Mutation("names", "an f-string literal", True, line(i, b"300 f'{1+1}' 1"))]
    for _ in range(max(0, n - len(out))):
        j = rng.randrange(len(lines) - 1)
        bit = rng.randrange(max(1, len(lines[j]) * 8))
        out.append(Mutation("flip", f"line {j} bit {bit}", False, lambda c, j=j, bit=bit: _flip_line(file(c), j, bit)))
    return out


def _flip_line(f: Path, j: int, bit: int) -> None:
    ls = f.read_bytes().split(b"\n")
    b = bytearray(ls[j])
    if b:
        b[bit // 8 % len(b)] ^= 1 << (bit % 8)
    ls[j] = bytes(b)
    f.write_bytes(b"\n".join(ls))


def tokenizer_mutations(file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    doc = json.loads(seed.read_text())

    def read(c):
        return json.loads(file(c).read_text())

    def write(c, d):
        file(c).write_bytes(dumps(d))
    targeted = [("types", ("normalizer",), {"type": "Precompiled", "precompiled_charsmap": "AAAA"}),
                ("types", ("normalizer",), {"type": "Replace", "pattern": {"Regex": "("}, "content": "x"}),
                ("types", ("normalizer",), {"type": "Sequence", "normalizers": [{"type": "NFC"}] * 3}),
                ("types", ("model", "vocab"), [1, 2]), ("types", ("model", "merges"), [["t"]]),
                ("types", ("model", "type"), "Nope"), ("types", ("pre_tokenizer",), {"type": "Split", "pattern": {"Regex": "[" }, "behavior": "Isolated", "invert": False}),
                ("huge", ("added_tokens",), [{"id": 2 ** 40, "content": "x", "single_word": False, "lstrip": False,
                                              "rstrip": False, "normalized": False, "special": True}])]
    targeted = [t for t in targeted if t[1] != ("normalizer",) or "Sequence" not in str(t[2])]
    return json_mutations(read, write, doc, rng, max(0, n - 10), lambda p: p in (("model",), ("model", "vocab"),
                                                                               ("model", "type")), targeted)



# -- reading ---------------------------------------------------------------------------------------

def _run_world(case: Path, out, seeds) -> None:
    from edgeseq.tokenizer import RwkvWorldTokenizer

    t = RwkvWorldTokenizer(str(case))
    t.decode(t.encode(SAMPLE))


def _run_tokenizer(case: Path, out, seeds) -> None:
    from edgeseq.tokenizer import load_tokenizer

    t = load_tokenizer(str(case.parent), {"kind": "hf", "file": case.name})
    t.decode(t.encode(SAMPLE))
