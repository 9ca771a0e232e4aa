"""GGUF tensor types in numpy: quantize, dequantize, choose a type per tensor, repack for MatMulNBits.

Types: F32, F16, BF16, the legacy block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32 weights a block; the
`gguf` package's own numpy code, which follows ggml's reference quantizers), and the K-quants Q4_K,
Q5_K, Q6_K (256-weight super-blocks), written here in vectorised numpy because the `gguf` package
only dequantizes them.

Symbols: a tensor is (rows, n) in numpy order, n = its row length (GGUF's ne[0]); a row is cut into
blocks of QK weights (QK = 32 or 256); a K-quant super-block holds 8 sub-blocks of 32 (Q4_K, Q5_K) or
16 sub-blocks of 16 (Q6_K).

Block layouts (bytes, as ggml-common.h declares them and gguf.quants dequantizes them):

    Q4_K (144): d f16 | dmin f16 | scales[12] (8 six-bit scales, 8 six-bit mins) | qs[128]
    Q5_K (176): d f16 | dmin f16 | scales[12] | qh[32] (5th bit; bit j = sub-block j) | qs[128]
    Q6_K (210): ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] int8 | d f16

    Q4_K/Q5_K weight = d*sc_j*q - dmin*m_j,  q in 0..15 / 0..31
    Q6_K      weight = d*sc_j*(q - 32),      q in 0..63

How the K-quant scales are found (the method of ggml's reference quantizers, rewritten for whole
arrays at once): each 32-weight sub-block gets an affine fit x ~ s*q + m, q = round((x - min)/s),
chosen among a small grid of candidate step sizes by weighted least squares (weights |x| + rms(x),
which favours the large weights); the 8 scales and 8 mins are then themselves quantized to 6 bits
against the super-block's largest, and the weights re-rounded against the stored scales. Q6_K is
symmetric: per 16-weight sub-block, the scale that maximises the x²-weighted fit over a grid of 19
candidates around max|x|/32, then 8-bit scales against the super-block's largest.
"""
from __future__ import annotations

import numpy as np
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgeseq.errors import EdgeseqError

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
QK_K = 256
_CHUNK = 1 << 20  # weights per vectorised pass of the K-quant fits (bounds temporary memory to ~100 MB)


def type_name(name: str) -> str:
    t = name.upper()
    if t not in TYPES:
        raise EdgeseqError(f"GGUF type {name!r}: not supported (choose one of {', '.join(TYPES)})")
    return t


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name(name)]][0]


def type_size(name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name(name)]][1]


def row_bytes(name: str, n: int) -> int:
    qk, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name(name)]]
    return n // qk * nbytes


