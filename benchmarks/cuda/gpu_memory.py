"""GPU memory of an edgeseq bundle on ONNX Runtime's CUDA provider, split as issue 21 asks: weights + state
per sequence x sequences + a fixed part.

    python benchmarks/cuda/gpu_memory.py WORK [--models rwkv7-0.1b mamba-130m] [--quants f32 f16]
        [--rows 1 8 64 256] [--prefill 512] [--json OUT]

WORK/<model>/bundle-<quant> as benchmarks/cuda/prep.py writes them. Each (model, quant) runs in a process of
its own (a CUDA context per measurement, nothing left by another), with the CUDA arena growing by what is
asked (`arena_extend_strategy` kSameAsRequested) so that the device's used memory (NVML, via nvidia-smi)
follows the allocations instead of the arena's power-of-two chunks. Readings, in MiB of device memory used
above the reading before the process made its CUDA context:

- `session`: the step graph's session made and one row stepped (CUDA context, cuBLAS/cuDNN workspaces, the
  weights, the arena's first activations);
- `rows B`: the state of B rows bound on the device twice (ping and pong, as serve's BatchRows keeps them),
  logits (B, vocab), one step of B rows;
- `prefill N`: the prefill graph's session added (its own copy of the weights: ONNX Runtime does not share
  initializers between sessions) and one N-token prefill.

The fixed part = session - weights - one row's state and logits; per row = the slope over --rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def used_mib() -> float:
    out = subprocess.check_output(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"])
    return float(out.split()[0])


def measure(bundle: str, rows: list[int], prefill: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    man = json.load(open(os.path.join(bundle, "edgeseq.json")))
    base = used_mib()
    prov = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}),
            "CPUExecutionProvider"]
    so = ort.SessionOptions()
    step = ort.InferenceSession(os.path.join(bundle, man["graphs"]["step"]["file"]), so, providers=prov)
    ins = {i.name: i for i in step.get_inputs()}
    outs = [o.name for o in step.get_outputs()]
    vocab = man["vocab_size"]

    def shape(name, b):
        dims = ins[name].shape
        return [b] + [int(d) if isinstance(d, int) else 1 for d in dims[1:]]

    def run(b, sess):
        io = sess.io_binding()
        keep = []
        for name, i in ins.items():
            if name == "input_ids":
                v = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1), np.int64), "cuda", 0)
            elif name == "position":
                v = ort.OrtValue.ortvalue_from_numpy(np.zeros((b,), np.int64), "cuda", 0)
            else:
                v = ort.OrtValue.ortvalue_from_shape_and_type(shape(name, b), np.float32, "cuda", 0)
            io.bind_ortvalue_input(name, v)
            keep.append(v)
        for o in outs:
            if o == "logits":
                v = ort.OrtValue.ortvalue_from_shape_and_type((b, vocab), np.float32, "cuda", 0)
            else:
                v = ort.OrtValue.ortvalue_from_shape_and_type(shape(o.replace("present", "past_key_values"), b),
                                                              np.float32, "cuda", 0)
            io.bind_ortvalue_output(o, v)
            keep.append(v)
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        return keep

    held = run(1, step)
    res = {"weights_mib": man["weights"]["bytes"] / 2**20, "state_mib_per_row": man["state_bytes_per_sequence"] / 2**20,
           "logits_mib_per_row": vocab * 4 / 2**20, "session_mib": used_mib() - base, "rows": {}}
    del held
    for b in rows:
        held = run(b, step)
        res["rows"][b] = used_mib() - base
        del held
    if prefill and "prefill" in man["graphs"]:
        pre = ort.InferenceSession(os.path.join(bundle, man["graphs"]["prefill"]["file"]), so, providers=prov)
        res["prefill_session_mib"] = used_mib() - base
        feeds = {i.name: (np.random.default_rng(0).integers(0, 100, (1, prefill)).astype(np.int64) if i.name == "input_ids"
                          else np.zeros((1,), np.int64) if i.name == "position"
                          else np.zeros(shape(i.name, 1), np.float32)) for i in pre.get_inputs()}
        pre.run(["logits"], feeds)
        res[f"prefill_{prefill}_mib"] = used_mib() - base
    one = res["state_mib_per_row"] * 2 + res["logits_mib_per_row"]
    res["fixed_mib"] = res["session_mib"] - res["weights_mib"] - one
    if len(rows) > 1:
        (b0, u0), (b1, u1) = (rows[0], res["rows"][rows[0]]), (rows[-1], res["rows"][rows[-1]])
        res["per_row_mib_measured"] = (u1 - u0) / (b1 - b0)
        res["per_row_mib_expected"] = one
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work")
    ap.add_argument("--models", nargs="+", default=["rwkv7-0.1b", "mamba-130m"])
    ap.add_argument("--quants", nargs="+", default=["f32", "f16"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child: measure this bundle, print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.rows, a.prefill)))
        return
    out = {}
    for m in a.models:
        for q in a.quants:
            bundle = os.path.join(a.work, m, f"bundle-{q}")
            cmd = [sys.executable, __file__, a.work, "--one", bundle, "--rows", *map(str, a.rows),
                   "--prefill", str(a.prefill)]
            r = json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])
            out[f"{m}/{q}"] = r
            print(f"{m} {q}: weights {r['weights_mib']:.0f} MiB, fixed {r['fixed_mib']:.0f} MiB, per row "
                  f"{r.get('per_row_mib_measured', 0):.2f} MiB measured ({r.get('per_row_mib_expected', 0):.2f} "
                  f"state x2 + logits); used at rows {r['rows']}; prefill session "
                  f"{r.get('prefill_session_mib', 0):.0f}, after a {a.prefill}-token prefill "
                  f"{r.get(f'prefill_{a.prefill}_mib', 0):.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
