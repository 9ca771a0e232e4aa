"""On a CUDA host: export a random-weight Mamba-2 (130m shape, byte-level vocabulary), check that the
CUDA provider's logits match the CPU's, and time decode and prefill on both.

    python benchmarks/cuda_check.py OUT_DIR          # needs onnxruntime-gpu importable

Works from a source checkout without installing (it maps the package folders itself), because the
GPU host has no package index.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_from_checkout() -> None:
    pkg = tempfile.mkdtemp(prefix="edgeseq-pkg-")
    os.makedirs(os.path.join(pkg, "edgeseq"))
    for name in os.listdir(os.path.join(ROOT, "edgeseq")):
        os.symlink(os.path.join(ROOT, "edgeseq", name), os.path.join(pkg, "edgeseq", name))
    for sub in ("exporters", "runtime", "kernels", "quant"):
        os.symlink(os.path.join(ROOT, sub), os.path.join(pkg, "edgeseq", sub))
    sys.path.insert(0, pkg)
    sys.path.insert(0, os.path.join(ROOT, "examples"))


def main(out: str) -> None:
    _import_from_checkout()
    import numpy as np
    import onnxruntime as ort

    import edgeseq
    import make_demo_model
    from edgeseq.exporters.export import export

    print("onnxruntime", ort.__version__, ort.get_available_providers())
    ckpt, bundle = os.path.join(out, "ckpt"), os.path.join(out, "bundle")
    make_demo_model.main(ckpt, d=768, layers=24, heads=24, head_dim=64, d_state=128)
    export(ckpt, bundle, force=True)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 256, 512).tolist()
    results = {}
    for device in ("cpu", "cuda"):
        m = edgeseq.load(bundle, device=device, threads=None if device == "cuda" else 16)
        s = m.session()
        logits = [s.prefill(prompt[:16])] + [s.step(t) for t in prompt[16:48]]
        results[device] = np.stack(logits)
        s.reset()
        s.prefill(prompt[:8])
        s.reset()
        t0 = time.perf_counter()
        lg = s.prefill(prompt)
        t_pre = time.perf_counter() - t0
        tok = int(np.argmax(lg))
        t0 = time.perf_counter()
        for _ in range(128):
            tok = int(np.argmax(s.step(tok)))
        t_dec = time.perf_counter() - t0
        print(f"{device}: prefill {512 / t_pre:.0f} tok/s, decode {128 / t_dec:.1f} tok/s")
    print("max |cuda - cpu| logits:", float(np.abs(results["cuda"] - results["cpu"]).max()),
          "scale", float(np.abs(results["cpu"]).max()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
