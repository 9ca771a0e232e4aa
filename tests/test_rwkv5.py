"""RWKV-5 (v5.2) from rwkv.cpp's tiny trained fixture: its expected logits, a float64 numpy reference
on a longer text, both graph flavours, every graph kind, and the state contract."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from conftest import graph_ops, max_diff, step_all
from edgeseq.exporters.export import export
from edgeseq.exporters.rwkvcpp import RwkvCppFile
from edgeseq.kernels.wkv5 import wkv5_ref

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
MODEL = FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"
EXPECTED = FIXTURES / "expected-logits-5v2-730K.bin"
PROMPT = [34, 105, 110]  # the bytes rwkv.cpp's own test feeds before comparing logits
TEXT = list(b'"In the beginning the Universe was created. This has made a lot of people very angry.')
TOL = 1e-3
C, L, H, N = 64, 12, 8, 8  # the fixture's width, layers, heads, head size
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv5")
    return {p: Path(export(str(MODEL), str(d / ("portable" if p else "fused")), portable=p)) for p in (False, True)}


@pytest.fixture(scope="module")
def models(bundles):
    return {p: edgeseq.load(str(b)) for p, b in bundles.items()}


@pytest.fixture(scope="module")
def reference():
    return numpy_rwkv5(TEXT)


def numpy_rwkv5(ids):
    """float64 numpy RWKV v5.2 from the rwkv.cpp tensors: (logits at every position, final state)."""
    f = RwkvCppFile(str(MODEL))

    def g(name):
        return f.get(name).astype(np.float64)

    def ln(x, p, eps=1e-5):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * g(p + ".weight") + g(p + ".bias")

    def sig(x):
        return 1 / (1 + np.exp(-x))

    shift_att, wkv, shift_ffn = np.zeros((L, C)), np.zeros((L, 1, H, N, N)), np.zeros((L, C))
    out = []
    for tok in ids:
        x = ln(g("emb.weight")[tok], "blocks.0.ln0")
        for i in range(L):
            p = f"blocks.{i}."
            xx = ln(x, p + "ln1")
            sx, shift_att[i] = shift_att[i].copy(), xx
            r, k, v, gate = (g(f"{p}att.{w}.weight") @ (sx + (xx - sx) * g(f"{p}att.time_mix_{m}"))
                             for m, w in (("r", "receptance"), ("k", "key"), ("v", "value"), ("g", "gate")))
            # time_decay as rwkv.cpp stores it is already w = exp(-exp(decay))
            y, wkv[i] = wkv5_ref(*(z.reshape(1, 1, H, N) for z in (r, k, v)), wkv[i],
                                 g(p + "att.time_faaaa"), g(p + "att.time_decay"))
            y = y.reshape(H, N)
            y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)  # rwkv.cpp's eps
            y = y.reshape(C) * g(p + "att.ln_x.weight") + g(p + "att.ln_x.bias")
            x = x + g(p + "att.output.weight") @ (y * gate * sig(gate))
            xx = ln(x, p + "ln2")
            sx, shift_ffn[i] = shift_ffn[i].copy(), xx
            kk = np.maximum(g(p + "ffn.key.weight") @ (sx + (xx - sx) * g(p + "ffn.time_mix_k")), 0) ** 2
            rr = sig(g(p + "ffn.receptance.weight") @ (sx + (xx - sx) * g(p + "ffn.time_mix_r")))
            x = x + rr * (g(p + "ffn.value.weight") @ kk)
        out.append(g("head.weight") @ ln(x, "ln_out"))
    state = {}
    for i in range(L):
        state[f"past_key_values.{i}.shift_att"] = shift_att[i][None]
        state[f"past_key_values.{i}.wkv"] = wkv[i]
        state[f"past_key_values.{i}.shift_ffn"] = shift_ffn[i][None]
    return np.stack(out), state


def test_reference_matches_rwkv_cpp(reference):
    """The numpy reference itself reproduces rwkv.cpp's expected logits (so it can judge longer texts)."""
    assert RwkvCppFile(str(MODEL)).architecture == "rwkv5"
    assert max_diff(numpy_rwkv5(PROMPT)[0][-1], np.fromfile(EXPECTED, dtype=np.float32)) < 1e-4
    assert reference[0].std() > 0.1  # not degenerate, or agreement would prove little


@FLAVOURS
def test_expected_logits(models, portable):
    want = np.fromfile(EXPECTED, dtype=np.float32)
    assert want.shape == (256,)
    m = models[portable]
    s = m.session()
    stepped = step_all(s, PROMPT)[-1]
    assert stepped.dtype == np.float32
    assert max_diff(stepped, want) < TOL
    assert max_diff(m.session().prefill(PROMPT), want) < TOL
    assert max_diff(m.session().logits_all(PROMPT)[-1], want) < TOL


