"""The conformance suite: every check a family must pass, run over every registered family case
(tests/families.py) in the flavours the case lists. Each number is compared with the case's outside
reference (`built.ref`: transformers in float64, the `rwkv` package, rwkv.cpp's expected logits, or a
float64 numpy model checked against them) at the case's tolerance `built.tol`.

What is special to one family (its configuration fields, its state against the reference's cache, its
checkpoint layouts, its controls) stays in that family's test file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgeseq
import families
from conftest import TOL, graph_ops, max_diff, plain_ort, random_ids, step_all, steps_alone


def params(check: str):
    """pytest params (case, portable) for `check` over every registered case that runs it."""
    out = []
    for c in families.CASES.values():
        for p in c.flavours(check):
            cid = c.id if p is None else f"{c.id}-{'portable' if p else 'fused'}"
            out.append(pytest.param(c, p, id=cid))
    return pytest.mark.parametrize("case, portable", out)


def prefill_params():
    out = []
    for c in families.CASES.values():
        for p in c.flavours("prefill_then_steps"):
            for t in c.prefill_at:
                out.append(pytest.param(c, p, t, id=f"{c.id}-{'portable' if p else 'fused'}-{t}"))
    return pytest.mark.parametrize("case, portable, t", out)


_CURRENT: list = []  # the built case the last test used


@pytest.fixture
def built(case, family_case):
    """The case built (once per session). conftest runs this module's tests case by case; when the case
    changes, the last one's loaded models (ONNX Runtime sessions) go, its bundles and reference stay (a
    family file that uses the case loads them again)."""
    b = family_case(case.id)
    if _CURRENT and _CURRENT[0] is not b:
        _CURRENT[0]._models.clear()
        _CURRENT[0].__dict__.pop("_plain_ort", None)
    _CURRENT[:] = [b]
    return b


def state_tol(x) -> float:
    return TOL * max(1.0, float(np.abs(x).max()))


# -- numbers against the reference -------------------------------------------------------------

@params("expected")
def test_rwkv_cpp_expected_logits(case, built, portable):
    """rwkv.cpp's own test: its expected logits after the prompt, by steps, prefill, logits_all, and the
    graphs driven by plain onnxruntime (where the step graph is what runs; sessions decode with prefill)."""
    prompt, file = case.expected
    want = np.fromfile(file, np.float32)
    assert want.shape == (built.ref.shape[1],)
    m = built.model(portable)
    stepped = step_all(m.session(), prompt)[-1]
    assert stepped.dtype == np.float32
    assert np.abs(stepped - want).max() < 1e-3
    assert np.abs(stepped - want).sum() < 1e-3 * 256 / 10  # rwkv.cpp's own test sums the differences
    assert np.abs(m.session().prefill(prompt) - want).max() < 1e-3
    assert np.abs(m.session().logits_all(prompt)[-1] - want).max() < 1e-3
    app = plain_ort(built, portable)
    steps, state = app.steps(prompt)
    assert np.abs(steps[-1] - want).max() < 1e-3
    last, pstate = app.run("prefill", prompt)
    assert np.abs(last[0] - want).max() < 1e-3
    every, _ = app.run("prefill_all", prompt)
    assert every.shape == (1, len(prompt), want.size) and np.abs(every[0, -1] - want).max() < 1e-3
    for k in state:
        assert np.abs(state[k] - pstate[k]).max() < 1e-4, k


@params("step")
def test_step_matches_reference(case, built, portable):
    got = steps_alone(built, portable)
    assert got.dtype == np.float32
    assert max_diff(got, built.ref) < built.tol
    m = built.model(portable)
    assert m.manifest["family"] == case.family and m.manifest["tokenizer"]["kind"] == case.tokenizer
    # a prefill after steps continues them
    s = m.session()
    step_all(s, built.ids[:8])
    assert max_diff(s.prefill(built.ids[8:]), built.ref[-1]) < built.tol


@params("prefill_all")
def test_prefill_all_matches_reference(case, built, portable):
    tol = case.prefill_all_tol or built.tol
    s = built.model(portable).session()
    got = s.logits_all(built.ids[:48])
    assert got.shape == (48, built.ref.shape[1])
    assert max_diff(got, built.ref[:48]) < tol
    assert s.position == 48
    # the state it leaves continues the sequence
    assert max_diff(step_all(s, built.ids[48:]), built.ref[48:]) < built.tol
    s.reset()
    assert max_diff(s.logits_all(built.ids), built.ref) < tol and s.position == len(built.ids)


@prefill_params()
def test_prefill_then_steps_equals_steps(case, built, portable, t):
    alone = steps_alone(built, portable)
    s = built.model(portable).session(prefill_chunk=case.prefill_chunk)
    last = s.prefill(built.ids[:t])
    assert s.position == t
    assert max_diff(last, alone[t - 1]) < built.tol
    assert max_diff(last, built.ref[t - 1]) < built.tol
    tail = step_all(s, built.ids[t:])
    assert max_diff(tail, alone[t:]) < built.tol and max_diff(tail, built.ref[t:]) < built.tol


@params("chunked")
def test_chunked_and_repeated_prefill(case, built, portable):
    alone = steps_alone(built, portable)
    # 36 tokens in chunks of 7: five prefill chunks and a last chunk of one token (a step)
    s = built.model(portable).session(prefill_chunk=7)
    first = s.prefill(built.ids[:36])
    assert max_diff(first, alone[35]) < built.tol and max_diff(first, built.ref[35]) < built.tol
    # a second prefill continues from the state the first left
    second = s.prefill(built.ids[36:60])
    assert max_diff(second, alone[59]) < built.tol and max_diff(second, built.ref[59]) < built.tol
    assert s.position == 60
    tail = step_all(s, built.ids[60:])
    assert max_diff(tail, built.ref[60:]) < built.tol and max_diff(tail, alone[60:]) < built.tol


@params("low_memory")
def test_low_memory(case, built, portable):
    """low_memory (no prepacking) computes the same logits."""
    m = edgeseq.load(built.bundle(portable), low_memory=True)
    assert max_diff(step_all(m.session(), built.ids[:16]), built.ref[:16]) < built.tol
    assert max_diff(m.session().logits_all(built.ids), built.ref) < (case.prefill_all_tol or built.tol)


# -- the graphs as an app drives them ------------------------------------------------------------

@params("plain_ort")
def test_graphs_with_plain_onnxruntime(case, built, portable):
    """Every graph driven by plain onnxruntime, names, shapes and initial values from the manifest, the
    state (and the position) fed back by hand. Sessions decode with the prefill graph, so this is also
    what proves the step graphs."""
    app = plain_ort(built, portable)
    for g in app.manifest["graphs"].values():
        assert g["inputs"][:2] == ["input_ids", "position"] if case.position else "position" not in g["inputs"]
    stepped, state = app.steps(built.ids)
    assert max_diff(stepped, built.ref) < built.tol
    last, mid = app.run("prefill", built.ids[:40])
    assert max_diff(last[0], built.ref[39]) < built.tol
    last, end = app.run("prefill", built.ids[40:], mid, position=40)
    assert max_diff(last[0], built.ref[-1]) < built.tol
    for name in state:
        assert max_diff(end[name], state[name]) < state_tol(state[name]), name
    ref_state = getattr(built, "ref_state", None)  # the reference's state after the sequence, where it has one
    for name, want in (ref_state or {}).items():
        assert max_diff(state[name], want) < built.tol, name
    every, _ = app.run("prefill_all", built.ids)
    assert every.shape == (1, len(built.ids), built.ref.shape[1])
    assert max_diff(every[0], built.ref) < (case.prefill_all_tol or built.tol)


@params("flavour_ops")
def test_flavours_use_the_ops_they_promise(case, built, portable):
    """The fused flavour uses the contrib ops the case lists where it lists them; the portable flavour
    only standard ops; no step graph has a loop."""
    fused, portable_bundle = Path(built.bundle(False)), Path(built.bundle(True))
    for bundle, want in ((fused, case.fused_ops), (portable_bundle, case.portable_ops)):
        for kind, ops in want.items():
            if ops is None:
                assert {d for d, _ in graph_ops(bundle, kind)} == {""}, (bundle.name, kind)
                continue
            have = {op for _, op in graph_ops(bundle, kind)}
            for op, present in ops.items():
                assert (op in have) == present, (bundle.name, kind, op)
    for kind in ("step", "prefill", "prefill_all"):
        assert {d for d, _ in graph_ops(portable_bundle, kind)} == {""}, f"portable {kind} uses non-standard domains"
    for b in (fused, portable_bundle):
        assert not {op for _, op in graph_ops(b, "step")} & {"Loop", "Scan", "If"}


# -- the state contract --------------------------------------------------------------------------

@params("state_spec")
def test_state_spec_names_and_shapes(case, built, portable):
    """The manifest, the graphs and the session all carry the state the case expects (from the reference's
    config), in spec order, float32, at its initial values."""
    want = case.state(built)
    model = built.model(portable)
    manifest = json.loads((Path(built.bundle(portable)) / "edgeseq.json").read_text())
    assert manifest["family"] == case.family and manifest["tokenizer"]["kind"] == case.tokenizer
    present = [n.replace("past_key_values.", "present.") for n in want]
    assert [s["name"] for s in manifest["state"]] == list(want)
    assert [s["output"] for s in manifest["state"]] == present
    assert {s["name"]: tuple(s["shape"][1:]) for s in manifest["state"]} == {k: v[1:] for k, v in want.items()}
    assert all(s["dtype"] == "float32" and s["shape"][0] == "batch" for s in manifest["state"])
    init = {s["name"]: case.init.get(s["name"].rsplit(".", 1)[1], 0.0) for s in manifest["state"]}
    assert {s["name"]: s["init"] for s in manifest["state"]} == init
    ring = manifest.get("max_context")

    def size(shape, mc):
        return int(np.prod([mc if d == "max_context" else d for d in shape]))

    assert manifest["state_bytes_per_sequence"] == sum(4 * size(v, ring) for v in want.values())
    extra = ["position"] if case.position else []
    for kind, g in manifest["graphs"].items():
        assert g["inputs"] == ["input_ids", *extra, *want] and g["outputs"] == ["logits", *present], kind
        sess = model.engine.session(kind)
        ins = {i.name: i.shape for i in sess.get_inputs()}
        outs = {o.name: o.shape for o in sess.get_outputs()}
        assert set(ins) == {"input_ids", *extra, *want}, kind
        assert set(outs) == {"logits", *present}, kind
        for name, out_name in zip(want, present):
            assert list(ins[name][1:]) == list(want[name][1:]), (kind, name)
            assert list(outs[out_name][1:]) == list(want[name][1:]), (kind, out_name)
        if extra:  # int64, one per row (batch,) where the graphs take rows, else one for all (1,): as declared
            assert ins["position"] == manifest["graphs"][kind]["tensors"]["position"]["shape"], kind
            assert ins["position"] in ([1], ["batch"]), kind
    assert model.engine.session("step").get_inputs()[0].shape[1] == 1
    st = model.session().state()
    assert {k: v.shape for k, v in st.items()} == {
        k: tuple(model.max_context if d == "max_context" else d for d in v) for k, v in want.items()}
    assert all((v == np.float32(init[k])).all() for k, v in st.items())  # the initial values


@params("state_constant")
def test_state_size_constant_over_many_steps(case, built, portable):
    model = built.model(portable)
    s = model.session()
    shapes = {k: v.shape for k, v in s.state().items()}
    arena = [[ov.data_ptr() for ov in half] for half in s._bufs]
    for t in random_ids(model.vocab_size, 300, seed=9):
        logits = s.step(t)
    assert np.isfinite(logits).all()
    assert s.position == 300
    assert {k: v.shape for k, v in s.state().items()} == shapes
    assert [[ov.data_ptr() for ov in half] for half in s._bufs] == arena  # the arena was never reallocated
    assert model.state_bytes == sum(v.nbytes for v in s.state().values())


@params("save_load_fork")
def test_save_load_fork(case, built, portable, tmp_path):
    """save_state after a prefix (nothing left beside the file), load into a session with another history:
    the same state, the same position, identical logits, the reference's; the other flavour continues
    from the same file; a fork and its parent, stepped in turn on different tokens, each the reference's
    (neither disturbs the other); reset starts over."""
    ids, ref, tol, k = built.ids, built.ref, built.tol, case.fork_at
    m = edgeseq.load(built.bundle(portable), **case.load) if case.load else built.model(portable)
    s = m.session()
    s.prefill(ids[:k])
    path = tmp_path / "chat.state"
    s.save_state(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.state"]
    saved = s.state()
    cont = step_all(s, ids[k:])
    assert max_diff(cont, ref[k:]) < tol

    t = m.session()
    t.prefill(ids[40:50])  # some other history, to be replaced
    t.load_state(str(path))
    assert t.position == k
    assert saved.keys() == t.state().keys() and all(np.array_equal(saved[n], t.state()[n]) for n in saved)
    assert np.array_equal(step_all(t, ids[k:]), cont)  # identical, not just close

    other_model = edgeseq.load(built.bundle(not portable), **case.load) if case.load else built.model(not portable)
    other = other_model.session()  # one state layout for both flavours
    other.load_state(str(path))
    assert other.position == k
    assert max_diff(step_all(other, ids[k:]), ref[k:]) < tol

    branch = getattr(built, "other", None) or random_ids(ref.shape[1], 12, seed=21)
    n = len(branch)
    s = m.session()
    s.prefill(ids[:k])
    f, g = s.fork(), s.fork()
    assert f.position == g.position == k
    assert all(np.array_equal(v, f.state()[name]) for name, v in s.state().items())
    a, b = [], []
    for x, y in zip(ids[k:k + n], branch):  # interleaved: neither may disturb the other
        a.append(s.step(x))
        b.append(f.step(y))
    assert max_diff(np.stack(a), ref[k:k + n]) < tol
    assert max_diff(step_all(g, ids[k:]), ref[k:]) < tol  # a fork continues as its parent would
    fork_ref = getattr(built, "fork_ref", None)
    if fork_ref is None or k != 20:  # the package's fork_ref is of ids[:20] + the branch
        fork_ref = built.reference(ids[:k] + branch)[k:]
    assert max_diff(fork_ref, ref[k:k + n]) > 0.1  # the two continuations really differ
    assert max_diff(np.stack(b), fork_ref) < built.tol_for(fork_ref)
    s.reset()
    assert s.position == 0 and max_diff(s.step(ids[0]), ref[0]) < tol


# -- GGUF ----------------------------------------------------------------------------------------

@params("gguf")
def test_gguf_round_trip(case, built, portable, tmp_path):
    """The checkpoint written as GGUF (llama.cpp's architecture where it has one, edgeseq's generic one
    otherwise) runs in edgeseq to the reference's logits, state and position included."""
    from edgeseq.exporters.gguf_writer import export_gguf

    gguf = tmp_path / "m.gguf"
    export_gguf(str(built.ckpt), str(gguf))
    m = edgeseq.load(gguf)
    assert m.manifest["family"] == case.family
    s = m.session()
    assert max_diff(s.prefill(built.ids[:20]), built.ref[19]) < built.tol
    assert max_diff(step_all(s, built.ids[20:]), built.ref[20:]) < built.tol
