"""GGUF quant types (quant/gguf_quants.py) against llama.cpp's quantizer and gguf's dequantizers.

References edgeseq did not write: llama_cpp.llama_model_quantize (ggml's quantizers, run on an F32
GGUF written with the gguf package) and gguf.quants' dequantizers (which read the blocks as ggml lays
them out); ONNX Runtime's MatMulNBits for the repacked blocks.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType

from edgeseq.errors import EdgeseqError
from edgeseq.quant import gguf_quants as Q

RNG = np.random.default_rng(7)
# rows of 256 and 512, two weight distributions (normal, heavy-tailed), a zero sub-block, a one-sided row
_W_IN = (RNG.standard_normal((96, 256)) * 0.05).astype(np.float32)
_W_OUT = (RNG.standard_t(4, (64, 512)) * 0.03).astype(np.float32)
_W_IN[3, :64] = 0.0
_W_OUT[5] = np.abs(_W_OUT[5])
TENSORS = {"blk.0.ssm_in.weight": _W_IN, "blk.0.ssm_out.weight": _W_OUT}


@pytest.mark.parametrize("t", Q.TYPES)
def test_blocks_read_back_by_gguf(t):
    """Our blocks are laid out as ggml's: gguf.quants decodes them to what our own dequantize gives,
    and the error is what the type's bits allow."""
    x = _W_OUT
    raw = Q.quantize(x, t)
    assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], Q.row_bytes(t, x.shape[1]))
    theirs = gq.dequantize(raw, GGMLQuantizationType[t]).reshape(x.shape)
    ours = Q.dequantize(raw, t, x.shape)
    np.testing.assert_array_equal(ours, theirs)
    rel = np.sqrt(np.mean((ours - x) ** 2) / np.mean(x ** 2))
    limit = {"F32": 0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q6_K": 3e-2, "Q5_K": 6e-2, "Q5_1": 6e-2,
             "Q5_0": 7e-2, "Q4_K": 0.11, "Q4_1": 0.12, "Q4_0": 0.14}[t]
    assert rel <= limit, (t, rel)


def test_kquants_fast_enough():
    """A 1024x4096 matrix (a quarter of the brief's 4096x4096) per K-quant well under a few seconds."""
    import time

    x = RNG.standard_normal((1024, 4096)).astype(np.float32)
    for t in Q.K_QUANTS:
        t0 = time.perf_counter()
        Q.quantize(x, t)
        assert time.perf_counter() - t0 < 10, t


def _write_f32_gguf(src, tensors):
    import gguf

    w = gguf.GGUFWriter(str(src), "mamba")
    w.add_context_length(64)
    w.add_embedding_length(256)
    w.add_block_count(1)
    w.add_ssm_conv_kernel(4)
    w.add_ssm_inner_size(512)
    w.add_ssm_state_size(16)
    w.add_ssm_time_step_rank(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    for k, v in tensors.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _quantize_with_llama(llama_cpp, src, dst, ftype, pure):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.pure = pure
    p.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


def _llama_quantized(tmp_path, llama_cpp):
    src = tmp_path / "f32.gguf"
    _write_f32_gguf(src, TENSORS)
    ftypes = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
              "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K"}
    out = {}
    for t, ft in ftypes.items():
        dst = tmp_path / f"{t}.gguf"
        _quantize_with_llama(llama_cpp, src, dst, ft, pure=True)  # one type everywhere: compared per tensor
        out[t] = dst
    return out


@pytest.mark.slow
def test_error_against_llama_cpp(tmp_path):
    """On the same f32 tensors (rows of 256 and 512), edgeseq's dequantized squared error is within
    5 % of llama.cpp's for every quantized type (legacy types are the same algorithm: equal bytes)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    files = _llama_quantized(tmp_path, llama_cpp)
    for t, path in files.items():
        reader = gguf.GGUFReader(str(path))
        seen = 0
        for ti in reader.tensors:
            x = TENSORS[ti.name]
            assert ti.tensor_type.name == t
            theirs_raw = np.asarray(ti.data)
            theirs = gq.dequantize(theirs_raw, ti.tensor_type).reshape(x.shape)
            ours_raw = Q.quantize(x, t)
            ours = Q.dequantize(ours_raw, t, x.shape)
            # our dequantizer reads llama.cpp's blocks as gguf does
            np.testing.assert_array_equal(Q.dequantize(theirs_raw, t, x.shape), theirs)
            e_theirs = float(np.mean((theirs - x) ** 2))
            e_ours = float(np.mean((ours - x) ** 2))
            assert e_ours <= 1.05 * e_theirs, (t, ti.name, e_ours / e_theirs)
            if t in Q.LEGACY:
                np.testing.assert_array_equal(ours_raw.reshape(-1), theirs_raw.reshape(-1))
            seen += 1
        assert seen == 2


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_choose_type_matches_llama_cpp_quantizer(tmp_path, tied):
    """llama.cpp's own type choices (not pure: its per-tensor rules and fallbacks) on odd shapes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    r = np.random.default_rng(3)
    tensors = {
        "token_embd.weight": r.standard_normal((64, 256)).astype(np.float32),
        "blk.0.ssm_in.weight": r.standard_normal((64, 256)).astype(np.float32),
        "blk.0.ssm_x.weight": r.standard_normal((16, 800)).astype(np.float32),
        "blk.0.ssm_dt.weight": r.standard_normal((64, 48)).astype(np.float32),
        "blk.0.ssm_conv1d.weight": r.standard_normal((64, 4)).astype(np.float32),
        "blk.0.ssm_a": r.standard_normal((64, 16)).astype(np.float32),
        "blk.0.ssm_norm.weight": r.standard_normal((64,)).astype(np.float32),
    }
    if not tied:
        tensors["output.weight"] = r.standard_normal((64, 800)).astype(np.float32)
    src = tmp_path / "f32.gguf"
    _write_f32_gguf(src, tensors)
    for req, ftype in (("q4_0", "Q4_0"), ("q8_0", "Q8_0"), ("q4_k", "Q4_K_S"), ("q5_k", "Q5_K_S"), ("q6_k", "Q6_K")):
        dst = tmp_path / f"{ftype}.gguf"
        _quantize_with_llama(llama_cpp, src, dst, ftype, pure=False)
        got = {ti.name: ti.tensor_type.name for ti in gguf.GGUFReader(str(dst)).tensors}
        want = {k: Q.choose_type(k, v.shape, req, "mamba", tied=tied) for k, v in tensors.items()}
        assert got == want, req


