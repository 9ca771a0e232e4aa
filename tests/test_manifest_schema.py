"""The manifest as a public contract: schema/edgeseq.schema.json validates the manifest of every family
and every kind of bundle (flavours, quantizations, mobile, tokenizers, tuned initial state, position
input), the rules a JSON Schema cannot state hold (names, dims, hashes, the graphs' real inputs and
outputs), every manifest key is documented, and damaged manifests are refused by both the schema and
edgeseq.bundle.read_manifest."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from js_cases import CASE_IDS, CASES, FIXTURES, ROOT, shared_bundles
from edgeseq.bundle import read_manifest, sha256_file
from edgeseq.errors import EdgeseqError
from edgeseq.exporters.export import export

import jsonschema
SCHEMA = json.loads((ROOT / "schema" / "edgeseq.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}

VARIANTS = [("mamba2", False, "int4", False), ("rwkv6", True, "int8", False), ("mamba", False, "f16", False),
            ("rwkv5_tuned", False, "f32", True), ("rwkv4", False, "f32", True), ("rwkv7", False, "w8a8", False)]
VARIANT_IDS = ["mamba2-int4", "rwkv6-portable-int8", "mamba-f16", "rwkv5_tuned-mobile", "rwkv4-mobile", "rwkv7-w8a8"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return shared_bundles(tmp_path_factory)


def errors(manifest) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in VALIDATOR.iter_errors(manifest)]


def graph_io(bundle: Path, g: dict) -> dict:
    """{name: (dtype, shape)} of a graph's real inputs and outputs (symbolic dims as names)."""
    if g["file"].endswith(".ort"):
        import onnxruntime as ort

        s = ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
        return {v.name: (ORT_DTYPES[v.type], list(v.shape)) for v in [*s.get_inputs(), *s.get_outputs()]}
    import onnx

    m = onnx.load(str(bundle / g["file"]), load_external_data=False)
    return {v.name: (ONNX_DTYPES[v.type.tensor_type.elem_type],
                     [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*m.graph.input, *m.graph.output]}


def check_contract(bundle: Path):
    m = json.loads((bundle / "edgeseq.json").read_text())
    assert not errors(m), errors(m)
    undocumented = set(m) - set(SCHEMA["properties"])
    assert not undocumented, f"document {sorted(undocumented)} in schema/edgeseq.schema.json (and docs/embedding.md)"
    state = m["state"]
    names = [s["name"] for s in state]
    assert len(set(names)) == len(names)
    for s in state:
        assert s["name"].split(".", 1)[1] == s["output"].split(".", 1)[1] == f"{s['layer']}.{s['kind']}"
        for d in s["shape"][1:]:
            assert isinstance(d, int) or isinstance(m.get(d), int), (s["name"], d)  # symbolic dims are defined
    dims = {k: m[k] for k in ("max_context",) if k in m}
    nbytes = sum(4 * int(np.prod([dims.get(d, d) for d in s["shape"][1:]])) for s in state)
    assert m["state_bytes_per_sequence"] == nbytes
    for kind, g in m["graphs"].items():
        real = graph_io(bundle, g)
        assert list(g["inputs"]) + list(g["outputs"]) == list(real), kind  # names and order, nothing unlisted
        assert g["inputs"][0] == "input_ids" and g["outputs"][0] == "logits"
        others = [n for n in g["inputs"] if not n.startswith("past_key_values.")]
        assert others in (["input_ids"], ["input_ids", "position"]), others
        assert g["inputs"][len(others):] == names and g["outputs"][1:] == [s["output"] for s in state]
        for s in state:
            assert real[s["name"]] == real[s["output"]] == (s["dtype"], s["shape"]), (kind, s["name"])
        for name, t in g["tensors"].items():
            assert real[name] == (t["dtype"], t["shape"]), (kind, name)
        assert set(g["tensors"]) == set(others) | {"logits"}
        if "position" in g["tensors"]:
            assert g["tensors"]["position"] == {"dtype": "int64", "shape": ["batch"]}  # one per row
        batch = g.get("batch", "batch")
        assert g["tensors"]["input_ids"] == {"dtype": "int64", "shape": [batch, 1 if kind == "step" else "sequence"]}
        want_logits = [batch, "sequence", m["vocab_size"]] if g["logits"] == "all" else [batch, m["vocab_size"]]
        assert g["tensors"]["logits"] == {"dtype": "float32", "shape": want_logits}
    for f, digest in m["files"].items():
        assert sha256_file(bundle / f) == digest, f
    if m["weights"].get("embedded") is not True:
        assert sha256_file(bundle / m["weights"]["file"]) == m["weights"]["sha256"]
    tok = m["tokenizer"]
    assert tok["kind"] == "bytes" or (bundle / tok["file"]).is_file()
    if m["initial_state"]:
        from safetensors.numpy import load_file

        tuned = load_file(bundle / m["initial_state"]["file"])
        assert sorted(tuned) == m["initial_state"]["tensors"] and set(tuned) <= set(names)
        shapes = {s["name"]: [1, *s["shape"][1:]] for s in state}
        assert all(list(a.shape) == shapes[k] and a.dtype == np.float32 for k, a in tuned.items())
    return m


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("family,portable", CASES, ids=CASE_IDS)
def test_every_family_meets_the_contract(bundles, family, portable):
    m = check_contract(bundles.get(family, portable))
    inits = {s["kind"]: s["init"] for s in m["state"]}
    if family == "rwkv4":
        assert inits["pp"] == -1e30 and inits["aa"] == 0.0
    if family == "rwkv5_tuned":
        assert m["initial_state"]["file"] == "initial_state.safetensors"
    if family == "recurrent_gemma":
        assert m["graphs"]["step"]["inputs"][1] == "position" and {"key", "value"} <= set(inits)


@pytest.mark.parametrize("family,portable,quant,mobile", VARIANTS, ids=VARIANT_IDS)
def test_quantized_and_mobile_bundles_meet_the_contract(bundles, family, portable, quant, mobile):
    m = check_contract(bundles.get(family, portable, quant, mobile))
    assert m["quant"]["recipe"] == quant and (m["flavour"] == "mobile") == mobile


def test_tokenizer_and_chat_template_kinds(bundles, tmp_path):
    from edgeseq.tokenizer import find_rwkv_vocab

    m = check_contract(bundles.get("mamba", False))
    assert m["tokenizer"] == {"kind": "bytes"} and m["chat_template"] is None
    vocab = find_rwkv_vocab(str(ROOT))
    if vocab is None:
        pytest.skip("the RWKV World vocabulary (rwkv package) is not installed")
    world = export(str(FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"), str(tmp_path / "world"), tokenizer=vocab)
    m = check_contract(Path(world))
    assert m["tokenizer"] == {"kind": "rwkv_world", "file": "rwkv_vocab_v20230424.txt"}
    assert m["chat_template"]["stop_token_ids"] == [261]


def test_a_hf_tokenizer_bundle(tmp_path):
    from conftest import make_mamba

    ck = make_mamba(tmp_path / "ck", seed=1, vocab_size=300, tokenizer_vocab=300)
    m = check_contract(Path(export(str(ck), str(tmp_path / "b"))))
    assert m["tokenizer"] == {"kind": "hf", "file": "tokenizer.json"}


# -- damaged manifests are refused -----------------------------------------------------------------

def damaged(m: dict) -> list[tuple[str, dict, str, bool]]:
    """(what, damaged manifest, text read_manifest's error must contain, whether the schema alone can
    tell: names that refer to other parts of the manifest are RULEs beyond JSON Schema)."""
    out = []

    def variant(what, fn, msg):
        d = copy.deepcopy(m)
        fn(d)
        out.append((what, d, msg, what not in ("a graph input that is not state", "a graph missing a state input")))

    variant("no state", lambda d: d.pop("state"), "no state spec")
    variant("a state tensor without init", lambda d: d["state"][0].pop("init"), "lacks init")
    variant("an undefined symbolic dim", lambda d: d["state"][0]["shape"].__setitem__(1, "max_context"),
            "'max_context', which the manifest does not define")
    variant("a graph input that is not state", lambda d: d["graphs"]["step"]["inputs"].append("past_key_values.9.x"),
            "past_key_values.9.x")
    variant("a misspelt graph input", lambda d: d["graphs"]["step"]["inputs"].append("positions"), "positions")
    variant("a graph missing a state input", lambda d: d["graphs"]["prefill"]["inputs"].pop(),
            "missing: past_key_values")
    variant("no step graph", lambda d: d["graphs"].pop("step"), "no step graph")
    return out


def test_damaged_manifests_are_refused(bundles, tmp_path):
    good = bundles.get("mamba", False)
    m = json.loads((good / "edgeseq.json").read_text())
    for what, d, msg, by_schema in damaged(m):
        assert bool(errors(d)) == by_schema, what  # the schema refuses it where it can tell...
        b = tmp_path / what.replace(" ", "_")
        shutil.copytree(good, b)
        (b / "edgeseq.json").write_text(json.dumps(d))
        with pytest.raises(EdgeseqError, match="damaged manifest|does not define") as e:  # ...and so does edgeseq
            read_manifest(str(b))
        assert msg in str(e.value) and str(b / "edgeseq.json") in str(e.value), (what, str(e.value))
    for what, fn in [("format 2", lambda d: d.__setitem__("format_version", 2)),
                     ("unknown tokenizer kind", lambda d: d.__setitem__("tokenizer", {"kind": "spm"})),
                     ("unknown flavour", lambda d: d.__setitem__("flavour", "tiny")),
                     ("a chat turn without {assistant}", lambda d: d.__setitem__("chat_template", {"turn": "{user}"})),
                     ("a bad hash", lambda d: d["files"].__setitem__("step.onnx", "xyz")),
                     ("an initial state without tensors", lambda d: d.__setitem__("initial_state", {"file": "x"})),
                     ("a state dtype", lambda d: d["state"][0].__setitem__("dtype", "int8"))]:
        d = copy.deepcopy(m)
        fn(d)
        assert errors(d), what
