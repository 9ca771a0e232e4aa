"""Fuzz targets for a bundle folder (manifest, weights.bin, graphs: load, a session per graph, two tokens)
and for state files (Session.load_state on the seed bundle's model)."""
from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path

from fuzz.mutations import Mutation, _byte_mutations, dumps, flip, json_mutations, put, truncate


# -- bundle ----------------------------------------------------------------------------------------

REQUIRED_MANIFEST = ("format", "format_version", "family", "state", "graphs", "weights", "tokenizer", "vocab_size",
                     "flavour", "config", "quant", "architecture", "edgeseq_version")


def bundle_mutations(_file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    m = json.loads((seed / "edgeseq.json").read_text())
    man = lambda c: c / "edgeseq.json"  # noqa: E731

    def read(c):
        return json.loads(man(c).read_text())

    def write(c, d):
        man(c).write_bytes(dumps(d))

    targeted = [("types", ("graphs", "step", "inputs", 2), None), ("types", ("weights",), True),
                ("types", ("graphs", "prefill", "chunk"), "x"), ("types", ("graphs", "prefill", "chunk"), -1),
                ("huge", ("vocab_size",), 2 ** 62),
                ("huge", ("state", 1, "shape", 1), 2 ** 40), ("dims", ("state", 1, "shape", 1), -4),
                ("names", ("graphs", "step", "file"), "../step.onnx"), ("names", ("tokenizer",), {"kind": "hf", "file": "/etc/passwd"}),
                ("names", ("weights", "file"), "../../weights.bin"), ("types", ("state", 0, "init"), "zero"),
                ("types", ("state", 0, "dtype"), "complex64"), ("types", ("eos_token_id",), 10 ** 9),
                ("types", ("weights", "bytes"), "many"), ("types", ("format_version",), "1")]
    if "max_context" not in m:  # a family without a KV ring: the dim is added where a state shape names it
        targeted.append(("huge", ("state", 1, "shape"), ["batch", "max_context", 4]))
    # graphs.*.tensors (dtypes and shapes for apps), docs and the config are informational to the runtime
    # sample hashes are optional (bundles before them), an init or a version string is any value
    required = lambda p: (p[0] in REQUIRED_MANIFEST and p[0] not in ("config", "quant", "edgeseq_version")  # noqa: E731
                          and p[-1] not in ("doc", "init", "logits") and "tensors" not in p and "sample" not in p
                          and p[:2] != ("weights", "sample_sha256"))
    # fields with a default (weights.file: weights.bin; the special tokens) may be missing
    out = json_mutations(read, write, m, rng, max(0, n - 40), required, targeted,
                         deletable=lambda p: p in (("weights", "file"), ("tokenizer", "file"))
                         or p[-1] in ("logits", "chunk", "tokens") or p in (("graphs", "prefill_all"),))
    out.append(Mutation("types", "flavour missing", True, lambda c: write(c, {k: v for k, v in read(c).items() if k != "flavour"})))
    w = seed / "weights.bin"
    size = w.stat().st_size
    wf = lambda c: c / "weights.bin"  # noqa: E731
    out += [Mutation("truncate", f"weights.bin cut at {b}", True, lambda c, b=b: truncate(wf(c), b)) for b in (0, size // 2, size - 1)]
    out += [Mutation("flip", f"weights.bin bit {b}", True, lambda c, b=b: flip(wf(c), b))
            for b in rng.sample(range(size * 8), 4)]
    step = seed / "step.onnx"
    sf = lambda c: c / "step.onnx"  # noqa: E731
    out += [Mutation("truncate", f"step.onnx cut at {b}", True, lambda c, b=b: truncate(sf(c), b))
            for b in (0, 10, step.stat().st_size // 2)]
    out += [Mutation("flip", f"step.onnx bit {b}", False, lambda c, b=b: flip(sf(c), b))
            for b in rng.sample(range(step.stat().st_size * 8), 3)]

    def location(value, key="location"):
        def apply(c):
            import onnx

            g = onnx.load(str(sf(c)), load_external_data=False)
            t = next(t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
            for e in t.external_data:
                if e.key == key:
                    e.value = value
            sf(c).write_bytes(g.SerializeToString())
        return apply
    out += [Mutation("names", "external data ../weights.bin", True, location("../weights.bin")),
            Mutation("names", "external data /etc/passwd", True, location("/etc/passwd")),
            Mutation("offsets", "external data offset past the end", True, location(str(size * 2), "offset")),
            Mutation("offsets", "external data length 2**62", True, location(str(2 ** 62), "length"))]
    return out


# -- state files -----------------------------------------------------------------------------------

MAGIC = b"EDGESEQ-STATE\n"


def state_parts(data: bytes):
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    return header, data[len(MAGIC) + 4 + n:-32]


def state_build(header, payload: bytes) -> bytes:
    hb = dumps(header)
    body = MAGIC + struct.pack("<I", len(hb)) + hb + payload
    return body + hashlib.sha256(body).digest()  # the checksum recomputed: only the header checks are left


def state_mutations(file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    data = seed.read_bytes()
    header, payload = state_parts(data)

    def read(c):
        return state_parts(file(c).read_bytes())[0]

    def write(c, h):
        file(c).write_bytes(state_build(h, state_parts(file(c).read_bytes())[1]))

    targeted = [("types", ("position",), -5), ("types", ("position",), 1e300), ("types", ("position",), 2.5),
                ("types", ("position",), "3"), ("types", ("version",), -1), ("types", ("version",), 0),
                ("types", ("version",), 99), ("types", ("tensors",), None), ("types", ("tensors", 0, "dtype"), "float64"),
                ("dims", ("tensors", 0, "shape"), [1, 2 ** 40]), ("dims", ("tensors", 0, "shape", 0), -1),
                ("names", ("tensors", 0, "name"), "é✓"), ("names", ("tensors", 1), header["tensors"][0]),
                ("types", ("family",), "rwkv7"), ("types", ("weights_sha256",), "0" * 64)]
    out = json_mutations(read, write, header, rng, max(0, n - 30), lambda p: p[0] != "position" or len(p) > 1, targeted)
    out += [Mutation("truncate", "payload one byte short (checksum recomputed)", True,
                     lambda c: file(c).write_bytes(state_build(read(c), state_parts(file(c).read_bytes())[1][:-1]))),
            Mutation("truncate", "payload one byte long (checksum recomputed)", True,
                     lambda c: file(c).write_bytes(state_build(read(c), state_parts(file(c).read_bytes())[1] + b"\0"))),
            Mutation("huge", "header length 2**32-1", True, lambda c: put(file(c), len(MAGIC), "<I", 2 ** 32 - 1)),
            Mutation("types", "NaN in the state (checksum recomputed)", True,
                     lambda c: file(c).write_bytes(state_build(read(c), b"\0\0\xc0\x7f" + state_parts(file(c).read_bytes())[1][4:])))]
    out += [Mutation(m.kind, m.detail, True, m.apply) for m in
            _byte_mutations(file, len(data), [len(MAGIC), len(MAGIC) + 4, len(data) - 32, len(data) - 1], len(data), rng, 4)]
    return out



# -- reading ---------------------------------------------------------------------------------------

def _run_bundle(case: Path, out, seeds) -> None:
    import edgeseq

    m = edgeseq.load(str(case))
    for kind in m.manifest["graphs"]:  # every graph an app may run (the Python session uses some of them)
        m.engine.session(kind)
    s = m.session()
    s.prefill(m.tokenizer.encode("hi"))
    s.step(1)


_MODELS: dict = {}


def _run_state(case: Path, out, seeds) -> None:
    import edgeseq

    bundle = seeds["bundle"]
    if bundle not in _MODELS:
        _MODELS[bundle] = edgeseq.load(str(bundle))
    _MODELS[bundle].session().load_state(str(case))
