"""edgeseq: recurrent language models on the edge, with a fixed-size state.

    model = edgeseq.load("bundle_dir")
    s = model.session()
    for piece in s.generate("Hello", max_tokens=32):
        print(piece, end="")
"""
from __future__ import annotations

__version__ = "0.1.0"

from edgeseq.errors import EdgeseqError, UnsupportedError  # noqa: E402

__all__ = ["load", "EdgeseqError", "UnsupportedError", "__version__"]


def load(path, device: str = "cpu", threads: int | None = None, **options):
    """Load a bundle directory (or, later, a .gguf file) for inference. Imports the runtime lazily."""
    from edgeseq.runtime.model import load as _load

    return _load(path, device=device, threads=threads, **options)
