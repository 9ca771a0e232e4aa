"""A probe, not a flavour: what int8 activations per row x int8 weights per column (W8A8, through ONNX
Runtime's MatMulInteger and its integer GEMM) would buy over edgeseq's int8 bundles (MatMulNBits: blocks of 32,
int8 activations per block), for decode, batched decode and prefill, and what it would cost in accuracy.

    python benchmarks/kernels/w8a8.py F32_BUNDLE OUT [--int8 INT8_BUNDLE] [--threads 2] [--min-dim 100]
        [--graphs prefill.onnx prefill_all.onnx] [--eval TEXT --eval-bytes 40000]

OUT: a copy of F32_BUNDLE whose graphs (--graphs) have every MatMul / Gemm(transB) on a 2-D weight with both
sides >= --min-dim rewritten (edgeseq's int8 recipe keeps RWKV's LoRA matrices in float; --min-dim 100 does
too): the activations quantized per row (u8, zero point 128, scale max|x| / 127; one chain per distinct
input, shared by the matrices that read it), the weight per output column (s8, symmetric), MatMulInteger,
then both scales. Timing: plain ONNX Runtime sessions of prefill.onnx (F32, --int8 and OUT), interleaved,
3 rounds, medians: one row one token (decode), 16 rows one token (batched decode), one row 256 tokens.
--eval: nats per byte of TEXT's first --eval-bytes bytes through prefill_all.onnx in 256-token chunks
(byte-level models: the demo bundles). The rewritten graphs change the bundle's files, so OUT is for these
measurements only (edgeseq.load would refuse its hashes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def rewrite(src: str, dst: str, graph: str, min_dim: int) -> int:
    m = onnx.load(os.path.join(src, graph))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    nodes, quantized, extra = [], {}, []

    def const(name, arr):
        extra.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    for name, v in (("w8.ax", np.array([-1], np.int64)), ("w8.inv", np.float32(1 / 127)),
                    ("w8.eps", np.float32(1e-30)), ("w8.zp", np.uint8(128)), ("w8.128", np.float32(128)),
                    ("w8.lo", np.float32(0)), ("w8.hi", np.float32(255))):
        const(name, v)
    count = 0
    for node in g.node:
        w = None
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            w = numpy_helper.to_array(inits[node.input[1]])
        elif (node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits
              and any(a.name == "transB" and a.i == 1 for a in node.attribute)):
            w = numpy_helper.to_array(inits[node.input[1]]).T
        if w is None or min(w.shape) < min_dim:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantized:
            p = quantized[x] = f"w8.{len(quantized)}"
            mk = helper.make_node
            nodes += [mk("Abs", [x], [p + ".a"]), mk("ReduceMax", [p + ".a", "w8.ax"], [p + ".m"], keepdims=1),
                      mk("Max", [p + ".m", "w8.eps"], [p + ".m2"]), mk("Mul", [p + ".m2", "w8.inv"], [p + ".s"]),
                      mk("Div", [x, p + ".s"], [p + ".d"]), mk("Round", [p + ".d"], [p + ".r"]),
                      mk("Add", [p + ".r", "w8.128"], [p + ".o"]), mk("Clip", [p + ".o", "w8.lo", "w8.hi"], [p + ".c"]),
                      mk("Cast", [p + ".c"], [p + ".q"], to=TensorProto.UINT8)]
        p = quantized[x]
        scale = np.maximum(np.abs(w).max(axis=0), 1e-30) / 127
        wn, o = node.input[1], node.output[0]
        const(wn + ".s8", np.clip(np.rint(w / scale), -127, 127).astype(np.int8))
        const(wn + ".cs", scale.astype(np.float32))
        nodes += [helper.make_node("MatMulInteger", [p + ".q", wn + ".s8", "w8.zp"], [o + ".i"]),
                  helper.make_node("Cast", [o + ".i"], [o + ".f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [o + ".f", p + ".s"], [o + ".g"]),
                  helper.make_node("Mul", [o + ".g", wn + ".cs"], [o])]
        count += 1
    used = {i for n in nodes for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + extra)
    del g.node[:]
    g.node.extend(nodes)
    opset = next(o for o in m.opset_import if o.domain in ("", "ai.onnx"))
    opset.version = max(opset.version, 18)  # ReduceMax with axes as an input
    os.remove(os.path.join(dst, graph))
    onnx.save(m, os.path.join(dst, graph), save_as_external_data=True, location=graph + ".w8a8.data",
              size_threshold=1024)
    return count


def session(bundle: str, graph: str, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(os.path.join(bundle, graph), so, providers=["CPUExecutionProvider"])


def feeds(sess, batch: int, tokens: int, init: dict) -> dict:
    f = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            f[i.name] = np.random.default_rng(0).integers(0, 256, (batch, tokens)).astype(np.int64)
        elif i.name == "position":
            f[i.name] = np.zeros((batch,), np.int64)
        else:
            f[i.name] = np.repeat(init[i.name], batch, axis=0)
    return f


def timing(bundles: dict, threads: int, init: dict) -> dict:
    cases = {"decode 1 row (ms)": (1, 1, 20), "decode 16 rows (ms)": (16, 1, 6), "prefill 256 (ms)": (1, 256, 1)}
    sess = {k: session(b, "prefill.onnx", threads) for k, b in bundles.items()}
    res = {k: {c: [] for c in cases} for k in bundles}
    for _ in range(3):
        for k, s in sess.items():
            for c, (batch, tokens, reps) in cases.items():
                f = feeds(s, batch, tokens, init)
                s.run(["logits"], f)
                t = time.perf_counter()
                for _ in range(reps):
                    s.run(["logits"], f)
                res[k][c].append((time.perf_counter() - t) / reps * 1000)
    return {k: {c: round(float(np.median(v)), 2) for c, v in r.items()} for k, r in res.items()}


def nats_per_byte(bundle: str, text: str, nbytes: int, threads: int, init: dict) -> float:
    ids = list(open(text, "rb").read()[:nbytes])
    s = session(bundle, "prefill_all.onnx", threads)
    outs = [o.name for o in s.get_outputs()]
    state = {i.name: init[i.name] for i in s.get_inputs() if i.name not in ("input_ids", "position")}
    nll, n = 0.0, 0
    for a in range(0, len(ids) - 1, 256):
        tgt = np.array(ids[a + 1:a + 257])
        res = s.run(outs, {"input_ids": np.array([ids[a:a + len(tgt)]], np.int64), **state})
        logits = res[outs.index("logits")][0].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nll -= float((logits[np.arange(len(tgt)), tgt] - lse).sum())
        n += len(tgt)
        state = {k: res[outs.index(k.replace("past_key_values", "present"))] for k in state}
    return nll / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("f32")
    ap.add_argument("out")
    ap.add_argument("--int8", help="the int8 bundle of the same checkpoint (MatMulNBits), timed and scored beside")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-dim", type=int, default=100)
    ap.add_argument("--graphs", nargs="+", default=["prefill.onnx", "prefill_all.onnx"])
    ap.add_argument("--eval", help="a text file to score (byte-level models)")
    ap.add_argument("--eval-bytes", type=int, default=40000)
    a = ap.parse_args()
    import edgeseq

    init = edgeseq.load(a.f32).initial_state()
    shutil.copytree(a.f32, a.out, dirs_exist_ok=True)
    for gr in a.graphs:
        print(f"{gr}: {rewrite(a.f32, a.out, gr, a.min_dim)} matrices as W8A8")
    bundles = {"f32": a.f32, **({"int8": a.int8} if a.int8 else {}), "w8a8": a.out}
    for k, r in timing(bundles, a.threads, init).items():
        print(f"{k:5s} {r}")
    if a.eval:
        for k, b in bundles.items():
            print(f"{k:5s} nats/byte {nats_per_byte(b, a.eval, a.eval_bytes, a.threads, init):.5f}")


if __name__ == "__main__":
    main()
