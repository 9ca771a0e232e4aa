"""Half-precision compute (`export(..., compute="f16"|"bf16")`, quant/half.py): bundles whose matrices and
activations are float16 or bfloat16 while every recurrence and the state stay float32.

One case per family, the fused flavour (what CUDA runs): the float16 bundle runs in ONNX Runtime's CPU
provider and its logits, by steps and by prefill, must stay near the case's outside reference (transformers
in float64, the rwkv package, rwkv.cpp): a relative error of half precision, not of a wrong graph. The graph
itself must compute in half (every MatMul and Gemm), with the state and logits float32 at its edges and
the recurrence's nodes float32. bfloat16 has no CPU kernels in ONNX Runtime: its graphs are checked for
the same structure here, and run on the GPU (docs/cuda.md)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgeseq
import families
from conftest import step_all
from edgeseq.errors import EdgeseqError
from edgeseq.exporters.export import export

F32, F16, BF16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16

FIRST = {}
for _c in families.CASES.values():
    FIRST.setdefault(_c.family, _c)
# a relative error of half precision: float16's 11-bit significand over a few layers of tiny random models.
# Measured (max over the steps / the prefill's last logits, over the case's largest reference logit):
# 3.5e-4 (rwkv7) ... 1.9e-2 (qwen35_moe), 2.3e-2 (qwen3_next), 4.6e-2 / 1.1e-2 (qwen35)
REL = 0.06


def _half_bundle(built, compute: str):
    out = built.workdir / f"bundle-fused-{compute}-compute"
    if not out.exists():
        export(str(built.ckpt), str(out), compute=compute)
    return out


def _types(path) -> dict[str, int]:
    m = onnx.load(str(path), load_external_data=False)
    g = onnx.shape_inference.infer_shapes(m, strict_mode=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return m.graph, types


@pytest.mark.parametrize("case", list(FIRST.values()), ids=list(FIRST))
def test_f16_compute_stays_near_the_reference(case, family_case):
    built = family_case(case.id)
    m = edgeseq.load(_half_bundle(built, "f16"), **case.load)
    assert m.manifest["quant"] == {"recipe": "f16", "compute": "float16"}
    scale = max(1.0, float(np.abs(built.ref).max()))
    stepped = step_all(m.session(), built.ids)
    assert stepped.dtype == np.float32
    err_steps = float(np.abs(stepped - built.ref).max()) / scale
    err_prefill = float(np.abs(m.session().prefill(built.ids) - built.ref[-1]).max()) / scale
    assert err_steps < REL and err_prefill < REL, (err_steps, err_prefill)
    # and the float32 bundle is much closer: the error is half precision's, not a graph's
    f32 = edgeseq.load(built.bundle(False), **case.load)  # not built.model: its cache lives for the session
    assert float(np.abs(step_all(f32.session(), built.ids) - built.ref).max()) / scale < REL / 60


@pytest.mark.parametrize("compute, half", [("f16", F16), ("bf16", BF16)])
@pytest.mark.parametrize("family", ["mamba", "mamba2", "rwkv7"])
def test_half_graphs_compute_in_half_around_a_float32_state(family, compute, half, family_case):
    built = family_case(FIRST[family].id)
    bundle = _half_bundle(built, compute)
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    for kind in ("step", "prefill"):
        g, types = _types(bundle / f"{kind}.onnx")
        assert all(v.type.tensor_type.elem_type in (F32, onnx.TensorProto.INT64) for v in [*g.input, *g.output])
        stored = {i.name for i in g.initializer if i.data_type == half}
        stored |= {n.output[0] for n in g.node if n.op_type == "Cast" and n.input[0] in stored}
        products = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in stored]
        assert products, kind
        for n in products:  # every product with a stored matrix reads it in half and computes in half
            assert types[n.input[1]] == half and types.get(n.output[0]) == half, n.name
        assert sum(n.op_type == "Cast" for n in g.node) > 0
        # the residual stream and the norms read float32 (a half x² overflows at 256)
        norms = [n for n in g.node if n.op_type in ("Pow", "LayerNormalization", "SimplifiedLayerNormalization",
                                                     "SkipSimplifiedLayerNormalization")]
        assert norms and all(types.get(n.input[0]) == F32 for n in norms), kind
    weights = manifest["weights"]["bytes"]
    f32 = (built.bundle(False) / "weights.bin").stat().st_size
    assert weights < 0.6 * f32  # the matrices are stored in half


def test_half_compute_is_checked(family_case, tmp_path):
    built = family_case(next(iter(FIRST.values())).id)
    with pytest.raises(EdgeseqError, match="does not combine with --quant int8"):
        export(str(built.ckpt), str(tmp_path / "x"), quant="int8", compute="f16")
    with pytest.raises(EdgeseqError, match="--compute f8"):
        export(str(built.ckpt), str(tmp_path / "y"), compute="f8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_bf16_bundle_on_the_cpu_is_a_clear_error(family_case):
    built = family_case(FIRST["mamba"].id)
    bundle = _half_bundle(built, "bf16")
    with pytest.raises(EdgeseqError, match="computes in bfloat16.*device='cuda'"):
        edgeseq.load(bundle)


@pytest.mark.parametrize("family", ["mamba2", "rwkv7"])
def test_f16_compute_on_trained_weights_keeps_the_loss(family, tmp_path):
    """The shipped demo models (trained): float16 compute leaves the held-out loss where float32 has it
    (measured: Mamba-2 2.59675 / 2.59663 nats a token, RWKV-7 2.70437 / 2.70436 over 400 tokens)."""
    from pathlib import Path

    src = Path(edgeseq.__file__).parent / "demo" / family
    text = (Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora" / "tinyshakespeare.txt").read_text()
    f32 = edgeseq.load(export(str(src), str(tmp_path / "f32")))
    f16 = edgeseq.load(export(str(src), str(tmp_path / "f16"), compute="f16"))
    ids = f32.tokenizer.encode(text[5000:7000])[:400]

    def nll(logits):
        z = logits[:-1].astype(np.float64)
        z -= z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), ids[1:]]))

    a, b = f32.session().logits_all(ids), f16.session().logits_all(ids)
    assert abs(nll(a) - nll(b)) < 1e-3 and np.abs(a - b).max() < 0.05
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99
