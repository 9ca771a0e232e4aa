"""pytest plugin for the x86 side of pi-check's test part (see pi_refs.py): with the real tests/conftest.py,
store what its torch-backed helpers produce, so the aarch64 guest can replay it.

    PI_REFS=DIR .venv/bin/python -P -m pytest -p pi_record tests/test_session.py ...   (tests/pi on PYTHONPATH)
"""
from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

import numpy as np

import pi_refs as R


def _wrap(conftest):
    real_build, real_load, real_logits, real_cache, real_ss = (conftest._build, conftest.load_hf, conftest.hf_logits64,
                                                                conftest.hf_cache64, conftest.write_state_spaces)

    @functools.wraps(real_build)
    def _build(cls, cfg_cls, defaults, path, seed, tokenizer_vocab, **cfg):
        out = real_build(cls, cfg_cls, defaults, path, seed, tokenizer_vocab, **cfg)
        dst = R.store() / "ckpt" / R.build_key(cls.__name__, defaults, seed, tokenizer_vocab, cfg)
        if not dst.exists():
            shutil.copytree(out, dst)
        return out

    @functools.wraps(real_load)
    def load_hf(path, dtype=None):
        m = real_load(path, dtype)
        m._pi_digest = R.dir_digest(path)
        return m

    def digest_of(model_or_path):
        if isinstance(model_or_path, (str, Path)):
            return R.dir_digest(model_or_path)
        return getattr(model_or_path, "_pi_digest", None)

    @functools.wraps(real_logits)
    def hf_logits64(model_or_path, ids):
        out = real_logits(model_or_path, ids)
        d = digest_of(model_or_path)
        if d:
            p = R.store() / "logits" / f"{d}-{R.ids_key(ids)}.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, out)
        return out

    @functools.wraps(real_cache)
    def hf_cache64(model_or_path, ids):
        conv, rec = real_cache(model_or_path, ids)
        d = digest_of(model_or_path)
        if d:
            p = R.store() / "cache" / f"{d}-{R.ids_key(ids)}.npz"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.savez(p, **{f"conv{i}": c for i, c in enumerate(conv)}, **{f"rec{i}": r for i, r in enumerate(rec)})
        return conv, rec

    @functools.wraps(real_ss)
    def write_state_spaces(hf_path, out):
        res = real_ss(hf_path, out)
        dst = R.store() / "state_spaces" / R.dir_digest(hf_path)
        if not dst.exists():
            shutil.copytree(res, dst)
        return res

    conftest._build, conftest.load_hf, conftest.hf_logits64 = _build, load_hf, hf_logits64
    conftest.hf_cache64, conftest.write_state_spaces = hf_cache64, write_state_spaces


def pytest_sessionstart(session):
    conftest = sys.modules.get("conftest")
    assert conftest is not None and hasattr(conftest, "_build"), "tests/conftest.py was not loaded as 'conftest'"
    R.store().mkdir(parents=True, exist_ok=True)
    _wrap(conftest)
