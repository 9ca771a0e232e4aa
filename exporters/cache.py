"""Checkpoints run directly (`edgeseq run ./hf-folder`): exported once into the cache folder, then reused."""
from __future__ import annotations

import os

from edgeseq.errors import EdgeseqError


def needs_export(path: str) -> bool:
    """A checkpoint rather than something the runtime loads (a bundle folder or a .gguf file)."""
    return False


def cached_checkpoint(path: str) -> str:
    raise EdgeseqError(f"{path}: not an edgeseq bundle")
