"""rwkv.cpp's model container, read from the shared fixtures (real trained tiny RWKV models).

The RWKV families (their graphs, and undoing what rwkv.cpp's converter did to some tensors) come with
the RWKV issue; this covers the container: header, tensor table, values, and damaged files.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.exporters.rwkvcpp import RwkvCppFile

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
MODELS = {"4v0": (128, 4), "5v2": (64, 12), "6v0": (64, 12), "7v0": (64, 12)}  # n_embed, n_layer (from the file names' models)


def fixture(tag: str) -> Path:
    (path,) = FIXTURES.glob(f"tiny-rwkv-{tag}-*-FP32.bin")
    return path


@pytest.mark.parametrize("tag", list(MODELS))
def test_header_and_tensor_table(tag):
    f = RwkvCppFile(str(fixture(tag)))
    n_embed, n_layer = MODELS[tag]
    assert f.config["n_vocab"] == 256 and f.config["n_embed"] == n_embed and f.config["n_layer"] == n_layer
    assert f.config["data_type"] == 0
    layers = {int(m.group(1)) for k in f.keys() if (m := re.match(r"blocks\.(\d+)\.", k))}
    assert layers == set(range(n_layer))
    assert f.shape("emb.weight") == (256, n_embed) and f.shape("head.weight") == (256, n_embed)
    # every byte of the file is accounted for by the header and the tensor records
    end = max(off + int(np.prod(shape)) * 4 for _, shape, off in f.meta.values())
    assert end == fixture(tag).stat().st_size


def test_values_decode_as_rwkv_cpp_stored_them():
    # rwkv.cpp's converter stores RWKV-4's time_decay as -exp(w) (always negative) and RWKV-5.2's as
    # exp(-exp(w)) (always in (0, 1)); layer norms of a trained model have weights near 1
    v4 = RwkvCppFile(str(fixture("4v0")))
    assert (v4.get("blocks.0.att.time_decay") < 0).all()
    v5 = RwkvCppFile(str(fixture("5v2")))
    d = v5.get("blocks.3.att.time_decay")
    assert d.shape == (8, 8, 1) and ((d > 0) & (d < 1)).all()
    ln = v5.get("blocks.0.ln1.weight")
    assert ln.dtype == np.float32 and 0.2 < float(np.abs(ln).mean()) < 5
    emb = v4.get("emb.weight")
    assert emb.shape == (256, 128) and np.isfinite(emb).all() and emb.std() > 0


def test_truncated_file_names_the_tensor(tmp_path):
    data = fixture("4v0").read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeseqError, match=r"cut\.bin: truncated"):
        RwkvCppFile(str(bad))


def test_not_an_rwkv_cpp_file(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(EdgeseqError, match="not an rwkv.cpp model"):
        RwkvCppFile(str(bad))
    with pytest.raises(EdgeseqError, match="no such file"):
        RwkvCppFile(str(tmp_path / "missing.bin"))


def test_old_or_unknown_quantized_tensor_is_a_clear_error(tmp_path):
    name = b"emb.weight"
    for version, ttype, words in ((100, 2, "version-100"), (101, 5, "data type 5")):
        body = struct.pack("<6i", 0x67676D66, version, 256, 32, 1, 2) + struct.pack("<3i", 2, len(name), ttype)
        body += struct.pack("<2i", 32, 256) + name + bytes(256 * 32)
        bad = tmp_path / "q.bin"
        bad.write_bytes(body)
        with pytest.raises(UnsupportedError, match=words):
            RwkvCppFile(str(bad))


RWKV_CPP_QUANT = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 7, "Q5_1": 8, "Q8_0": 9}  # rwkv.cpp's data type codes


@pytest.mark.parametrize("qname,tol", [("Q8_0", 0.2), ("Q5_1", 1.0), ("Q4_0", 4.0)])
def test_quantized_file_reads_its_blocks(tmp_path, qname, tol):
    """A v5.2 fixture re-written as rwkv.cpp writes a quantized file (its quantizer: every matrix but
    the embedding in ggml blocks of 32, vectors FP32, type codes from its FILE_FORMAT.md). The reader
    must return exactly the dequantized blocks, and the model stays close to the FP32 one."""
    from gguf import GGMLQuantizationType, quants

    import edgeseq
    from edgeseq.exporters.export import export

    f32 = RwkvCppFile(str(fixture("5v2")))
    qtype = GGMLQuantizationType[qname]
    path = tmp_path / f"m-{qname}.bin"
    expect = {}
    with open(path, "wb") as f:
        h = f32.config
        f.write(struct.pack("<6i", 0x67676D66, 101, h["n_vocab"], h["n_embed"], h["n_layer"], RWKV_CPP_QUANT[qname]))
        for name in f32.keys():
            a = f32.get(name)
            quant = a.ndim == 2 and name != "emb.weight"
            data = quants.quantize(a, qtype) if quant else a.astype(np.float32)
            expect[name] = quants.dequantize(data, qtype).reshape(a.shape) if quant else a
            f.write(struct.pack("<3i", a.ndim, len(name.encode()), RWKV_CPP_QUANT[qname] if quant else 0))
            f.write(struct.pack(f"<{a.ndim}i", *reversed(a.shape)))
            f.write(name.encode() + data.tobytes())
    q = RwkvCppFile(str(path))
    assert q.meta["blocks.0.att.key.weight"][0] == RWKV_CPP_QUANT[qname]
    for name in f32.keys():
        assert np.array_equal(q.get(name), expect[name]), name
    logits = edgeseq.load(export(str(path), str(tmp_path / "b"))).session().prefill([34, 105, 110])
    # the same dequantized weights in an FP32 file give the same model
    write_container(tmp_path / "deq.bin", {**f32.config, "file_version": 101}, expect, fp16=False)
    same = edgeseq.load(export(str(tmp_path / "deq.bin"), str(tmp_path / "d"))).session().prefill([34, 105, 110])
    assert np.abs(logits - same).max() < 1e-5
    # and it stays near rwkv.cpp's FP32 logits (a 730K-parameter model is sensitive: 0.08 at Q8_0, 1.9 at Q4_0)
    expected = np.fromfile(FIXTURES / "expected-logits-5v2-730K.bin", np.float32)
    assert 0 < np.abs(logits - expected).max() < tol


def write_container(path, header, tensors, fp16: bool):
    """An rwkv.cpp file as its converter writes one: header, then per tensor its dims (reversed), name
    and data; matrices in FP16 when the file is FP16 (1-D vectors and time_* stay FP32)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<6i", 0x67676D66, header["file_version"], header["n_vocab"], header["n_embed"],
                            header["n_layer"], int(fp16)))
        for name, a in tensors.items():
            half = fp16 and a.ndim > 1 and ".time_" not in name
            data = a.astype(np.float16 if half else np.float32)
            f.write(struct.pack("<3i", a.ndim, len(name.encode()), 1 if half else 0))
            f.write(struct.pack(f"<{a.ndim}i", *reversed(a.shape)))
            f.write(name.encode() + data.tobytes())


