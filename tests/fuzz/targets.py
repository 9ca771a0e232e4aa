"""The readers under fuzz: for each, its seed, its mutations and what reading means (`run`).

    safetensors  a model folder with model.safetensors: `edgeseq export` (config, header, tensors, shapes)
    shards       a sharded safetensors folder: the index's weight_map, then as above
    rwkvcpp      an rwkv.cpp .bin: export
    gguf         a GGUF file: `inspect` (summary), then its bundle built, loaded and run for 2 tokens
    bundle       a bundle folder: edgeseq.load, an ONNX Runtime session per graph, 2 tokens
    state        a state file: Session.load_state on the seed bundle's model
    world        an RWKV World vocabulary: parsed, then a sample encoded and decoded
    tokenizer    a tokenizer.json: loaded, then a sample encoded and decoded
    pth          a BlinkDL .pth: export (torch.load weights_only)
"""
from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path

from fuzz.mutations import HUGE, Mutation, _byte_mutations, _Raw, dumps, flip, json_mutations, put, truncate

SAMPLE = "And God said: é ✓ 😀\n\nthe end"


# -- safetensors -------------------------------------------------------------------------------------

def _st_read(f: Path):
    data = f.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_write(f: Path, header, body: bytes) -> None:
    hb = dumps(header)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + body)


