"""Do edgeseq, llama.cpp and HF compute the same model? (So the benchmark compares like with like.)

    python benchmarks/check_agreement.py /tmp/edgeseq-bench/mamba-130m

Feeds 20 tokens one at a time to each system and prints the largest logit difference against HF's
full (uncached) forward in fp32, next to HF's own cached stepping for scale.
"""
from __future__ import annotations

import os
import sys

import numpy as np


def main(root: str) -> None:
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    import edgeseq

    ids = list(range(1000, 1020))
    torch.set_num_threads(2)
    m = AutoModelForCausalLM.from_pretrained(os.path.join(root, "hf"), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = m(torch.tensor([ids]), use_cache=False).logits[0].numpy()
        out = m(torch.tensor([ids[:1]]), use_cache=True, logits_to_keep=1)
        steps = [out.logits[0, -1].numpy()]
        for t in ids[1:]:
            out = m(torch.tensor([[t]]), cache_params=out.cache_params, use_cache=True, logits_to_keep=1)
            steps.append(out.logits[0, -1].numpy())
    print(f"{os.path.basename(root)}: |logits| max {np.abs(ref).max():.2f}")
    print(f"  HF cached steps vs HF full:      {np.abs(np.stack(steps) - ref).max():.2e}")
    for flavour in ("fused", "portable"):
        s = edgeseq.load(os.path.join(root, f"bundle-{flavour}"), threads=2).session()
        got = np.stack([s.step(t) for t in ids])
        print(f"  edgeseq {flavour + ' steps vs HF:':23s}{np.abs(got - ref).max():.2e}")
    llm = llama_cpp.Llama(os.path.join(root, "model-f32.gguf"), n_ctx=64, n_threads=2, n_threads_batch=2,
                          verbose=False)
    nv = llm.n_vocab()
    got = []
    for t in ids:
        llm.eval([t])
        got.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(nv,)).copy())
    print(f"  llama.cpp steps vs HF:           {np.abs(np.stack(got)[:, :ref.shape[1]] - ref).max():.2e}")


if __name__ == "__main__":
    for r in sys.argv[1:] or ["/tmp/edgeseq-bench/mamba-130m", "/tmp/edgeseq-bench/mamba2-130m"]:
        main(r)
