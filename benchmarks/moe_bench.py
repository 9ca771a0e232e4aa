"""One mixture-of-experts layer (edgeseq.mixers.moe) at released shapes: the dense form (every expert on every
token, weighed by 0 or w: MatMul / MatMulNBits) against ONNX Runtime's MoE / QMoE contrib ops (the fused
flavour's path where exact), f32 / int8 / int4, a decode step (1 token) and a 256-token prefill.

    python benchmarks/moe_bench.py [--shape lfm2-8b-a1b qwen3.5-35b-a3b] [--quant f32 int8 int4] [--rounds 5]

Random weights (speed does not depend on their values; the int8/int4 recipe's fit is cut to one candidate
range per block, which changes the bytes, not the work). The two graphs of a (shape, quant) share one
weights file and run interleaved, each round in alternating order, on `--threads` intra-op threads;
medians over rounds. Session start (where ONNX Runtime folds the experts' layout nodes) is timed once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from edgeseq.graph import GraphBuilder, WeightStore
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.quant import onnx_quant as oq

SHAPES = {
    # LiquidAI/LFM2-8B-A1B: sigmoid routing with a choice bias, renormalised top 4 of 32
    "lfm2-8b-a1b": dict(d_model=2048, n_experts=32, top_k=4, expert_dim=1792, score="sigmoid", expert_bias=True),
    # the same without the choice bias: the f32 MoE op's case (sigmoid renormalised = softmax of log sigmoid)
    "lfm2-8b-a1b-nobias": dict(d_model=2048, n_experts=32, top_k=4, expert_dim=1792, score="sigmoid",
                               expert_bias=False),
    # Qwen/Qwen3.5-35B-A3B (transformers' Qwen3_5MoeTextConfig defaults): softmax, renormalised top 8 of 256;
    # its shared expert is a plain MLP beside the block (not timed here)
    "qwen3.5-35b-a3b": dict(d_model=2048, n_experts=256, top_k=8, expert_dim=512, score="softmax",
                            expert_bias=False),
}


class RouterF32:
    def quant_policy(self, name, shape):
        return "f32" if name.endswith(".router") else None

    def quant_block(self, bits, block):
        return block


def graph(moe: MoeFeedForward, table, fused: bool, name: str) -> GraphBuilder:
    b = GraphBuilder(table, "weights.bin", name=name)
    h = b.input("h", TensorProto.FLOAT, ["batch", "sequence", moe.d_model])
    b.output(moe(b, h, "m.", fused=fused), "y", TensorProto.FLOAT, ["batch", "sequence", moe.d_model])
    return b


def build(moe: MoeFeedForward, quant: str, folder: Path, block: int) -> dict[str, Path]:
    """Write the weights and the two graphs (dense, contrib) into `folder`; returns their paths."""
    g = np.random.default_rng(0)
    d, E, f = moe.d_model, moe.n_experts, moe.expert_dim
    st = WeightStore(str(folder / "weights.bin"))
    st.add("m.router", (g.standard_normal((d, E)) / d ** 0.5).astype(np.float32))
    for n, shape in (("gate", (d, E * f)), ("up", (d, E * f)), ("down", (E * f, d))):
        w = np.empty(shape, np.float32)
        for a in range(0, shape[0], 256):  # in slices: bounded temporary memory
            w[a:a + 256] = g.standard_normal((min(256, shape[0] - a), shape[1]), dtype=np.float32) / shape[0] ** 0.5
        st.add(f"m.experts_{n}", w)
        del w
    if moe.expert_bias:
        st.add("m.expert_bias", (g.standard_normal(E) * 0.1).astype(np.float32))
    st.sha256 = st.close()
    table, specs = st.table, {}
    if quant != "f32":
        specs = oq.plan(st.table, oq.collect_usage([graph(moe, st.table, True, "plan")]), quant, block, RouterF32())
        new = oq.requantize_store(st.path, st.table, specs)
        table = oq.build_table(new, st.table, specs)
    out = {}
    for name, fused in (("dense", False), ("contrib", True)):
        b = graph(moe, table, fused, name)
        oq.rewrite(b, specs)
        out[name] = folder / f"{name}.onnx"
        onnx.save(b.to_model(), str(out[name]))
        out[name + "_ops"] = sorted({n.op_type for n in b.nodes} & {"MoE", "QMoE", "MatMulNBits", "MatMul"})
    return out


def session(path: Path, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t = time.perf_counter()
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s, time.perf_counter() - t


def timed(s, x, reps: int) -> float:
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, {"h": x})
        best.append(time.perf_counter() - t)
    return statistics.median(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--quant", nargs="+", default=["f32", "int8", "int4"], choices=["f32", "int8", "int4"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    oq._SHRINK = (1.0,)  # one candidate range per block: same bytes' layout and work, 8x quicker to write
    rows = []
    for shape in a.shape:
        moe = MoeFeedForward(**SHAPES[shape])
        for quant in a.quant:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                paths = build(moe, quant, Path(tmp), a.block)
                print(f"{shape} {quant}: built in {time.perf_counter() - t:.0f} s; dense {paths['dense_ops']}, "
                      f"contrib {paths['contrib_ops']}", flush=True)
                sess = {k: session(paths[k], a.threads) for k in ("dense", "contrib")}
                g = np.random.default_rng(1)
                x1 = g.standard_normal((1, 1, moe.d_model), dtype=np.float32)
                xp = g.standard_normal((1, a.prefill, moe.d_model), dtype=np.float32)
                y = {k: s.run(None, {"h": xp})[0] for k, (s, _) in sess.items()}  # warm up, and agree
                diff = float(np.abs(y["dense"] - y["contrib"]).max() / np.abs(y["dense"]).max())
                res = {k: {"step": [], "prefill": []} for k in sess}
                for r in range(a.rounds):
                    for k in (("dense", "contrib") if r % 2 == 0 else ("contrib", "dense")):
                        s = sess[k][0]
                        res[k]["step"].append(timed(s, x1, 5))
                        res[k]["prefill"].append(timed(s, xp, 1))
                for k in sess:
                    row = dict(shape=shape, quant=quant, path=k, ops=paths[k + "_ops"], start_s=sess[k][1],
                               step_ms=1e3 * statistics.median(res[k]["step"]),
                               prefill_ms=1e3 * statistics.median(res[k]["prefill"]), rel_diff=diff)
                    rows.append(row)
                    print(f"  {k:8s} {'/'.join(row['ops']):12s} start {row['start_s']:6.1f} s  "
                          f"step {row['step_ms']:8.2f} ms  prefill{a.prefill} {row['prefill_ms']:9.1f} ms  "
                          f"(max |dense-contrib| / max|dense| {diff:.1e})", flush=True)
                del sess
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
