"""Checkpoints run directly (`edgeseq run ./hf-folder`, a .pth): exported once into the cache folder, as
mlx-lm does, then reused; keyed by each file's name, size and mtime (edgeseq.cache)."""
from __future__ import annotations

import os
import sys

from edgeseq.cache import cached_bundle, folder_identity

CHECKPOINT_FILES = (".pth", ".pt", ".bin", ".safetensors")


def needs_export(path: str) -> bool:
    """A checkpoint rather than what the runtime loads (a bundle folder or a .gguf file)."""
    if os.path.isdir(path):
        return not os.path.isfile(os.path.join(path, "edgeseq.json"))
    if path.lower().endswith(".gguf"):
        return False
    from edgeseq.gguf_file import is_gguf

    return path.lower().endswith(CHECKPOINT_FILES) and not is_gguf(path)


def cached_checkpoint(path: str, quant: str = "f32") -> str:
    """The bundle of checkpoint `path` in the cache, exported now if it is not there."""
    from edgeseq.chat_template import checkpoint_template
    from edgeseq.exporters.export import export

    def build(out: str) -> None:
        print(f"exporting {path} into the cache (once; `edgeseq cache list` shows it)", file=sys.stderr)
        template = checkpoint_template(path)
        export(path, out, quant=quant, progress=sys.stderr.isatty(),
               **({"chat_template": template} if template else {}))

    out, _ = cached_bundle("ckpt", path, [folder_identity(path), quant], build)
    return out
