"""Tiny bundles of every family for the JavaScript tests (tests/test_node.py, tests/test_web.py,
tests/test_manifest_schema.py), and the Python runtime's greedy ids they are compared with.

Families: Mamba, Mamba-2, RecurrentGemma, Zamba and Zamba2 (HF classes, random; the last three take
the `position` input, Zamba's and Zamba2's state has a `max_context` ring), RWKV-4, RWKV-5.2 and RWKV-7 from the rwkv.cpp fixtures (RWKV-5.2 state-tuned:
`initial_state.safetensors`), RWKV-6 from a random BlinkDL .pth.
Each in the flavours whose graphs differ (fused uses com.microsoft ops where the family has them).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.exporters.export import export

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FIXTURES = ROOT / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
NODE = shutil.which("node")

FAMILIES = ["mamba", "mamba2", "rwkv4", "rwkv5_tuned", "rwkv6", "rwkv7", "recurrent_gemma", "zamba", "zamba2"]
# RWKV-4 and RWKV-7 use the same standard ops in both flavours (no fused op fits them): one flavour
CASES = [(f, p) for f in FAMILIES for p in ((False,) if f in ("rwkv4", "rwkv7") else (False, True))]
CASE_IDS = [f"{f}-{'portable' if p else 'fused'}" for f, p in CASES]


def require_node_package(package: str):
    """Skip (with the reason) unless node and the npm package are installed (`make test` installs them)."""
    if NODE is None:
        pytest.skip("node is not installed")
    if not (EXAMPLES / "node_modules" / package / "package.json").is_file():
        pytest.skip(f"npm package {package} missing: run `make .venv/.web` or `cd examples && npm ci`")


def _checkpoint(family: str, d: Path) -> tuple[Path, dict]:
    """A tiny checkpoint of `family` in `d` and the export options it needs."""
    if family in ("mamba", "mamba2"):
        import conftest

        make = conftest.make_mamba if family == "mamba" else conftest.make_mamba2
        return make(d / "ckpt", seed=22), {}
    if family == "recurrent_gemma":  # attention over a window ring: graphs take `position`
        from test_recurrent_gemma import CONFIGS, make_recurrent_gemma

        return make_recurrent_gemma(d / "ckpt", seed=5, **CONFIGS["gqa-cap4"]), {}
    if family == "zamba":
        from test_zamba import CONFIGS, make_zamba

        return make_zamba(d / "ckpt", seed=5, **CONFIGS["2heads"]), {}
    if family == "zamba2":  # full attention over a max_context ring, and `position`
        from test_zamba2 import CONFIGS, make_zamba2

        return make_zamba2(d / "ckpt", seed=5, **CONFIGS["2blocks-gqa-dtmin"]), {}
    if family == "rwkv4":
        return FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin", {}
    if family == "rwkv7":
        return FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin", {}
    import torch

    if family == "rwkv5_tuned":
        g = torch.Generator().manual_seed(3)
        state = {f"blocks.{i}.att.time_state": torch.randn(8, 8, 8, generator=g) * 0.3 for i in range(12)}
        torch.save(state, d / "state.pth")
        return FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin", {"initial_state": str(d / "state.pth")}
    if family == "rwkv6":
        from rwkv_builders import v6_state_dict

        path = d / "RWKV-6.0-tiny.pth"
        torch.save(v6_state_dict(C=64, L=2, H=2, F=128, seed=4), path)
        return path, {}
    raise ValueError(family)


class Bundles:
    """Bundles exported on first use, cached for the test session."""

    def __init__(self, root: Path):
        self.root = root
        self._ckpt: dict = {}
        self._cache: dict = {}

    def get(self, family: str, portable: bool, quant: str = "f32", mobile: bool = False) -> Path:
        key = (family, portable, quant, mobile)
        if key not in self._cache:
            d = self.root / family
            if family not in self._ckpt:
                d.mkdir()
                self._ckpt[family] = _checkpoint(family, d)
            ckpt, opts = self._ckpt[family]
            out = d / f"bundle-{'mobile' if mobile else 'portable' if portable else 'fused'}-{quant}"
            if mobile:
                from edgeseq.exporters.mobile import export_mobile

                export_mobile(str(ckpt), str(out), quant=quant, **opts)
            else:
                export(str(ckpt), str(out), portable=portable, quant=quant, **opts)
            self._cache[key] = out
        return self._cache[key]


_SHARED: Bundles | None = None


def shared_bundles(tmp_path_factory) -> Bundles:
    """One cache of bundles for every test module of the session (node, web, schema)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Bundles(tmp_path_factory.mktemp("js_bundles"))
    return _SHARED


def python_greedy(bundle: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy ids from the Python runtime: prefill the prompt, then argmax and step, stopping at the
    manifest's stop tokens, the same loop examples/node/generate.mjs runs."""
    m = edgeseq.load(bundle)
    s = m.session()
    logits, out = s.prefill(prompt), []
    for _ in range(n):
        t = int(np.argmax(logits))
        if t in m.stop_token_ids:
            break
        out.append(t)
        logits = s.step(t)
    return out


def run_node(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
