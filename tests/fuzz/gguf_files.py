"""Fuzz target for GGUF files: `inspect` (the summary), then the bundle built from it, loaded and run."""
from __future__ import annotations

import random
import struct
from pathlib import Path

from fuzz.bundles import _run_bundle
from fuzz.mutations import Mutation, _byte_mutations, put


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



# -- reading ---------------------------------------------------------------------------------------

def _run_gguf(case: Path, out: Path, seeds) -> None:
    from edgeseq.gguf_bundle import gguf_to_bundle
    from edgeseq.gguf_names import summary

    summary(str(case))
    gguf_to_bundle(str(case), str(out))
    _run_bundle(out, None, seeds)
