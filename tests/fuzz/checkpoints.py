"""Fuzz targets for the checkpoint readers: safetensors (one file), a sharded safetensors folder, an
rwkv.cpp `.bin` and a BlinkDL `.pth`; reading each is `edgeseq export`."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from fuzz.mutations import Mutation, _byte_mutations, _Raw, dumps, json_mutations, put, truncate


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



# -- reading ---------------------------------------------------------------------------------------

def _run_export(case: Path, out: Path, seeds) -> None:
    from edgeseq.exporters.export import export

    export(str(case), str(out))
