"""`export --mobile`: ORT-format step graphs (batch 1, static shapes) for ONNX Runtime Mobile.

For every family the `.ort` graph, run with plain ONNX Runtime from the manifest alone, gives the logits
of the portable `.onnx` step graph it came from, token after token; and a mobile bundle loaded with
edgeseq reproduces an outside reference: rwkv.cpp's expected logits (RWKV-4, 5, 7 fixtures) and
transformers in float64 (Mamba, Mamba-2). Also: the operator config of a reduced build, RWKV-4's state
initial values and a state-tuned RWKV bundle's initial state, f16, bad input, and the fixed-IO code path
that ONNX Runtime's CUDA graphs need (on CPU here; on a GPU where one is present).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgeseq
from conftest import hf_logits64, make_mamba, make_mamba2, random_ids
from edgeseq.errors import EdgeseqError
from edgeseq.exporters.export import export
from edgeseq.exporters.mobile import export_mobile

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
RWKV_FIXTURES = {"rwkv4": "4v0-660K", "rwkv5": "5v2-730K", "rwkv7": "7v0-834K"}
PROMPT = [34, 105, 110]  # the bytes of '"in', as in rwkv.cpp's test
FAMILIES = ["mamba", "mamba2", "rwkv4", "rwkv5", "rwkv6", "rwkv7", "zamba", "zamba2", "recurrent_gemma"]
M, H = "mamba", "hybrid"  # Zamba's layer kinds


def _checkpoint(family: str, d: Path) -> Path:
    if family == "mamba":
        return make_mamba(d / "hf", seed=3, hidden_size=32, num_hidden_layers=2)
    if family == "mamba2":
        return make_mamba2(d / "hf", seed=3)
    if family == "zamba":
        from test_zamba import make_zamba

        return make_zamba(d / "hf", seed=5, layers_block_type=[M, H, M, H])
    if family == "zamba2":
        from test_zamba2 import make_zamba2

        return make_zamba2(d / "hf", seed=5, layers_block_type=["linear_attention", "hybrid"] * 2, num_mem_blocks=1,
                           max_position_embeddings=256)
    if family == "recurrent_gemma":
        from test_recurrent_gemma import make_recurrent_gemma

        return make_recurrent_gemma(d / "hf", seed=3, hidden_size=48, intermediate_size=192, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=1)
    if family == "rwkv6":
        import torch
        from rwkv_builders import v6_state_dict

        torch.save(v6_state_dict(C=64, L=2, H=2, F=224), d / "RWKV-6.pth")
        return d / "RWKV-6.pth"
    return FIXTURES / f"tiny-rwkv-{RWKV_FIXTURES[family]}-FP32.bin"


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, checkpoint, portable bundle, mobile bundle) of one family."""
    d = tmp_path_factory.mktemp(f"mobile-{request.param}")
    ckpt = _checkpoint(request.param, d)
    return (request.param, ckpt, export(str(ckpt), str(d / "portable"), portable=True),
            export_mobile(str(ckpt), str(d / "mobile")))


def manifest(bundle) -> dict:
    with open(os.path.join(bundle, "edgeseq.json")) as f:
        return json.load(f)


def initial_state(bundle, m: dict) -> dict:
    """What an app does: each state tensor filled with its manifest `init`, then the bundle's tuned
    initial state where it has one."""
    dims = lambda s: [m[d] if isinstance(d, str) else d for d in s["shape"][1:]]  # noqa: E731 (max_context)
    state = {s["name"]: np.full([1, *dims(s)], s["init"], np.float32) for s in m["state"]}
    if m.get("initial_state"):
        from safetensors.numpy import load_file

        state.update(load_file(os.path.join(bundle, m["initial_state"]["file"])))
    return state


def run_steps(bundle, ids, state=None) -> np.ndarray:
    """Drive a bundle's step graph with plain ONNX Runtime, from the manifest alone: (len(ids), vocab)."""
    m = manifest(bundle)
    g = m["graphs"]["step"]
    sess = ort.InferenceSession(os.path.join(bundle, g["file"]), providers=["CPUExecutionProvider"])
    state = dict(state) if state is not None else initial_state(bundle, m)
    out = []
    for pos, t in enumerate(ids):
        feeds = {"input_ids": np.array([[t]], np.int64), **state}
        if "position" in g["inputs"]:  # attention families: the token's absolute position
            feeds["position"] = np.array([pos], np.int64)
        res = sess.run(None, feeds)
        named = dict(zip(g["outputs"], res))
        out.append(named["logits"][0])
        state = {s["name"]: named[s["output"]] for s in m["state"]}
    return np.stack(out)


