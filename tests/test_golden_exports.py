"""Golden exports (issue 14): bundles and state files exported before a change still load and give the
recorded logits after it, and a new export of the same checkpoint keeps every graph's names.

tests/data/golden/<case>/ holds a tiny bundle per family and layout (fused; Mamba-2, RWKV-6 and
RecurrentGemma also portable and int4), a state file saved after a prompt, and expected.json, all
written by tests/make_golden.py with the code of the day. Two promises are checked:

(a) the stored bundle, run by today's runtime, gives the recorded logits through session steps, prefill
    then steps, logits_all, the step graph driven by plain onnxruntime, and the step after loading the
    stored state file. The graph files are the stored ones, so on the platform that recorded them
    (same onnxruntime version, CPU architecture and vector ISA: `recorded_on`) the numbers must be
    bit-identical (np.array_equal): anything else means the runtime fed the graphs differently. On
    another platform onnxruntime's own kernels may round differently, so there they must agree to
    1e-6 times the logits' scale (a few float32 ulps of logits of magnitude ~1-10).
(b) the checkpoint rebuilt by the same seeded builder and exported by today's code has, in every graph,
    the same weight initializers (the tensors of weights.bin; inline constants are numbered by a
    counter and excluded), the same inputs and outputs in the same order, and logits within 1e-5 times
    max(1, the logits' scale) of the recorded ones (a rewrite may reorder float operations; fused ops
    stay where they are).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from make_golden import (CASES, GOLDEN, IDS, PROMPT, build_and_export, checkpoint_digest, from_json_logits,
                         graph_names, platform_key, session_logits)

RECORDED = sorted(p.name for p in GOLDEN.iterdir() if (p / "expected.json").is_file())
NEW_EXPORT_TOL = 1e-5
OTHER_PLATFORM_TOL = 1e-6  # times max(1, max |logit|)


def expected(name: str) -> dict:
    return json.loads((GOLDEN / name / "expected.json").read_text())


def test_every_family_and_case_is_recorded():
    from edgeseq.families import family_for_architecture, supported_architectures

    families = {family_for_architecture(a).name for a in supported_architectures()}
    covered = {expected(n)["family"] for n in RECORDED}
    assert families <= covered, (f"no golden export for {sorted(families - covered)}: add a case to "
                                 f"tests/make_golden.py and run it for that case only")
    assert RECORDED == sorted(CASES), "tests/make_golden.py's cases and tests/data/golden/ differ"
    for name in RECORDED:
        e = expected(name)
        assert e["ids"] == IDS and e["prompt"] == PROMPT, name
        assert e["export"] == CASES[name].export_kwargs() and e["load"] == CASES[name].load, name


def _compare(name: str, got: dict, want: dict, tol: float | None):
    """tol None: bit-identical; else max abs difference <= tol."""
    assert set(got) == set(want), (name, sorted(got), sorted(want))
    for k, ref in want.items():
        g = np.asarray(got[k])
        assert g.dtype == np.float32 and g.shape == ref.shape, (name, k, g.dtype, g.shape, ref.shape)
        if tol is None:
            assert np.array_equal(g, ref), (f"{name}: {k} differs from the recorded logits by "
                                            f"{np.abs(g.astype(np.float64) - ref).max():.3g} (must be identical)")
        else:
            d = float(np.abs(g.astype(np.float64) - ref).max())
            assert d <= tol, f"{name}: {k} differs from the recorded logits by {d:.3g} (> {tol:.3g})"


@pytest.mark.parametrize("name", RECORDED)
def test_old_bundle_and_state_file_give_the_recorded_logits(name):
    e = expected(name)
    want = from_json_logits(e["logits"])
    got = session_logits(GOLDEN / name / "bundle", e["load"], GOLDEN / name / "prompt.state", save=False)
    same_platform = platform_key() == e["recorded_on"]
    scale = max(1.0, max(float(np.abs(v).max()) for v in want.values()))
    _compare(name, got, want, None if same_platform else OTHER_PLATFORM_TOL * scale)


@pytest.mark.parametrize("name", RECORDED)
def test_new_export_keeps_names_and_logits(name, tmp_path):
    e = expected(name)
    case = CASES[name]
    ckpt, bundle = build_and_export(case, tmp_path / "work", tmp_path / "bundle")
    assert checkpoint_digest(ckpt) == e["checkpoint_sha256"], (
        f"{name}: the builder in tests/make_golden.py now makes another checkpoint than the one recorded, "
        f"so this test cannot judge the export: restore the builder (conftest.py, rwkv_builders.py, the "
        f"family test files) or, if the change is meant, record this case anew")
    assert json.loads((bundle / "edgeseq.json").read_text())["family"] == e["family"]
    names = graph_names(bundle)
    assert list(names) == list(e["graphs"]), name  # the same graph kinds
    for kind, want in e["graphs"].items():
        for key in ("file", "inputs", "outputs"):
            assert names[kind][key] == want[key], (name, kind, key)
        got_w, want_w = set(names[kind]["initializers"]), set(want["initializers"])
        assert got_w == want_w, (f"{name} {kind}: weight initializers renamed: new {sorted(got_w - want_w)}, "
                                 f"gone {sorted(want_w - got_w)}")
    # the state file is the new bundle's own (a state file belongs to its bundle's weights.bin)
    got = session_logits(bundle, e["load"], tmp_path / "prompt.state", save=True)
    want = from_json_logits(e["logits"])
    _compare(name, got, want, NEW_EXPORT_TOL * max(1.0, max(float(np.abs(v).max()) for v in want.values())))