def test_fp16_file_exports_and_matches_its_rounded_weights(tmp_path):
    import edgeseq
    from edgeseq.exporters.export import export

    f32 = RwkvCppFile(str(fixture("4v0")))
    tensors = {k: f32.get(k) for k in f32.keys()}
    write_container(tmp_path / "m-FP16.bin", f32.config, tensors, fp16=True)
    f16 = RwkvCppFile(str(tmp_path / "m-FP16.bin"))
    assert f16.meta["blocks.0.att.key.weight"][0] == 1 and f16.meta["blocks.0.ln1.weight"][0] == 0
    rounded = {k: (v.astype(np.float16).astype(np.float32) if v.ndim > 1 and ".time_" not in k else v)
               for k, v in tensors.items()}
    write_container(tmp_path / "rounded.bin", f32.config, rounded, fp16=False)  # the same weights, stored FP32
    a = edgeseq.load(export(str(tmp_path / "m-FP16.bin"), str(tmp_path / "a"))).session().prefill([34, 105, 110])
    b = edgeseq.load(export(str(tmp_path / "rounded.bin"), str(tmp_path / "b"))).session().prefill([34, 105, 110])
    assert np.abs(a - b).max() < 1e-5  # FP16 tensors are read exactly
    expected = np.fromfile(FIXTURES / "expected-logits-4v0-660K.bin", np.float32)
    assert 0 < np.abs(a - expected).max() < 5e-2  # and the FP16 model stays close to the FP32 one


def rwkv_cpp_v6(sd: dict) -> dict:
    """A BlinkDL v6.0 state dict as rwkv.cpp's converter stores it (python/convert_pytorch_to_ggml.py,
    its v6.0 branch): time_* squeezed; time_faaaa unsqueezed to (H, N, 1); time_decay reshaped (H, N, 1);
    every matrix whose name contains '.time_maa_w1' or '.time_decay_w' transposed to the (out, in) layout
    its ggml_mul_mat reads (rwkv_graph.inc, rwkv_att_v6): time_maa_w1, time_decay_w1 *and* time_decay_w2;
    time_maa_w2 (5, D, C) -> (5, C, D)."""
    H = sd["blocks.0.att.time_faaaa"].shape[0]
    out = {}
    for k, t in sd.items():
        a = t.float().numpy()
        if ".time_" in k:
            a = a.squeeze()
        if ".time_faaaa" in k:
            a = a[..., None]
        if ".time_maa_w1" in k or ".time_decay_w" in k:
            a = a.T
        if ".time_maa_w2" in k:
            a = a.transpose(0, 2, 1)
        if ".time_decay" in k and "_w" not in k:
            a = a.reshape(H, -1, 1)
        out[k] = np.ascontiguousarray(a)
    return out