@FLAVOURS
def test_step_graph_with_plain_onnxruntime(bundles, reference, portable):
    """Sessions decode through the prefill graph; drive the static step graph by hand as an app would."""
    import onnxruntime as ort

    bundle = bundles[portable]
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    spec = manifest["state"]
    sess = ort.InferenceSession(str(bundle / "step.onnx"), providers=["CPUExecutionProvider"])
    state = {s["name"]: np.zeros([1, *s["shape"][1:]], np.float32) for s in spec}
    want = np.fromfile(EXPECTED, dtype=np.float32)
    for ids, ref in ((PROMPT, want), (TEXT, reference[0][-1])):
        state = {s["name"]: np.zeros([1, *s["shape"][1:]], np.float32) for s in spec}
        for t in ids:
            outs = sess.run(None, {"input_ids": np.array([[t]], np.int64), **state})
            state = {s["name"]: o for s, o in zip(spec, outs[1:])}
        assert max_diff(outs[0][0], ref) < TOL
    for name, ref_state in reference[1].items():
        assert max_diff(state[name], ref_state) < TOL, name


@FLAVOURS
def test_longer_text_matches_reference(models, reference, portable):
    logits, state = reference
    m = models[portable]
    assert max_diff(m.session().logits_all(TEXT), logits) < TOL
    s = m.session()
    assert max_diff(s.prefill(TEXT), logits[-1]) < TOL
    got = s.state()
    for name, ref_state in state.items():
        assert max_diff(got[name], ref_state) < TOL, name


@FLAVOURS
def test_prefill_then_steps(models, portable):
    m = models[portable]
    alone = step_all(m.session(prefill_chunk=7), TEXT)
    for t in (1, 2, 17):
        s = m.session(prefill_chunk=7)
        assert max_diff(s.prefill(TEXT[:t]), alone[t - 1]) < TOL
        assert s.position == t
        assert max_diff(step_all(s, TEXT[t:]), alone[t:]) < TOL
    # chunks of 7 (the last chunk a single token) and a second prefill continuing the first
    s = m.session(prefill_chunk=7)
    assert max_diff(s.prefill(TEXT[:36]), alone[35]) < TOL
    assert max_diff(s.prefill(TEXT[36:60]), alone[59]) < TOL
    assert max_diff(step_all(s, TEXT[60:]), alone[60:]) < TOL


@FLAVOURS
def test_state_spec_and_size_constant(models, bundles, portable):
    m = models[portable]
    want = {}
    for i in range(L):
        want[f"past_key_values.{i}.shift_att"] = (1, C)
        want[f"past_key_values.{i}.wkv"] = (1, H, N, N)
        want[f"past_key_values.{i}.shift_ffn"] = (1, C)
    manifest = json.loads((bundles[portable] / "edgeseq.json").read_text())
    assert manifest["family"] == "rwkv5"
    assert manifest["config"]["n_head"] == H and manifest["config"]["head_size"] == N
    assert [s["name"] for s in manifest["state"]] == list(want)
    assert {s["name"]: (1, *s["shape"][1:]) for s in manifest["state"]} == want
    assert manifest["state_bytes_per_sequence"] == sum(4 * int(np.prod(v)) for v in want.values())
    for kind in ("step", "prefill", "prefill_all"):
        ins = {i.name: i.shape for i in m.engine.session(kind).get_inputs()}
        outs = {o.name: o.shape for o in m.engine.session(kind).get_outputs()}
        for name, shape in want.items():
            assert list(ins[name][1:]) == list(shape[1:]), (kind, name)
            assert list(outs[name.replace("past_key_values.", "present.")][1:]) == list(shape[1:]), (kind, name)
    s = m.session()
    assert {k: v.shape for k, v in s.state().items()} == want
    assert all(not v.any() for v in s.state().values())
    arena = [[ov.data_ptr() for ov in half] for half in s._bufs]
    rng = np.random.default_rng(3)
    for t in rng.integers(0, 256, 300):
        logits = s.step(int(t))
    assert np.isfinite(logits).all()
    assert {k: v.shape for k, v in s.state().items()} == want
    assert [[ov.data_ptr() for ov in half] for half in s._bufs] == arena
    assert m.state_bytes == sum(v.nbytes for v in s.state().values())


def test_flavour_ops(bundles):
    fused, portable = bundles[False], bundles[True]
    for kind in ("prefill", "prefill_all"):
        assert ("com.microsoft", "LinearAttention") in graph_ops(fused, kind), kind
        assert ("", "Scan") in graph_ops(portable, kind), kind
    for kind in ("step", "prefill", "prefill_all"):
        assert {d for d, _ in graph_ops(portable, kind)} == {""}, kind
    for b in (fused, portable):
        assert not {op for _, op in graph_ops(b, "step")} & {"Loop", "Scan", "If"}
        assert {d for d, _ in graph_ops(b, "step")} == {""}


def test_state_moves_between_flavours(models):
    """Both flavours keep one state layout: a state left by one continues in the other."""
    a, b = models[False].session(), models[True].session()
    a.prefill(TEXT[:30])
    b.set_state(a.state(), a.position)
    assert max_diff(step_all(b, TEXT[30:]), step_all(a, TEXT[30:])) < TOL
