"""The cache folder: $EDGESEQ_CACHE, else $XDG_CACHE_HOME/edgeseq, else ~/.cache/edgeseq."""
from __future__ import annotations

import os


def cache_dir() -> str:
    root = os.environ.get("EDGESEQ_CACHE")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "edgeseq")
