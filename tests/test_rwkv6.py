"""RWKV-6 from a BlinkDL .pth: a small random v6.0 model against the `rwkv` package's reference forward
(run in a subprocess with RWKV_V7_ON unset, so the package's v4-v6 code is the one used), at every
position of a 48-token sequence, both flavours, every graph kind, the state contract, and the WKV-6
Scan against its numpy reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeseq
from edgeseq.exporters.export import export
from edgeseq.graph import OPSET, GraphBuilder
from edgeseq.kernels import wkv6

N_LAYER, C, H, N, F, VOCAB, D_MIX, D_DECAY = 3, 64, 2, 32, 224, 256, 8, 16
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
T = 48


def _state_dict(seed=0):
    rng = np.random.default_rng(seed)

    def rnd(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def vec(lo=0.0, hi=1.0):
        return rng.uniform(lo, hi, (1, 1, C)).astype(np.float32)

    sd = {"emb.weight": rnd(VOCAB, C), "blocks.0.ln0.weight": 1 + rnd(C, scale=0.1), "blocks.0.ln0.bias": rnd(C, scale=0.1)}
    for i in range(N_LAYER):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"] = 1 + rnd(C, scale=0.1)
            sd[f"{p}{ln}.bias"] = rnd(C, scale=0.1)
        for m in "xwkvrg":
            sd[f"{p}att.time_maa_{m}"] = vec()
        sd[p + "att.time_maa_w1"] = rnd(C, 5 * D_MIX, scale=0.1)
        sd[p + "att.time_maa_w2"] = rnd(5, D_MIX, C, scale=0.1)
        sd[p + "att.time_decay"] = vec(-4.0, 1.0)
        sd[p + "att.time_decay_w1"] = rnd(C, D_DECAY, scale=0.1)
        sd[p + "att.time_decay_w2"] = rnd(D_DECAY, C, scale=0.2)
        sd[p + "att.time_faaaa"] = rnd(H, N, scale=0.5)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[f"{p}att.{m}.weight"] = rnd(C, C, scale=C ** -0.5)
        sd[p + "att.ln_x.weight"] = 1 + rnd(C, scale=0.1)
        sd[p + "att.ln_x.bias"] = rnd(C, scale=0.1)
        sd[p + "ffn.time_maa_k"] = vec()
        sd[p + "ffn.time_maa_r"] = vec()
        sd[p + "ffn.key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[p + "ffn.value.weight"] = rnd(C, F, scale=F ** -0.5)
        sd[p + "ffn.receptance.weight"] = rnd(C, C, scale=C ** -0.5)
    sd["ln_out.weight"] = 1 + rnd(C, scale=0.1)
    sd["ln_out.bias"] = rnd(C, scale=0.1)
    sd["head.weight"] = rnd(VOCAB, C, scale=2 * C ** -0.5)
    return sd


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The random .pth, and the `rwkv` package's logits for it, one token at a time."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("rwkv")
    d = tmp_path_factory.mktemp("rwkv6")
    base = str(d / "m")
    torch.save({k: torch.tensor(v) for k, v in _state_dict().items()}, base + ".pth")
    ids = np.random.default_rng(1).integers(0, VOCAB, T).tolist()
    script = textwrap.dedent("""
        import os, sys
        os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"; os.environ.pop("RWKV_V7_ON", None)
        import numpy as np
        from rwkv.model import RWKV
        base, ids = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
        model, state, out = RWKV(model=base, strategy="cpu fp32", verbose=False), None, []
        assert model.version == 6.0, model.version
        for t in ids:
            o, state = model.forward([t], state)
            out.append(o.float().numpy().copy())
        np.save(base + ".npy", np.stack(out))
        o, _ = model.forward(ids, None)  # the package's sequence path (att_seq_v6_0) agrees with its steps
        np.save(base + "-seq.npy", o.float().numpy())
    """)
    env = {k: v for k, v in os.environ.items() if k != "RWKV_V7_ON"}
    subprocess.run([sys.executable, "-c", script, base, ",".join(map(str, ids))], check=True, capture_output=True,
                   env=env)
    ref = np.load(base + ".npy")
    assert ref.shape == (T, VOCAB) and ref.std() > 0.5  # not degenerate, or agreement would prove little
    assert np.abs(np.load(base + "-seq.npy") - ref[-1]).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    return ids, ref, base + ".pth"


@pytest.fixture(scope="module")
def bundles(reference, tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv6-bundles")
    return {p: export(reference[2], str(d / f"b{int(p)}"), portable=p) for p in (False, True)}


def _tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


@FLAVOURS
def test_matches_rwkv_package_at_every_position(bundles, reference, portable):
    ids, ref, _ = reference
    m = edgeseq.load(bundles[portable])
    assert m.manifest["family"] == "rwkv6" and m.manifest["tokenizer"]["kind"] == "bytes"
    assert m.manifest["config"]["ln_x_eps"] == 64e-5
    s = m.session()
    steps = np.stack([s.step(t) for t in ids])
    print(f"\n{'portable' if portable else 'fused'} steps max |diff| {np.abs(steps - ref).max():.3g} "
          f"(|logits| max {np.abs(ref).max():.3g})")
    assert np.abs(steps - ref).max() < _tol(ref)
    s.reset()
    every = s.logits_all(ids)
    print(f"logits_all max |diff| {np.abs(every - ref).max():.3g}")
    assert np.abs(every - ref).max() < _tol(ref)
    s.reset()
    assert np.abs(s.prefill(ids[:30]) - ref[29]).max() < _tol(ref)
    assert s.position == 30
    tail = np.stack([s.step(t) for t in ids[30:]])
    print(f"prefill+steps max |diff| {np.abs(tail - ref[30:]).max():.3g}")
    assert np.abs(tail - ref[30:]).max() < _tol(ref)


@FLAVOURS
def test_chunked_prefill_carries_the_state(bundles, reference, portable, monkeypatch):
    import edgeseq.runtime.session as session_mod

    ids, ref, _ = reference
    monkeypatch.setattr(session_mod, "PREFILL_CHUNK", 7)
    s = edgeseq.load(bundles[portable]).session()
    assert np.abs(s.prefill(ids[:36]) - ref[35]).max() < _tol(ref)
    assert np.abs(s.prefill(ids[36:]) - ref[-1]).max() < _tol(ref)


@FLAVOURS
def test_graphs_with_plain_onnxruntime(bundles, reference, portable):
    """Sessions decode through the prefill graph; this drives the step graph (and the others) directly."""
    import onnxruntime as ort

    ids, ref, _ = reference
    bundle = Path(bundles[portable])
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    spec = manifest["state"]
    zeros = {s["name"]: np.zeros([1, *s["shape"][1:]], np.float32) for s in spec}
    sess = {k: ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
            for k, g in manifest["graphs"].items()}

    def run(kind, toks, state):
        g = manifest["graphs"][kind]
        outs = sess[kind].run(g["outputs"], {"input_ids": np.asarray([toks], np.int64), **state})
        return outs[0], {s["name"]: o for s, o in zip(spec, outs[1:])}

    state, steps = zeros, []
    for t in ids[:12]:
        logits, state = run("step", [t], state)
        steps.append(logits[0])
    assert np.abs(np.stack(steps) - ref[:12]).max() < _tol(ref)
    last, pstate = run("prefill", ids[:12], zeros)
    assert np.abs(last[0] - ref[11]).max() < _tol(ref)
    every, _ = run("prefill_all", ids[:12], zeros)
    assert every.shape == (1, 12, VOCAB) and np.abs(every[0] - ref[:12]).max() < _tol(ref)
    for k in state:
        assert np.abs(state[k] - pstate[k]).max() < 1e-4 * max(1.0, float(np.abs(state[k]).max())), k
    graph_ops = {kind: {n.op_type for n in onnx.load(str(bundle / g["file"]), load_external_data=False).graph.node}
                 for kind, g in manifest["graphs"].items()}
    assert not graph_ops["step"] & {"Scan", "Loop", "If", "LinearAttention"}
    if portable:
        assert "Scan" in graph_ops["prefill"] and "LinearAttention" not in graph_ops["prefill"]
    else:
        assert "LinearAttention" in graph_ops["prefill"] and "Scan" not in graph_ops["prefill"]


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
    assert len(spec) == 3 * N_LAYER
    s = m.session()
    assert {k: v.shape for k, v in s.state().items()} == want
    for t in range(200):
        logits = s.step((t * 37) % 256)
    assert np.isfinite(logits).all() and s.position == 200
    assert {k: v.shape for k, v in s.state().items()} == want
    assert m.state_bytes == sum(v.nbytes for v in s.state().values())


def test_rwkv6_rejects_a_non_blinkdl_source():
    from edgeseq.errors import UnsupportedError
    from edgeseq.families.rwkv6 import Rwkv6

    class Src:
        path, stored_by, config = "x.bin", "rwkv.cpp", {}

    with pytest.raises(UnsupportedError):
        Rwkv6.read_config(Src())


def test_wkv6_scan_matches_reference():
    """The Scan fragment (per-token decay) against the numpy reference, and the reference against the
    update written out per head."""
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    b, t, h, n = 2, 5, 3, 4
    r, k, v = (rng.standard_normal((b, t, h, n)).astype(np.float32) for _ in range(3))
    w = rng.uniform(0.1, 1.0, (b, t, h, n)).astype(np.float32)
    u = rng.standard_normal((h, n, 1)).astype(np.float32)
    S0 = rng.standard_normal((b, h, n, n)).astype(np.float32)
    y_ref, S_ref = wkv6.wkv6_ref(r, k, v, w, S0, u)
    S = S0.astype(np.float64).copy()
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                a = np.outer(k[bi, ti, hi], v[bi, ti, hi])
                assert np.allclose(r[bi, ti, hi] @ (u[hi] * a + S[bi, hi]), y_ref[bi, ti, hi], atol=1e-4)
                S[bi, hi] = a + w[bi, ti, hi][:, None] * S[bi, hi]
    assert np.allclose(S, S_ref, atol=1e-4)

    g = GraphBuilder({}, name="wkv6_test")
    f = TensorProto.FLOAT
    ins = {nm: g.input(nm, f, [b, t, h, n]) for nm in ("r", "k", "v")}
    w_in = g.input("w", f, [b, t, h, n, 1])
    s_in = g.input("S", f, [b, h, n, n])
    u_c = g.const(u)
    y, s_out = wkv6.scan(g, ins["r"], ins["k"], ins["v"], w_in, s_in, u_c)
    g.output(y, "y", f, [b, t, h, n])
    g.output(s_out, "S_out", f, [b, h, n, n])
    model = helper.make_model(helper.make_graph(g.nodes, "wkv6_test", g.inputs, g.outputs,
                                                list(g.initializers.values())),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_got, S_got = sess.run(["y", "S_out"], {"r": r, "k": k, "v": v, "w": w[..., None], "S": S0})
    assert np.abs(y_got - y_ref).max() < 1e-4
    assert np.abs(S_got - S_ref).max() < 1e-4
