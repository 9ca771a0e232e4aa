"""The demo models as bundles: exported on first use into the cache folder, then reused.

The cache folder is $EDGESEQ_CACHE, else $XDG_CACHE_HOME/edgeseq, else ~/.cache/edgeseq. A bundle's name
holds the demo's name, the quantization, edgeseq's version and the checkpoint's hash, so a new edgeseq or
new weights export afresh. The export goes to a temporary folder beside it and is renamed into place, so
a reader never sees half a bundle and two processes exporting at once both end with a whole one.
"""
from __future__ import annotations

import hashlib
import os

from edgeseq import __version__
from edgeseq import demo
from edgeseq.cache import cache_dir, cached_bundle, code_digest  # noqa: F401 (cache_dir re-exported: the CLI names it)


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for f in demo.FILES:
        with open(os.path.join(folder, f), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def demo_bundle(name: str = demo.DEFAULT, quant: str = "f32", progress: bool = False) -> str:
    """The path of demo model `name` exported as an ONNX bundle (`quant` as for `edgeseq export`), made
    once in the cache folder (edgeseq.cache: staged, renamed into place, cleaned up on signals)."""
    from edgeseq.exporters.export import export

    src = demo.path(name)
    digest = _digest(src)
    out, _ = cached_bundle("demo", src, [name, quant, digest],
                           lambda staged: export(src, staged, quant=quant, progress=progress),
                           name=f"demo-{name}-{quant}-{__version__}-{digest}-{code_digest()}")
    return out
