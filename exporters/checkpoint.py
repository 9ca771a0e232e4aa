"""Checkpoint readers: a Hugging Face directory (safetensors, sharded safetensors, pytorch_model.bin)
or the original state-spaces Mamba layout, offered to families as a `TensorSource`.

Tensors are read one at a time (safetensors by offset, pickles memory-mapped by torch), so an export
holds about one tensor at a time, not the checkpoint. Float tensors come back as float32 numpy arrays.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from edgeseq import safe_io
from edgeseq.errors import EdgeseqError, UnsupportedError

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bf16", "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: the bf16 value is the top half of the float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """A safetensors file read through its JSON header (nothing loaded up front).

    Every field of the header is checked against the file before anything is allocated: the header
    is an object of {name: {dtype, shape, data_offsets}}; dtypes are known; shapes are lists of
    non-negative integers; offsets are in order, inside the data section, and hold exactly the bytes
    the shape and dtype need; no two tensors overlap. A damaged header is an EdgeseqError naming the
    file and the tensor."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EdgeseqError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise EdgeseqError(f"{path}: damaged safetensors header (declares {n} header bytes, file has {size})")
            header = safe_io.loads(f.read(n), path, "safetensors header")
        if not isinstance(header, dict):
            raise EdgeseqError(f"{path}: damaged safetensors header (a {type(header).__name__}, not an object)")
        self.start = 8 + n
        data = size - self.start
        self.meta = {}
        spans = []
        for name, m in header.items():
            if name == "__metadata__":
                if m is not None and not isinstance(m, dict):
                    raise EdgeseqError(f"{path}: damaged safetensors header (__metadata__ is not an object)")
                continue
            where = f"{path}: tensor {name!r}"
            if not isinstance(m, dict):
                raise EdgeseqError(f"{where}: damaged header entry ({safe_io._show(m)})")
            missing = [k for k in ("dtype", "shape", "data_offsets") if k not in m]
            if missing:
                raise EdgeseqError(f"{where}: damaged header entry (no {', '.join(missing)})")
            dtype = safe_io.need_str(m["dtype"], path, f"the dtype of {name!r}", 16)
            if dtype not in _ST_DTYPES:
                raise UnsupportedError(f"{where} has dtype {dtype}, which edgeseq cannot read (it reads "
                                       f"{', '.join(_ST_DTYPES)})")
            shape = safe_io.need_shape(m["shape"], path, f"the shape of {name!r}")
            offs = m["data_offsets"]
            if not isinstance(offs, list) or len(offs) != 2:
                raise EdgeseqError(f"{where}: data_offsets {safe_io._show(offs)} is not a pair [begin, end]")
            a = safe_io.need_int(offs[0], path, f"the first data offset of {name!r}", 0, data)
            z = safe_io.need_int(offs[1], path, f"the end data offset of {name!r}", 0, 1 << 62)
            if z > data:
                raise EdgeseqError(f"{path}: truncated: tensor {name!r} needs bytes up to {self.start + z}, the "
                                   f"file has {size}")
            if z < a:
                raise EdgeseqError(f"{where}: data_offsets [{a}, {z}] run backwards")
            count = 1
            for d in shape:
                count *= d
            itemsize = 2 if dtype in ("BF16", "F16") else np.dtype(_ST_DTYPES[dtype]).itemsize
            if count * itemsize != z - a:
                raise EdgeseqError(f"{where}: shape {list(shape)} of {dtype} needs {count * itemsize} bytes, its "
                                   f"data_offsets hold {z - a}")
            self.meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [a, z]}
            spans.append((a, z, name))
        # as the safetensors library requires: the tensors tile the data section, no overlap and no gap
        # (a header length off by a few bytes would otherwise shift every tensor's bytes silently)
        end = 0
        for a, z, name in sorted(spans):
            if a < end:
                raise EdgeseqError(f"{path}: tensor {name!r} overlaps the one before it (bytes {a}..{end})")
            if a > end:
                raise EdgeseqError(f"{path}: damaged header: bytes {end}..{a} of the data belong to no tensor")
            end = z
        if end != data:
            raise EdgeseqError(f"{path}: damaged header: the tensors cover {end} bytes of data, the file holds {data}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        m = self.meta[name]
        a, z = m["data_offsets"]
        # a plain read, not a memory map: the pages are freed with the array, so an export's resident
        # memory stays near the largest tensor instead of growing to the whole checkpoint
        raw = np.empty(z - a, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.start + a)
            if f.readinto(memoryview(raw)) != z - a:
                raise EdgeseqError(f"{self.path}: truncated while reading tensor {name!r}")
        dt = _ST_DTYPES[m["dtype"]]
        if dt == "bf16":
            arr = bf16_to_f32(raw.view(np.uint16))
        else:
            arr = raw.view(dt)
        arr = arr.reshape(m["shape"])
        return arr.astype(np.float32, copy=False) if arr.dtype.kind == "f" else arr


class TorchFile:
    """A pickled torch checkpoint, loaded with weights_only=True (a checkpoint never runs code)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise EdgeseqError(f"{path}: reading pickled checkpoints needs torch: pip install 'edgeseq[torch]'") from None
        self.path = path
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a damaged or unsafe pickle
            raise EdgeseqError(f"{path}: cannot read this checkpoint: {type(e).__name__}: {e}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise EdgeseqError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
        self.tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.meta = self.tensors
        size = os.path.getsize(path)
        for name, t in self.tensors.items():
            _check_torch_tensor(path, name, t, size)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return t.float().numpy() if t.is_floating_point() else t.numpy()


# torch dtypes a checkpoint's tensors may have (float ones come back as float32)
_TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def _check_torch_tensor(path: str, name, t, file_size: int) -> None:
    """A pickled tensor is what it claims: a string name, a dtype edgeseq reads, and elements that its
    storage (and so the file) actually holds: an expanded view (stride 0) of a small storage would make
    `.float()` allocate its full size, terabytes for a hostile file."""
    if not isinstance(name, str):
        raise EdgeseqError(f"{path}: a tensor's name is {safe_io._show(name)}, not a string")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _TORCH_DTYPES:
        raise UnsupportedError(f"{path}: tensor {name!r} has dtype {dtype}, which edgeseq cannot read (it reads "
                               f"{', '.join(_TORCH_DTYPES)})")
    if t.layout != t.new_empty(0).layout or t.is_sparse or t.is_quantized:
        raise UnsupportedError(f"{path}: tensor {name!r} is not a dense tensor")
    nbytes = t.numel() * t.element_size()
    storage = t.untyped_storage().nbytes()
    if nbytes > storage - t.storage_offset() * t.element_size() or nbytes > file_size:
        raise EdgeseqError(f"{path}: tensor {name!r} {tuple(t.shape)} ({nbytes} bytes) is a view larger than the "
                           f"{storage} bytes stored for it (a stride-0 or overlapping view); refused")


class Checkpoint:
    stored_by: str | None = None  # a model directory: its family tells the layout from the tensor names
    """A model directory: config.json plus one or more weight files, as one name -> tensor map."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise EdgeseqError(f"{path}: no such file or directory")
        if not os.path.isdir(path):
            raise EdgeseqError(f"{path}: expected a model directory (config.json and weights)")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise EdgeseqError(f"{path}: no config.json in this directory")
        self.config = safe_io.load_json_file(cfg_path, "config.json", 64 << 20)
        if not isinstance(self.config, dict):
            raise EdgeseqError(f"{cfg_path}: not a JSON object")
        self._index = None
        self.files = [self._open(f) for f in self._weight_files()]
        self._where: dict[str, object] = {}
        for f in self.files:
            for name in f.meta:
                if name in self._where:
                    raise EdgeseqError(f"{f.path}: tensor {name!r} is also in {self._where[name].path}")
                self._where[name] = f
        if self._index:  # the index and the shards agree on where each tensor is
            ip, wm = self._index
            unlisted = sorted(set(self._where) - set(wm))
            if unlisted:
                raise EdgeseqError(f"{ip}: does not list tensor {unlisted[0]!r} of {self._where[unlisted[0]].path}")
            for name, shard in wm.items():
                f = self._where.get(name)
                if f is None:
                    raise EdgeseqError(f"{ip}: lists tensor {name!r} in {shard}, which does not hold it")
                if os.path.basename(f.path) != os.path.basename(shard):
                    raise EdgeseqError(f"{ip}: lists tensor {name!r} in {shard}, but it is in {f.path}")

    def _weight_files(self) -> list[str]:
        p = self.path
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            ip = os.path.join(p, index)
            if os.path.isfile(ip):
                index = safe_io.load_json_file(ip, "shard index", 256 << 20)
                wm = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(wm, dict) or not wm:
                    raise EdgeseqError(f"{ip}: damaged index (no weight_map object of tensor -> shard file)")
                for k, v in wm.items():
                    safe_io.need_str(v, ip, f"the shard of {k!r}", 4096)
                shards = sorted(set(wm.values()))
                for s in shards:  # a shard is a file of this folder, never ../elsewhere or /abs
                    safe_io.inside(p, s, ip, "shard")
                missing = [s for s in shards if not os.path.isfile(os.path.join(p, s))]
                if missing:
                    raise EdgeseqError(f"{ip}: lists shard(s) that are missing: {', '.join(missing)}")
                self._index = (ip, wm)
                return [os.path.join(p, s) for s in shards]
        for single in ("model.safetensors", "pytorch_model.bin", "model.bin"):
            if os.path.isfile(os.path.join(p, single)):
                return [os.path.join(p, single)]
        raise EdgeseqError(f"{p}: no weights found (expected model.safetensors, model.safetensors.index.json "
                           f"or pytorch_model.bin)")

    @staticmethod
    def _open(path: str):
        return SafetensorsFile(path) if path.endswith(".safetensors") else TorchFile(path)

    @property
    def architecture(self) -> str:
        """The architecture name the registry knows this checkpoint by."""
        archs = self.config.get("architectures")
        if archs:
            if not isinstance(archs, list) or not isinstance(archs[0], str):
                raise EdgeseqError(f"{self.path}/config.json: 'architectures' is {safe_io._show(archs)}, expected a "
                                   f"list of names")
            return archs[0]
        if "d_model" in self.config and ("ssm_cfg" in self.config or "n_layer" in self.config):
            ssm_cfg = self.config.get("ssm_cfg") or {}
            layer = ssm_cfg.get("layer", "Mamba1") if isinstance(ssm_cfg, dict) else None
            return "Mamba2LMHeadModel" if layer == "Mamba2" else "MambaLMHeadModel"  # state-spaces layout
        raise EdgeseqError(f"{self.path}/config.json: no 'architectures' list, so the model family is unknown "
                           f"(add e.g. \"architectures\": [\"MambaForCausalLM\"])")

    # -- TensorSource ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        self._need(name)
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        self._need(name)
        return self._where[name].get(name)

    def _need(self, name: str) -> None:
        if name not in self._where:
            raise EdgeseqError(f"{self.path}: missing tensor {name!r}")

    def weights_bytes(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files)


class SingleFileSource(TorchFile):
    """A one-file pickled checkpoint offered as a TensorSource: a missing tensor is an error naming it."""

    stored_by: str | None = None

    def weights_bytes(self) -> int:
        return os.path.getsize(self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise EdgeseqError(f"{self.path}: missing tensor {name!r}")
        return super().shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise EdgeseqError(f"{self.path}: missing tensor {name!r}")
        return super().get(name)


class BlinkDLFile(SingleFileSource):
    """A BlinkDL RWKV `.pth` (a bare state dict: emb.weight, blocks.{i}.att.*, …); the RWKV version
    follows from the tensors present."""

    stored_by = "blinkdl"

    def __init__(self, path: str):
        super().__init__(path)
        self.config: dict = {}

    @property
    def architecture(self) -> str:
        from edgeseq.exporters.rwkvcpp import rwkv_version

        if "emb.weight" not in self.tensors:
            raise EdgeseqError(f"{self.path}: no emb.weight tensor; not a BlinkDL RWKV checkpoint")
        return rwkv_version(self.tensors)


def open_checkpoint(path: str):
    """A model directory (HF or state-spaces layout) or a single-file checkpoint: a BlinkDL RWKV
    `.pth` or an rwkv.cpp `.bin`."""
    if os.path.isfile(path):
        from edgeseq.exporters.rwkvcpp import RwkvCppFile, is_rwkv_cpp

        if is_rwkv_cpp(path):
            return RwkvCppFile(path)
        if path.endswith(".pth"):
            return BlinkDLFile(path)
        if path.endswith(".pt"):  # the recurrentgemma package's PyTorch checkpoints (2b.pt, 9b.pt)
            from edgeseq.exporters.recurrentgemma import GriffinFile

            return GriffinFile(path)
        raise EdgeseqError(f"{path}: not a model directory nor a checkpoint file edgeseq reads "
                           f"(BlinkDL .pth, rwkv.cpp .bin, recurrentgemma .pt); for Hugging Face models pass "
                           f"the directory")
    return Checkpoint(path)
