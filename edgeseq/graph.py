"""Building ONNX graphs directly from weights (no tracing), with weights stored once on disk.

`WeightStore` streams tensors into one external-data file (`weights.bin`) as the exporter produces
them; every graph of a bundle (step, prefill, prefill_all) points into that one file, so the weights
exist once on disk however many graphs there are. `GraphBuilder` collects nodes; every
tensor it hands out is a `Value`, the ONNX name of the tensor (a `str`) that also knows its builder, so
graph code reads like the math it builds:

    with b.scope("layers.3.att"):
        k = k * (1 + (a - 1) * b.w("layers.3.k_a"))     # Mul, Sub, Mul, Add, Mul nodes
        y = (x @ b.w("layers.3.out")).reshape(0, 0, -1)   # MatMul, Reshape

Python numbers become float32 constants; `b.ints([...])` makes int64 ones. Nodes are named by their
scope (`/layers.3.att/Mul_12`), so a profile or a failing node points at the model's code.
`b.recur(step, carry, xs, tokens)` builds a recurrence from its one-token `step` function: called
directly in the one-token graph (no loop), or as the body of a standard ONNX Scan otherwise.
"""
from __future__ import annotations

import contextlib
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
# element types by name, for Cast and graph inputs: `x.cast("float32")`, never a raw `to=1`
DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
          "int64": TensorProto.INT64, "int32": TensorProto.INT32, "int8": TensorProto.INT8,
          "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}


def onnx_type(dtype) -> int:
    if str(dtype) == "bfloat16":  # ml_dtypes' numpy type (onnx's own dependency)
        return TensorProto.BFLOAT16
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
        self._write(memoryview(array.view(np.uint8) if array.dtype.name == "bfloat16" else array).cast("B"))  # no copy
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