def test_ort_graph_matches_the_onnx_graph(pair):
    family, _, portable, mobile = pair
    m = manifest(mobile)
    assert m["flavour"] == "mobile" and list(m["graphs"]) == ["step"] and m["graphs"]["step"]["file"] == "step.ort"
    assert sorted(os.listdir(mobile)) == sorted(["edgeseq.json", "step.ort", "required_operators.config",
                                                 *([m["tokenizer"]["file"]] if m["tokenizer"].get("file") else [])])
    sess = ort.InferenceSession(os.path.join(mobile, "step.ort"), providers=["CPUExecutionProvider"])
    for v in [*sess.get_inputs(), *sess.get_outputs()]:  # every shape static, batch 1
        assert all(isinstance(d, int) for d in v.shape) and v.shape[0] == 1, (v.name, v.shape)
    assert [i.name for i in sess.get_inputs()] == m["graphs"]["step"]["inputs"]
    ids = random_ids(m["vocab_size"], 24, seed=5)
    a, b = run_steps(mobile, ids), run_steps(portable, ids)
    assert a.std() > 0.1 and len(set(a.argmax(-1).tolist())) > 3  # not degenerate
    assert np.abs(a - b).max() < 1e-5 * max(1.0, float(np.abs(b).max())), family


def test_ops_config_lists_the_graphs_standard_ops(pair):
    family, _, portable, mobile = pair
    ops = set()
    for line in Path(mobile, "required_operators.config").read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _, names = line.split(";")
            assert domain == "ai.onnx", line  # standard ops only: no com.microsoft
            ops.update(names.split(","))
    src = {n.op_type for n in onnx.load(os.path.join(portable, "step.onnx"), load_external_data=False).graph.node}
    # level-basic optimization only removes nodes (Shape folds once the batch is static); it adds none
    assert ops <= src and {"MatMul", "Gather", "Add", "Mul"} <= ops, (family, ops, src)
    assert "Shape" not in ops and "Scan" not in ops


