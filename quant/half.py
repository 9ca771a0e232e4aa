"""Half-precision compute: a graph whose matrices and activations are float16 or bfloat16, for GPUs.

An f16/bf16 bundle made with `compute` rewrites each graph after it is built (`rewrite(b, "f16")`):

- Where half values come from: the matrices stored in half (`quantize_tensor`), their widening Casts
  dropped. A node computes in half when any of its float inputs is half; its other float inputs are cast
  to half (small constants and f32 vectors, which ONNX Runtime folds at load). So work derived only from
  float32 sources (positions and their rotary angles, the state alone) stays float32.
- What stays float32 whatever its inputs: the residual stream (its Adds, from the embedding on: a random
  mamba-130m's stream reaches 41,000, at float16's edge and where bfloat16 keeps 2 digits), so each norm
  reads float32 and a mixer's half output is cast up where it is added; each recurrence's one-token step
  (`GraphBuilder.recur` marks its nodes), loops and branches with their subgraphs (the prefill's Scan, RWKV-7's chunked If), the ops
  whose range or sums half precision loses (exponentials and logs, sums along an axis), contrib ops without half kernels, and ops whose ONNX schema lacks the
  type (bf16 Softplus at opset 21). Their half inputs are cast up; their float32 outputs are cast down
  where a half node reads them.
- The graph's inputs and outputs keep their types: the state goes in and out as float32, and so do the
  logits (cast up at the end).

The recurrent state, every recurrence and the residual stream run in float32 (as llama.cpp keeps its
residual in f32); matrix products read half and accumulate in float32 in cuBLAS; the work inside a mixer
between its products is half. ONNX Runtime's CPU
provider runs the float16 form (slowly; tests use it), not the bfloat16 one.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from edgeseq.graph import MS_DOMAIN, OPSET, GraphBuilder, walk_nodes

HALF = {"f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
F32 = TensorProto.FLOAT
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}

# float32 wherever they are: exponentials and logs (decays, softmax), sums, squares and means along an axis
# (a norm's statistics: x² of a residual of 300 overflows float16), rotary angles, control flow, and the
# ops that make float tensors from attributes or integers
KEEP_OPS = {"Exp", "Log", "CumSum", "ReduceSum", "Pow", "ReduceMean", "ReduceL2", "Sin", "Cos", "Scan", "If", "Loop", "Constant", "ConstantOfShape", "Range", "EyeLike",
            "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
# com.microsoft ops with half kernels in ONNX Runtime's CUDA provider (float16; bfloat16 where listed)
HALF_CONTRIB = {"f16": {"QuickGelu", "FusedMatMul", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
                        "Gelu", "FastGelu", "BiasGelu"},
                "bf16": {"FusedMatMul", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "FastGelu"}}
# ONNX-domain ops ONNX Runtime defines itself (no onnx.defs schema), with the types its kernels take
ORT_ONNX_OPS = {"SimplifiedLayerNormalization": {"f16", "bf16"}}
# the outputs of the norms that are float32 statistics (type U), whatever the input type
STAT_OUTPUTS = {"LayerNormalization": {1, 2}, "SimplifiedLayerNormalization": {1},
                "SkipLayerNormalization": {1, 2}, "SkipSimplifiedLayerNormalization": {1, 2}}
NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}
TYPE_NAME = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}


def _schema_takes(op: str, half: str) -> bool:
    """Whether the ONNX-domain op `op` accepts the half type on its first input at our opset."""
    if op in ORT_ONNX_OPS:
        return half in ORT_ONNX_OPS[op]
    try:
        schema = onnx.defs.get_schema(op, OPSET, "")
    except onnx.defs.SchemaError:
        return False
    if not schema.inputs:
        return False
    tname = schema.inputs[0].type_str
    for c in schema.type_constraints:
        if c.type_param_str == tname:
            return TYPE_NAME[HALF[half]] in c.allowed_type_strs
    return tname == TYPE_NAME[HALF[half]]


def _keeps_f32(node: onnx.NodeProto, half: str, marked: set[str]) -> bool:
    if node.name in marked or node.op_type in KEEP_OPS:
        return True
    if node.domain == MS_DOMAIN:
        return node.op_type not in HALF_CONTRIB[half]
    return not _schema_takes(node.op_type, half)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _outer_refs(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph (and those inside it) reads that none of them defines: values of the graphs around
    it, read by name (the builder's names are unique model-wide)."""
    nodes = list(walk_nodes(g))
    defined = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in nodes for o in n.output}
    for sub in (s for n in nodes for s in _subgraphs(n)):
        defined |= {i.name for i in sub.input} | {i.name for i in sub.initializer}
    return {i for n in nodes for i in n.input if i} - defined