class Value(str):
    """A tensor of a graph under construction: its ONNX name, plus the builder that emits its ops.

    Arithmetic and the methods below append nodes to the builder and return new Values. A Value is a
    `str`, so it can stand wherever an ONNX name is expected; `==` and hashing stay those of the name.
    Of two operands, the op goes to the innermost builder (a Scan body rather than its parent graph)."""

    __slots__ = ("b",)

    def __new__(cls, name: str, builder: "GraphBuilder"):
        v = super().__new__(cls, name)
        v.b = builder
        return v

    def _binary(self, op: str, other, reverse: bool = False) -> "Value":
        b = _inner(self, other)
        o = other if isinstance(other, str) else b.const(other)
        return b.op(op, o, self) if reverse else b.op(op, self, o)

    def __add__(self, o): return self._binary("Add", o)
    def __radd__(self, o): return self._binary("Add", o, reverse=True)
    def __sub__(self, o): return self._binary("Sub", o)
    def __rsub__(self, o): return self._binary("Sub", o, reverse=True)
    def __mul__(self, o): return self._binary("Mul", o)
    def __rmul__(self, o): return self._binary("Mul", o, reverse=True)
    def __truediv__(self, o): return self._binary("Div", o)
    def __rtruediv__(self, o): return self._binary("Div", o, reverse=True)
    def __matmul__(self, o): return self._binary("MatMul", o)
    def __rmatmul__(self, o): return self._binary("MatMul", o, reverse=True)
    def __pow__(self, o): return self._binary("Pow", o)
    def __neg__(self): return self.b.op("Neg", self)

    def __mod__(self, o):  # str's %-formatting of a tensor's name would be a silent surprise
        raise TypeError("a graph Value does not take %; call .mod(...)")

    def __and__(self, o): return self._binary("And", o)

    # comparisons (methods: `<` and `==` stay those of the name, a str)
    def gt(self, o): return self._binary("Greater", o)
    def ge(self, o): return self._binary("GreaterOrEqual", o)
    def lt(self, o): return self._binary("Less", o)
    def le(self, o): return self._binary("LessOrEqual", o)
    def eq(self, o): return self._binary("Equal", o)
    def mod(self, o): return self.b.op("Mod", self, o if isinstance(o, str) else self.b.const(o), fmod=0)

    def where(self, then, otherwise) -> "Value":
        """`then` where this (bool) tensor is true, else `otherwise` (a Value or a float)."""
        b = _inner(self, then, otherwise)
        return b.op("Where", self, then if isinstance(then, str) else b.const(then),
                    otherwise if isinstance(otherwise, str) else b.const(otherwise))

    # elementwise functions
    def exp(self): return self.b.op("Exp", self)
    def log(self): return self.b.op("Log", self)
    def sqrt(self): return self.b.op("Sqrt", self)
    def tanh(self): return self.b.op("Tanh", self)
    def sigmoid(self): return self.b.op("Sigmoid", self)
    def relu(self): return self.b.op("Relu", self)
    def softplus(self): return self.b.op("Softplus", self)
    def silu(self): return self * self.sigmoid()
    def gelu(self, approximate: str = "none"): return self.b.op("Gelu", self, approximate=approximate)
    def abs(self): return self.b.op("Abs", self)
    def maximum(self, o): return self._binary("Max", o)
    def minimum(self, o): return self._binary("Min", o)
    def cos(self): return self.b.op("Cos", self)
    def sin(self): return self.b.op("Sin", self)
    def sinh(self): return self.b.op("Sinh", self)
    def isnan(self): return self.b.op("IsNaN", self)
    def softmax(self, axis: int = -1): return self.b.op("Softmax", self, axis=axis)

    def clip(self, lo: float, hi: float) -> "Value":
        return self.b.op("Clip", self, self.b.const(lo), self.b.const(hi))

    # shapes
    def reshape(self, *shape: int) -> "Value":
        """Reshape to `shape` (ONNX semantics: 0 keeps that axis, -1 is inferred), or to the shape held by
        an int64 tensor: `x.reshape(shape_value)`."""
        if len(shape) == 1 and isinstance(shape[0], str):
            return self.b.op("Reshape", self, shape[0])
        return self.b.op("Reshape", self, self.b.ints(shape))

    def transpose(self, *perm: int) -> "Value":
        return self.b.op("Transpose", self, perm=list(perm))

    def squeeze(self, *axes: int) -> "Value":
        return self.b.op("Squeeze", self, self.b.ints(axes))

    def unsqueeze(self, *axes: int) -> "Value":
        return self.b.op("Unsqueeze", self, self.b.ints(axes))

    def split(self, sizes, axis: int = -1, parts: int | None = None) -> list["Value"]:
        """Pieces of the given sizes along `axis`: a list of ints, or an int64 tensor of `parts` sizes."""
        n = parts if isinstance(sizes, str) else len(sizes)
        outs = self.b.op("Split", self, sizes if isinstance(sizes, str) else self.b.ints(sizes), axis=axis, outputs=n)
        return outs if isinstance(outs, list) else [outs]

    def expand(self, *shape) -> "Value":
        """Broadcast to `shape` (ONNX Expand: 1 keeps an axis as it is), ints or one int64 tensor."""
        if len(shape) == 1 and isinstance(shape[0], str):
            return self.b.op("Expand", self, shape[0])
        return self.b.op("Expand", self, self.b.ints(shape))

    def tile(self, *reps: int) -> "Value":
        return self.b.op("Tile", self, self.b.ints(reps))

    def scatter(self, index, updates, axis: int = 0) -> "Value":
        """A copy with `updates` written at `index` along `axis` (ONNX ScatterElements)."""
        return self.b.op("ScatterElements", self, index, updates, axis=axis)

    def gather(self, index, axis: int = 0) -> "Value":
        """Entries at `index` along `axis`: an int drops the axis (x[:, -1]), a list of ints or an int64
        tensor keeps it (x[:, [-1]]; an embedding lookup `table.gather(ids)`)."""
        if isinstance(index, str):
            idx = index
        elif isinstance(index, int):
            idx = self.b.const(index, np.int64)
        else:
            idx = self.b.ints(index)
        return self.b.op("Gather", self, idx, axis=axis)

    def slice(self, start, end=None, axis: int = 0) -> "Value":
        """x[start:end] along one axis; start and end are ints or (1,) int64 tensors, end None the end."""
        def bound(v):
            return v if isinstance(v, str) else self.b.ints([v])
        end = np.iinfo(np.int64).max if end is None else end
        return self.b.op("Slice", self, bound(start), bound(end), self.b.ints([axis]))

    def dims(self, start: int | None = None, end: int | None = None) -> "Value":
        """The sizes of axes start..end-1 (all by default) as an int64 tensor (ONNX Shape)."""
        bounds = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        return self.b.op("Shape", self, **bounds)

    def cast(self, dtype: str) -> "Value":
        return self.b.op("Cast", self, to=DTYPES[dtype])

    # reductions (over the given axes, kept unless keepdims=False)
    def sum(self, *axes: int, keepdims: bool = True) -> "Value":
        return self.b.op("ReduceSum", self, self.b.ints(axes), keepdims=int(keepdims))

    def mean(self, *axes: int, keepdims: bool = True) -> "Value":
        return self.b.op("ReduceMean", self, self.b.ints(axes), keepdims=int(keepdims))

    def l2(self, *axes: int, keepdims: bool = True) -> "Value":
        """The Euclidean norm over `axes` (ONNX ReduceL2)."""
        return self.b.op("ReduceL2", self, self.b.ints(axes), keepdims=int(keepdims))

    def max(self, *axes: int, keepdims: bool = True) -> "Value":
        """The largest entry over `axes`, or over everything when none are given."""
        if not axes:
            return self.b.op("ReduceMax", self, keepdims=int(keepdims))
        return self.b.op("ReduceMax", self, self.b.ints(axes), keepdims=int(keepdims))


