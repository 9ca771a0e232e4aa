"""RWKV-5 (v5.2) from rwkv.cpp's tiny trained fixture: what is special to it: the float64 numpy reference
against rwkv.cpp's expected logits, the state against that reference's, its configuration, and a state
moved between the flavours. The common checks (rwkv.cpp's expected logits, the numpy reference on a
longer text, both flavours, every graph kind, the state contract, plain onnxruntime, save/load/fork,
GGUF) run over the case registered in tests/families.py ("rwkv5/rwkv.cpp"), in tests/test_conformance.py."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import max_diff, step_all
from edgeseq.exporters.rwkvcpp import RwkvCppFile
from families import FIXTURES, PROMPT, RWKV5_CPP as MODEL, RWKV5_SHAPE, RWKV5_TEXT as TEXT, numpy_rwkv5

EXPECTED = FIXTURES / "expected-logits-5v2-730K.bin"
TOL = 1e-3
C, L, H, N = RWKV5_SHAPE
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


@pytest.fixture(scope="module")
def case(family_case):
    return family_case("rwkv5/rwkv.cpp")


def test_reference_matches_rwkv_cpp(case):
    """The numpy reference itself reproduces rwkv.cpp's expected logits (so it can judge longer texts)."""
    assert RwkvCppFile(str(MODEL)).architecture == "rwkv5"
    assert max_diff(numpy_rwkv5(PROMPT)[0][-1], np.fromfile(EXPECTED, dtype=np.float32)) < 1e-4
    assert case.ref.std() > 0.1  # not degenerate, or agreement would prove little


@FLAVOURS
def test_state_matches_reference(case, portable):
    """After the text a session's state equals the numpy reference's (the step graph's, driven by plain
    onnxruntime, is the conformance suite's: case.ref_state)."""
    s = case.model(portable).session()
    assert max_diff(s.prefill(TEXT), case.ref[-1]) < TOL
    got = s.state()
    for name, ref_state in case.ref_state.items():
        assert max_diff(got[name], ref_state) < TOL, name


def test_config(case):
    cfg = case.model(False).manifest["config"]
    assert cfg["n_head"] == H and cfg["head_size"] == N


def test_state_moves_between_flavours(case):
    """Both flavours keep one state layout: a state left by one continues in the other."""
    a, b = case.model(False).session(), case.model(True).session()
    a.prefill(TEXT[:30])
    b.set_state(a.state(), a.position)
    assert max_diff(step_all(b, TEXT[30:]), step_all(a, TEXT[30:])) < TOL
