"""rwkv.cpp's own model container (`.bin`, magic 'ggmf'), read as a TensorSource.

    header:  int32 magic 0x67676d66 | int32 version (100, 101) | int32 n_vocab | int32 n_embed
             | int32 n_layer | int32 data_type (0 f32, 1 f16, 2 Q4_0, 3 Q4_1, 7 Q5_0, 8 Q5_1, 9 Q8_0)
    tensor:  int32 n_dims | int32 name_bytes | int32 type (0 f32, 1 f16, >1 quantized)
             | int32 dims[n_dims] (ggml order: reversed from PyTorch) | name (utf-8) | data
             ... until the end of the file

Tensors come back as float32 in PyTorch's dimension order, *as stored*: rwkv.cpp's converter stores
some parameters already transformed for its kernels (`time_*` squeezed; RWKV-4 `time_decay` as
-exp(w); RWKV-5 `time_decay` as exp(-exp(w)) and `time_first` as exp(u); RWKV-6 LoRA matrices
in the (out, in) layout of its ggml_mul_mat: time_maa_w1, time_decay_w1 and time_decay_w2 transposed,
time_maa_w2 (5, D, C) -> (5, C, D)). Undoing those belongs to the RWKV families, which know each
version's layout.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError

MAGIC = 0x67676D66
VERSIONS = (100, 101)
_TYPES = {0: np.float32, 1: np.float16}
# rwkv.cpp's quantized data types (docs/FILE_FORMAT.md there): ggml's blocks of 32, in the layout ggml has used
# since 2023-05-27 (file version 101), which is the one GGUF still uses; version 100 files used older blocks
_QUANT = {2: "Q4_0", 3: "Q4_1", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}


def _nbytes(path: str, name: str, ttype: int, shape: tuple[int, ...], version: int) -> int:
    count = 1
    for d in shape:  # Python integers: np.prod would wrap around (65536**4 == 0 in int64)
        count *= d
    if ttype in _TYPES:
        return count * np.dtype(_TYPES[ttype]).itemsize
    if ttype not in _QUANT:
        raise UnsupportedError(f"{path}: tensor {name!r} has rwkv.cpp data type {ttype}, which edgeseq does not "
                               f"know (known: 0 FP32, 1 FP16, " + ", ".join(f"{k} {v}" for k, v in _QUANT.items()) + ")")
    if version != 101:
        raise UnsupportedError(f"{path}: tensor {name!r} is quantized ({_QUANT[ttype]}) in an rwkv.cpp version-{version} "
                               f"file, whose pre-2023-05-27 ggml blocks edgeseq does not read; re-quantize it with a "
                               f"current rwkv.cpp or convert the original checkpoint")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[_QUANT[ttype]]]
    if shape[-1] % block:
        raise EdgeseqError(f"{path}: tensor {name!r} is {_QUANT[ttype]} but its rows of {shape[-1]} do not divide into "
                           f"blocks of {block}")
    return count // block * size


class RwkvCppFile:
    """An rwkv.cpp model file: header fields in `config`, tensors by name (read lazily by offset)."""

    stored_by = "rwkv.cpp"  # families undo what rwkv.cpp's converter did to some tensors

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise EdgeseqError(f"{path}: no such file")
        size = os.path.getsize(path)
        self.meta: dict[str, tuple[int, tuple[int, ...], int]] = {}  # name -> (type, shape, offset)
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24:
                raise EdgeseqError(f"{path}: not an rwkv.cpp model (only {size} bytes)")
            magic, version, n_vocab, n_embed, n_layer, data_type = struct.unpack("<6i", head)
            if magic != MAGIC:
                raise EdgeseqError(f"{path}: not an rwkv.cpp model (magic {magic:#x}, expected {MAGIC:#x})")
            if version not in VERSIONS:
                raise UnsupportedError(f"{path}: rwkv.cpp file version {version} is not supported "
                                       f"(supported: {', '.join(map(str, VERSIONS))})")
            if min(n_vocab, n_embed, n_layer) <= 0 or n_layer > size // 12:
                raise EdgeseqError(f"{path}: damaged header (n_vocab {n_vocab}, n_embed {n_embed}, n_layer {n_layer} "
                                   f"in a file of {size} bytes)")
            self.config = {"n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer, "data_type": data_type,
                           "file_version": version}
            pos = 24
            while pos < size:
                rec = f.read(12)
                if len(rec) < 12:
                    raise EdgeseqError(f"{path}: truncated tensor record at byte {pos}")
                n_dims, name_len, ttype = struct.unpack("<3i", rec)
                if not 0 < n_dims <= 4 or not 0 < name_len < 1024:
                    raise EdgeseqError(f"{path}: damaged tensor record at byte {pos} ({n_dims} dims, name of "
                                       f"{name_len} bytes)")
                rest = f.read(4 * n_dims + name_len)
                if len(rest) < 4 * n_dims + name_len:
                    raise EdgeseqError(f"{path}: truncated tensor record at byte {pos} (its dims and name need "
                                       f"{4 * n_dims + name_len} bytes, {len(rest)} remain)")
                dims = struct.unpack_from(f"<{n_dims}i", rest)
                try:
                    name = rest[4 * n_dims:].decode("utf-8")
                except UnicodeDecodeError:
                    raise EdgeseqError(f"{path}: damaged tensor record at byte {pos} (its name is not UTF-8: "
                                       f"{rest[4 * n_dims:][:40]!r})") from None
                shape = tuple(reversed(dims))  # ggml lists the fastest-varying dimension first
                if any(d <= 0 for d in shape):
                    raise EdgeseqError(f"{path}: damaged tensor record {name!r} (shape {shape})")
                if name in self.meta:
                    raise EdgeseqError(f"{path}: tensor {name!r} appears twice (at byte {pos})")
                offset = f.tell()
                nbytes = _nbytes(path, name, ttype, shape, version)
                if offset + nbytes > size:
                    raise EdgeseqError(f"{path}: truncated: tensor {name!r} needs bytes up to {offset + nbytes}, "
                                       f"the file has {size}")
                self.meta[name] = (ttype, shape, offset)
                f.seek(offset + nbytes)
                pos = offset + nbytes
        if "emb.weight" not in self.meta:
            raise EdgeseqError(f"{path}: no emb.weight tensor; is this an RWKV model?")
        if self.shape("emb.weight") != (n_vocab, n_embed):
            raise EdgeseqError(f"{path}: emb.weight is {self.shape('emb.weight')}, the header says "
                               f"({n_vocab}, {n_embed})")

    @property
    def architecture(self) -> str:
        """The RWKV version, from the tensors present (rwkv.cpp files carry no version field)."""
        return rwkv_version(self.keys())

    def weights_bytes(self) -> int:
        return os.path.getsize(self.path)

    # -- TensorSource ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.meta)

    def has(self, name: str) -> bool:
        return name in self.meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._need(name)[1]

    def get(self, name: str) -> np.ndarray:
        ttype, shape, offset = self._need(name)
        if ttype in _QUANT:  # dequantized to float32: the export then stores the model at its --quant
            from gguf import GGMLQuantizationType, quants

            qtype = GGMLQuantizationType[_QUANT[ttype]]
            nbytes = _nbytes(self.path, name, ttype, shape, 101)
            raw = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=offset)
            rows = int(np.prod(shape[:-1]))
            return quants.dequantize(raw.reshape(rows, -1), qtype).reshape(shape).astype(np.float32, copy=False)
        count = _nbytes(self.path, name, ttype, shape, 101) // np.dtype(_TYPES[ttype]).itemsize
        arr = np.fromfile(self.path, dtype=_TYPES[ttype], count=count, offset=offset).reshape(shape)
        return arr.astype(np.float32, copy=False)

    def _need(self, name: str):
        if name not in self.meta:
            raise EdgeseqError(f"{self.path}: missing tensor {name!r}")
        return self.meta[name]


def rwkv_version(keys) -> str:
    """'rwkv4' … 'rwkv7' from an RWKV checkpoint's tensor names (BlinkDL and rwkv.cpp layouts)."""
    keys = list(keys)
    if any(k.endswith((".att.x_rwkvag", ".att.w0", ".att.k_k")) for k in keys):
        return "rwkv7"
    if any(".att.time_maa_x" in k for k in keys):
        return "rwkv6"
    if any(k.endswith(".att.ln_x.weight") for k in keys):
        return "rwkv5"
    return "rwkv4"


def is_rwkv_cpp(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == struct.pack("<i", MAGIC)
    except OSError:
        return False
