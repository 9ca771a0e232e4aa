"""RWKV-4: what is special to it: the state spec's running maximum, the BlinkDL .pth layout in f32 and
bf16, and the HF RwkvForCausalLM builder. The common checks (rwkv.cpp's expected logits, the `rwkv`
package's reference model on 64 tokens, transformers' RwkvForCausalLM in float64, both flavours, the
state contract, plain onnxruntime, save/load/fork, GGUF) run over the cases registered in
tests/families.py ("rwkv4/rwkv.cpp", "rwkv4/hf"), in tests/test_conformance.py."""
from __future__ import annotations

import os

import numpy as np
import pytest

import edgeseq
from edgeseq.exporters.export import export
from edgeseq.exporters.rwkvcpp import RwkvCppFile
from families import FIXTURES, PROMPT, RWKV4_CPP as MODEL, make_hf_rwkv4

EXPECTED = np.fromfile(FIXTURES / "expected-logits-4v0-660K.bin", np.float32)


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    """(folder, ids, float64 logits) of the HF RwkvForCausalLM case; tests/make_golden.py builds its golden
    RWKV-4 export with this fixture's function."""
    return make_hf_rwkv4(tmp_path_factory)


def test_state_spec(family_case):
    """The running maximum pp starts at the reference's -1e30 and stays so in a fresh session's state
    (the rest of the state contract is the conformance suite's)."""
    m = family_case("rwkv4/rwkv.cpp").model(False)
    pp = [s for s in m.manifest["state"] if s["kind"] == "pp"]
    assert len(pp) == 4 and all(s["init"] == -1e30 for s in pp)
    assert m.session().state()["past_key_values.0.pp"].min() == np.float32(-1e30)


# -- BlinkDL .pth ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blinkdl_pth(tmp_path, dtype):
    """The fixture's weights as BlinkDL releases them (.pth, raw time_decay, (1, 1, C) mixes), in f32
    and bf16: the f32 file reproduces rwkv.cpp's logits; the bf16 one the rwkv package's fp32 model of
    the bf16-rounded weights (saved as f32, since the package applies ln0 to a bf16 embedding in bf16)."""
    import torch
    f = RwkvCppFile(str(MODEL))
    sd = {}
    for k in f.keys():
        a = f.get(k)
        if k.endswith("att.time_decay"):
            a = np.log(-a)  # rwkv.cpp stored -exp(time_decay)
        if ".time_" in k:
            a = a.reshape(1, 1, -1) if "mix" in k else a
        sd[k] = torch.tensor(a).to(getattr(torch, dtype))
    pth = tmp_path / "RWKV-4-tiny.pth"
    torch.save(sd, pth)
    m = edgeseq.load(export(str(pth), str(tmp_path / "b")))
    assert m.manifest["family"] == "rwkv4"
    logits = m.session().prefill(PROMPT)
    if dtype == "float32":
        assert np.abs(logits - EXPECTED).max() < 1e-3
    else:
        os.environ.setdefault("RWKV_JIT_ON", "0")
        from rwkv import model as rwkv_model
        rounded = tmp_path / "rounded.pth"
        torch.save({k: v.float() for k, v in sd.items()}, rounded)
        ref, _ = rwkv_model.RWKV(model=str(rounded)[:-4], strategy="cpu fp32", verbose=False).forward(PROMPT, None)
        assert np.abs(logits - ref.numpy()).max() < 1e-3
        assert np.abs(logits - EXPECTED).max() > 1e-4  # bf16 rounding did change the model


@pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
def test_hf_checkpoint_is_read_as_transformers_writes_it(family_case, portable):
    """transformers' RwkvForCausalLM (its numbers are the conformance suite's "rwkv4/hf" case): the
    architecture and the tokenizer.json beside it."""
    m = family_case("rwkv4/hf").model(portable)
    assert m.manifest["architecture"] == "RwkvForCausalLM" and m.manifest["tokenizer"]["kind"] == "hf"
    assert m.session().state()["past_key_values.0.aa"].shape == (1, 48)
