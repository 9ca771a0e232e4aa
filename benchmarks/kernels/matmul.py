"""The quantized matrix product on its own: edgeseq's kernel (ONNX Runtime's MatMulNBits, as an int8/int4
bundle runs it) against llama.cpp's (ggml's mul_mat on Q8_0/Q4_0), on the same shapes, threads and cores.

    python benchmarks/kernels/matmul.py --llama-lib DIR --llama-include DIR [--shapes 768x3072 1536x768]
        [--m 1 16 256] [--nmat 24] [--threads 1 2] [--rounds 3]

--llama-lib: the folder of a llama.cpp build's libggml*.so (e.g. a native cmake build's bin/);
--llama-include: its ggml/include. ggml_matmul.c is compiled against them once (cc -O2).

Each measurement multiplies --nmat distinct random K x N matrices by the same M x K activations and sums the
products (an Add chain in both), so that with nmat 24 the weights stream from memory as a model's layers
do (one matrix alone stays in the cache); time per matrix product = median over runs / nmat. Rounds
interleave the two engines; the table gives medians over rounds. ONNX Runtime runs MatMulNBits as edgeseq's
int8/int4 bundles do (block 32, accuracy level 4, zero points); `--variants` adds other block sizes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))


def build_ggml(lib: str, include: str) -> str:
    exe = os.path.join(tempfile.gettempdir(), "edgeseq-ggml-matmul")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(HERE, "ggml_matmul.c"), f"-I{include}", f"-L{lib}",
                    "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{lib}"], check=True)
    return exe


def ggml_ms(exe: str, typ: str, k: int, n: int, m: int, nmat: int, threads: int, reps: int) -> float:
    out = subprocess.run([exe, typ, str(k), str(n), str(m), str(nmat), str(threads), str(reps)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def ort_session(bits: int, block: int, k: int, n: int, nmat: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quant.onnx_quant import pack, quantize_blocks

    rng = np.random.default_rng(1)
    nodes, inits, y = [], [], None
    for i in range(nmat):
        q, s, z = quantize_blocks((rng.random((n, k), np.float32) - 0.5) * 0.1, bits, block)
        inits += [numpy_helper.from_array(pack(q, bits), f"q{i}"), numpy_helper.from_array(s, f"s{i}"),
                  numpy_helper.from_array(np.ascontiguousarray(z if bits == 8 else pack(z, 4)), f"z{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}", f"z{i}"], [f"p{i}"],
                                      domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                      accuracy_level=4))
        if y is None:
            y = f"p{i}"
        else:
            nodes.append(helper.make_node("Add", [y, f"p{i}"], [f"a{i}"]))
            y = f"a{i}"
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_ms(sess, k: int, m: int, nmat: int, reps: int) -> float:
    x = (np.random.default_rng(2).random((m, k), np.float32) - 0.5)
    for _ in range(3):
        sess.run(None, {"x": x})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3 / nmat


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-lib", required=True)
    ap.add_argument("--llama-include", required=True)
    ap.add_argument("--shapes", nargs="+", default=["768x3072", "1536x768"], help="KxN (in x out)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--nmat", type=int, default=24)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quant", nargs="+", default=["int8", "int4"])
    a = ap.parse_args(argv)
    exe = build_ggml(a.llama_lib, a.llama_include)
    print("| K x N | quant | threads | M | MatMulNBits ms | ggml ms | ggml / MatMulNBits (speed ratio, edgeseq) |")
    print("|---|---|---|---|---|---|---|")
    for shape in a.shapes:
        k, n = map(int, shape.split("x"))
        for quant in a.quant:
            bits, gtype = {"int8": (8, "q8_0"), "int4": (4, "q4_0")}[quant]
            for th in a.threads:
                sess = ort_session(bits, 32, k, n, a.nmat, th)
                for m in a.m:
                    reps = max(5, min(50, 4000 // max(1, m * a.nmat // 8)))
                    o, g = [], []
                    for _ in range(a.rounds):
                        o.append(ort_ms(sess, k, m, a.nmat, reps))
                        g.append(ggml_ms(exe, gtype, k, n, m, a.nmat, th, reps))
                    om, gm = statistics.median(o), statistics.median(g)
                    print(f"| {k} x {n} | {quant} / {gtype.upper()} | {th} | {m} | {om:.3f} | {gm:.3f} | "
                          f"{gm / om:.2f} |", flush=True)


if __name__ == "__main__":
    main()
