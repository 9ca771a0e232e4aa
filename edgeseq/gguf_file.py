"""A hardened GGUF reader: every count, length and offset is checked against the file before it is used.

GGUF (v2, v3), little-endian:

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv ×      key (u64 length + UTF-8)  u32 value type  value
    n_tensors × name  u32 n_dims  u64 ne[n_dims] (fastest axis first)  u32 ggml type  u64 offset
    padding to general.alignment (default 32), then the tensor data, each tensor at its offset

A damaged file (bad magic, absurd counts or lengths, offsets past the end, unknown types, truncation)
raises EdgeseqError naming the file and the problem; nothing is allocated before the bytes it
describes are known to exist, so a hostile header cannot ask for gigabytes. Tensor data is memory
mapped, never read up front. Shapes are given in numpy order (ne reversed), as the gguf package does.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME (with the terminating NUL in C)
MAX_KEY = 1 << 16

# value types: id -> (struct format, size) for fixed-size scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "string",
              9: "array", 10: "u64", 11: "i64", 12: "f64"}


# value types of the metadata keys edgeseq reads (by the key's last part: llama.cpp's and edgeseq's own
# keys); a key of another type is a damaged file, refused at parse time rather than where it is used
_INTS = (0, 1, 2, 3, 4, 5, 10, 11)
_NUMBERS = _INTS + (6, 12)
_INT_SUFFIXES = ("block_count", "_count", "_length", "_size", "_kernel", "_rank", "_token_id", "_dim", "alignment",
                 "_layers", "_version", "file_type", "head_count_kv")
_BOOL_KEYS = ("add_space_prefix", "add_bos_token", "add_eos_token", "dt_b_c_rms")
_BOOL_ARRAYS = ("recurrent_layers",)  # qwen35's attention.recurrent_layers: one per layer
_INT_OR_ARRAY = ("head_count_kv", "feed_forward_length")  # one per layer: lfm2's heads (0: conv), nemotron_h's widths
_STR_KEYS = ("general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre", "edgeseq.family",
             "edgeseq.config", "edgeseq.state", "tokenizer.chat_template")
_ARRAYS = {"tokenizer.ggml.tokens": (STRING,), "tokenizer.ggml.merges": (STRING,),
           "tokenizer.ggml.token_type": _INTS, "tokenizer.ggml.scores": _NUMBERS}
MAX_INT_VALUE = 1 << 40


def expected_type(key: str):
    """(what, accepted GGUF value types, accepted array element types or None) for a known key, else None."""
    last = key.rsplit(".", 1)[-1]
    if key in _ARRAYS:
        return "an array", (ARRAY,), _ARRAYS[key]
    if last in _BOOL_ARRAYS:
        return "an array of bools", (ARRAY,), (7,)
    if last in _INT_OR_ARRAY:
        return "an integer or an array of integers", _INTS + (ARRAY,), None
    if key in _STR_KEYS:
        return "a string", (STRING,), None
    if last in _BOOL_KEYS:
        return "a bool", (7,), None
    if "epsilon" in last or last.endswith(("_eps", "scale")):
        return "a number", _NUMBERS, None
    if last.endswith(_INT_SUFFIXES):
        return "an integer", _INTS, None
    return None


def ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size in elements, bytes per block), from the gguf package's table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest axis first)
    ggml_type: int
    type_name: str
    offset: int  # absolute, in the file
    nbytes: int


class GGUFFile:
    """Metadata (`kv`, `kv_types`) and tensor table (`tensors`) of a GGUF file; data by `raw` / `array`."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise EdgeseqError(f"{self.path}: no such file")
        self.size = os.path.getsize(self.path)
        if self.size < 24:
            raise EdgeseqError(f"{self.path}: not a GGUF file (only {self.size} bytes)")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # arrays still view the map; it closes when they are gone
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- parsing -------------------------------------------------------------------------------
    def _err(self, msg: str) -> EdgeseqError:
        return EdgeseqError(f"{self.path}: {msg}")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.size:
            raise self._err(f"truncated or damaged: {what} needs {n} bytes at offset {self._pos}, "
                            f"the file has {self.size}")

    def _unpack(self, fmt: str, size: int, what: str):
        self._need(size, what)
        (v,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += size
        return v

    def _u32(self, what):
        return self._unpack("<I", 4, what)

    def _u64(self, what):
        return self._unpack("<Q", 8, what)

    def _str(self, what: str, limit: int | None = None) -> str:
        n = self._u64(f"the length of {what}")
        if limit is not None and n > limit:
            raise self._err(f"{what} declares {n} bytes (at most {limit} expected): damaged file")
        self._need(n, what)
        raw = bytes(self._mm[self._pos:self._pos + n])
        self._pos += n
        return raw.decode("utf-8", errors="surrogateescape")  # round-trips arbitrary bytes (RWKV tokens)

    def _value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self._unpack(fmt, size, f"the value of {key}")
        if vtype == STRING:
            return self._str(f"the value of {key}")
        if vtype == ARRAY:
            etype = self._u32(f"the array type of {key}")
            count = self._u64(f"the array length of {key}")
            if etype in _SCALARS:
                size = _SCALARS[etype][1]
                if count > (self.size - self._pos) // size:
                    raise self._err(f"array {key} declares {count} items, more than the file could hold")
                arr = np.frombuffer(self._mm, _NP[etype], count, self._pos).copy()
                self._pos += count * size
                return arr
            if etype == STRING:
                if count > (self.size - self._pos) // 8:  # each string needs at least its length field
                    raise self._err(f"array {key} declares {count} strings, more than the file could hold")
                return [self._str(f"item {i} of {key}") for i in range(count)]
            raise self._err(f"array {key} has element type {etype}, which GGUF does not define"
                            + (" (nested arrays are not supported)" if etype == ARRAY else ""))
        raise self._err(f"key {key} has value type {vtype}, which GGUF does not define")

    def _parse(self) -> None:
        self._pos = 0
        magic = bytes(self._mm[:4])
        if magic != MAGIC:
            raise self._err(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self._pos = 4
        self.version = self._u32("the version")
        if self.version not in (2, 3):
            raise self._err(f"GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors = self._u64("the tensor count")
        n_kv = self._u64("the metadata count")
        # every entry takes at least 8 (name length) + 4 + 4 bytes: a count beyond that is a lie
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise self._err(f"absurd counts ({n_tensors} tensors, {n_kv} metadata keys) for a file of "
                            f"{self.size} bytes: damaged file")
        self.kv: dict[str, object] = {}
        self.kv_types: dict[str, tuple[int, ...]] = {}
        for i in range(n_kv):
            key = self._str(f"metadata key {i}", MAX_KEY)
            vtype = self._u32(f"the type of {key}")
            at = self._pos
            value = self._value(vtype, key)
            if key in self.kv:
                raise self._err(f"metadata key {key} appears twice")
            self.kv[key] = value
            self.kv_types[key] = (vtype, struct.unpack_from("<I", self._mm, at)[0]) if vtype == ARRAY else (vtype,)
            self._check_type(key, value, n_tensors)
        align = self.kv.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise self._err(f"general.alignment {align!r} is not a power of two")
        types = ggml_types()
        infos = []
        names = set()
        for i in range(n_tensors):
            name = self._str(f"the name of tensor {i}", 1 << 10)
            if name in names:
                raise self._err(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = self._u32(f"the dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._err(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            ne = [self._u64(f"the shape of {name}") for _ in range(n_dims)]
            gtype = self._u32(f"the type of {name}")
            offset = self._u64(f"the offset of {name}")
            if gtype not in types:
                raise self._err(f"tensor {name!r} has ggml type {gtype}, which this edgeseq does not know")
            tname, block, bsize = types[gtype]
            if any(d == 0 or d > 1 << 40 for d in ne):
                raise self._err(f"tensor {name!r} has an absurd shape {ne}")
            n = 1
            for d in ne:
                n *= d
            if ne[0] % block:
                raise self._err(f"tensor {name!r} ({tname}) has rows of {ne[0]}, not a multiple of its block {block}")
            nbytes = n // block * bsize
            if offset % align:
                raise self._err(f"tensor {name!r} starts at offset {offset}, not aligned to {align}")
            infos.append((name, tuple(int(d) for d in reversed(ne)), gtype, tname, offset, nbytes))
        self.data_start = self._pos + (-self._pos) % align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, gtype, tname, offset, nbytes in infos:
            start = self.data_start + offset
            if start + nbytes > self.size:
                raise self._err(f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, the file has "
                                f"{self.size}")
            self.tensors[name] = TensorInfo(name, shape, gtype, tname, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (a0, z0, n0), (a1, z1, n1) in zip(spans, spans[1:]):
            if a1 < z0:
                raise self._err(f"tensors {n0!r} and {n1!r} overlap (bytes {a1}..{min(z0, z1)} of the file)")
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"):
            tokens = self.kv.get("tokenizer.ggml.tokens")
            if key in self.kv and isinstance(tokens, list) and self.kv[key] >= len(tokens):
                raise self._err(f"metadata {key} is {self.kv[key]}, but the vocabulary has {len(tokens)} tokens")

    def _check_type(self, key: str, value, n_tensors: int) -> None:
        """A known key has its type, counts are non-negative and bounded by what the file holds (a
        block_count beyond the tensor count would make every per-layer loop run that long)."""
        want = expected_type(key)
        if want is None:
            return
        what, vtypes, etypes = want
        got = self.kv_types[key]
        if what == "an integer or an array of integers":  # one for the model, or one per layer
            if got[0] == ARRAY and got[1] in _INTS:
                value = np.asarray(value)
                if value.size and not (0 <= value.min() and value.max() <= MAX_INT_VALUE):
                    raise self._err(f"metadata {key} holds {value.min()}..{value.max()}, expected 0 to {MAX_INT_VALUE}")
                return
            what, vtypes = "an integer", _INTS
        if got[0] not in vtypes or etypes is not None and got[1] not in etypes:
            shown = TYPE_NAMES.get(got[0], got[0]) + (f" of {TYPE_NAMES.get(got[1], got[1])}" if len(got) > 1 else "")
            raise self._err(f"metadata {key} is {shown}, expected {what}"
                            + (f" of {'/'.join(TYPE_NAMES[t] for t in etypes)}" if etypes else ""))
        if what == "an integer":
            # a model holds at least one tensor per layer; a vocabulary-only file (no tensors, as llama.cpp's
            # models/ggml-vocab-*.gguf) is read for its tokenizer and never for layers
            hi = n_tensors if key.endswith(".block_count") and n_tensors else MAX_INT_VALUE
            if not 0 <= value <= hi:
                raise self._err(f"metadata {key} is {value}, expected 0 to {hi}"
                                + (" (at most one layer per tensor of the file)" if hi == n_tensors else ""))
        if what == "a number" and not np.isfinite(value):
            raise self._err(f"metadata {key} is {value}, expected a finite number")

    # -- access --------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.kv.get("general.architecture")
        if not isinstance(arch, str):
            raise self._err("no general.architecture string in the metadata")
        return arch

    def arch_key(self, key: str) -> str:
        """`{general.architecture}.{key}`: where llama.cpp keeps an architecture's hyperparameters."""
        return f"{self.architecture}.{key}"

    def get(self, key: str, default=None, kind: type | tuple | None = None):
        """A metadata value; with `kind`, a value of another type is an error naming the key."""
        if key not in self.kv:
            if default is _REQUIRED:
                raise self._err(f"missing metadata key {key}")
            return default
        v = self.kv[key]
        if kind is not None and not isinstance(v, kind) or isinstance(v, bool) and kind is int:
            raise self._err(f"metadata {key} is {v!r}, expected {kind}")
        return v

    def need(self, key: str, kind: type | tuple | None = None):
        return self.get(key, _REQUIRED, kind)

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise self._err(f"missing tensor {name!r}")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (uint8, a view of the memory map)."""
        t = self.tensor(name)
        return np.frombuffer(self._mm, np.uint8, t.nbytes, t.offset)

    def array(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order (quantized types dequantized)."""
        t = self.tensor(name)
        raw = self.raw(name)
        if t.type_name == "F32":
            return raw.view(np.float32).reshape(t.shape).copy()
        if t.type_name == "F16":
            return raw.view(np.float16).astype(np.float32).reshape(t.shape)
        if t.type_name == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
        from edgeseq.quant import gguf_quants

        if t.type_name not in gguf_quants.TYPES:
            raise self._err(f"tensor {name!r} is {t.type_name}, which edgeseq cannot dequantize (it reads "
                            f"{', '.join(gguf_quants.TYPES)})")
        # row chunks of ~1M weights: the dequantizers' temporaries stay small beside the f32 result
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        out = np.empty((rows, t.shape[-1]), np.float32)
        per_row = t.nbytes // rows
        step = max(1, (1 << 20) // t.shape[-1])
        blocks = raw.reshape(rows, per_row)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            out[a:b] = gguf_quants.dequantize(blocks[a:b], t.type_name, (b - a, t.shape[-1]))
        return out.reshape(t.shape)


_REQUIRED = object()


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
