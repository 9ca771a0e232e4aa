"""Chat templates."""
from __future__ import annotations

import os

from edgeseq.errors import EdgeseqError


def describe(template) -> str:
    return "none (plain continuation)" if not template else "template"


def load_template_option(value: str):
    if not os.path.isfile(value):
        raise EdgeseqError(f"--chat-template {value}: no such file")
    return None


def checkpoint_template(path: str):
    return None
