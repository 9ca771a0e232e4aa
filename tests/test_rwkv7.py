"""RWKV-7: what is special to it: the configuration read from random BlinkDL .pth files. The common
checks (rwkv.cpp's expected logits for its fixture; the `rwkv` package's x070 reference, run in a
subprocess since the package picks its RWKV-7 code at import time, from RWKV_V7_ON, on the fixture's
weights as rwkv.cpp and as BlinkDL .pth files, and on random models of several shapes: head size 32
and 64, 1, 3 and 5 layers, different widths, ffn and LoRA sizes; both flavours; every graph kind; the
state contract; plain onnxruntime; save/load/fork; GGUF) run over the cases registered in
tests/families.py (RWKV7_CONFIGS, "rwkv7/rwkv.cpp", "rwkv7/fixture-pth"), in tests/test_conformance.py;
the WKV-7 kernel against its numpy reference is in tests/test_kernels.py."""
from __future__ import annotations

import pytest

from families import RWKV7_CONFIGS as CONFIGS
from rwkv_builders import FLAVOURS


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, family_case):
    return family_case(f"rwkv7/{request.param}")


@FLAVOURS
def test_config_read_from_checkpoint(case, portable):
    c = case.cfg
    m = case.model(portable)
    assert m.manifest["family"] == "rwkv7"
    cfg = m.manifest["config"]
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["dim_ffn"]) == (
        c["L"], c["C"], c["H"], c["C"] // c["H"], c["F"])