# -- quantize / dequantize ----------------------------------------------------------------------
def quantize(array: np.ndarray, name: str) -> np.ndarray:
    """f32 array (..., n) -> raw GGUF blocks, uint8 (..., n/QK*block_bytes)."""
    t = type_name(name)
    x = np.ascontiguousarray(array, dtype=np.float32)
    if x.ndim == 0:
        raise EdgeseqError("quantize: a scalar has no rows")
    n = x.shape[-1]
    qk = block_size(t)
    if n % qk:
        raise EdgeseqError(f"quantize to {t}: rows of {n} do not divide into blocks of {qk} (use choose_type)")
    lead = x.shape[:-1]
    if t == "F32":
        return x.view(np.uint8)
    if t == "F16":
        return x.astype(np.float16).view(np.uint8)
    if t in ("BF16",) + LEGACY:
        return gq.quantize(x, GGMLQuantizationType[t])
    blocks = x.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size(t)), dtype=np.uint8)
    step = max(1, _CHUNK // QK_K)
    fn = {"Q4_K": _q4k_blocks, "Q5_K": _q5k_blocks, "Q6_K": _q6k_blocks}[t]
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = fn(blocks[i:i + step])
    return out.reshape(*lead, -1)


def dequantize(raw: np.ndarray, name: str, shape) -> np.ndarray:
    """Raw GGUF blocks (any uint8 layout holding them in order) -> f32 array of `shape`."""
    t = type_name(name)
    shape = tuple(int(s) for s in shape)
    n = shape[-1] if shape else 1
    qk, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
    if n % qk:
        raise EdgeseqError(f"dequantize {t}: rows of {n} do not divide into blocks of {qk}")
    count = int(np.prod(shape))
    need = count // qk * nbytes
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if data.size != need:
        raise EdgeseqError(f"dequantize {t} {shape}: expected {need} bytes, found {data.size}")
    if t == "F32":
        return data.view(np.float32).reshape(shape).copy()
    if t == "F16":
        return data.view(np.float16).astype(np.float32).reshape(shape)
    if t in ("BF16",) + LEGACY:
        # rows of the tensor's width, not of one block: gguf's dequantizer makes one numpy pass per 16 rows
        return gq.dequantize(data.reshape(-1, n // qk * nbytes), GGMLQuantizationType[t]).reshape(shape)
    blocks = data.reshape(-1, nbytes)
    fn = {"Q4_K": _dq4k, "Q5_K": _dq5k, "Q6_K": _dq6k}[t]
    return fn(blocks).reshape(shape)


# -- K-quants: the fits -------------------------------------------------------------------------
def _affine_fit(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per row of x (m, 32): step s >= 0 and offset mn <= 0 with x ~ s*q + mn, q in 0..nmax.
    Tries nmax/(max-min) and nstep+1 candidates (rmin + rdelta*i + nmax)/(max-min); for each rounding
    the weighted least-squares (s, mn) is solved in closed form; keeps the lowest weighted error."""
    w = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + np.abs(x)  # (m, 32)
    lo = np.minimum(x.min(axis=1), 0.0)[:, None]  # (m, 1)
    hi = x.max(axis=1)[:, None]
    rng = hi - lo
    flat = (rng[:, 0] <= 0)
    rng = np.where(flat[:, None], 1.0, rng)
    sw = w.sum(axis=1)
    sx = (w * x).sum(axis=1)

    iscale = nmax / rng
    q = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    best_s = (1.0 / iscale)[:, 0]
    best_m = lo[:, 0].copy()
    best_err = (w * (best_s[:, None] * q + lo - x) ** 2).sum(axis=1)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / rng
        q = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
        sl = (w * q).sum(axis=1)
        sl2 = (w * q * q).sum(axis=1)
        sxl = (w * q * x).sum(axis=1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        detz = np.where(ok, det, 1.0)
        s = (sw * sxl - sx * sl) / detz
        m = (sl2 * sx - sl * sxl) / detz
        pos = m > 0  # an offset above zero would push every weight up: fit a pure scale instead
        s = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), s)
        m = np.where(pos, 0.0, m)
        err = (w * (s[:, None] * q + m[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best_err)
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, m, best_m)
        best_err = np.where(better, err, best_err)
    best_s = np.where(flat, 0.0, best_s)
    best_m = np.where(flat, lo[:, 0], best_m)
    return best_s.astype(np.float32), (-best_m).astype(np.float32)  # scale, min (>= 0)


def _kquant_affine(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared by Q4_K and Q5_K: blocks (nb, 256) -> d, dmin (f16), 6-bit scales, mins (nb, 8), q (nb, 8, 32)."""
    nb = blocks.shape[0]
    x = blocks.reshape(nb * 8, 32)
    sc, mn = _affine_fit(x, nmax, rmin, rdelta, nstep)
    sc = sc.reshape(nb, 8)
    mn = mn.reshape(nb, 8)
    max_sc = sc.max(axis=1, keepdims=True)
    max_mn = mn.max(axis=1, keepdims=True)
    inv_sc = np.where(max_sc > 0, 63.0 / np.where(max_sc > 0, max_sc, 1), 0.0)
    inv_mn = np.where(max_mn > 0, 63.0 / np.where(max_mn > 0, max_mn, 1), 0.0)
    ls = np.minimum(63, np.rint(inv_sc * sc)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_mn * mn)).astype(np.uint8)
    d = (max_sc[:, 0] / 63.0).astype(np.float16)
    dmin = (max_mn[:, 0] / 63.0).astype(np.float16)
    # re-round every weight against the scales as stored
    dj = d.astype(np.float32)[:, None] * ls  # (nb, 8)
    mj = dmin.astype(np.float32)[:, None] * lm
    xs = blocks.reshape(nb, 8, 32)
    q = np.rint((xs + mj[:, :, None]) / np.where(dj > 0, dj, 1.0)[:, :, None])
    q = np.where(dj[:, :, None] > 0, np.clip(q, 0, nmax), 0).astype(np.uint8)
    return d, dmin, _pack_scales_k4(ls, lm), q


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins into 12 bytes: sub-blocks 0-3 whole in bytes 0-7,
    sub-blocks 4-7 as low nibbles in bytes 8-11 and their top two bits in bytes 0-7's top bits."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _unpack_scales_k4(s: np.ndarray):
    s = s.astype(np.uint8)
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return ls.astype(np.float32), lm.astype(np.float32)


def _q4k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, scales, q = _kquant_affine(blocks, 15, -1.0, 0.1, 20)
    q = q.reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)  # sub-blocks 2k, 2k+1 share 32 bytes
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs], axis=1)


def _q5k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, scales, q = _kquant_affine(blocks, 31, -0.5, 0.1, 15)  # q (nb, 8, 32)
    hi = (q >> 4) & 1
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(8):
        qh |= hi[:, j] << j
    lo = (q & 0x0F).reshape(nb, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qh, qs],
                          axis=1)


