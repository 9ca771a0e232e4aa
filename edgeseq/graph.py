"""Building ONNX graphs directly from weights (no tracing), with weights stored once on disk.

`WeightStore` streams tensors into one external-data file (`weights.bin`) as the exporter produces
them; every graph of a bundle (step, prefill, prefill_all) points into that one file, so the weights
exist once on disk however many graphs there are. `GraphBuilder` is a thin layer over
`onnx.helper`: `b.op("MatMul", x, b.w("layers.0.in_proj"))` returns the output's name.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # loads in onnxruntime >= 1.20; the com.microsoft ops are opset 1 of their domain
MS_DOMAIN = "com.microsoft"

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}
ONNX_TYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64"}


def onnx_type(dtype) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


@dataclass(frozen=True)
class WeightInfo:
    """Where one tensor lives in the weights file."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class WeightStore:
    """Append-only weights file. Each tensor is aligned to `align` bytes so it can be memory-mapped."""

    def __init__(self, path: str, align: int = 64):
        self.path = path
        self.align = align
        self.table: dict[str, WeightInfo] = {}
        self._f = open(path, "wb")
        self._pos = 0
        self._sha = hashlib.sha256()

    def add(self, name: str, array: np.ndarray) -> WeightInfo:
        if name in self.table:
            raise ValueError(f"weight {name!r} written twice")
        array = np.ascontiguousarray(array)
        pad = (-self._pos) % self.align
        if pad:
            self._write(b"\0" * pad)
        info = WeightInfo(name, array.dtype.name, tuple(int(d) for d in array.shape), self._pos, array.nbytes)
        self._write(memoryview(array).cast("B"))  # no copy of the tensor
        self.table[name] = info
        return info

    def _write(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def close(self) -> str:
        """Close the file; returns the sha256 of its bytes (the weights' identity for state files)."""
        self._f.close()
        return self._sha.hexdigest()

    @property
    def nbytes(self) -> int:
        return self._pos


class GraphBuilder:
    """Collects nodes, inputs, outputs and initializers; each op returns its output name(s)."""

    def __init__(self, weights: dict[str, WeightInfo], weights_file: str = "weights.bin", name: str = "graph",
                 prefix: str = ""):
        self.weights = weights
        self.prefix = prefix  # subgraphs (Scan bodies) prefix their names: names are unique model-wide
        self.weights_file = weights_file
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._consts: dict[tuple, str] = {}
        self._casts: dict[str, str] = {}
        self._n = 0
        self.uses_ms_domain = False

    # -- names -------------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    # -- values ------------------------------------------------------------------------------
    def w(self, name: str, alias: str | None = None) -> str:
        """A weight from the store, referenced as external data (widened to float32 if stored f16).

        `alias` gives the same stored bytes a second initializer name. ONNX Runtime maps each external
        initializer separately, so two consumers that treat a matrix differently (a Gather that reads a
        few rows, a Gemm that prepacks all of it) keep separate mappings: the packed copy replaces one,
        and the other stays untouched on disk except for the rows read."""
        key = alias or name
        if key in self._casts:
            return self._casts[key]
        if key not in self.initializers:
            info = self.weights.get(name)
            if info is None:
                raise KeyError(f"graph {self.name} needs weight {name!r}, which the export did not write")
            t = TensorProto()
            t.name = key
            t.data_type = onnx_type(info.dtype)
            t.dims.extend(info.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.weights_file), ("offset", str(info.offset)), ("length", str(info.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.initializers[key] = t
            if info.dtype == "float16":
                self._casts[key] = self.op("Cast", key, to=TensorProto.FLOAT)
                return self._casts[key]
        return key

    def has_weight(self, name: str) -> bool:
        return name in self.weights

    def const(self, value, dtype=np.float32) -> str:
        """A small constant stored inside the graph (deduplicated)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers[name] = numpy_helper.from_array(arr, name)
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(list(values), np.int64)

    # -- nodes -------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str | None, outputs: int | list[str] = 1, domain: str = "", **attrs):
        if isinstance(outputs, int):
            outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        else:
            outs = list(outputs)
        ins = ["" if i is None else i for i in inputs]
        self.nodes.append(helper.make_node(op_type, ins, outs, domain=domain or None, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        return outs[0] if len(outs) == 1 else outs

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        """Expose `value` as graph output `name` (an Identity when the names differ)."""
        if value != name:
            self.op("Identity", value, outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    # -- result ------------------------------------------------------------------------------
    def to_model(self, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values()))
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeseq")
        model.ir_version = 10  # onnxruntime 1.20+ reads IR 10
        for k, v in (metadata or {}).items():
            p = model.metadata_props.add()
            p.key, p.value = k, str(v)
        return model


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Write a graph whose initializers already point into the weights file (no data is copied)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
