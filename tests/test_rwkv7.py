"""RWKV-7 from an rwkv.cpp file: against rwkv.cpp's own expected logits (the shared fixture), against
the `rwkv` package's x070 reference model on a 64-token sequence (in a subprocess: the package picks
its RWKV-7 code at import time, from RWKV_V7_ON), both flavours, every graph kind, the state contract,
and the WKV-7 kernel against its numpy reference. RWKV-7 from BlinkDL .pth files: the fixture's weights,
and random models of several shapes (head size 32 and 64, 1, 3 and 5 layers, different widths, ffn and
LoRA sizes) against the package at every position; state save/load/fork round trips."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeseq
from edgeseq.exporters.export import export
from edgeseq.exporters.rwkvcpp import RwkvCppFile
from rwkv_builders import FLAVOURS, RwkvCase, attach_references, check_matches_package, check_save_load_fork, \
    check_state_shapes

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
MODEL = FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin"
EXPECTED = np.fromfile(FIXTURES / "expected-logits-7v0-834K.bin", np.float32)
PROMPT = [34, 105, 110]  # the bytes of '"in', as in rwkv.cpp's test
N_LAYER, C, H, N = 12, 64, 1, 64


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv7")
    return {p: export(str(MODEL), str(d / f"b{int(p)}"), portable=p) for p in (False, True)}


@FLAVOURS
def test_matches_rwkv_cpp_fixture(bundles, portable):
    m = edgeseq.load(bundles[portable])
    assert m.manifest["family"] == "rwkv7" and m.manifest["tokenizer"]["kind"] == "bytes"
    s = m.session()
    for t in PROMPT:
        logits = s.step(t)
    assert np.abs(logits - EXPECTED).max() < 1e-3
    assert np.abs(m.session().prefill(PROMPT) - EXPECTED).max() < 1e-3


@FLAVOURS
def test_graphs_with_plain_onnxruntime(bundles, portable):
    """Sessions decode through the prefill graph; this drives the step graph (and the others) directly."""
    import onnxruntime as ort

    bundle = Path(bundles[portable])
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    spec = manifest["state"]
    zeros = {s["name"]: np.zeros([1, *s["shape"][1:]], np.float32) for s in spec}
    sess = {k: ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
            for k, g in manifest["graphs"].items()}

    def run(kind, ids, state):
        g = manifest["graphs"][kind]
        outs = sess[kind].run(g["outputs"], {"input_ids": np.asarray([ids], np.int64), **state})
        return outs[0], {s["name"]: o for s, o in zip(spec, outs[1:])}

    state = zeros
    for t in PROMPT:
        logits, state = run("step", [t], state)
    assert np.abs(logits[0] - EXPECTED).max() < 1e-3
    last, pstate = run("prefill", PROMPT, zeros)
    assert np.abs(last[0] - EXPECTED).max() < 1e-3
    every, _ = run("prefill_all", PROMPT, zeros)
    assert every.shape == (1, 3, 256) and np.abs(every[0, -1] - EXPECTED).max() < 1e-3
    for k in state:
        assert np.abs(state[k] - pstate[k]).max() < 1e-4, k
    # the step graph has no loops; the flavours build the same graphs (no fused op fits WKV-7)
    ops = {n.op_type for n in onnx.load(str(bundle / manifest["graphs"]["step"]["file"]),
                                        load_external_data=False).graph.node}
    assert not ops & {"Scan", "Loop", "If"}


CONFIGS = {  # random BlinkDL .pth files: name: (version, config)
    "h32-L1": ("7", dict(C=64, L=1, H=2, F=256, D_W=16, D_A=16, D_V=8, D_G=16)),
    "h64-L3": ("7", dict(C=128, L=3, H=2, F=320, D_W=32, D_A=16, D_V=16, D_G=32)),
    "h32-L5": ("7", dict(C=96, L=5, H=3, F=384, D_W=8, D_A=8, D_V=8, D_G=8)),
    "h64-L5": ("7", dict(C=192, L=5, H=3, F=256, D_W=16, D_A=32, D_V=8, D_G=24)),
}


def _fixture_as_pth(path: Path) -> Path:
    """The rwkv.cpp fixture's weights as the BlinkDL .pth the package reads (rwkv.cpp's layout undone)."""
    import torch
    f, sd = RwkvCppFile(str(MODEL)), {}
    for k in f.keys():
        a = f.get(k)
        if k.endswith("att.x_rwkvag"):  # rwkv.cpp fused x_r, x_w, x_k, x_v, x_a, x_g
            for j, m in enumerate("rwkvag"):
                sd[k[:-len("x_rwkvag")] + "x_" + m] = torch.tensor(a[j].reshape(1, 1, -1))
            continue
        if any(k.endswith(f"att.{m}{n}") for m in "wavg" for n in "12"):
            a = a.T  # rwkv.cpp stored the LoRA matrices transposed
        sd[k] = torch.tensor(np.ascontiguousarray(a))
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The random configs and the fixture's weights, with the `rwkv` package's x070 logits for each (one
    subprocess: the package picks its RWKV-7 code at import time, from RWKV_V7_ON)."""
    d = tmp_path_factory.mktemp("rwkv7-ref")
    out = {name: RwkvCase(name, version, cfg, d / name) for name, (version, cfg) in CONFIGS.items()}
    (d / "fixture").mkdir()
    out["fixture"] = RwkvCase("fixture", "7", {}, d / "fixture", pth=_fixture_as_pth(d / "fixture" / "m.pth"))
    attach_references(list(out.values()), v7=True)
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, cases):
    return cases[request.param]