def _float_outputs(b: GraphBuilder) -> dict[str, int]:
    """The element type of every value ONNX's shape inference can type (contrib outputs it cannot)."""
    model = onnx.shape_inference.infer_shapes(b.to_model(), strict_mode=False)
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type")}


def residual_stream(b: GraphBuilder) -> set[str]:
    """The nodes of the residual stream: from the token embedding (the Gather of the ids), each Add that
    reads the stream continues it (through reshapes and scalings by a constant, as some families scale the
    embedding; through a norm before the first Add, as RWKV's ln0), and so does a fused SkipLayerNorm's
    sum output."""
    stream = {n.output[0] for n in b.nodes if n.op_type in ("Gather", "GatherBlockQuantized")
              and "input_ids" in n.input}
    adds = set()
    for n in b.nodes:
        if not stream.intersection(n.input):
            continue
        if not adds and n.op_type in NORMS:
            adds.add(n.name)
            stream.add(n.output[0])
        elif n.op_type == "Add":
            adds.add(n.name)
            stream.add(n.output[0])
        elif n.op_type in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization") and len(n.output) > 3:
            adds.add(n.name)
            stream.add(n.output[3])
        elif n.op_type in ("Reshape", "Identity", "Squeeze", "Unsqueeze") or (
                n.op_type == "Mul" and any(i in b.initializers for i in n.input)):
            stream.add(n.output[0])
    return adds


def rewrite(b: GraphBuilder, half: str) -> None:
    """Make the built graph `b` compute in `half` ("f16" or "bf16") as the module says, in place."""
    H = HALF[half]
    marked = b.full_precision | residual_stream(b)
    known = _float_outputs(b)
    types: dict[str, int] = {i.name: i.type.tensor_type.elem_type for i in b.inputs}
    types.update({name: t.data_type for name, t in b.initializers.items()})
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}/{'half' if to == H else 'f32'}"
            nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}/Cast"))
            casts[key] = types[out] = out
        return casts[key]

    for node in b.nodes:
        floats = [i for i in node.input if i and types.get(i) in FLOATS]
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if types.get(node.input[0]) == H and to.i == F32 and node.name not in marked:
                to.i = H  # a stored half matrix's widening: it stays half
            types[node.output[0]] = to.i
            nodes.append(node)
            continue
        keep = _keeps_f32(node, half, marked)
        target = H if not keep and any(types[i] == H for i in floats) else F32
        for k, i in enumerate(node.input):
            if i in floats and types[i] != target:
                node.input[k] = cast(i, target)
        for sub in _subgraphs(node) if keep else ():  # a loop or branch reads outer values by name: f32 ones
            refs = {r: cast(r, F32) for r in _outer_refs(sub) if types.get(r) == H}
            for n in walk_nodes(sub):
                n.input[:] = [refs.get(i, i) for i in n.input]
        stats = STAT_OUTPUTS.get(node.op_type, set()) if target == H else set()
        for k, o in enumerate(node.output):
            if not o:
                continue
            t = known.get(o, F32 if floats else 0)
            types[o] = (F32 if k in stats else target) if t in FLOATS else t
        nodes.append(node)

    for out in b.outputs:  # the graph's outputs keep their declared types
        want = out.type.tensor_type.elem_type
        if types.get(out.name) == H and want != H:
            inner = out.name + "/half"
            for n in nodes:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if i == out.name else i for i in n.input]
            nodes.append(helper.make_node("Cast", [inner], [out.name], to=want, name=out.name + "/Cast"))
    b.nodes[:] = nodes
