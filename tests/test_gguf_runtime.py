"""GGUF in edgeseq's own engine and the GGUF writer's recipes:

- a GGUF of an HF checkpoint runs in edgeseq (edgeseq.load("x.gguf")) to the logits of the ONNX bundle of
  the same checkpoint, and to HF's; `edgeseq export x.gguf --format onnx` writes that bundle;
- families llama.cpp has no architecture for (rwkv.cpp's RWKV-4 and RWKV-5 fixtures) go through the
  generic `edgeseq-<family>` architecture and reproduce rwkv.cpp's expected logits;
- every --quant recipe: the types chosen per tensor (kept-F32 tensors, the head, row fallbacks) and each
  type's dequantized error against the f32 weights;
- the command line: export --format gguf, run x.gguf, errors for bad recipes and damaged files.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from conftest import export_bundle, hf_logits64, make_mamba, make_mamba2
from edgeseq.exporters.gguf_writer import export_gguf
from edgeseq.gguf_file import GGUFFile
from gguf_helpers import FIXTURES

PROMPT = [34, 105, 110]


@pytest.mark.parametrize("make", [make_mamba, make_mamba2], ids=["mamba", "mamba2"])
def test_gguf_runs_like_the_bundle(tmp_path, make):
    ckpt = make(tmp_path / "hf", tokenizer_vocab=256)
    g = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(g))
    ids = [5, 9, 200, 31, 7, 77, 12, 150, 3, 3, 60]
    want = hf_logits64(ckpt, ids)
    a = edgeseq.load(export_bundle(ckpt, tmp_path / "bundle")).session()
    b = edgeseq.load(g).session()
    for i, t in enumerate(ids):
        x, y = a.step(t), b.step(t)
        np.testing.assert_allclose(y, x, atol=1e-5)
    np.testing.assert_allclose(y, want[-1], atol=1e-4)
    assert edgeseq.load(g).tokenizer.encode("To be, or not") == a.model.tokenizer.encode("To be, or not")
    # the bundle a GGUF becomes keeps the manifest contract apps rely on
    import json

    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[1] / "schema" / "edgeseq.schema.json").read_text())
    jsonschema.validate(b.model.manifest, schema)


@pytest.mark.parametrize("version, family", [("4v0-660K", "rwkv4"), ("5v2-730K", "rwkv5")])
def test_generic_architecture_reproduces_rwkv_cpp(tmp_path, version, family):
    g = tmp_path / "r.gguf"
    info = export_gguf(str(FIXTURES / f"tiny-rwkv-{version}-FP32.bin"), str(g))
    assert info["architecture"] == f"edgeseq-{family}" and "no " + family in info["generic_because"]
    m = edgeseq.load(g)
    with GGUFFile(g) as f:
        import json

        assert json.loads(f.kv["edgeseq.state"]) == [s.to_json() for s in m.family.state_spec()]
    s = m.session()
    for t in PROMPT:
        logits = s.step(t)
    expected = np.fromfile(FIXTURES / f"expected-logits-{version}.bin", np.float32)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


# dequantized rms error / rms of the weights (this model's matrices, rows of 256 and 512); measured:
# f16 2.1e-4, bf16 1.7e-3, q8_0 5.4e-3, q6_k 1.8e-2, q5_1 3.8e-2, q5_k 3.6e-2, q5_0 4.3e-2, q4_1 7.8e-2,
# q4_k 7.2e-2, q4_0 8.6e-2; bounds 1.5x that (the K-quants' own yardstick against llama.cpp's quantizer
# is in the quant tests)
REL_ERROR = {"f16": 3.2e-4, "bf16": 2.6e-3, "q8_0": 8e-3, "q6_k": 2.7e-2, "q5_1": 5.7e-2, "q5_k": 5.4e-2,
             "q5_0": 6.5e-2, "q4_1": 1.2e-1, "q4_k": 1.1e-1, "q4_0": 1.3e-1}


@pytest.fixture(scope="module")
def wide_mamba(tmp_path_factory):
    """One Mamba layer wide enough for every block type (rows of 256 and 512) and its f32 GGUF."""
    d = tmp_path_factory.mktemp("wide")
    ckpt = make_mamba(d / "hf", hidden_size=256, num_hidden_layers=1, state_size=16, vocab_size=256)
    export_gguf(str(ckpt), str(d / "f32.gguf"))
    return ckpt, GGUFFile(d / "f32.gguf")


@pytest.mark.parametrize("quant", list(REL_ERROR))
def test_quant_recipes(tmp_path, wide_mamba, quant):
    ckpt, ref = wide_mamba
    g = tmp_path / f"{quant}.gguf"
    export_gguf(str(ckpt), str(g), quant=quant)
    with GGUFFile(g) as f:
        t = {n: i.type_name for n, i in f.tensors.items()}
        # llama.cpp's rules: 1-D tensors, norms, ssm_a/ssm_d, the conv stay F32; the tied embedding is the
        # head: Q6_K under the low-bit recipes; dt_proj's rows of 16 (the dt rank) fall back to F16
        for n in ("blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_conv1d.weight", "blk.0.attn_norm.weight"):
            assert t[n] == "F32", n
        base = quant.upper()
        head = base if quant in ("f16", "bf16", "q8_0") else "Q6_K"
        assert t["token_embd.weight"] == head
        assert t["blk.0.ssm_in.weight"] == base and t["blk.0.ssm_out.weight"] == base
        assert t["blk.0.ssm_dt.weight"] == (base if quant in ("f16", "bf16") else "F16")
        assert f.kv["general.file_type"] != ref.kv["general.file_type"]
        for n in ("blk.0.ssm_in.weight", "blk.0.ssm_out.weight", "blk.0.ssm_x.weight"):
            w, q = ref.array(n), f.array(n)
            err = np.sqrt(np.mean((q - w) ** 2) / np.mean(w ** 2))
            assert err < REL_ERROR[quant], (n, t[n], err)
        # and the file runs in edgeseq (dequantized to f32) close to the f32 file
        a = edgeseq.load(g).session().prefill(PROMPT)
        b = edgeseq.load(ref.path).session().prefill(PROMPT)
        assert np.corrcoef(a, b)[0, 1] > 0.9


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeseq.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli(tmp_path):
    ckpt = make_mamba2(tmp_path / "hf", tokenizer_vocab=256)
    g = tmp_path / "m.gguf"
    r = _cli("export", str(ckpt), "-o", str(g), "--format", "gguf", "--quant", "q8_0")
    assert r.returncode == 0 and "mamba2" in r.stdout, r.stderr
    r = _cli("run", str(g), "-p", "To be", "-n", "6", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("To be"), r.stderr
    r = _cli("inspect", str(g))
    assert r.returncode == 0 and "family      mamba2  (mamba2)" in r.stdout and "Q8_0" in r.stdout, r.stderr
    r = _cli("export", str(g), "-o", str(tmp_path / "b"), "--format", "onnx")
    assert r.returncode == 0, r.stderr
    want = edgeseq.load(g).session().prefill([1, 2, 3])
    np.testing.assert_allclose(edgeseq.load(tmp_path / "b").session().prefill([1, 2, 3]), want, atol=1e-6)
    for args, msg in ((("export", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--format", "gguf", "--quant", "q9"),
                       "not available for gguf"),
                      (("export", str(ckpt), "-o", str(g), "--format", "gguf"), "already exists"),
                      (("export", str(ckpt), "-o", str(tmp_path / "y"), "--format", "ggml"), "choose onnx or gguf")):
        r = _cli(*args)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.gguf").exists()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(g.read_bytes()[:5000])
    r = _cli("run", str(bad), "-p", "x")
    assert r.returncode == 1 and "bad.gguf" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("quant, bits", [("q8_0", 8), ("q4_0", 4), ("q4_k", 8)])
def test_quantized_blocks_feed_matmulnbits(tmp_path, wide_mamba, quant, bits):
    """Q4_0/Q8_0 matrices reach the graphs as MatMulNBits weights (no f32 copy), computing what the
    dequantized weights compute (accuracy_level 0; the default 4 rounds activations to int8); other
    block types (here Q4_K, and the Q6_K tied embedding of the q4_0 file) are re-quantized to 8 bits,
    or kept f32 with requant8=False."""
    ckpt, ref = wide_mamba
    g = tmp_path / f"{quant}.gguf"
    export_gguf(str(ckpt), str(g), quant=quant)
    ids = [34, 105, 110, 7, 9, 200]
    exact = edgeseq.load(g, portable=True).session().prefill(ids)  # portable: every tensor dequantized
    m = edgeseq.load(g, accuracy_level=0, requant8=False)
    q = m.manifest["quant"]
    stored = {"q8_0": "Q8_0", "q4_0": "Q4_0"}.get(quant)
    if stored:
        assert q["form"] == "matmulnbits"
        assert {"layers.0.in_proj", "layers.0.out_proj", "layers.0.x_proj"} <= set(q["tensors"])
        assert all(t["bits"] == bits for t in q["tensors"].values())
    else:
        assert "tensors" not in q  # Q4_K kept f32
    np.testing.assert_allclose(m.session().prefill(ids), exact, atol=1e-4)
    d = edgeseq.load(g, accuracy_level=0)
    assert {"embed", "layers.0.in_proj", "layers.0.out_proj", "layers.0.x_proj"} <= set(d.manifest["quant"]["tensors"])
    assert d.weights_bytes < 0.5 * edgeseq.load(ref.path).weights_bytes
    # measured on this model: re-quantizing moves the logits by 0.24 (q4_k) and 0.04 (q4_0's Q6_K head)
    # where the quantization itself moved them by 2.1 and 1.8 from the f32 model's (max |logit| 7.8)
    np.testing.assert_allclose(d.session().prefill(ids), exact, atol=0.05 * np.abs(exact).max())
    np.testing.assert_allclose(edgeseq.load(g).session().prefill(ids), exact, atol=0.1 * np.abs(exact).max())


def _hybrid_makers():
    import test_recurrent_gemma as rg
    import test_zamba as z1
    import test_zamba2 as z2

    return {"zamba": (z1.make_zamba, z1.CONFIGS["2heads"]), "zamba2": (z2.make_zamba2, z2.CONFIGS["2blocks-gqa-dtmin"]),
            "recurrent_gemma": (rg.make_recurrent_gemma, rg.CONFIGS["mqa"])}


@pytest.mark.parametrize("family", ["zamba", "zamba2", "recurrent_gemma"])
def test_generic_architecture_for_hybrid_families(tmp_path, family):
    """Families with attention (position input, KV rings) need no GGUF code of their own: the generic
    architecture carries their config and state spec, and the GGUF runs as their bundle does."""
    make, cfg = _hybrid_makers()[family]
    ckpt = make(tmp_path / "hf", seed=1, **cfg)
    g = tmp_path / "m.gguf"
    assert export_gguf(str(ckpt), str(g))["architecture"] == f"edgeseq-{family}"
    a = edgeseq.load(g).session()
    b = edgeseq.load(export_bundle(ckpt, tmp_path / "b")).session()
    for t in [5, 9, 100, 3, 7, 200, 1, 2]:
        np.testing.assert_allclose(a.step(t), b.step(t), atol=1e-6)
    assert a.position == b.position == 8


@pytest.mark.parametrize("key, named", [("backbone.layers.0.norm.weight", "'layers.0.norm' (16,)"),
                                        # the tensor table's shape, before the graphs are built
                                        ("backbone.layers.1.mixer.conv1d.bias",
                                         "conv1d.bias (32,) gives layers.1.conv_bias of shape (32,)")])
def test_a_tensor_of_the_wrong_shape_is_named_and_nothing_is_written(tmp_path, key, named):
    """The writer checks the weights against the config before it writes (edgeseq.weight_check, as the
    ONNX export does): a norm or a conv bias at half its width is an error naming that weight, on the
    command line one `error:` line and exit status 1; no output and no temporary file are left."""
    from safetensors.numpy import load_file, save_file

    from edgeseq.errors import EdgeseqError

    ckpt = make_mamba(tmp_path / "hf", hidden_size=32)
    w = load_file(ckpt / "model.safetensors")
    w[key] = w[key][:w[key].shape[0] // 2].copy()
    save_file(w, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EdgeseqError, match="hf: ") as failed:
        export_gguf(str(ckpt), str(tmp_path / "m.gguf"))
    assert named in str(failed.value)
    r = _cli("export", str(ckpt), "-o", str(tmp_path / "m.gguf"))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and named in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_failure_while_streaming_leaves_the_old_file(tmp_path, monkeypatch):
    """Tensors are written one at a time after the header: a failure half-way (here the encoder of the
    fifth tensor) removes the partial file and leaves the file being replaced as it was."""
    import edgeseq.exporters.gguf_writer as gw
    from edgeseq.errors import EdgeseqError

    ckpt = make_mamba(tmp_path / "hf")
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(out))
    before = out.read_bytes()
    calls, encode = [], gw._encode

    def failing(a, t):
        calls.append(t)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return encode(a, t)

    monkeypatch.setattr(gw, "_encode", failing)
    with pytest.raises(EdgeseqError, match="m.gguf: the disk is full"):
        export_gguf(str(ckpt), str(out), force=True, quant="q8_0")
    assert len(calls) == 5 and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]