def _inner(*values) -> "GraphBuilder":
    """The builder of the innermost graph among the operands (a Scan body sees its parent's values)."""
    builders = [v.b for v in values if isinstance(v, Value)]
    return max(builders, key=lambda b: b.depth)


class GraphBuilder:
    """Collects nodes, inputs, outputs and initializers; every op returns its output Value(s)."""

    def __init__(self, weights: dict[str, WeightInfo], weights_file: str = "weights.bin", name: str = "graph",
                 prefix: str = "", parent: "GraphBuilder | None" = None):
        self.weights = weights
        self.prefix = prefix  # subgraphs (Scan bodies) prefix their names: names are unique model-wide
        self.weights_file = weights_file
        self.name = name
        self.parent = parent
        self.depth = parent.depth + 1 if parent else 0
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._consts: dict[tuple, str] = {}
        self._casts: dict[str, str] = {}
        # nodes a half-precision rewrite keeps in float32 (quant/half.py): a recurrence's one-token step
        self.full_precision: set[str] = parent.full_precision if parent else set()
        self._n = 0
        self._nodes_named = 0
        self._scope: list[str] = list(parent._scope) if parent else []
        self.uses_ms_domain = False

    # -- names -------------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    @contextlib.contextmanager
    def scope(self, name: str):
        """Name every node built inside after its place in the model: `/layers.3.att/MatMul_7`."""
        self._scope.append(name)
        try:
            yield self
        finally:
            self._scope.pop()

    @contextlib.contextmanager
    def float32(self):
        """Nodes built inside stay float32 when the graph is rewritten to compute in half (quant/half.py):
        a recurrence's one-token step, where the state is updated."""
        first = len(self.nodes)
        try:
            yield self
        finally:
            self.full_precision.update(n.name for n in self.nodes[first:])

    def _node_name(self, op_type: str) -> str:
        self._nodes_named += 1
        leaf = f"{self.prefix}{op_type}_{self._nodes_named}"
        return "/" + "/".join([*self._scope, leaf]) if self._scope else leaf

    # -- values ------------------------------------------------------------------------------
    def w(self, name: str, alias: str | None = None) -> str:
        """A weight from the store, referenced as external data (widened to float32 if stored f16 or bf16).

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
            if info.dtype in ("float16", "bfloat16"):
                self._casts[key] = self.op("Cast", key, to=TensorProto.FLOAT)
                return self._casts[key]
        return Value(key, self)

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
        return Value(self._consts[key], self)

    def ints(self, values) -> str:
        return self.const(list(values), np.int64)

    # -- nodes -------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str | None, outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Append one node; returns its output Value, or a list of them when it has several.
        For arithmetic, prefer the Value operators; call op() by name for the rest (contrib ops, Scan)."""
        if isinstance(outputs, int):
            outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        else:
            outs = list(outputs)
        ins = ["" if i is None else str(i) for i in inputs]
        self.nodes.append(helper.make_node(op_type, ins, [str(o) for o in outs], name=self._node_name(op_type),
                                           domain=domain or None, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        outs = [Value(o, self) for o in outs]
        return outs[0] if len(outs) == 1 else outs

    def recur(self, step, carry: list[str], xs: list[str], one_token: bool, squeeze_time: bool = False,
              name: str = "recurrence"):
        """A recurrence from its one-token function `step(*carry, *x_t) -> (new_carry, ys)`.

        Several tokens: xs carry the time axis at position 1 and `step` becomes the body of a standard
        ONNX Scan; the ys come back with the time axis at position 1. One token: `step` is called
        directly (the step graph has no loop) on xs as given, or, with `squeeze_time`, on xs without
        their time axis of 1, the ys getting it back. Returns (final carry, ys), both lists."""
        if not one_token:
            return self.scan(step, carry, xs, name)
        if squeeze_time:
            axis = self.ints([1])
            xs = [self.op("Squeeze", x, axis) for x in xs]
        with self.float32():
            new_carry, ys = step(*carry, *xs)
        if squeeze_time:
            ys = [self.op("Unsqueeze", y, axis) for y in ys]
        return list(new_carry), list(ys)

    def scan(self, step, carry: list[str], xs: list[str], name: str = "scan"):
        """ONNX Scan over axis 1 of xs whose body is `step` (see recur)."""
        body_name = self.fresh(name + "_body")
        body = GraphBuilder({}, name=body_name, prefix=body_name + "/", parent=self)
        f = TensorProto.FLOAT
        c_in = [body.input(f"c{i}_in", f, None) for i in range(len(carry))]
        x_in = [body.input(f"x{i}_t", f, None) for i in range(len(xs))]
        new_carry, ys = step(*c_in, *x_in)
        seen = set()
        for v in [*new_carry, *ys]:
            # a body output must be a value the body computes, and each only once
            if v in seen or v in c_in or v in x_in or not (isinstance(v, Value) and v.b is body):
                v = body.op("Identity", v)
            seen.add(v)
            body.outputs.append(helper.make_tensor_value_info(str(v), f, None))
        graph = helper.make_graph(body.nodes, body.name, body.inputs, body.outputs, list(body.initializers.values()))
        outs = self.op("Scan", *carry, *xs, outputs=len(new_carry) + len(ys), body=graph, num_scan_inputs=len(xs),
                       scan_input_axes=[1] * len(xs), scan_output_axes=[1] * len(ys))
        outs = outs if isinstance(outs, list) else [outs]
        return outs[:len(new_carry)], outs[len(new_carry):]

    def concat(self, *values: str, axis: int) -> Value:
        return self.op("Concat", *values, axis=axis)

    def arange(self, start, limit, delta=1) -> Value:
        """int64 start, start + delta, ... below limit (ONNX Range); ints or int64 scalar tensors."""
        def scalar(v):
            return v if isinstance(v, str) else self.const(v, np.int64)
        return self.op("Range", scalar(start), scalar(limit), scalar(delta))

    def if_(self, cond: str, then_fn, else_fn, args=(), name: str = "if"):
        """ONNX If: `then_fn(*args)` where the bool scalar `cond` holds, else `else_fn(*args)`. Each branch
        is a subgraph built by calling its function on `args` rebound to that subgraph, so the branch's
        ops land in it (it reads the values themselves from this graph by name). Both branches return a
        Value or a list of them (float32); returns the If's output(s)."""
        branches = []
        for fn in (then_fn, else_fn):
            sub_name = self.fresh(fn.__name__ if fn.__name__.isidentifier() else name)
            sub = GraphBuilder({}, name=sub_name, prefix=sub_name + "/", parent=self)
            outs = fn(*(Value(a, sub) for a in args))
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for i, v in enumerate(outs):
                sub.output(v, sub.prefix + ("o" if len(outs) == 1 else f"o{i}"), TensorProto.FLOAT, None)
            self.uses_ms_domain |= sub.uses_ms_domain
            branches.append(helper.make_graph(sub.nodes, sub.name, [], sub.outputs, list(sub.initializers.values())))
        if len(branches[0].output) != len(branches[1].output):
            raise ValueError(f"{name}: the branches of an If return {len(branches[0].output)} and "
                             f"{len(branches[1].output)} values")
        return self.op("If", cond, outputs=len(branches[0].output), then_branch=branches[0], else_branch=branches[1])

    def input(self, name: str, elem_type: int | str, shape: list) -> Value:
        elem_type = DTYPES[elem_type] if isinstance(elem_type, str) else elem_type
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return Value(name, self)

    def output(self, value: str, name: str, elem_type: int | str, shape: list) -> str:
        """Expose `value` as graph output `name` (an Identity when the names differ)."""
        elem_type = DTYPES[elem_type] if isinstance(elem_type, str) else elem_type
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


def walk_nodes(graph: onnx.GraphProto):
    """Every node of `graph` and of the subgraphs inside its nodes (Scan bodies, If branches), depth first."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from walk_nodes(g)


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Write a graph whose initializers already point into the weights file (no data is copied)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
