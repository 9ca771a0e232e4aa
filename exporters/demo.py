"""The demo models as bundles: exported on first use into the cache folder, then reused.

The cache folder is $EDGESEQ_CACHE, else $XDG_CACHE_HOME/edgeseq, else ~/.cache/edgeseq. A bundle's name
holds the demo's name, the quantization, edgeseq's version and the checkpoint's hash, so a new edgeseq or
new weights export afresh. The export goes to a temporary folder beside it and is renamed into place, so
a reader never sees half a bundle and two processes exporting at once both end with a whole one.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from edgeseq import __version__
from edgeseq import demo
from edgeseq.cache import cache_dir  # noqa: F401 (re-exported: the CLI names it)
from edgeseq.errors import EdgeseqError

MANIFEST = "edgeseq.json"




def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for f in demo.FILES:
        with open(os.path.join(folder, f), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def demo_bundle(name: str = demo.DEFAULT, quant: str = "f32", progress: bool = False) -> str:
    """The path of demo model `name` exported as an ONNX bundle (`quant` as for `edgeseq export`)."""
    from edgeseq.exporters.export import export

    src = demo.path(name)
    root = cache_dir()
    out = os.path.join(root, f"demo-{name}-{quant}-{__version__}-{_digest(src)}")
    if os.path.isfile(os.path.join(out, MANIFEST)):
        return out
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=root)
    except OSError as e:
        raise EdgeseqError(f"{root}: cannot create the cache folder for the demo bundle ({e}); set EDGESEQ_CACHE "
                           f"to a writable folder") from None
    try:
        staged = os.path.join(tmp, "bundle")
        export(src, staged, quant=quant, progress=progress)
        try:
            os.rename(staged, out)
        except OSError:
            if not os.path.isfile(os.path.join(out, MANIFEST)):  # not another process's finished bundle
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
