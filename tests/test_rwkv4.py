"""RWKV-4 from an rwkv.cpp file: against rwkv.cpp's own expected logits (the shared fixture) and
against the `rwkv` package's reference model on a longer sequence, both flavours."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.exporters.export import export
from edgeseq.exporters.rwkvcpp import RwkvCppFile

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
MODEL = FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"
EXPECTED = np.fromfile(FIXTURES / "expected-logits-4v0-660K.bin", np.float32)
PROMPT = [34, 105, 110]  # the bytes of '"in', as in rwkv.cpp's test
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv4")
    return {p: export(str(MODEL), str(d / f"b{int(p)}"), portable=p) for p in (False, True)}


@FLAVOURS
def test_matches_rwkv_cpp_fixture(bundles, portable):
    m = edgeseq.load(bundles[portable])
    assert m.manifest["family"] == "rwkv4" and m.manifest["tokenizer"]["kind"] == "bytes"
    s = m.session()
    for t in PROMPT:
        logits = s.step(t)
    assert np.abs(logits - EXPECTED).max() < 1e-3
    assert np.abs(logits - EXPECTED).sum() < 1e-3 * 256 / 10  # rwkv.cpp's own test sums the differences
    assert np.abs(m.session().prefill(PROMPT) - EXPECTED).max() < 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The `rwkv` package's model on the fixture's weights, the converter's transforms undone."""
    import torch
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv import model as rwkv_model
    f = RwkvCppFile(str(MODEL))
    sd = {}
    for k in f.keys():
        a = f.get(k)
        if k.endswith("att.time_decay"):
            a = np.log(-a)  # rwkv.cpp stored -exp(time_decay)
        if ".time_mix" in k:
            a = a.reshape(1, 1, -1)
        sd[k] = torch.tensor(a)
    path = tmp_path_factory.mktemp("pth") / "m.pth"
    torch.save(sd, path)
    model = rwkv_model.RWKV(model=str(path)[:-4], strategy="cpu fp32", verbose=False)
    ids = np.random.default_rng(0).integers(0, 256, 64).tolist()
    logits, state = [], None
    for t in ids:
        out, state = model.forward([t], state)
        logits.append(out.numpy().copy())
    return ids, np.stack(logits)


@FLAVOURS
def test_matches_rwkv_package_at_every_position(bundles, reference, portable):
    ids, ref = reference
    m = edgeseq.load(bundles[portable])
    s = m.session()
    got = np.stack([s.step(t) for t in ids])
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    s.reset()
    assert np.abs(s.logits_all(ids) - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    s.reset()
    s.prefill(ids[:30])
    tail = np.stack([s.step(t) for t in ids[30:]])
    assert np.abs(tail - ref[30:]).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_state_spec(bundles):
    m = edgeseq.load(bundles[False])
    names = [s["name"] for s in m.manifest["state"]]
    assert names[:5] == [f"past_key_values.0.{k}" for k in ("shift_att", "aa", "bb", "pp", "shift_ffn")]
    assert len(names) == 5 * 4
    pp = [s for s in m.manifest["state"] if s["kind"] == "pp"]
    assert all(s["init"] == -1e30 for s in pp)  # the reference's initial running maximum
    s = m.session()
    assert s.state()["past_key_values.0.pp"].min() == np.float32(-1e30)
    for t in range(300):
        s.step(t % 256)
    assert {k: v.shape for k, v in s.state().items()} == {n: (1, 128) for n in names}


# -- Hugging Face RwkvForCausalLM ------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    import torch
    from conftest import add_noise, write_tokenizer
    from transformers import RwkvConfig, RwkvForCausalLM

    d = tmp_path_factory.mktemp("hf-rwkv4")
    torch.manual_seed(0)
    cfg = RwkvConfig(vocab_size=301, hidden_size=32, attention_hidden_size=48, intermediate_size=80,
                     num_hidden_layers=3, rescale_every=0, tie_word_embeddings=False)
    model = add_noise(RwkvForCausalLM(cfg).eval(), seed=1)
    with torch.no_grad():  # time_decay/time_first start at tidy values; make every channel differ
        for blk in model.rwkv.blocks:
            blk.attention.time_decay.add_(torch.randn_like(blk.attention.time_decay))
            blk.attention.time_first.add_(torch.randn_like(blk.attention.time_first) * 0.5)
    model.save_pretrained(d / "hf")
    write_tokenizer(d / "hf" / "tokenizer.json", 301)
    ids = np.random.default_rng(3).integers(0, 301, 64).tolist()
    with torch.no_grad():
        ref = model.double()(torch.tensor([ids]), use_cache=False).logits[0].numpy()
    return d, ids, ref


@FLAVOURS
def test_hf_rwkv_matches_transformers_fp64(hf_case, portable):
    d, ids, ref = hf_case
    assert ref.std() > 0.5 and len(set(ref.argmax(-1).tolist())) > 8  # not degenerate
    out = export(str(d / "hf"), str(d / f"bundle{int(portable)}"), portable=portable)
    m = edgeseq.load(out)
    assert m.manifest["architecture"] == "RwkvForCausalLM" and m.manifest["tokenizer"]["kind"] == "hf"
    s = m.session()
    got = np.stack([s.step(t) for t in ids])
    assert np.abs(got - ref).max() < 1e-4
    s.reset()
    assert np.abs(s.logits_all(ids) - ref).max() < 1e-4
    assert s.state()["past_key_values.0.aa"].shape == (1, 48)


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