def _symmetric_fit(x: np.ndarray, nmax: int = 32) -> np.ndarray:
    """Per row of x (m, 16): the scale s (sign included) of x ~ s*l, l in -nmax..nmax-1, with the
    x²-weighted best fit over 19 candidate steps around max|x|/nmax."""
    idx = np.abs(x).argmax(axis=1)
    mx = x[np.arange(x.shape[0]), idx][:, None]  # signed value of largest magnitude
    zero = np.abs(mx[:, 0]) < 1e-15
    mx = np.where(zero[:, None], 1.0, mx)
    w = x * x

    def fit(iscale):
        l = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return (w * x * l).sum(axis=1), (w * l * l).sum(axis=1)

    sumlx, suml2 = fit(-nmax / mx)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0.0)
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        sumlx, suml2 = fit(-(nmax + 0.1 * i) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s = sumlx / np.where(suml2 > 0, suml2, 1)
        scale = np.where(better, s, scale)
        best = np.where(better, s * sumlx, best)
    return np.where(zero, 0.0, scale).astype(np.float32)


def _q6k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    sc = _symmetric_fit(blocks.reshape(nb * 16, 16)).reshape(nb, 16)
    j = np.abs(sc).argmax(axis=1)
    max_sc = sc[np.arange(nb), j][:, None]  # signed
    zero = np.abs(max_sc[:, 0]) < 1e-15
    iscale = np.where(zero[:, None], 0.0, -128.0 / np.where(zero[:, None], 1.0, max_sc))
    d = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, iscale[:, 0])).astype(np.float16)
    ls = np.minimum(127, np.rint(iscale * sc)).astype(np.int8)  # (nb, 16)
    dj = d.astype(np.float32)[:, None] * ls  # (nb, 16)
    xs = blocks.reshape(nb, 16, 16)
    l = np.rint(xs / np.where(dj != 0, dj, 1.0)[:, :, None])
    q = np.where(dj[:, :, None] != 0, np.clip(l, -32, 31) + 32, 32).astype(np.uint8).reshape(nb, 2, 4, 32)
    # per half of 128: ql[l] = q[l] | q[l+64] << 4, ql[32+l] = q[32+l] | q[96+l] << 4;
    # qh[l] = bits 4-5 of q[l], q[32+l], q[64+l], q[96+l] at bit positions 0, 2, 4, 6
    ql = np.concatenate([q[:, :, 0] & 0x0F | ((q[:, :, 2] & 0x0F) << 4),
                         q[:, :, 1] & 0x0F | ((q[:, :, 3] & 0x0F) << 4)], axis=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    qh = qh.reshape(nb, 64)
    ls = np.where(zero[:, None], 0, ls).astype(np.int8)
    return np.concatenate([ql, qh, ls.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)


def _dq4k(b: np.ndarray) -> np.ndarray:
    nb = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    ls, lm = _unpack_scales_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(nb, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
    return (d * ls)[:, :, None] * q - (dmin * lm)[:, :, None]


def _dq5k(b: np.ndarray) -> np.ndarray:
    nb = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    ls, lm = _unpack_scales_k4(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:176].reshape(nb, 4, 1, 32)
    lo = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32)
    hi = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (lo | (hi << 4)).astype(np.float32)
    return (d * ls)[:, :, None] * q - (dmin * lm)[:, :, None]


def _dq6k(b: np.ndarray) -> np.ndarray:
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 2, 32)
    qh = b[:, 128:192].reshape(nb, 2, 32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    q = np.empty((nb, 2, 4, 32), dtype=np.uint8)
    q[:, :, 0] = ql[:, :, 0] & 0x0F
    q[:, :, 1] = ql[:, :, 1] & 0x0F
    q[:, :, 2] = ql[:, :, 0] >> 4
    q[:, :, 3] = ql[:, :, 1] >> 4
    for k in range(4):
        q[:, :, k] |= ((qh >> (2 * k)) & 3) << 4
    q = q.reshape(nb, 16, 16).astype(np.float32) - 32.0
    return (d * sc)[:, :, None] * q


# -- which type each tensor gets ----------------------------------------------------------------
# llama.cpp, src/llama-quant.cpp (vendored in llama-cpp-python 0.3.36):
#   tensor_allows_quantization: only 2-D+ tensors whose name ends in "weight"; never "_norm.weight",
#     "ssm_conv1d", nor RWKV's time_mix_{first,w0,w1,w2,v0,v1,v2,a0,a1,a2,g1,g2,decay_w1,decay_w2,
#     lerp_fused}.weight;
#   llama_tensor_get_type_impl: output.weight (and token_embd.weight when the model has no separate
#     output, i.e. tied) becomes Q8_0 when its row length does not divide by the requested block,
#     else Q6_K unless Q8_0 was asked; the layer-by-layer bumps for attn_v/ffn_down never match the
#     recurrent archs' tensor names (ssm_*, time_mix_*, channel_mix_*);
#   tensor_type_fallback: a row length that does not divide by the block demotes Q4_K -> Q5_0,
#     Q5_K -> Q5_1, Q6_K -> Q8_0, a 32-block type stays; still not dividing -> F16.
# convert_hf_to_gguf.py (conversion/base.py): F32 for 1-D tensors, norms, names not ending in
# ".weight", ssm_conv1d and time_mix_{first,w1,w2,decay_w1,decay_w2,lerp_fused}.
_NEVER_QUANTIZED = ("ssm_conv1d",) + tuple(
    f"time_mix_{s}.weight" for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
                                     "decay_w1", "decay_w2", "lerp_fused"))
_CONVERTER_F32 = ("ssm_conv1d",) + tuple(
    f"time_mix_{s}.weight" for s in ("first", "w1", "w2", "decay_w1", "decay_w2", "lerp_fused"))
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Architectures whose GGUF names edgeseq writes; llama.cpp's one arch-specific rule on this path
# (Falcon's output tensor at Q8_0) concerns none of them.
ARCHS = ("mamba", "mamba2", "rwkv6", "rwkv7")


def choose_type(tensor_name: str, shape, requested: str, arch: str = "", tied: bool = False) -> str:
    """The GGUF type a tensor gets when the user asks for `requested`, by llama.cpp's rules.

    `shape` is numpy order (rows, ..., n): the last axis is the row length GGUF blocks run along.
    `tied` says the model has no separate output.weight (llama.cpp then treats token_embd as the head).
    """
    req = type_name(requested)
    shape = tuple(int(s) for s in shape)
    ne = shape[::-1]  # ggml's order; ggml_n_dims ignores trailing axes of 1
    ndims = max([i + 1 for i, s in enumerate(ne) if s > 1] or [1])
    name = tensor_name
    if req == "F32" or ndims < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    if any(k in name for k in _CONVERTER_F32):
        return "F32"
    if req in ("F16", "BF16"):
        return req
    if any(k in name for k in _NEVER_QUANTIZED):
        return "F32"  # the quantizer leaves these at the converter's float type; edgeseq writes f32
    n = shape[-1]
    new = req
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output:
        if n % block_size(req):
            new = "Q8_0"
        elif req != "Q8_0":
            new = "Q6_K"
    if n % block_size(new):
        new = _FALLBACK.get(new, new)
        if n % block_size(new):
            new = "F16"
    return new


# -- GGUF blocks -> MatMulNBits, without going through f32 --------------------------------------
def repack_for_matmulnbits(raw: np.ndarray, name: str, shape):
    """Q4_0 / Q8_0 blocks of a (N, K) weight (N rows of K: GGUF's layout, y = x @ W.T) -> the inputs
    of com.microsoft.MatMulNBits with block_size 32: B uint8 (N, K/32, 16 or 32), scales f32 (N*K/32,),
    zero_points uint8 (4 bits: two per byte, (N*ceil(K/64)); 8 bits: (N*K/32,)).

    Q4_0 stores q in 0..15 for w = d*(q - 8): zero point 8, nibble order changed from (j, j+16) to
    (2i, 2i+1). Q8_0 stores int8 q for w = d*q: uint8 q+128, zero point 128. Integers move as
    integers; only the f16 scales are widened."""
    t = type_name(name)
    if t not in ("Q4_0", "Q8_0"):
        raise EdgeseqError(f"repack for MatMulNBits: {t} is not Q4_0 or Q8_0")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[1] % 32:
        raise EdgeseqError(f"repack for MatMulNBits: shape {shape} is not (N, K) with K a multiple of 32")
    N, K = shape
    nblk = K // 32
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    size = type_size(t)
    if data.size != N * nblk * size:
        raise EdgeseqError(f"repack {t} {shape}: expected {N * nblk * size} bytes, found {data.size}")
    blocks = data.reshape(N, nblk, size)
    scales = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32).reshape(-1)
    if t == "Q8_0":
        b = blocks[:, :, 2:] ^ np.uint8(0x80)  # int8 two's complement -> offset binary (q + 128)
        zp = np.full(N * nblk, 128, dtype=np.uint8)
        return np.ascontiguousarray(b), scales, zp
    qs = blocks[:, :, 2:]  # (N, nblk, 16): low nibble = weight j, high = weight j+16
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # (N, nblk, 32) in weight order
    b = q[:, :, 0::2] | (q[:, :, 1::2] << 4)  # MatMulNBits: weight 2i low nibble, 2i+1 high
    zp = np.full((N, (nblk + 1) // 2), 0x88, dtype=np.uint8)
    if nblk % 2:
        zp[:, -1] = 0x08  # the pad nibble of an odd block count is unused
    return np.ascontiguousarray(b), scales, zp.reshape(-1)
