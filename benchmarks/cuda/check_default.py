"""On the GPU host: edgeseq.load(bundle, device="cuda") with no options decodes under CUDA graphs for a
family without a position input, and gives the CPU provider's greedy tokens; cuda_graph=False turns the
graphs off. A tiny random Mamba from transformers, exported here. Usage: python3 check_default.py WORKDIR"""
import os
import sys

import numpy as np


def main(work: str) -> None:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    import edgeseq
    from edgeseq.exporters.export import export

    torch.manual_seed(0)
    ckpt, bundle = os.path.join(work, "ckpt"), os.path.join(work, "bundle")
    MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=3, state_size=8,
                                 expand=2, conv_kernel=4)).save_pretrained(ckpt)
    export(ckpt, bundle)
    prompt = list(range(10, 26))
    out = {}
    for name, kw in (("cpu", {}), ("cuda-default", {"device": "cuda"}),
                     ("cuda-no-graphs", {"device": "cuda", "cuda_graph": False})):
        m = edgeseq.load(bundle, **kw)
        s = m.session()
        logits = [np.asarray(s.prefill(prompt), np.float32)]
        toks = []
        for _ in range(24):
            t = int(np.argmax(logits[-1]))
            toks.append(t)
            logits.append(np.asarray(s.step(t), np.float32).copy())
        out[name] = (toks, np.stack(logits))
        print(name, "cuda_graph:", getattr(m.engine, "cuda_graph", None), "decode graph:", m.engine.decode_graph,
              "tokens:", toks[:12])
    for name in ("cuda-default", "cuda-no-graphs"):
        same = out[name][0] == out["cpu"][0]
        d = float(np.abs(out[name][1] - out["cpu"][1]).max())
        print(f"{name}: tokens equal to the CPU's: {same}; max |logit difference| {d:.2e}")
    assert edgeseq.load(bundle, device="cuda").engine.cuda_graph is True
    assert edgeseq.load(bundle, device="cuda", cuda_graph=False).engine.cuda_graph is False
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
