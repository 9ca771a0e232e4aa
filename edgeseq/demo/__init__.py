"""edgeseq's own demo models, shipped as package data: byte-level (vocabulary = the 256 byte values, no
tokenizer file) RWKV-7 (`rwkv7/`, fla-hub `RWKV7ForCausalLM` layout) and Mamba-2 (`mamba2/`, Hugging Face
`Mamba2ForCausalLM`), about 3.5M parameters each, f16 safetensors, trained on the King James Bible by
examples/train_demo.py. `eval.json` beside each gives its held-out loss (nats per byte) on
tests/data/kjv_heldout.txt as the training script measured it.

Only paths live here (the core does not import the exporters): edgeseq.exporters.demo exports a demo
model to a bundle in the cache folder on first use.
"""
from __future__ import annotations

import os

from edgeseq.errors import EdgeseqError

NAMES = ("rwkv7", "mamba2")
DEFAULT = "rwkv7"
FILES = ("config.json", "model.safetensors")


def path(name: str = DEFAULT) -> str:
    """The checkpoint directory of demo model `name` (one of NAMES)."""
    if name not in NAMES:
        raise EdgeseqError(f"no demo model named {name!r}; there are: {', '.join(NAMES)}")
    p = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    missing = [f for f in FILES if not os.path.isfile(os.path.join(p, f))]
    if missing:
        raise EdgeseqError(f"{p}: the demo model's {', '.join(missing)} is missing (was edgeseq installed without "
                           f"its package data? reinstall it)")
    return p
