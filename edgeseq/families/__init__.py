"""The family registry: one source of truth from architecture names to family classes.

Each family module registers itself with `@register(...)`; every module of this package is a
family except the shared `base` and `common`, so adding an architecture means adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from edgeseq.errors import UnsupportedError

_SHARED = ("base", "common", "rwkv_common")
_BY_ARCH: dict[str, type] = {}
_BY_NAME: dict[str, type] = {}
_loaded = False


def register(*architectures: str):
    def deco(cls):
        cls.architectures = tuple(architectures)
        _BY_NAME[cls.name] = cls
        for a in architectures:
            _BY_ARCH[a] = cls
        return cls

    return deco


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for m in pkgutil.iter_modules(__path__):
            if m.name not in _SHARED:
                importlib.import_module(f"{__name__}.{m.name}")
        _loaded = True


def all_families() -> list[type]:
    _load_all()
    return [_BY_NAME[n] for n in sorted(_BY_NAME)]


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(_BY_ARCH)


def family_for_architecture(arch: str, where: str = "config.json") -> type:
    _load_all()
    if arch not in _BY_ARCH:
        raise UnsupportedError(f"{where}: architecture {arch!r} is not supported; supported: "
                               f"{', '.join(supported_architectures())}")
    return _BY_ARCH[arch]


def family_by_name(name: str, where: str = "edgeseq.json") -> type:
    _load_all()
    if name not in _BY_NAME:
        raise UnsupportedError(f"{where}: family {name!r} is unknown to edgeseq; known: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]
