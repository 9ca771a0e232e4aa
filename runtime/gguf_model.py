"""GGUF files in the runtime: `edgeseq.load("x.gguf")` (ONNX Runtime) or `engine="llama.cpp"`.

ONNX Runtime: the GGUF becomes a bundle in a private temporary directory (edgeseq.gguf_bundle: the
weights become the graphs' initializers in weights.bin), loaded as any bundle and removed when the model
is closed or the process exits. It costs one pass over the weights and their F32 size on disk (see
gguf_bundle for what each tensor type becomes). llama.cpp: the file as it is, through llama-cpp-python,
with edgeseq's tokenizer and sampling on top.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from edgeseq.errors import EdgeseqError

ENGINES = ("onnxruntime", "llama.cpp")
_ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp",
            "llama-cpp": "llama.cpp"}


def engine_name(engine: str | None) -> str:
    e = _ALIASES.get((engine or "onnxruntime").lower())
    if e is None:
        raise EdgeseqError(f"engine {engine!r} is unknown (choose {', '.join(ENGINES)})")
    return e


def _scratch() -> str:
    from edgeseq.safe_io import temp_dir

    d = temp_dir(tempfile.gettempdir(), "edgeseq-gguf-")  # and those of killed processes removed
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


class _Text:
    """Tokenizer and special tokens of a GGUF, for the llama.cpp engine (edgeseq does the text side)."""

    def __init__(self, path: str):
        from edgeseq.gguf_bundle import _tokenizer
        from edgeseq.gguf_file import GGUFFile
        from edgeseq.tokenizer import load_tokenizer

        d = _scratch()
        with GGUFFile(path) as g:
            spec, special = _tokenizer(g, d)
        self.tokenizer = load_tokenizer(d, spec)
        self.stop_token_ids = [int(t) for t in special.get("stop_token_ids") or []]
        self.manifest = {"bos_token_id": special.get("bos_token_id"), "tokenizer": spec}


def load_gguf(path: str, device: str = "cpu", threads: int | None = None, engine: str | None = None, **options):
    e = engine_name(engine)
    if not os.path.isfile(path):
        raise EdgeseqError(f"{path}: no such file")
    if e == "llama.cpp":
        if device != "cpu":
            raise EdgeseqError("--engine llama.cpp runs on the CPU build of llama-cpp-python here (device cpu)")
        from edgeseq.runtime.engine_llamacpp import LlamaCppModel

        return LlamaCppModel(path, threads=threads, meta=_Text(path))
    from edgeseq.gguf_bundle import gguf_to_bundle
    from edgeseq.runtime.model import Model

    d = os.path.join(_scratch(), "bundle")
    gguf_to_bundle(path, d, portable=bool(options.pop("portable", False)),
                   accuracy_level=int(options.pop("accuracy_level", 4)),
                   requant8=bool(options.pop("requant8", True)))
    m = Model(d, device=device, threads=threads, **options)
    m.source = path
    return m
