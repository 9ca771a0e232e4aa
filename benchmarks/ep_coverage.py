"""Which nodes of each family's mobile step graph NNAPI, CoreML, QNN and XNNPACK would take, and
which fall back to ONNX Runtime's CPU provider. Derived from the graphs, not written by hand.

    python benchmarks/ep_coverage.py [BUNDLE ...]        # default: tiny models of every family
    python benchmarks/ep_coverage.py --markdown          # the table docs/devices.md shows

The graph analysed is what `export --mobile` puts in step.ort: the portable step graph with batch 1,
optimized by ONNX Runtime at level basic. Partitions are estimated with ONNX Runtime's own mobile
usability checker (onnxruntime.tools.mobile_helpers.usability_checker.check_partitioning: connected
groups of supported nodes with fixed-size inputs), fed a per-provider test of each node:

- NNAPI, CoreML: the operator lists ONNX Runtime ships with that checker (nnapi_supported_ops.md,
  coreml_supported_mlprogram_ops.md), plus the caveats of those lists that this script can check on
  our graphs: NNAPI runs only 2-D Conv (our causal convs are 1-D) and a Gather with non-constant indices
  only when they are int32 (input_ids is int64).
- QNN: the operators registered in onnxruntime/core/providers/qnn/builder/op_builder_factory.cc
  (ONNX Runtime main, read 2026-11; QNN_OPS below). Per-op limits of the QNN builders are not checked.
- Every provider: a node with an input whose shape ONNX shape inference cannot fix (the attention
  families' position-dependent Range/Slice) counts as unsupported, as the checker does.
- XNNPACK: onnxruntime/core/providers/xnnpack/detail/node_support_checker.cc takes only Conv,
  ConvTranspose, QLinearConv, MaxPool, AveragePool, Softmax, Resize, Gemm and MatMul; its MatMul
  needs A of rank <= 2 and a constant 2-D B, its Gemm a constant B, its Conv a 4-D input (2-D conv).

Models are the harness's tiny shapes, one per family (benchmarks/harness/models.py: the test suite's
shapes; random .pth files for RWKV-4, -5 and -7 where tests/test_mobile.py uses the rwkv.cpp fixtures);
the graph's structure, hence the table, does not depend on the width; node counts grow with the layers.
The figures are node counts, not time: a node's cost varies by orders of magnitude (a MatMul against a
Reshape).
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import tempfile

QNN_OPS = set("""Add Asin Atan Mul Abs And Ceil Cos Sign Div Equal Exp Floor Greater GreaterOrEqual LeakyRelu Less
LessOrEqual Log Max Min Neg Not Or Pow PRelu Relu Gelu Elu Round Where ScatterND Sigmoid Sin Sqrt Sub Sum Tanh
Concat QuantizeLinear DequantizeLinear HardSwish HardSigmoid DepthToSpace SpaceToDepth GridSample LpNormalization
ScatterElements Softmax LogSoftmax Cast ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceL2 Conv
ConvTranspose GlobalAveragePool AveragePool MaxPool GlobalMaxPool Reshape Flatten Squeeze Unsqueeze Gemm Gather
GatherElements ArgMax ArgMin Clip Slice Split Resize Upsample TopK Tile InstanceNormalization BatchNormalization
LayerNormalization RMSNormalization LRN Transpose Reciprocal Pad Expand Einsum MatMul Mean LSTM CumSum
RandomUniformLike GatherND Mod ThresholdedRelu STFT Inverse""".split())
XNNPACK_OPS = {"Conv", "ConvTranspose", "QLinearConv", "MaxPool", "AveragePool", "Softmax", "Resize", "Gemm", "MatMul"}
EPS = ("NNAPI", "CoreML", "QNN", "XNNPACK")


class Checker:
    """What usability_checker.check_partitioning asks of a provider: is_op_supported(node), get_caveats()."""

    def __init__(self, ep: str, graph):
        from onnxruntime.tools.mobile_helpers import usability_checker as uc

        self.ep = ep
        self.consts = {i.name for i in graph.initializer}
        self.consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        self.info = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
        here = pathlib.Path(uc.__file__).parent
        self.listed = None
        if ep == "NNAPI":
            self.listed = uc._SupportedOpsChecker(here / "nnapi_supported_ops.md")
        elif ep == "CoreML":
            self.listed = uc._SupportedOpsChecker(here / "coreml_supported_mlprogram_ops.md")
        self.seen: set[str] = set()

    def rank(self, name: str) -> int | None:
        v = self.info.get(name)
        return len(v.type.tensor_type.shape.dim) if v is not None and v.type.tensor_type.HasField("shape") else None

    def elem(self, name: str) -> int | None:
        v = self.info.get(name)
        return v.type.tensor_type.elem_type if v is not None else None

    def is_op_supported(self, node) -> bool:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return False
        if self.ep in ("NNAPI", "CoreML"):
            if not self.listed.is_op_supported(node):
                return False
            if self.ep == "NNAPI":
                if op == "Conv" and self.rank(node.input[0]) != 4:
                    return False  # "Only 2D Conv is supported"
                if op == "Gather" and node.input[1] not in self.consts and self.elem(node.input[1]) != 6:
                    return False  # "Input indices should be constant if not int32 type"
            return True
        if self.ep == "QNN":
            return op in QNN_OPS
        # XNNPACK
        if op not in XNNPACK_OPS:
            return False
        if op == "MatMul":
            return (self.rank(node.input[0]) or 99) <= 2 and node.input[1] in self.consts and self.rank(node.input[1]) == 2
        if op == "Gemm":
            return node.input[1] in self.consts
        if op == "Conv":
            return self.rank(node.input[0]) == 4 and node.input[1] in self.consts
        return True

    def get_caveats(self):
        return self.listed.get_caveats() if self.listed else []


def mobile_graph(portable_bundle: str, work: str):
    """The step graph as step.ort holds it: batch 1, ONNX Runtime level-basic optimization; shapes inferred."""
    import onnx
    import onnxruntime as ort

    from edgeseq.exporters.mobile import fix_batch

    step = fix_batch(onnx.load(os.path.join(portable_bundle, "step.onnx"), load_external_data=False))
    fixed = os.path.join(portable_bundle, "step.batch1.onnx")
    onnx.save(step, fixed)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = os.path.join(work, "optimized.onnx")
    ort.InferenceSession(fixed, so, providers=["CPUExecutionProvider"])
    os.remove(fixed)
    return onnx.shape_inference.infer_shapes(onnx.load(so.optimized_model_filepath, load_external_data=False))


def analyse(model) -> dict:
    from onnxruntime.tools.mobile_helpers.usability_checker import check_partitioning

    out = {"nodes": len(model.graph.node), "ops": collections.Counter(n.op_type for n in model.graph.node)}
    for ep in EPS:
        checker = Checker(ep, model.graph)
        info = check_partitioning(model.graph, checker, require_fixed_input_sizes=True,
                                  max_rank=5 if ep == "CoreML" else 999)
        cpu = collections.Counter(n.op_type for n in model.graph.node if not checker.is_op_supported(n))
        out[ep] = {"supported": info.num_supported_nodes, "partitions": info.num_partitions, "cpu_ops": cpu,
                   "dynamic": info.nodes_unsupported_due_to_dynamic_input}
    return out


def tiny_bundles(work: str) -> dict[str, str]:
    """Portable bundles of the harness's tiny shapes, one per family (harness.models)."""
    from edgeseq.exporters.export import export
    from harness.models import SHAPES, build

    out = {}
    for name, shape in SHAPES.items():
        if shape["tiny"]:
            b = build(name, work)
            out[shape["family"]] = export(b["checkpoint"], os.path.join(work, name, "portable"), portable=True,
                                          tokenizer=b["tokenizer"])
    return out