def test_mobile_bundle_matches_outside_reference(pair):
    family, ckpt, _, mobile = pair
    model = edgeseq.load(mobile)
    assert model.engine.decode_graph == "step"
    if family in RWKV_FIXTURES:  # rwkv.cpp's own expected logits after '"in'
        expected = np.fromfile(FIXTURES / f"expected-logits-{RWKV_FIXTURES[family]}.bin", np.float32)
        logits = model.session().prefill(PROMPT)
        assert np.abs(logits - expected).max() < 1e-3
    elif family.startswith("mamba"):  # transformers, float64, every position
        ids = random_ids(256, 32, seed=9)
        ref = hf_logits64(ckpt, ids)
        got = model.session().logits_all(ids)
        assert np.abs(got - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    else:  # RWKV-6, Zamba, Zamba2, RecurrentGemma: their portable bundles are checked against
        # their references (the rwkv package, transformers) in their own test files
        ids = random_ids(256, 16, seed=9)
        ref = edgeseq.load(pair[2]).session().logits_all(ids)
        assert np.abs(model.session().logits_all(ids) - ref).max() < 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_rwkv4_running_maximum_starts_where_the_manifest_says(tmp_path):
    ckpt = FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"
    mobile = export_mobile(str(ckpt), str(tmp_path / "m"))
    m = manifest(mobile)
    inits = {s["kind"]: s["init"] for s in m["state"]}
    assert inits == {"shift_att": 0.0, "aa": 0.0, "bb": 0.0, "pp": -1e30, "shift_ffn": 0.0}
    assert all(s["shape"][0] == 1 for s in m["state"])
    expected = np.fromfile(FIXTURES / "expected-logits-4v0-660K.bin", np.float32)
    # an app that fills the state from the manifest reproduces rwkv.cpp (with aa = bb = 0 the running
    # maximum's start cancels out of the ratio aa/bb: -1e30 is there so that exp() never overflows)
    assert np.abs(run_steps(mobile, PROMPT)[-1] - expected).max() < 1e-3


def test_state_tuned_bundle_ships_its_initial_state(tmp_path):
    import torch
    ckpt = FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"  # 12 layers, 8 heads of 8
    g = torch.Generator().manual_seed(0)
    torch.save({f"blocks.{i}.att.time_state": torch.randn(8, 8, 8, generator=g) * 0.3 for i in range(12)},
               tmp_path / "state.pth")
    tuned = export(str(ckpt), str(tmp_path / "tuned"), portable=True, initial_state=str(tmp_path / "state.pth"))
    mobile = export_mobile(str(ckpt), str(tmp_path / "m"), initial_state=str(tmp_path / "state.pth"))
    m = manifest(mobile)
    assert m["initial_state"]["file"] == "initial_state.safetensors"
    assert os.path.isfile(os.path.join(mobile, "initial_state.safetensors"))
    ref = edgeseq.load(tuned).session().logits_all(PROMPT)
    assert np.abs(run_steps(mobile, PROMPT) - ref).max() < 1e-5  # an app reading the manifest
    assert np.abs(edgeseq.load(mobile).session().logits_all(PROMPT) - ref).max() < 1e-5
    plain = run_steps(mobile, PROMPT, {s["name"]: np.zeros([1, *s["shape"][1:]], np.float32) for s in m["state"]})
    assert np.abs(plain - ref).max() > 1e-2  # without the tuned state the output differs


def test_f16_keeps_half_size_weights_and_a_tied_matrix_is_stored_once(tmp_path):
    ckpt = make_mamba2(tmp_path / "hf", seed=3, hidden_size=64, num_heads=16, num_hidden_layers=2, vocab_size=4096,
                       tokenizer_vocab=4096, tie_word_embeddings=True)  # the embedding (1 MiB): most of the weights
    f32 = export_mobile(str(ckpt), str(tmp_path / "m32"))
    f16 = export_mobile(str(ckpt), str(tmp_path / "m16"), quant="f16")
    p16 = export(str(ckpt), str(tmp_path / "p16"), portable=True, quant="f16")
    s32, s16 = os.path.getsize(Path(f32, "step.ort")), os.path.getsize(Path(f16, "step.ort"))
    w32 = manifest(f32)["weights"]["weights_bytes"]
    assert w32 < s32 < 1.1 * w32, (s32, w32)  # the head's alias of the embedding is not a second copy
    assert s16 < 0.6 * s32, (s32, s16)  # f16 matrices stay f16 in the file
    ids = random_ids(4096, 12, seed=2)
    assert np.abs(run_steps(f16, ids) - run_steps(p16, ids)).max() < 1e-4


def test_bad_input_leaves_nothing(tmp_path):
    with pytest.raises(EdgeseqError, match="no such|not found|does not exist"):
        export_mobile(str(tmp_path / "nothing"), str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    ckpt = FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"
    with pytest.raises(EdgeseqError, match="already exists"):
        export_mobile(str(ckpt), str(tmp_path / "out"))
    with pytest.raises(EdgeseqError, match="--quant int3"):
        export_mobile(str(ckpt), str(tmp_path / "o2"), quant="int3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


# -- the fixed-IO decode path that ONNX Runtime's CUDA graphs need --------------------------------

def test_fixed_io_path_gives_the_same_tokens_on_cpu(tmp_path):
    """With every step input and output bound once to fixed buffers (what CUDA graphs replay; the
    `fixed_io` option on its own), a session decodes the same logits as the default path; forks get
    their own graph ids. A graph with a position input is refused by name."""
    ckpt = FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"
    bundle = export(str(ckpt), str(tmp_path / "b"))
    ref_model, model = edgeseq.load(bundle), edgeseq.load(bundle, fixed_io=True)  # cuda_graph's path, no CUDA
    assert (ref_model.engine.decode_graph, model.engine.decode_graph) == ("prefill", "step")
    ids = random_ids(256, 20, seed=4)
    a, b = ref_model.session(), model.session()
    ref = np.stack([a.prefill(ids[:5])] + [a.step(t) for t in ids[5:]])
    got = np.stack([b.prefill(ids[:5])] + [b.step(t) for t in ids[5:]])
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))  # step graph vs the fused prefill graph: rounding only
    assert np.abs(got - ref).max() < tol and len(set(ref.argmax(-1).tolist())) > 3
    fork, fork_ref = b.fork(), a.fork()
    ids2 = [1, 2, 3]
    assert np.abs(np.stack([fork.step(t) for t in ids2]) - np.stack([fork_ref.step(t) for t in ids2])).max() < tol
    assert np.abs(b.step(7) - a.step(7)).max() < tol  # the original is untouched by its fork
    assert model.engine.new_graph_ids(1) == [5]  # two sessions took ids 1-4
    assert b._fixed and not a._fixed


def test_fixed_io_refuses_a_position_input(tmp_path):
    bundle = export(str(_checkpoint("recurrent_gemma", tmp_path)), str(tmp_path / "b"))
    assert edgeseq.load(bundle).uses_position
    with pytest.raises(EdgeseqError, match="fixed_io: graphs with a position input"):
        edgeseq.load(bundle, fixed_io=True)


def test_cuda_graph_needs_cuda(tmp_path):
    bundle = export(str(FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"), str(tmp_path / "b"))
    with pytest.raises(EdgeseqError, match="cuda_graph needs device='cuda'"):
        edgeseq.load(bundle, cuda_graph=True)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["iobinding", "cuda-graph"])
def test_cuda_greedy_tokens_equal_cpu(tmp_path, cuda_graph):
    bundle = export(str(FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin"), str(tmp_path / "b"))
    out = {}
    for dev in ("cpu", "cuda"):
        s = edgeseq.load(bundle, device=dev, cuda_graph=cuda_graph and dev == "cuda").session()
        tok, toks = int(np.argmax(s.prefill(PROMPT))), []
        for _ in range(32):
            toks.append(tok)
            tok = int(np.argmax(s.step(tok)))
        out[dev] = toks
    assert out["cuda"] == out["cpu"]


def test_cli_export_mobile_and_the_cuda_graph_option(tmp_path):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "edgeseq.cli"]
    out = tmp_path / "m"
    r = subprocess.run([*cli, "export", str(FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"), "-o", str(out), "--mobile"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert manifest(out)["flavour"] == "mobile" and (out / "step.ort").is_file()
    r = subprocess.run([*cli, "run", str(out), "-p", "hi", "-n", "4", "--seed", "1", "--cuda-graph"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cuda_graph needs device='cuda'" in r.stderr


def test_weights_over_the_ort_limit_are_refused(tmp_path, monkeypatch):
    import edgeseq.exporters.mobile as mobile

    monkeypatch.setattr(mobile, "ORT_FILE_LIMIT", 1000)  # the tiny model's weights stand for > 2 GiB
    with pytest.raises(EdgeseqError, match="must stay under 2 GiB: export with --quant f16"):
        export_mobile(str(FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"), str(tmp_path / "m"))
    assert not list(tmp_path.iterdir())


def test_int8_stays_int8_and_int4_is_refused(tmp_path):
    """int8 (DequantizeLinear of int8 weights: not constant-folded by ORT) ships at int8 size with the
    exact dequantize-then-MatMul numbers; ORT's format cannot hold int4 tensors: a clear error."""
    ckpt = make_mamba2(tmp_path / "hf", seed=3, hidden_size=64, num_heads=16, num_hidden_layers=2, vocab_size=4096,
                       tokenizer_vocab=4096, tie_word_embeddings=True)
    f32 = export_mobile(str(ckpt), str(tmp_path / "m32"))
    i8 = export_mobile(str(ckpt), str(tmp_path / "m8"), quant="int8")
    p8 = export(str(ckpt), str(tmp_path / "p8"), portable=True, quant="int8")
    assert os.path.getsize(Path(i8, "step.ort")) < 0.4 * os.path.getsize(Path(f32, "step.ort"))
    ids = random_ids(4096, 12, seed=2)
    # the portable graph at ORT's level basic: DequantizeLinear then MatMul, as written (level all may
    # fuse it into an int8-activation kernel, other numbers)
    m = manifest(p8)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(os.path.join(p8, "step.onnx"), so, providers=["CPUExecutionProvider"])
    state, ref = initial_state(p8, m), []
    for t in ids:
        out = dict(zip(m["graphs"]["step"]["outputs"], sess.run(None, {"input_ids": np.array([[t]]), **state})))
        ref.append(out["logits"][0])
        state = {s["name"]: out[s["output"]] for s in m["state"]}
    assert np.abs(run_steps(i8, ids) - np.stack(ref)).max() < 1e-5
    assert np.abs(run_steps(i8, ids) - run_steps(f32, ids)).max() > 1e-3  # it is quantized
    with pytest.raises(EdgeseqError, match="ORT format cannot hold int4 tensors"):
        export_mobile(str(ckpt), str(tmp_path / "m4"), quant="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m32", "m8", "p8"]
