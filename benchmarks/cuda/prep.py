"""Device-host preparation for the CUDA comparison (issue 21): the random checkpoints at real shapes
(harness.models), edgeseq's f32 GGUF of each (llama.cpp quantizes it to F16/Q8_0/Q4_0 itself) and the
ONNX bundles cuda_bench.py runs (f32, f16, int8, int4), one process per model.

    python benchmarks/cuda/prep.py WORK [--models ...] [--quants f32 f16 int8 int4] [--no-gguf] [--accuracy-level N]

WORK/<model>/ckpt (the checkpoint), WORK/<model>/model-f32.gguf, WORK/<model>/bundle-<quant>;
WORK/<model>/prep.json says what was written and how long it took. Run with edgeseq importable (the
checkout laid out as the package: harness.checkout.package_tree) and benchmarks/ on sys.path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def prep(name: str, work: str, quants: list[str], gguf: bool, accuracy_level: int | None = None) -> dict:
    from edgeseq.exporters.export import export
    from edgeseq.exporters.gguf_writer import export_gguf
    from harness.models import build

    t0 = time.perf_counter()
    b = build(name, work)
    out = {"model": name, "built": b, "build_s": time.perf_counter() - t0}
    if gguf:
        t = time.perf_counter()
        path = os.path.join(work, name, "model-f32.gguf")
        out["gguf"] = export_gguf(b["checkpoint"], path, quant="f32", tokenizer=b["tokenizer"], force=True)
        out["gguf_path"], out["gguf_s"] = path, time.perf_counter() - t
    for q in quants:
        t = time.perf_counter()
        al = accuracy_level if q in ("int8", "int4") else None
        d = os.path.join(work, name, f"bundle-{q}" + ("" if al is None else f"-al{al}"))
        export(b["checkpoint"], d, quant=q, tokenizer=b["tokenizer"], force=True,
               **({} if al is None else {"accuracy_level": al}))
        out[f"bundle_{q}_s"] = time.perf_counter() - t
        out[f"bundle_{q}_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    with open(os.path.join(work, name, "prep.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m", "rwkv7-0.1b"])
    ap.add_argument("--quants", nargs="+", default=["f32", "f16", "int8", "int4"])
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--accuracy-level", type=int, default=None,
                    help="int8/int4 bundles: MatMulNBits accuracy_level (0: f32 activations, as on CUDA); "
                         "written as bundle-<quant>-al<N>")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    with ProcessPoolExecutor(len(a.models)) as ex:
        futs = [ex.submit(prep, m, a.work, a.quants, not a.no_gguf, a.accuracy_level) for m in a.models]
        for f in futs:
            r = f.result()
            print(r["model"], {k: round(v, 1) for k, v in r.items() if k.endswith("_s")}, flush=True)


if __name__ == "__main__":
    main()