def fmt_ops(c: collections.Counter) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(c.items(), key=lambda x: (-x[1], x[0]))) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="*", help="portable bundles (default: tiny models of every family)")
    ap.add_argument("--markdown", action="store_true", help="print the docs/devices.md table")
    a = ap.parse_args()
    import json

    with tempfile.TemporaryDirectory() as work:
        if a.bundles:
            bundles = {}
            for b in a.bundles:
                with open(os.path.join(b, "edgeseq.json")) as f:
                    bundles[json.load(f)["family"]] = b
        else:
            bundles = tiny_bundles(work)
        results = {}
        for fam, b in bundles.items():
            d = os.path.join(work, f"opt-{fam}")
            os.makedirs(d, exist_ok=True)
            results[fam] = analyse(mobile_graph(b, d))
    if a.markdown:
        print("| family | nodes | dynamic-shape nodes | " + " | ".join(f"{ep}: nodes (partitions)" for ep in EPS) + " |")
        print("|---|---|---|" + "---|" * len(EPS))
        for fam, r in results.items():
            cells = [f"{r[ep]['supported']} ({r[ep]['partitions']})" for ep in EPS]
            print(f"| {fam} | {r['nodes']} | {r['NNAPI']['dynamic']} | " + " | ".join(cells) + " |")
        print()
        print("What falls back to the CPU provider because of its operator (op type and node count; nodes with a "
              "dynamic-shape input fall back too):")
        print()
        print("| family | " + " | ".join(EPS) + " |")
        print("|---|" + "---|" * len(EPS))
        for fam, r in results.items():
            print(f"| {fam} | " + " | ".join(fmt_ops(r[ep]["cpu_ops"]) for ep in EPS) + " |")
        return
    for fam, r in results.items():
        print(f"{fam}: {r['nodes']} nodes: {fmt_ops(r['ops'])}")
        for ep in EPS:
            e = r[ep]
            print(f"  {ep:<8} {e['supported']:>4}/{r['nodes']} nodes in {e['partitions']} partitions; "
                  f"{e['dynamic']} with a dynamic-shape input; CPU by operator: {fmt_ops(e['cpu_ops'])}")


if __name__ == "__main__":
    main()
