"""Checkpoint readers: a Hugging Face directory (safetensors, sharded safetensors, pytorch_model.bin)
or the original state-spaces Mamba layout, offered to families as a `TensorSource`.

Tensors are read one at a time (safetensors by offset, pickles memory-mapped by torch), so an export
holds about one tensor at a time, not the checkpoint. Float tensors come back as float32 numpy arrays.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bf16", "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: the bf16 value is the top half of the float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """A safetensors file read through its JSON header and a memory map (nothing loaded up front)."""

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
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise EdgeseqError(f"{path}: damaged safetensors header ({e})") from None
        self.start = 8 + n
        self.meta = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, m in self.meta.items():
            end = self.start + m["data_offsets"][1]
            if end > size:
                raise EdgeseqError(f"{path}: truncated: tensor {name!r} needs bytes up to {end}, the file has {size}")
            if m["dtype"] not in _ST_DTYPES:
                raise UnsupportedError(f"{path}: tensor {name!r} has dtype {m['dtype']}, which edgeseq cannot read")

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
        self.tensors = {k: v for k, v in sd.items() if hasattr(v, "shape")}
        self.meta = self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return t.float().numpy() if t.is_floating_point() else t.numpy()


class Checkpoint:
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
        try:
            with open(cfg_path) as f:
                self.config = json.load(f)
        except ValueError as e:
            raise EdgeseqError(f"{cfg_path}: not valid JSON ({e})") from None
        self.files = [self._open(f) for f in self._weight_files()]
        self._where: dict[str, object] = {}
        for f in self.files:
            for name in f.meta:
                self._where[name] = f

    def _weight_files(self) -> list[str]:
        p = self.path
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            ip = os.path.join(p, index)
            if os.path.isfile(ip):
                try:
                    with open(ip) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                except (ValueError, KeyError) as e:
                    raise EdgeseqError(f"{ip}: damaged index ({e})") from None
                missing = [s for s in shards if not os.path.isfile(os.path.join(p, s))]
                if missing:
                    raise EdgeseqError(f"{ip}: lists shard(s) that are missing: {', '.join(missing)}")
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
            return archs[0]
        if "d_model" in self.config and ("ssm_cfg" in self.config or "n_layer" in self.config):
            layer = (self.config.get("ssm_cfg") or {}).get("layer", "Mamba1")
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
