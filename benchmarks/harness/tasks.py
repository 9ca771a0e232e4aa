"""The child tasks (run by harness.child in a fresh interpreter; see protocol.py)."""
from __future__ import annotations

import os
import time


def measure(p: dict) -> dict:
    from harness.measure import measure as run
    from harness.systems import from_spec

    return run(from_spec(p["system"]), p["artifact"], p["built"], p["decode"], p["prefill"], p["threads"],
               p.get("marks", ()), p.get("max_context"))


def export(p: dict) -> dict:
    """An edgeseq artifact of a checkpoint: kind fused | portable (ONNX bundle), mobile, gguf."""
    import edgeseq

    t0 = time.perf_counter()
    kind, ckpt, out, q, tok = p["kind"], p["checkpoint"], p["out"], p["quant"], p.get("tokenizer")
    if kind == "gguf":
        from edgeseq.exporters.gguf_writer import export_gguf

        export_gguf(ckpt, out, quant=q, tokenizer=tok, force=True)
    elif kind == "mobile":
        from edgeseq.exporters.mobile import export_mobile

        export_mobile(ckpt, out, quant=q, tokenizer=tok, force=True)
    else:
        from edgeseq.exporters.export import export as export_onnx

        export_onnx(ckpt, out, quant=q, portable=kind == "portable", tokenizer=tok, force=True)
    size = os.path.getsize(out) if os.path.isfile(out) else sum(
        os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    return {"path": out, "bytes": size, "export_s": time.perf_counter() - t0, "edgeseq_file": edgeseq.__file__}


def llama_quantize(p: dict) -> dict:
    """llama.cpp's own quantizer (what llama-quantize runs) on an f32 GGUF."""
    import ctypes

    import llama_cpp

    from harness.systems import LLAMA_FTYPES

    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[p["quant"]]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(p["src"].encode(), p["out"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({p['quant']}) returned {rc}")
    return {"path": p["out"], "bytes": os.path.getsize(p["out"]), "export_s": time.perf_counter() - t0}


def info(p: dict) -> dict:
    """Versions of what this interpreter would import, and where its edgeseq lives (not imported)."""
    import importlib.metadata as md
    import importlib.util
    import platform
    import sys

    from harness.proc import git

    out = {"python": platform.python_version(), "executable": sys.executable, "versions": {}}
    for dist in ("edgeseq", "onnxruntime", "numpy", "torch", "transformers", "llama_cpp_python", "rwkv", "gguf"):
        try:
            out["versions"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    spec = importlib.util.find_spec("edgeseq")
    if spec and spec.origin:
        out["edgeseq_file"] = spec.origin
        out["edgeseq_git"] = git(os.path.dirname(spec.origin))
    return out


def logits(p: dict) -> dict:
    """The logits of `steps` tokens fed one at a time from a fresh state, then of a prefill of the same
    tokens, saved as an .npz (for `agree`)."""
    import numpy as np

    from harness.systems import from_spec

    system = from_spec(p["system"])
    system.imports()
    r = system.open(p["artifact"], p["built"], p["threads"])
    ids = np.random.default_rng(7).integers(0, min(r.vocab, p["built"]["vocab"]), p["steps"]).tolist()
    r.reset()
    steps = np.stack([np.asarray(r.step(t), np.float32).reshape(-1) for t in ids])
    r.reset()
    pre = np.asarray(r.prefill(ids), np.float32).reshape(-1)
    np.savez(p["out"], steps=steps, prefill=pre)
    return {"path": p["out"]}


def profile(p: dict) -> dict:
    """ONNX Runtime's profiler over decode steps of one bundle graph, opened the way edgeseq's engine opens
    it (intra-op threads, ORT_ENABLE_ALL; prepacking off with low_memory): kernel time per step by
    operator type and by node, and the kernels run per step."""
    import collections
    import json
    import tempfile

    import numpy as np
    import onnxruntime as ort

    bundle, graph, n, threads = p["bundle"], p["graph"], p["steps"], p["threads"]
    with open(os.path.join(bundle, "edgeseq.json")) as f:
        spec = json.load(f)["state"]
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        if p.get("low_memory"):
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_profiling, so.profile_file_prefix = True, os.path.join(d, graph)
        sess = ort.InferenceSession(os.path.join(bundle, f"{graph}.onnx"), so, providers=["CPUExecutionProvider"])
        state = {s["name"]: np.full([1, *s["shape"][1:]], s.get("init", 0.0), np.float32) for s in spec}
        names = ["logits"] + [s["output"] for s in spec]
        ids = np.zeros((1, 1), np.int64)
        tok, steps = 5, 8 + n  # the profiler records from session creation: the 8 warm-up steps count too
        for _ in range(steps):
            ids[0, 0] = tok
            outs = sess.run(names, {"input_ids": ids, **state})
            state = {s["name"]: o for s, o in zip(spec, outs[1:])}
            tok = int(outs[0].reshape(-1).argmax())
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    by_op, by_node, kernels, run = collections.Counter(), collections.Counter(), 0, 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] += e["dur"]
            by_node[f"{e['name'][:-len('_kernel_time')]} ({op})"] += e["dur"]
            kernels += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            run += e["dur"]
    return {"graph": graph, "steps": steps, "kernels_per_step": kernels / steps, "run_us": run / steps,
            "kernel_us": sum(by_op.values()) / steps, "by_op": {k: v / steps for k, v in by_op.most_common()},
            "top_nodes": {k: v / steps for k, v in by_node.most_common(15)}}
