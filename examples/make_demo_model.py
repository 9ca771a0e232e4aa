"""Write a small random-weight Mamba-2 checkpoint (HF layout, safetensors) for `make demo`.

Its weights are random, so the text it writes is noise: the demo shows the pipeline (export, the
bundle, streamed generation, the fixed-size state), not a trained model. numpy + safetensors only.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file


def main(out: str, d: int = 128, layers: int = 4, heads: int = 4, head_dim: int = 64, d_state: int = 32,
         groups: int = 1, k: int = 4, vocab: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    di = heads * head_dim
    conv_dim = di + 2 * groups * d_state

    def mat(rows, cols):  # (out, in) like torch.nn.Linear, scaled so activations stay O(1)
        return (rng.standard_normal((rows, cols)) * 1.5 / np.sqrt(cols)).astype(np.float32)

    t = {"backbone.embeddings.weight": (rng.standard_normal((vocab, d)) * 0.5).astype(np.float32),
         "backbone.norm_f.weight": np.ones(d, np.float32)}
    for i in range(layers):
        p = f"backbone.layers.{i}."
        t[p + "norm.weight"] = np.ones(d, np.float32)
        t[p + "mixer.in_proj.weight"] = mat(di + conv_dim + heads, d)
        t[p + "mixer.conv1d.weight"] = (rng.standard_normal((conv_dim, 1, k)) * 0.5).astype(np.float32)
        t[p + "mixer.conv1d.bias"] = np.zeros(conv_dim, np.float32)
        t[p + "mixer.dt_bias"] = np.log(np.expm1(rng.uniform(1e-3, 1e-1, heads))).astype(np.float32)
        t[p + "mixer.A_log"] = np.log(np.arange(1, heads + 1, dtype=np.float32))
        t[p + "mixer.D"] = np.ones(heads, np.float32)
        t[p + "mixer.norm.weight"] = np.ones(di, np.float32)
        t[p + "mixer.out_proj.weight"] = mat(d, di)
    os.makedirs(out, exist_ok=True)
    save_file(t, os.path.join(out, "model.safetensors"))
    cfg = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": vocab, "hidden_size": d,
           "num_hidden_layers": layers, "num_heads": heads, "head_dim": head_dim, "state_size": d_state,
           "n_groups": groups, "conv_kernel": k, "expand": di // d, "layer_norm_epsilon": 1e-5,
           "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"wrote a random-weight Mamba-2 ({layers} layers, d={d}, byte-level vocabulary) to {out}; "
          f"its text is noise")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-model/checkpoint")
