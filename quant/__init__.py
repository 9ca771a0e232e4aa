"""Weight quantization. One vocabulary for every format; a name the chosen format lacks is an error.

ONNX bundles: f32; f16 and bf16 (weights stored half size and widened to f32 by a Cast in the graph, which
ONNX Runtime folds once at load; with `compute`, the graphs compute in that half type instead: `half.py`); int8 and int4 (block-wise, MatMulNBits / GatherBlockQuantized, or
DequantizeLinear in the portable flavour: `onnx_quant.py`); w8a8 (int8, with the projections as per-column
int8 weights times per-row int8 activations through MatMulInteger). GGUF files: the GGUF types of
`gguf_quants.py`.
"""
from __future__ import annotations

import numpy as np

from edgeseq.errors import EdgeseqError

ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}
ONNX_QUANTS = ("f32", "f16", "bf16", "int8", "int4", "w8a8")
COMPUTE = ("f32", "f16", "bf16")  # what an ONNX bundle's graphs compute in (half: `half.py`, for GPUs)
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")


def parse_quant(name: str, fmt: str = "onnx") -> str:
    q = ALIASES.get(name.lower(), name.lower())
    allowed = GGUF_QUANTS if fmt == "gguf" else ONNX_QUANTS
    if q not in allowed:
        raise EdgeseqError(f"--quant {name}: not available for {fmt} (choose one of {', '.join(allowed)})")
    return q


def quantize_tensor(name: str, array: np.ndarray, quant: str) -> np.ndarray:
    """Store a tensor as the recipe says. Matrices (2-D and up) follow the recipe; vectors, norms and
    the SSM parameters stay f32 (small, and the recurrence is sensitive to them)."""
    if quant in ("f16", "bf16") and array.ndim >= 2 and array.dtype == np.float32 and not _keep_f32(name):
        if quant == "bf16":
            import ml_dtypes  # onnx's own dependency: numpy's bfloat16

            return array.astype(ml_dtypes.bfloat16)
        return array.astype(np.float16)
    return array


def parse_compute(compute: str, quant: str) -> tuple[str, str]:
    """(compute, quant) for an ONNX export: half compute stores its matrices in that type (the default
    f32 quant follows it); any other recipe with half compute is an error."""
    c = ALIASES.get(compute.lower(), compute.lower())
    if c not in COMPUTE:
        raise EdgeseqError(f"--compute {compute}: choose one of {', '.join(COMPUTE)}")
    if c != "f32" and quant not in ("f32", c):
        raise EdgeseqError(f"--compute {c} stores the weights in {c}: it does not combine with --quant {quant}")
    return c, (c if c != "f32" else quant)


def _keep_f32(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("A", "D", "conv")