def st_mutations(file, seed_file: Path, rng: random.Random, n: int) -> list[Mutation]:
    header, body = _st_read(seed_file)
    names = sorted(k for k in header if k != "__metadata__")
    hlen = 8 + struct.unpack_from("<Q", seed_file.read_bytes())[0]
    size = seed_file.stat().st_size

    def edit(fn):
        def apply(c):
            f = file(c)
            h, b = _st_read(f)
            out = fn(h, b)
            _st_write(f, *(out if isinstance(out, tuple) else (out, b)))
        return apply

    def entry(name, key, value):
        return edit(lambda h, b: (h[name].__setitem__(key, value), h)[1])

    out = []
    t = rng.choice(names)
    a, z = header[t]["data_offsets"]
    shape = header[t]["shape"]
    out += [Mutation("types", f"{t} without dtype", True, edit(lambda h, b: (h[t].pop("dtype"), h)[1])),
            Mutation("types", f"{t} without shape", True, edit(lambda h, b: (h[t].pop("shape"), h)[1])),
            Mutation("types", f"{t} dtype C64", True, entry(t, "dtype", "C64")),
            Mutation("types", f"{t} dtype 7", True, entry(t, "dtype", 7)),
            Mutation("types", f"{t} dtype F16 (wrong size)", True, entry(t, "dtype", "F16")),
            Mutation("types", "header is a list", True, edit(lambda h, b: [h])),
            Mutation("types", f"{t} entry is a string", True, entry(t, "shape", "x")),
            Mutation("nest", "100,000 nested [", True, edit(lambda h, b: _Raw("[" * 100_000 + "]" * 100_000))),
            Mutation("offsets", f"{t} offsets reversed", True, entry(t, "data_offsets", [z, a])),
            Mutation("offsets", f"{t} offsets past the end", True, entry(t, "data_offsets", [a, len(body) + 64])),
            Mutation("offsets", f"{t} offsets 2**62", True, entry(t, "data_offsets", [a, 2 ** 62])),
            Mutation("offsets", f"{t} offsets one number", True, entry(t, "data_offsets", [a])),
            Mutation("dims", f"{t} shape negative", True, entry(t, "shape", [-1] + shape[1:])),
            Mutation("dims", f"{t} shape 2**62", True, entry(t, "shape", [2 ** 62] + shape[1:])),
            Mutation("dims", f"{t} shape product != bytes", True, entry(t, "shape", [shape[0] + 1] + shape[1:])),
            Mutation("dims", f"{t} shape float", True, entry(t, "shape", [1.5] + shape[1:])),
            Mutation("huge", "header length 2**62", True, lambda c: put(file(c), 0, "<Q", 2 ** 62)),
            Mutation("huge", "header length 0", True, lambda c: put(file(c), 0, "<Q", 0)),
            Mutation("huge", "header length short by 1", True, lambda c: put(file(c), 0, "<Q", hlen - 9))]
    # a consistent header with a tensor at half its width (shape checked against the config)
    vec = [k for k in names if len(header[k]["shape"]) == 1 and header[k]["shape"][0] >= 4]
    if vec:
        v = rng.choice(vec)
        va, vz = header[v]["data_offsets"]

        def half(h, b, v=v, va=va, vz=vz):
            h[v]["shape"] = [h[v]["shape"][0] // 2]
            h[v]["data_offsets"] = [va, va + (vz - va) // 2]
            return h
        out.append(Mutation("dims", f"{v} at half its width", True, edit(half)))
    m = [k for k in names if len(header[k]["shape"]) == 2]
    if m:
        w = rng.choice(m)
        wa, wz = header[w]["data_offsets"]

        def transpose(h, b, w=w):
            h[w]["shape"] = h[w]["shape"][::-1]
            return h
        out.append(Mutation("dims", f"{w} transposed", h_sq(header[w]["shape"]) is False, edit(transpose)))
    t2 = rng.choice([k for k in names if k != t])
    out.append(Mutation("offsets", f"{t2} overlaps {t}", True,
                        entry(t2, "data_offsets", [a, a + header[t2]["data_offsets"][1] - header[t2]["data_offsets"][0]])))
    # renamed, a tensor is unknown (ignored) and missing: refused unless the family takes it as optional
    out.append(Mutation("names", f"{t} renamed to unicode", False,
                        edit(lambda h, b: ({("é✓\u202e" + k if k == t else k): v for k, v in h.items()}))))
    out.append(Mutation("names", "__metadata__ a list", True, edit(lambda h, b: {**h, "__metadata__": [1]})))
    out += json_mutations(lambda c: _st_read(file(c))[0], lambda c, h: _st_write(file(c), h, _st_read(file(c))[1]),
                          header, rng, max(0, n - len(out) - 12), required=lambda p: len(p) >= 2 and p[0] != "__metadata__")
    bounds = [8, hlen - 1, hlen] + [hlen + header[k]["data_offsets"][1] - 1 for k in names[:6]]
    out += _byte_mutations(file, size, bounds, hlen, rng)
    return out


def h_sq(shape) -> bool:
    return shape[0] == shape[1]


# -- shard index -----------------------------------------------------------------------------------

def shard_mutations(case_file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    idx = json.loads((seed / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    t = sorted(wm)[0]
    shards = sorted(set(wm.values()))

    def edit(fn):
        def apply(c):
            p = c / "model.safetensors.index.json"
            p.write_bytes(dumps(fn(json.loads(p.read_text()))))
        return apply

    out = [Mutation("types", "weight_map a list", True, edit(lambda d: {**d, "weight_map": list(d["weight_map"])})),
           Mutation("types", "weight_map missing", True, edit(lambda d: {"metadata": {}})),
           Mutation("types", f"{t} -> 5", True, edit(lambda d: (d["weight_map"].__setitem__(t, 5), d)[1])),
           Mutation("types", f"{t} -> null", True, edit(lambda d: (d["weight_map"].__setitem__(t, None), d)[1])),
           Mutation("names", f"{t} -> ../other/model.safetensors", True,
                    edit(lambda d: (d["weight_map"].__setitem__(t, "../other/model.safetensors"), d)[1])),
           Mutation("names", f"{t} -> /etc/passwd", True, edit(lambda d: (d["weight_map"].__setitem__(t, "/etc/passwd"), d)[1])),
           Mutation("names", f"{t} -> the other shard", True,
                    edit(lambda d: (d["weight_map"].__setitem__(t, shards[-1] if wm[t] == shards[0] else shards[0]), d)[1])),
           Mutation("names", "an extra tensor in the map", True,
                    edit(lambda d: (d["weight_map"].__setitem__("ghost.weight", shards[0]), d)[1])),
           Mutation("names", "a missing shard", True, edit(lambda d: (d["weight_map"].__setitem__(t, "nope.safetensors"), d)[1])),
           Mutation("nest", "100,000 nested [", True,
                    lambda c: (c / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000))]
    out += json_mutations(lambda c: json.loads((c / "model.safetensors.index.json").read_text()),
                          lambda c, d: (c / "model.safetensors.index.json").write_bytes(dumps(d)), idx, rng,
                          max(0, n // 2 - len(out)), required=lambda p: p[:1] == ("weight_map",))
    out += st_mutations(lambda c: c / shards[0], seed / shards[0], rng, n // 2)
    return out


# -- rwkv.cpp --------------------------------------------------------------------------------------

def rwkvcpp_records(data: bytes) -> list[tuple[int, int, int, int]]:
    """(record offset, n_dims, name_len, data end) of every tensor record of a valid rwkv.cpp file."""
    import numpy as np

    pos, out = 24, []
    while pos < len(data):
        n_dims, name_len, ttype = struct.unpack_from("<3i", data, pos)
        dims = struct.unpack_from(f"<{n_dims}i", data, pos + 12)
        start = pos + 12 + 4 * n_dims + name_len
        end = start + int(np.prod(dims)) * (4 if ttype == 0 else 2)
        out.append((pos, n_dims, name_len, end))
        pos = end
    return out


def rwkvcpp_mutations(file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    data = seed.read_bytes()
    recs = rwkvcpp_records(data)
    out = []
    for i, field in enumerate(("n_vocab", "n_embed", "n_layer")):
        for v in (-1, 0, 2 ** 31 - 1):
            out.append(Mutation("huge", f"header {field} = {v}", True, lambda c, i=i, v=v: put(file(c), 8 + 4 * i, "<i", v)))
    picks = [recs[0], recs[1], rng.choice(recs), recs[-1]]
    for pos, n_dims, name_len, end in picks:
        out += [Mutation("huge", f"record@{pos} n_dims {v}", True, lambda c, p=pos, v=v: put(file(c), p, "<i", v))
                for v in (0, 5, -1, 2 ** 31 - 1)]
        out += [Mutation("huge", f"record@{pos} name_len {v}", True, lambda c, p=pos, v=v: put(file(c), p + 4, "<i", v))
                for v in (0, -1, 2 ** 31 - 1)]
        out += [Mutation("types", f"record@{pos} type {v}", True, lambda c, p=pos, v=v: put(file(c), p + 8, "<i", v))
                for v in (99, -1, 2)]
        for v in (65536, 0, -5, 2 ** 31 - 1):
            out.append(Mutation("dims", f"record@{pos} dims all {v}", True,
                                lambda c, p=pos, k=n_dims, v=v: [put(file(c), p + 12 + 4 * j, "<i", v) for j in range(k)]))
        out.append(Mutation("names", f"record@{pos} name not UTF-8", True,
                            lambda c, p=pos, k=n_dims: put(file(c), p + 12 + 4 * k, "<B", 0xFF)))
        out.append(Mutation("truncate", f"cut inside record@{pos}'s dims", True, lambda c, p=pos: truncate(file(c), p + 14)))
    # a record renamed to its predecessor's name: a duplicate
    p0, k0, l0, _ = recs[0]
    p1, k1, l1, _ = recs[1]
    if l0 == l1:
        name0 = data[p0 + 12 + 4 * k0:p0 + 12 + 4 * k0 + l0]

        def dup(c, p1=p1, k1=k1, name0=name0):
            d = bytearray(file(c).read_bytes())
            d[p1 + 12 + 4 * k1:p1 + 12 + 4 * k1 + len(name0)] = name0
            file(c).write_bytes(bytes(d))
        out.append(Mutation("names", "duplicate tensor name", True, dup))
    bounds = [4, 23, 24] + [r[0] for r in recs] + [r[0] + 12 for r in rng.sample(recs, min(8, len(recs)))]
    out += _byte_mutations(file, len(data), bounds, 24, rng)
    rng.shuffle(out)
    return out[:max(n, 24)]


# -- GGUF ------------------------------------------------------------------------------------------

def gguf_fields(data: bytes) -> list[tuple[int, str, str]]:
    """(offset, struct format, what) of every count, length, type and offset field of a valid GGUF."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    out = [(4, "<I", "version"), (8, "<Q", "n_tensors"), (16, "<Q", "n_kv")]
    (n_tensors,) = struct.unpack_from("<Q", data, 8)
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    pos = 24

    def string(what):
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, "<Q", f"length of {what}"))
        s = data[pos + 8:pos + 8 + n].decode("utf-8", "replace")
        pos += 8 + n
        return s

    for _ in range(n_kv):
        key = string("a key")
        (vt,) = struct.unpack_from("<I", data, pos)
        out.append((pos, "<I", f"type of {key}"))
        pos += 4
        if vt == 8:
            string(f"value of {key}")
        elif vt == 9:
            (et,) = struct.unpack_from("<I", data, pos)
            out.append((pos, "<I", f"array type of {key}"))
            (cnt,) = struct.unpack_from("<Q", data, pos + 4)
            out.append((pos + 4, "<Q", f"array length of {key}"))
            pos += 12
            for j in range(cnt):
                if et == 8:
                    string(f"item of {key}") if j < 3 else None
                    if j >= 3:
                        (ln,) = struct.unpack_from("<Q", data, pos)
                        pos += 8 + ln
                else:
                    pos += sizes[et]
        else:
            if key.endswith(("block_count", "embedding_length", "context_length")) or "epsilon" in key:
                out.append((pos, "<Q" if sizes[vt] == 8 else "<I" if sizes[vt] == 4 else "<B", f"value of {key}"))
            pos += sizes[vt]
    for _ in range(n_tensors):
        name = string("a tensor name")
        (nd,) = struct.unpack_from("<I", data, pos)
        out.append((pos, "<I", f"n_dims of {name}"))
        for j in range(nd):
            out.append((pos + 4 + 8 * j, "<Q", f"ne[{j}] of {name}"))
        pos += 4 + 8 * nd
        out.append((pos, "<I", f"type of {name}"))
        out.append((pos + 4, "<Q", f"offset of {name}"))
        pos += 12
    out.append((pos, "", "end of header"))
    return out


def gguf_rewrite(src: Path, dst: Path, edit_kv=None, edit_tensors=None) -> None:
    """Rewrite a GGUF through the gguf package with its metadata or tensors edited."""
    import gguf
    import numpy as np

    from edgeseq.gguf_file import GGUFFile

    with GGUFFile(src) as g:
        kv = dict(g.kv)
        types = dict(g.kv_types)
        tensors = {n: (np.array(g.raw(n)), t) for n, t in g.tensors.items()}
    if edit_kv:
        edit_kv(kv, types)
    if edit_tensors:
        edit_tensors(tensors)
    w = gguf.GGUFWriter(str(dst) + ".new", kv.pop("general.architecture"))
    types.pop("general.architecture", None)
    if kv.get("general.alignment") == 32:  # the writer's default; another value is kept (a mutation)
        kv.pop("general.alignment")
    for k, v in kv.items():
        vt = gguf.GGUFValueType(types[k][0])
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, list(v), vt, sub_type=gguf.GGUFValueType(types[k][1]))
        else:
            w.add_key_value(k, v, vt)
    for n, (raw, t) in tensors.items():
        if t.type_name in ("F32", "F16"):
            w.add_tensor(n, raw.view(np.float32 if t.type_name == "F32" else np.float16).reshape(t.shape))
        else:
            w.add_tensor(n, raw, raw_shape=t.shape, raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    Path(str(dst) + ".new").replace(dst)


def gguf_mutations(file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    import numpy as np

    from edgeseq.gguf_file import GGUFFile

    data = seed.read_bytes()
    fields = gguf_fields(data)
    header_end = fields[-1][0]
    with GGUFFile(seed) as g:
        arch = g.architecture
        names = list(g.tensors)
        f32_vecs = [k for k, t in g.tensors.items() if t.type_name == "F32" and len(t.shape) == 1 and t.shape[0] >= 4]

    def kv(fn, what, kind="types"):
        return Mutation(kind, what, True, lambda c: gguf_rewrite(file(c), file(c), edit_kv=fn))

    def set_kv(key, value, vtype, sub=None):
        def fn(kv_, types):
            kv_[key] = value
            types[key] = (vtype, sub) if sub is not None else (vtype,)
        return fn

    out = [kv(set_kv(f"{arch}.block_count", 2 ** 62, 10), "block_count = 2**62", "huge"),
           kv(set_kv(f"{arch}.block_count", 2 ** 31, 4), "block_count = 2**31", "huge"),
           kv(set_kv(f"{arch}.block_count", 0, 4), "block_count = 0", "huge"),
           kv(set_kv(f"{arch}.block_count", -3, 5), "block_count = -3 (i32)", "huge"),
           kv(set_kv(f"{arch}.attention.layer_norm_rms_epsilon", "abc", 8), "epsilon = 'abc'"),
           kv(set_kv(f"{arch}.attention.layer_norm_rms_epsilon", float("nan"), 6), "epsilon = nan"),
           kv(set_kv(f"{arch}.embedding_length", "x", 8), "embedding_length = 'x'"),
           kv(set_kv(f"{arch}.ssm.inner_size", 0, 4), "ssm.inner_size = 0", "dims"),
           kv(set_kv(f"{arch}.ssm.time_step_rank", 0, 4), "ssm.time_step_rank = 0", "dims"),
           kv(set_kv(f"{arch}.ssm.state_size", 2 ** 40, 10), "ssm.state_size = 2**40", "huge"),
           kv(set_kv("tokenizer.ggml.token_type", ["1"] * 3, 9, 8), "token types as strings"),
           kv(set_kv("tokenizer.ggml.tokens", [1, 2, 3], 9, 5), "tokens as integers"),
           kv(set_kv("tokenizer.ggml.bos_token_id", 10 ** 9, 4), "bos_token_id past the vocabulary"),
           kv(set_kv("tokenizer.ggml.model", "nope", 8), "tokenizer model 'nope'"),
           kv(set_kv("general.architecture", "llama", 8), "architecture llama"),
           kv(set_kv("general.alignment", 3, 4), "alignment 3")]
    if f32_vecs:
        v = rng.choice(f32_vecs)

        def half(tensors, v=v):
            raw, t = tensors[v]
            import dataclasses

            tensors[v] = (raw[:len(raw) // 2].copy(), dataclasses.replace(t, shape=(t.shape[0] // 2,)))
        out.append(Mutation("dims", f"{v} at half its width", True,
                            lambda c, half=half: gguf_rewrite(file(c), file(c), edit_tensors=half)))
    t0, t1 = names[0], names[-1]

    def drop(tensors, t=t1):
        tensors.pop(t)
    out.append(Mutation("names", f"{t1} missing", True, lambda c: gguf_rewrite(file(c), file(c), edit_tensors=drop)))
    for off, fmt, what in fields[:-1]:
        if fmt in ("<Q", "<I"):
            (orig,) = struct.unpack_from(fmt, data, off)
            for v in ((2 ** 62, 2 ** 64 - 1, 0) if fmt == "<Q" else (2 ** 32 - 1, 13, 0)):
                if v == orig:
                    continue
                # a value (other than the layer count) may be odd yet harmless: 13 as a float's bits is a tiny eps
                must = "value of" not in what or "block_count" in what
                out.append(Mutation("huge" if "length" in what or "n_" in what else "offsets" if "offset" in what
                                    else "types", f"{what} = {v}", must,
                                    lambda c, off=off, fmt=fmt, v=v: put(file(c), off, fmt, v)))
    # an offset that makes two tensors overlap
    offs = [f for f in fields if f[2].startswith("offset of")]
    if len(offs) > 1:
        out.append(Mutation("offsets", f"{offs[1][2]} = {offs[0][2]}", True,
                            lambda c: put(file(c), offs[1][0], "<Q", struct.unpack_from("<Q", data, offs[0][0])[0])))
    out += _byte_mutations(file, len(data), [f[0] for f in fields] + [header_end + 32, len(data) - 1], header_end, rng)
    rng.shuffle(out)
    keep = [m for m in out if m.kind not in ("huge", "offsets", "truncate")]
    rest = [m for m in out if m.kind in ("huge", "offsets", "truncate")]
    return (keep + rest)[:max(n, 40)]


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


# -- BlinkDL .pth ----------------------------------------------------------------------------------

def pth_mutations(file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    import torch

    sd = torch.load(str(seed), weights_only=True)
    names = sorted(sd)

    def edit(fn):
        def apply(c):
            d = torch.load(str(file(c)), weights_only=True)
            out = fn(d)
            torch.save(out if out is not None else d, str(file(c)))
        return apply
    vec = [k for k in names if sd[k].dim() == 1 and sd[k].shape[0] >= 4]
    mat = [k for k in names if sd[k].dim() == 2]
    v, m = rng.choice(vec), rng.choice(mat)
    out = [Mutation("dims", f"{m} a stride-0 view of 2**20 x 2**20", True,
                    edit(lambda d: d.__setitem__(m, torch.zeros(1).expand(2 ** 20, 2 ** 20)))),
           Mutation("dims", f"{m} a stride-0 view of its own shape", False,
                    edit(lambda d: d.__setitem__(m, torch.zeros(1).expand(*sd[m].shape)))),
           Mutation("types", f"{v} complex64", True, edit(lambda d: d.__setitem__(v, d[v].to(torch.complex64)))),
           Mutation("types", f"{v} float8", True, edit(lambda d: d.__setitem__(v, d[v].to(torch.float8_e4m3fn)))),
           Mutation("dims", f"{m} a zero-sized dim", True, edit(lambda d: d.__setitem__(m, torch.zeros(0, sd[m].shape[1])))),
           Mutation("dims", f"{v} at half its width", True, edit(lambda d: d.__setitem__(v, d[v][: len(d[v]) // 2].clone()))),
           Mutation("dims", f"{m} transposed", sd[m].shape[0] != sd[m].shape[1] and min(sd[m].shape) > 1, edit(lambda d: d.__setitem__(m, d[m].T.contiguous()))),
           Mutation("dims", f"{m} with an extra axis of 1", False, edit(lambda d: d.__setitem__(m, d[m][None]))),
           Mutation("dims", f"{m} with an extra axis of 2", True, edit(lambda d: d.__setitem__(m, d[m][None].expand(2, *d[m].shape).clone()))),
           Mutation("names", f"{m} missing", True, edit(lambda d: d.pop(m))),
           Mutation("names", "an integer key", False, edit(lambda d: d.__setitem__(7, torch.zeros(2)))),
           Mutation("types", "a list, not a dict", True, edit(lambda d: [d])),
           Mutation("types", f"{v} a string", True, edit(lambda d: d.__setitem__(v, "x"))),
           Mutation("pickle", "a malicious __reduce__", True, lambda c: file(c).write_bytes(malicious_pickle())),
           Mutation("pickle", "a malicious __reduce__ in torch's zip", True, lambda c: torch_zip_with(file(c), malicious_pickle()))]
    size = seed.stat().st_size
    out += _byte_mutations(file, size, [30, 64, 512, size // 3, size - 22, size - 100], 0, rng, 6)
    return out


def malicious_pickle() -> bytes:
    """A pickle whose loading would run `os.system` (a file that must never be executed by a load)."""
    import pickle

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch /tmp/edgeseq-fuzz-pwned",))
    return pickle.dumps({"emb.weight": Evil()}, protocol=2)


def torch_zip_with(path: Path, payload: bytes) -> None:
    """torch.save's zip with its data.pkl replaced by `payload`."""
    import zipfile

    src = zipfile.ZipFile(path)
    items = [(i, src.read(i.filename)) for i in src.infolist()]
    src.close()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            z.writestr(info, payload if info.filename.endswith("data.pkl") else data)


# -- the readers -------------------------------------------------------------------------------------

def _run_export(case: Path, out: Path, seeds) -> None:
    from edgeseq.exporters.export import export

    export(str(case), str(out))


def _run_gguf(case: Path, out: Path, seeds) -> None:
    from edgeseq.gguf_bundle import gguf_to_bundle
    from edgeseq.gguf_names import summary

    summary(str(case))
    gguf_to_bundle(str(case), str(out))
    _run_bundle(out, None, seeds)


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


def _run_world(case: Path, out, seeds) -> None:
    from edgeseq.tokenizer import RwkvWorldTokenizer

    t = RwkvWorldTokenizer(str(case))
    t.decode(t.encode(SAMPLE))


def _run_tokenizer(case: Path, out, seeds) -> None:
    from edgeseq.tokenizer import load_tokenizer

    t = load_tokenizer(str(case.parent), {"kind": "hf", "file": case.name})
    t.decode(t.encode(SAMPLE))


class Reader:
    def __init__(self, name, seed, mutations, run, file=lambda c: c, folder=False):
        self.name, self.seed, self._mutations, self.run, self.file, self.folder = name, seed, mutations, run, file, folder

    def mutations(self, seeds: dict, rng: random.Random, n: int) -> list[Mutation]:
        return self._mutations(self.file, self.file(seeds[self.seed]), rng, n)


READERS = {
    "safetensors": Reader("safetensors", "safetensors", st_mutations, _run_export,
                          file=lambda c: c / "model.safetensors", folder=True),
    "shards": Reader("shards", "shards", shard_mutations, _run_export, folder=True),
    "rwkvcpp": Reader("rwkvcpp", "rwkvcpp", rwkvcpp_mutations, _run_export),
    "gguf": Reader("gguf", "gguf", gguf_mutations, _run_gguf),
    "bundle": Reader("bundle", "bundle", bundle_mutations, _run_bundle, folder=True),
    "state": Reader("state", "state", state_mutations, _run_state),
    "world": Reader("world", "world", world_mutations, _run_world),
    "tokenizer": Reader("tokenizer", "tokenizer", tokenizer_mutations, _run_tokenizer),
    "pth": Reader("pth", "pth", pth_mutations, _run_export),
}
