"""RWKV-6 (v6.0) from rwkv.cpp's tiny trained fixture (12 layers, C 64, 8 heads of 8, byte-level):
rwkv.cpp's expected logits through the ONNX bundle (both flavours, prefill and steps), through the GGUF
edgeseq writes from it run by edgeseq's engine, and through that same GGUF run by llama.cpp.

The fixture's decay LoRA is square (D_d = C = 64), so a misread orientation of time_decay_w2 keeps every
shape and only shows in the numbers (6.3e-3 off before the fix); test_rwkvcpp_reader.py covers the
non-square case with a file written by rwkv.cpp's converter rules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.exporters.export import export
from edgeseq.exporters.gguf_writer import export_gguf
from edgeseq.exporters.rwkvcpp import RwkvCppFile
from edgeseq.gguf_file import GGUFFile
from gguf_helpers import FIXTURES, llama_cpp, llama_logits

MODEL = FIXTURES / "tiny-rwkv-6v0-1m-FP32.bin"
EXPECTED = np.fromfile(FIXTURES / "expected-logits-6v0-1m.bin", np.float32)
PROMPT = [34, 105, 110]  # the bytes rwkv.cpp's own test feeds before comparing logits
TOL = 2e-5  # measured max abs: 3.8e-6 fused, 4.8e-6 portable, 3.8e-6 edgeseq on the GGUF, 1.9e-6 llama.cpp


def check(logits: np.ndarray) -> None:
    assert logits.shape == EXPECTED.shape
    assert np.abs(logits - EXPECTED).sum() < 1e-3  # rwkv.cpp's own acceptance (FP32)
    np.testing.assert_allclose(logits, EXPECTED, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rwkv6cpp") / "tiny-rwkv6.gguf"
    info = export_gguf(str(MODEL), str(out))
    assert info["architecture"] == "rwkv6" and info["generic_because"] is None
    return out


def test_fixture_config():
    from edgeseq.families.rwkv6 import Rwkv6

    c = Rwkv6.read_config(RwkvCppFile(str(MODEL)))
    assert (c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.head_size) == (256, 64, 12, 8, 8)
    assert (c.dim_ffn, c.mix_lora, c.decay_lora, c.ln_x_eps) == (224, 32, 64, 64e-5)


@pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
def test_bundle_reproduces_rwkv_cpp(tmp_path, portable):
    m = edgeseq.load(export(str(MODEL), str(tmp_path / "b"), portable=portable))
    check(m.session().prefill(PROMPT))
    s = m.session()
    for t in PROMPT:
        logits = s.step(t)
    check(logits)


def test_gguf_in_edgeseq_reproduces_rwkv_cpp(gguf):
    with GGUFFile(gguf) as f:
        assert f.kv["general.architecture"] == "rwkv6"
    m = edgeseq.load(gguf)
    check(m.session().prefill(PROMPT))
    s = m.session()
    for t in PROMPT:
        logits = s.step(t)
    check(logits)


def test_gguf_in_llama_cpp_reproduces_rwkv_cpp(gguf):
    llama_cpp()
    got, _ = llama_logits(gguf, PROMPT)
    check(got[-1])