@pytest.fixture(scope="module")
def reference(cases):
    """The package on the fixture's weights, 64 tokens: (ids, logits, the .pth it read)."""
    c = cases["fixture"]
    return c.ids, c.ref, str(c.pth)


@FLAVOURS
def test_random_blinkdl_pth_matches_rwkv_package(case, portable):
    c = case.cfg
    m = case.model(portable)
    assert m.manifest["family"] == "rwkv7"
    cfg = m.manifest["config"]
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["dim_ffn"]) == (
        c["L"], c["C"], c["H"], c["C"] // c["H"], c["F"])
    check_matches_package(case, portable)
    check_state_shapes(case, c["H"], c["C"] // c["H"], c["L"], c["C"])


def test_save_load_fork_round_trip(cases, tmp_path):
    check_save_load_fork(cases["h64-L3"], tmp_path)


@FLAVOURS
def test_matches_rwkv_package_at_every_position(bundles, reference, portable):
    ids, ref, _ = reference
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    s = edgeseq.load(bundles[portable]).session()
    steps = np.stack([s.step(t) for t in ids])
    assert np.abs(steps - ref).max() < tol
    s.reset()
    assert np.abs(s.logits_all(ids) - ref).max() < tol
    # prefill then steps equals steps alone
    s.reset()
    assert np.abs(s.prefill(ids[:30]) - steps[29]).max() < tol
    assert s.position == 30
    tail = np.stack([s.step(t) for t in ids[30:]])
    assert np.abs(tail - steps[30:]).max() < tol


@FLAVOURS
def test_chunked_prefill_carries_the_state(bundles, reference, portable):
    ids, ref, _ = reference
    s = edgeseq.load(bundles[portable]).session(prefill_chunk=7)
    assert np.abs(s.prefill(ids[:36]) - ref[35]).max() < 1e-3
    assert np.abs(s.prefill(ids[36:]) - ref[-1]).max() < 1e-3


@FLAVOURS
def test_blinkdl_pth_matches_rwkv_package(reference, portable, tmp_path):
    """The same weights from the BlinkDL .pth the reference loaded: separate x_r … x_g, LoRA as (in, out)."""
    ids, ref, pth = reference
    s = edgeseq.load(export(pth, str(tmp_path / "b"), portable=portable)).session()
    assert np.abs(np.stack([s.step(t) for t in ids[:8]]) - ref[:8]).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert np.abs(s.prefill(ids[8:]) - ref[-1]).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_state_spec(bundles):
    m = edgeseq.load(bundles[False])
    spec = m.manifest["state"]
    assert [s["name"] for s in spec[:3]] == [f"past_key_values.0.{k}" for k in ("shift_att", "wkv", "shift_ffn")]
    want = {}
    for i in range(N_LAYER):
        want[f"past_key_values.{i}.shift_att"] = (1, C)
        want[f"past_key_values.{i}.wkv"] = (1, H, N, N)
        want[f"past_key_values.{i}.shift_ffn"] = (1, C)
    assert all(s["dtype"] == "float32" and s["init"] == 0 for s in spec)
    s = m.session()
    assert {k: v.shape for k, v in s.state().items()} == want
    for t in range(300):
        logits = s.step((t * 37) % 256)
    assert np.isfinite(logits).all() and s.position == 300
    assert {k: v.shape for k, v in s.state().items()} == want
    assert m.state_bytes == sum(v.nbytes for v in s.state().values())
