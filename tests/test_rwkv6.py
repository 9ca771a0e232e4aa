"""RWKV-6 from a BlinkDL .pth: small random v6.0 models of several shapes (head size 32 and 64, 1, 3 and
5 layers, different widths, ffn and LoRA sizes) against the `rwkv` package's reference forward (run in a
subprocess with RWKV_V7_ON unset, so the package's v4-v6 code is the one used) at every position of a
64-token sequence, both flavours; every graph kind, the state contract, state save/load/fork round
trips, and the WKV-6 Scan against its numpy reference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeseq
from rwkv_builders import (FLAVOURS, VOCAB, build_cases, check_matches_package, check_save_load_fork,
                           check_state_shapes, tol)

CONFIGS = {  # name: (version, config); the first is the one the graph and state tests use
    "h32-L3": ("6.0", dict(C=64, L=3, H=2, F=224, D_MIX=8, D_DECAY=16)),
    "h64-L1": ("6.0", dict(C=128, L=1, H=2, F=448, D_MIX=16, D_DECAY=32)),
    "h32-L5": ("6.0", dict(C=96, L=5, H=3, F=320, D_MIX=8, D_DECAY=8)),
    "h64-L5": ("6.0", dict(C=192, L=5, H=3, F=256, D_MIX=4, D_DECAY=16)),
}
N_LAYER, C, H, N = 3, 64, 2, 32  # the first config's


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every config's random .pth and the `rwkv` package's logits for it (one subprocess for all)."""
    return build_cases(CONFIGS, tmp_path_factory.mktemp("rwkv6"), v7=False)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, cases):
    return cases[request.param]


@pytest.fixture(scope="module")
def reference(cases):
    c = cases["h32-L3"]
    return c.ids, c.ref, str(c.pth)


@pytest.fixture(scope="module")
def bundles(cases):
    return {p: cases["h32-L3"].bundle(p) for p in (False, True)}


def _tol(ref):
    return tol(ref)


@FLAVOURS
def test_matches_rwkv_package_at_every_position(case, portable):
    c = case.cfg
    m = case.model(portable)
    assert m.manifest["family"] == "rwkv6" and m.manifest["tokenizer"]["kind"] == "bytes"
    cfg = m.manifest["config"]
    assert cfg["ln_x_eps"] == 64e-5
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["dim_ffn"], cfg["mix_lora"],
            cfg["decay_lora"]) == (c["L"], c["C"], c["H"], c["C"] // c["H"], c["F"], c["D_MIX"], c["D_DECAY"])
    check_matches_package(case, portable)
    check_state_shapes(case, c["H"], c["C"] // c["H"], c["L"], c["C"])


def test_save_load_fork_round_trip(cases, tmp_path):
    check_save_load_fork(cases["h64-L5"], tmp_path)


@FLAVOURS
def test_chunked_prefill_carries_the_state(bundles, reference, portable):
    ids, ref, _ = reference
    s = edgeseq.load(bundles[portable]).session(prefill_chunk=7)
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


def test_rwkv6_rejects_a_source_it_does_not_read():
    from edgeseq.errors import UnsupportedError
    from edgeseq.families.rwkv6 import Rwkv6

    class Src:
        path, stored_by, config = "x", "other", {}

        def has(self, name):
            return True

    with pytest.raises(UnsupportedError):
        Rwkv6.read_config(Src())