@pytest.mark.parametrize("name,shape,req,tied,want", [
    ("blk.0.ssm_in.weight", (1536, 768), "q4_k", False, "Q4_K"),
    ("blk.0.ssm_dt.weight", (1536, 48), "q4_0", False, "F16"),       # rows of 48: no block fits
    ("blk.0.ssm_x.weight", (80, 800), "q4_k", False, "Q5_0"),        # 800 % 256 != 0 -> Q5_0
    ("blk.0.ssm_x.weight", (80, 800), "q5_k", False, "Q5_1"),
    ("blk.0.ssm_x.weight", (80, 800), "q6_k", False, "Q8_0"),
    ("blk.0.ssm_in.weight", (96, 100), "q6_k", False, "F16"),        # neither 256 nor 32 divides 100
    ("token_embd.weight", (50280, 768), "q4_0", True, "Q6_K"),       # tied: the head's rule
    ("token_embd.weight", (50280, 768), "q4_0", False, "Q4_0"),
    ("output.weight", (50280, 768), "q8_0", False, "Q8_0"),
    ("output.weight", (50280, 800), "q4_0", False, "Q8_0"),          # 800 % 256 != 0, 800 % 32 == 0
    ("output.weight", (50280, 1536), "q5_k", False, "Q6_K"),
    ("blk.0.ssm_conv1d.weight", (1536, 4), "q4_0", False, "F32"),
    ("blk.0.ssm_a", (1536, 16), "q4_0", False, "F32"),                # no ".weight": never quantized
    ("blk.0.ssm_d", (1536,), "f16", False, "F32"),
    ("blk.0.ssm_dt.bias", (1536,), "q8_0", False, "F32"),
    ("blk.0.attn_norm.weight", (1, 768), "f16", False, "F32"),       # 1-D to ggml, and a norm
    ("blk.0.time_mix_lerp_fused.weight", (6, 1, 1, 768), "f16", False, "F32"),
    ("blk.0.time_mix_w1.weight", (64, 768), "q8_0", False, "F32"),
    ("blk.0.time_mix_a1.weight", (64, 768), "f16", False, "F16"),    # converter: f16; quantizer: skips
    ("blk.0.time_mix_a1.weight", (64, 768), "q4_0", False, "F32"),
    ("blk.0.time_mix_key.weight", (768, 768), "bf16", False, "BF16"),
    ("blk.0.time_mix_key.weight", (768, 768), "f32", False, "F32"),
])
def test_choose_type_follows_llama_cpp(name, shape, req, tied, want):
    assert Q.choose_type(name, shape, req, "mamba", tied=tied) == want


def test_bad_input_is_an_error():
    with pytest.raises(EdgeseqError, match="Q9_9"):
        Q.quantize(np.zeros((2, 32), np.float32), "Q9_9")
    with pytest.raises(EdgeseqError, match="rows of 48"):
        Q.quantize(np.zeros((2, 48), np.float32), "Q4_0")
    with pytest.raises(EdgeseqError, match="expected 34 bytes, found 35"):
        Q.dequantize(np.zeros(35, np.uint8), "Q8_0", (1, 32))
    with pytest.raises(EdgeseqError, match="not Q4_0 or Q8_0"):
        Q.repack_for_matmulnbits(np.zeros(144, np.uint8), "Q4_K", (1, 256))


@pytest.mark.parametrize("t", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("n,k", [(48, 96), (64, 256)])  # 96: an odd count of blocks (zero-point padding)
def test_repack_for_matmulnbits(t, n, k):
    """MatMulNBits fed the repacked blocks computes x @ dequantize(blocks).T (to float32 rounding)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    raw = Q.quantize(w, t)
    b, scales, zp = Q.repack_for_matmulnbits(raw, t, w.shape)
    assert b.dtype == np.uint8 and b.shape == (n, k // 32, 16 if t == "Q4_0" else 32)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4 if t == "Q4_0" else 8, block_size=32)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales"), numpy_helper.from_array(zp, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, k)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ Q.dequantize(raw, t, w.shape).T.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
