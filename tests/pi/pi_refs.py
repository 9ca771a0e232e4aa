"""The torch-backed helpers of tests/conftest.py, recorded on x86 and replayed in the aarch64 guest.

The guest has no torch, and tests/conftest.py builds its tiny random checkpoints and the float64 reference
logits with torch and transformers. So `make pi-check` runs the chosen test files twice:

- on x86 with the real conftest and pi_record.py as a plugin, which stores every checkpoint `_build`
  writes (make_mamba, make_mamba2, make_falcon_mamba), every `write_state_spaces` folder, and every
  `hf_logits64` / `hf_cache64` result, keyed by what determines them;
- in the guest with pi_conftest.py in conftest.py's place: the real conftest's code, its torch-backed
  helpers replaced by look-ups of those records. The test files and their assertions are unchanged, and the
  references are transformers' own float64 numbers, as on x86.

A test that calls torch itself (a checkpoint it edits, a builder of another test file) cannot be replayed:
pi-check.sh deselects those by name, saying why.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def store() -> Path:
    return Path(os.environ["PI_REFS"])


def dir_digest(path) -> str:
    """The files of a checkpoint folder (or one file), names and bytes."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:24]


def build_key(cls_name: str, defaults: dict, seed: int, tokenizer_vocab, cfg: dict) -> str:
    text = json.dumps([cls_name, {**defaults, **cfg}, seed, tokenizer_vocab], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def ids_key(ids) -> str:
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]
