"""tests/conftest.py for the aarch64 guest, which has no torch (pi-check.sh puts this file in conftest.py's
place in the guest's copy of the repository, the real one beside it as conftest_x86.py).

The real conftest runs as it is, with stand-in `torch` and `transformers` modules present only while it is
imported (so a test's own `pytest.importorskip("torch")` still skips); then its torch-backed helpers are
replaced by look-ups of what pi_record.py stored on x86 (see pi_refs.py). A missing record fails the test,
naming it: nothing is skipped silently.
"""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "pi"))
import pi_refs as R  # noqa: E402


class _Stand:
    """Any attribute, any call: the names the real conftest touches at import time."""

    def __init__(self, name="stand-in"):
        self.__name__ = name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stand(name)

    def __call__(self, *a, **k):
        return _Stand(self.__name__)


def _module(name):
    m = types.ModuleType(name)
    m.__getattr__ = lambda attr: _Stand(attr)
    return m


_saved = {k: sys.modules.get(k) for k in ("torch", "transformers")}
sys.modules["torch"], sys.modules["transformers"] = _module("torch"), _module("transformers")
try:
    _real = Path(__file__).with_name("conftest_x86.py")
    exec(compile(_real.read_text(), str(_real), "exec"), globals())
finally:
    for k, v in _saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


class RecordedHF:
    """What load_hf returns here: the checkpoint's config (HF's config.json keys as attributes)."""

    def __init__(self, path):
        import json

        self.path = Path(path)
        self._pi_digest = R.dir_digest(path)
        self.config = types.SimpleNamespace(**json.loads((self.path / "config.json").read_text()))


def _missing(what):
    pytest.fail(f"no x86 record for {what}: this test needs torch beyond what pi_record.py stores", pytrace=False)


def _build(cls, cfg_cls, defaults, path, seed, tokenizer_vocab, **cfg):  # noqa: F811
    src = R.store() / "ckpt" / R.build_key(cls.__name__, defaults, seed, tokenizer_vocab, cfg)
    if not src.is_dir():
        _missing(f"checkpoint {cls.__name__} seed={seed} {cfg}")
    shutil.copytree(src, path)
    return Path(path)


def load_hf(path, dtype=None):  # noqa: F811
    return RecordedHF(path)


def as_f64(model_or_path):  # noqa: F811
    return model_or_path if isinstance(model_or_path, RecordedHF) else RecordedHF(model_or_path)


def _digest(model_or_path):
    return model_or_path._pi_digest if isinstance(model_or_path, RecordedHF) else R.dir_digest(model_or_path)


def hf_logits64(model_or_path, ids):  # noqa: F811
    p = R.store() / "logits" / f"{_digest(model_or_path)}-{R.ids_key(ids)}.npy"
    if not p.is_file():
        _missing(f"hf_logits64 of {len(ids)} tokens")
    return np.load(p)


def hf_cache64(model_or_path, ids):  # noqa: F811
    p = R.store() / "cache" / f"{_digest(model_or_path)}-{R.ids_key(ids)}.npz"
    if not p.is_file():
        _missing(f"hf_cache64 of {len(ids)} tokens")
    z = np.load(p)
    n = sum(1 for k in z.files if k.startswith("conv"))
    return [z[f"conv{i}"] for i in range(n)], [z[f"rec{i}"] for i in range(n)]


def write_state_spaces(hf_path, out):  # noqa: F811
    src = R.store() / "state_spaces" / R.dir_digest(hf_path)
    if not src.is_dir():
        _missing("write_state_spaces")
    shutil.copytree(src, out)
    return Path(out)