def test_rwkv6_file_written_the_rwkv_cpp_way_matches_its_pth(tmp_path):
    """A v6 .pth with a non-square decay LoRA (C 64, D_d 16; real models: C 2048, D_d 64) written through
    rwkv.cpp's converter rules: edgeseq reads back the .pth's model. The real rwkv.cpp v6 fixture
    (test_rwkv6_rwkvcpp.py) proves the values against rwkv.cpp's logits, but its decay LoRA is square
    (64 x 64), so only this file shows that both decay matrices come back in their shapes."""
    import torch
    import edgeseq
    from edgeseq.exporters.export import export
    from edgeseq.families.rwkv6 import Rwkv6
    from rwkv_builders import v6_state_dict

    sd = v6_state_dict(C=64, L=3, H=2, D_MIX=8, D_DECAY=16)
    torch.save(sd, tmp_path / "m.pth")
    converted = rwkv_cpp_v6(sd)
    assert converted["blocks.0.att.time_decay_w1"].shape == (16, 64)  # stored (out, in)
    assert converted["blocks.0.att.time_decay_w2"].shape == (64, 16)
    assert converted["blocks.0.att.time_maa_w2"].shape == (5, 64, 8)
    V, C = converted["emb.weight"].shape
    write_container(tmp_path / "m.bin", {"file_version": 101, "n_vocab": V, "n_embed": C, "n_layer": 3},
                    converted, fp16=False)
    cfg = Rwkv6.read_config(RwkvCppFile(str(tmp_path / "m.bin")))
    assert (cfg.mix_lora, cfg.decay_lora, cfg.n_head, cfg.head_size) == (8, 16, 2, 32)
    ids = np.random.default_rng(0).integers(0, V, 24).tolist()
    a = edgeseq.load(export(str(tmp_path / "m.bin"), str(tmp_path / "a"))).session().logits_all(ids)
    b = edgeseq.load(export(str(tmp_path / "m.pth"), str(tmp_path / "b"))).session().logits_all(ids)
    assert np.abs(a - b).max() < 1e-5 and np.abs(b).max() > 1


@pytest.mark.parametrize("version", ["5.0", "5.1"])
def test_rwkv5_0_and_5_1_files_written_the_rwkv_cpp_way_read_as_their_pth(tmp_path, version):
    """No rwkv.cpp v5.0/5.1 fixture exists; this writes a v5.0/5.1 .pth through the transforms rwkv.cpp's
    converter applies (python/convert_pytorch_to_ggml.py: time_* squeezed; time_decay stored as
    exp(-exp(d)), reshaped (H, 1, 1) without a gate, unsqueezed to (H, 1) with one; time_first stored as
    exp(u), (H, 1, 1)) and checks that edgeseq recovers the .pth's canonical weights from it. The .pth
    path itself is proven against the rwkv package in test_rwkv5_pth.py. The one intended difference:
    ln_x's eps is rwkv.cpp's (1e-5) for an rwkv.cpp file, the package's (64e-5) for a .pth."""
    import torch
    from edgeseq.exporters.checkpoint import BlinkDLFile
    from edgeseq.families.rwkv5 import Rwkv5
    from rwkv_builders import v5_state_dict

    sd = v5_state_dict(version, C=64, L=2, H=2, F=224)
    torch.save(sd, tmp_path / "m.pth")
    gate = "blocks.0.att.gate.weight" in sd
    converted = {}
    for k, t in sd.items():
        a = t.float().numpy()
        if ".time_" in k:
            a = a.squeeze()
        if k.endswith(".time_decay"):
            a = np.exp(-np.exp(a))
            a = a[..., None] if gate else a.reshape(-1, 1, 1)
        if k.endswith(".time_first"):
            a = np.exp(a).reshape(-1, 1, 1)
        converted[k] = np.ascontiguousarray(a, np.float32)
    V, C = converted["emb.weight"].shape
    write_container(tmp_path / "m.bin", {"file_version": 101, "n_vocab": V, "n_embed": C, "n_layer": 2},
                    converted, fp16=False)
    pth, cpp = BlinkDLFile(str(tmp_path / "m.pth")), RwkvCppFile(str(tmp_path / "m.bin"))
    fam_pth, fam_cpp = Rwkv5(Rwkv5.read_config(pth)), Rwkv5(Rwkv5.read_config(cpp))
    a_cfg, b_cfg = fam_pth.config_json(), fam_cpp.config_json()
    assert (b_cfg["version"], b_cfg["gate"], b_cfg["ln_x_eps"]) == (version, gate, 1e-5)
    assert {k: v for k, v in a_cfg.items() if k != "ln_x_eps"} == {k: v for k, v in b_cfg.items() if k != "ln_x_eps"}
    ours, theirs = dict(fam_pth.convert(pth)), dict(fam_cpp.convert(cpp))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert np.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), k
    # and the file exports and runs
    import edgeseq
    from edgeseq.exporters.export import export

    logits = edgeseq.load(export(str(tmp_path / "m.bin"), str(tmp_path / "b"))).session().prefill([1, 2, 3])
    assert np.isfinite(logits).all() and logits.std() > 0.1
