"""edgeseq.mixers.moe: the mixture-of-experts block in each routing configuration, both flavours, against a
float64 numpy reference of transformers' routing (itself checked against transformers' Lfm2Moe and Qwen3Moe
blocks); the fused flavour's MoE / QMoE contrib ops where they are exact (and the dense form where not);
int8/int4 experts through the recipe (QMoE); LFM2-MoE end to end in both flavours against transformers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from edgeseq.graph import GraphBuilder, WeightStore
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.quant import onnx_quant as oq

MARGIN = 1e-4  # least gap between the k-th and (k+1)-th choice scores in float64 (float32 chooses alike)

# name: (MoeFeedForward keywords, the op the fused flavour uses for f32 experts: None = the dense form)
CONFIGS = {
    "lfm2-sigmoid-bias-norm-scaled": (dict(score="sigmoid", expert_bias=True, norm_topk=True, scaling=1.5), None),
    "sigmoid-norm": (dict(score="sigmoid", expert_bias=False, norm_topk=True), "MoE"),
    "sigmoid-unnormalised": (dict(score="sigmoid", expert_bias=False, norm_topk=False, scaling=2.0), None),
    "qwen3-softmax-norm": (dict(score="softmax", expert_bias=False, norm_topk=True), "MoE"),
    "jamba-softmax-unnormalised": (dict(score="softmax", expert_bias=False, norm_topk=False), "MoE"),
    "softmax-ungated-silu": (dict(score="softmax", expert_bias=False, norm_topk=True, gated=False), "MoE"),
    "nemotron-relu2": (dict(score="sigmoid", expert_bias=True, norm_topk=True, gated=False, act="relu2",
                            scaling=2.5), None),
}
D, E, K, F = 64, 8, 2, 64  # width, experts, top k, expert width (int4 QMoE: an even number of 32-blocks in f)


def make_weights(moe: MoeFeedForward, seed: int) -> dict[str, np.ndarray]:
    """Canonical weights: router (d, E), experts (d, E·f) / (E·f, d), expert bias (E,)."""
    g = np.random.default_rng(seed)
    d, e, f = moe.d_model, moe.n_experts, moe.expert_dim
    w = {"m.router": g.standard_normal((d, e)) * 1.5 / d ** 0.5,
         "m.experts_up": g.standard_normal((d, e * f)) / d ** 0.5,
         "m.experts_down": g.standard_normal((e * f, d)) / f ** 0.5}
    if moe.gated:
        w["m.experts_gate"] = g.standard_normal((d, e * f)) / d ** 0.5
    if moe.expert_bias:
        w["m.expert_bias"] = g.standard_normal(e) * 0.2
    return {k: v.astype(np.float32) for k, v in w.items()}


def reference(moe: MoeFeedForward, w: dict, h: np.ndarray) -> tuple[np.ndarray, float]:
    """transformers' routing in float64 (Lfm2MoeTopKRouter, Qwen3MoeTopKRouter, JambaSparseMoeBlock,
    NemotronHTopkRouter): scores, the top k of scores + bias, the scores gathered, renormalised over the
    k (+1e-6 for sigmoid), times the routed scaling; each chosen expert's output weighed. Returns the
    output (b, t, d) and the least k-th to (k+1)-th gap of the choice scores."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    x = h.astype(np.float64).reshape(-1, moe.d_model)
    E, f = moe.n_experts, moe.expert_dim
    r = x @ w["m.router"]
    if moe.score == "sigmoid":
        s = 1 / (1 + np.exp(-r))
    else:
        s = np.exp(r - r.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
    choose = s + w["m.expert_bias"] if moe.expert_bias else s
    order = np.argsort(-choose, axis=-1)
    top = order[:, :moe.top_k]
    srt = np.take_along_axis(choose, order, -1)
    margin = float((srt[:, moe.top_k - 1] - srt[:, moe.top_k]).min())
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        wt = s[t, top[t]]
        if moe.norm_topk:
            wt = wt / (wt.sum() + (1e-6 if moe.score == "sigmoid" else 0.0))
        wt = wt * moe.scaling
        for e, we in zip(top[t], wt):
            cols = slice(e * f, (e + 1) * f)
            u = x[t] @ w["m.experts_up"][:, cols]
            if moe.gated:
                g = x[t] @ w["m.experts_gate"][:, cols]
                y = g / (1 + np.exp(-g)) * u
            elif moe.act == "silu":
                y = u / (1 + np.exp(-u))
            else:
                y = np.maximum(u, 0) ** 2
            out[t] += we * (y @ w["m.experts_down"][cols])
    return out.reshape(h.shape), margin


def graph(moe: MoeFeedForward, table, fused: bool) -> GraphBuilder:
    b = GraphBuilder(table, "weights.bin", name="moe")
    h = b.input("h", TensorProto.FLOAT, ["batch", "sequence", moe.d_model])
    b.output(moe(b, h, "m.", fused=fused), "y", TensorProto.FLOAT, ["batch", "sequence", moe.d_model])
    return b


def run(b: GraphBuilder, folder, h: np.ndarray) -> np.ndarray:
    path = folder / f"{b.name}-{len(list(folder.glob('*.onnx')))}.onnx"
    onnx.save(b.to_model(), str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]


def ops(b: GraphBuilder) -> set[str]:
    return {n.op_type for n in b.nodes}


class RouterF32:
    """The families' policy: routers stay f32 under int4/int8."""

    def quant_policy(self, name, shape):
        return "f32" if name.endswith(".router") else None

    def quant_block(self, bits, block):
        return block


def store(folder, w: dict) -> WeightStore:
    s = WeightStore(str(folder / "weights.bin"))
    for k, v in w.items():
        s.add(k, v)
    s.sha256 = s.close()
    return s


def case(name, seed=0, t=24):
    kw, op = CONFIGS[name]
    moe = MoeFeedForward(D, E, K, F, **kw)
    for s in range(seed, seed + 50):  # the first seed whose choices keep the margin
        w = make_weights(moe, s)
        h = np.random.default_rng(100 + s).standard_normal((2, t, D)).astype(np.float32)
        ref, margin = reference(moe, w, h)
        if margin > MARGIN:
            return moe, w, h, ref, op
    raise AssertionError(f"{name}: no seed keeps a routing margin of {MARGIN}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_both_flavours(name, tmp_path):
    moe, w, h, ref, op = case(name)
    st = store(tmp_path, w)
    portable, fused = graph(moe, st.table, False), graph(moe, st.table, True)
    assert not ops(portable) & {"MoE", "QMoE"}
    assert (ops(fused) & {"MoE", "QMoE"}) == ({op} if op else set())  # the contrib op exactly where it is exact
    yp, yf = run(portable, tmp_path, h), run(fused, tmp_path, h)
    scale = np.abs(ref).max()
    assert scale > 0.5
    assert np.abs(yp - ref).max() < 1e-4 * scale
    assert np.abs(yf - ref).max() < 1e-4 * scale
    assert np.abs(yf - yp).max() < 1e-4 * scale
    # one token (the decode step's shape) as well
    one = h[:, :1]
    assert np.abs(run(fused, tmp_path, one) - reference(moe, w, one)[0]).max() < 1e-4 * scale


def test_reference_is_transformers():
    """The numpy reference equals transformers' own blocks in float64: Lfm2MoeSparseMoeBlock (sigmoid,
    choice bias, renormalised, routed scaling) and Qwen3MoeSparseMoeBlock (softmax, with and without
    renormalisation)."""
    from transformers import Lfm2MoeConfig, Qwen3MoeConfig
    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    blocks = [
        ("lfm2-sigmoid-bias-norm-scaled", Lfm2MoeSparseMoeBlock(Lfm2MoeConfig(
            hidden_size=D, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F, norm_topk_prob=True,
            routed_scaling_factor=1.5, use_expert_bias=True))),
        ("qwen3-softmax-norm", Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
            hidden_size=D, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F, norm_topk_prob=True))),
        ("jamba-softmax-unnormalised", Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
            hidden_size=D, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F, norm_topk_prob=False))),
    ]
    for name, blk in blocks:
        moe, w, h, ref, _ = case(name)
        f, d = F, D
        gate = w["m.experts_gate"].reshape(d, E, f).transpose(1, 2, 0)  # (E, f, d)
        up = w["m.experts_up"].reshape(d, E, f).transpose(1, 2, 0)
        down = w["m.experts_down"].reshape(E, f, d).transpose(0, 2, 1)  # (E, d, f)
        blk = blk.double().eval()
        if hasattr(blk, "set_experts_implementation"):
            blk.set_experts_implementation("eager")
        with torch.no_grad():
            blk.gate.weight.copy_(torch.from_numpy(w["m.router"].T.astype(np.float64)))
            blk.experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([gate, up], 1).astype(np.float64)))
            blk.experts.down_proj.copy_(torch.from_numpy(down.astype(np.float64)))
            if moe.expert_bias:
                blk.expert_bias.copy_(torch.from_numpy(w["m.expert_bias"].astype(np.float64)))
            hf = blk(torch.from_numpy(h.astype(np.float64))).numpy()
        # Qwen3's router takes its softmax in float32 (dtype=torch.float): 1e-6 of the output's scale
        assert np.abs(hf - ref).max() < 1e-5 * np.abs(ref).max(), name


def quantized(moe, w, folder, quant: str, fused: bool, block=32):
    """The int8/int4 recipe on the block, as the exporter runs it: plan from the graph's uses, requantize the
    weights file, rebuild the graph on the quantized table, rewrite MatMuls to MatMulNBits."""
    st = store(folder, w)
    specs = oq.plan(st.table, oq.collect_usage([graph(moe, st.table, fused)]), quant, block, RouterF32())
    new = oq.requantize_store(st.path, st.table, specs)
    b = graph(moe, oq.build_table(new, st.table, specs), fused)
    oq.rewrite(b, specs)
    deq = dict(w)
    raw = np.memmap(st.path, dtype=np.uint8, mode="r")
    for n, s in specs.items():
        get = lambda x: np.frombuffer(raw[new.table[x].offset:][:new.table[x].nbytes],  # noqa: E731
                                      new.table[x].dtype).reshape(new.table[x].shape)
        m = oq.dequantize(get(n + ".q"), get(n + ".scales"), get(n + ".zp"), s.bits, s.block, s.k)
        deq[n] = m.T if s.transpose else m
    return b, specs, deq


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("name", ["lfm2-sigmoid-bias-norm-scaled", "qwen3-softmax-norm",
                                  "sigmoid-unnormalised", "softmax-ungated-silu", "nemotron-relu2"])
def test_block_quantized(name, quant, tmp_path):
    """int8/int4 experts: the recipe quantizes them in both flavours; the fused flavour runs them on QMoE
    (choice bias and unnormalised sigmoid included, through router_weights), except relu² (MatMulNBits);
    both within int8-activation noise of the float64 reference on the dequantized weights."""
    moe, w, h, ref, _ = case(name)
    (tmp_path / "f").mkdir()
    (tmp_path / "p").mkdir()
    bf, specs, deq = quantized(moe, w, tmp_path / "f", quant, fused=True)
    bp, specs_p, _ = quantized(moe, w, tmp_path / "p", quant, fused=False)
    experts = {n for n in w if "experts_" in n}
    assert set(specs) == set(specs_p) == experts  # routers f32, every expert matrix quantized
    assert {specs[n].bits for n in experts} == {oq.BITS[quant]}
    qmoe = moe.act != "relu2"
    assert ("QMoE" in ops(bf)) == qmoe and "MoE" not in ops(bf)
    assert ("MatMulNBits" in ops(bf)) != qmoe
    dref, margin = reference(moe, deq, h)
    assert margin > MARGIN
    yf, yp = run(bf, tmp_path / "f", h), run(bp, tmp_path / "p", h)
    scale = np.abs(dref).max()
    # accuracy level 4: both round the activations to int8 (about 1 % of the output's scale here)
    assert np.abs(yf - dref).max() < 0.03 * scale
    assert np.abs(yp - dref).max() < 0.03 * scale
    # and the quantization itself is felt: int4 moves the output more than the int8 activations do
    if quant == "int4":
        assert np.abs(dref - ref).max() > 0.01 * scale


def test_qmoe_layout_exact(tmp_path):
    """At accuracy level 0 QMoE on the recipe's int4 bytes is the dequantized block to float32 rounding
    (the regrouping of rows, blocks and zero points per expert is exact, not just close)."""
    moe, w, h, _, _ = case("lfm2-sigmoid-bias-norm-scaled")
    b, _, deq = quantized(moe, w, tmp_path, "int4", fused=True)
    (node,) = [n for n in b.nodes if n.op_type == "QMoE"]
    for a in node.attribute:
        if a.name == "accuracy_level":
            a.i = 0
    dref, _ = reference(moe, deq, h)
    assert np.abs(run(b, tmp_path, h) - dref).max() < 1e-4 * np.abs(dref).max()


def test_odd_blocks_fall_back(tmp_path):
    """int4 with an odd number of blocks per expert row of fc2 (f 48 in blocks of 16): a zero-point byte
    would span two experts, so the experts stay MatMulNBits, still correct."""
    moe = MoeFeedForward(D, E, K, 48, score="softmax", expert_bias=False)
    w = make_weights(moe, 1)
    h = np.random.default_rng(1).standard_normal((1, 8, D)).astype(np.float32)
    b, specs, deq = quantized(moe, w, tmp_path, "int4", fused=True, block=16)
    assert "QMoE" not in ops(b) and "MatMulNBits" in ops(b)
    dref, margin = reference(moe, deq, h)
    assert margin > MARGIN
    assert np.abs(run(b, tmp_path, h) - dref).max() < 0.03 * np.abs(dref).max()


def test_fold_limit_keeps_dense():
    """Expert stacks past ONNX Runtime's 1 GiB constant-folding limit keep the dense form (the layout nodes
    would run on every call): Qwen3.5-35B-A3B's f32 fc1 (2 GiB) stays dense, LFM2-8B-A1B's (0.94 GB) and
    Qwen3.5's int4 fc1 (0.27 GB) take the contrib ops. Graphs only: the table's shapes, no data."""
    from edgeseq.graph import WeightInfo

    def table(moe, bits=None):
        d, e, f = moe.d_model, moe.n_experts, moe.expert_dim
        t = {"m.router": WeightInfo("m.router", "float32", (d, e), 0, 4 * d * e)}
        for n, (k, rows) in (("gate", (d, e * f)), ("up", (d, e * f)), ("down", (e * f, d))):
            name = f"m.experts_{n}"
            if bits is None:
                t[name] = WeightInfo(name, "float32", (d, e * f) if n != "down" else (e * f, d), 0, 4 * d * e * f)
                continue
            nblk = k // 32
            t[name] = WeightInfo(name, "float32", (1,), -1, 4)
            t[name + ".q"] = WeightInfo(name + ".q", "uint8", (rows, nblk, 32 * bits // 8), 0, rows * k * bits // 8)
            t[name + ".scales"] = WeightInfo(name + ".scales", "float32", (rows, nblk), 0, 4 * rows * nblk)
            t[name + ".zp"] = WeightInfo(name + ".zp", "uint8", (rows, nblk * bits // 8), 0, rows * nblk * bits // 8)
        return t

    qwen = MoeFeedForward(2048, 256, 8, 512, score="softmax", expert_bias=False)
    lfm2 = MoeFeedForward(2048, 32, 4, 1792, score="sigmoid", expert_bias=False)
    assert not ops(graph(qwen, table(qwen), True)) & {"MoE", "QMoE"}
    assert "MoE" in ops(graph(lfm2, table(lfm2), True))
    assert "QMoE" in ops(graph(qwen, table(qwen, 4), True))


# -- LFM2-MoE end to end --------------------------------------------------------------------------------------
EXPERTS_FUSED = {"on": True}  # the fixture's switch: the block's fused path in a fused bundle, or its dense form


@pytest.fixture
def fused_lfm2_moe(monkeypatch):
    """Lfm2Moe's experts in a fused bundle on the block's fused path (the family's own choice) or, with
    EXPERTS_FUSED off, on its dense form: the two bundles to compare."""
    from edgeseq.families import lfm2_moe

    ffn = lfm2_moe.Lfm2Moe.ffn
    monkeypatch.setattr(lfm2_moe.Lfm2Moe, "ffn",
                        lambda self, b, m, o, i, fused=False: ffn(self, b, m, o, i, fused and EXPERTS_FUSED["on"]))
    EXPERTS_FUSED["on"] = True
    yield
    EXPERTS_FUSED["on"] = True


@pytest.mark.parametrize("quant", ["f32", "int8", "int4"])
def test_lfm2_moe_both_flavours(quant, tmp_path, fused_lfm2_moe):
    """LFM2-MoE (sigmoid, choice bias, renormalised) end to end. f32: both flavours' logits within 1e-4 of
    transformers' float64 ones (the fused flavour keeps the dense form: a choice bias). int8/int4: the fused
    bundle's experts on QMoE (blocks of 16 divide d 32 and f 32) equal the same bundle with the experts on
    MatMulNBits, at the accuracy level where both round activations alike (int8: 4, int8 activations in
    both; int4: 0, f32 activations in both). Whole-bundle comparisons across activation roundings are not
    tight on this tiny model: int4 alone moves its logits by about 6.5, and the portable QDQ bundle differs
    from the fused one by about 2 (measured)."""
    import edgeseq
    import families  # noqa: F401  (registers the cases; family_lfm2 imports from it)
    from conftest import SEQ_LEN, Built, export_bundle, random_ids
    from family_lfm2 import MARGIN as LFM2_MARGIN
    from family_lfm2 import MOE_CONFIGS, make_lfm2, routing_margin

    cfg = dict(MOE_CONFIGS["moe-top2-of-4"])
    cfg["moe"] = {**cfg["moe"], "moe_intermediate_size": 32}  # int4 QMoE: two blocks of 16 per expert row of fc2
    c = Built(make_lfm2(tmp_path / "hf", seed=3, **cfg), tmp_path, random_ids(256, SEQ_LEN, seed=10))
    assert routing_margin(c) > LFM2_MARGIN
    level = 0 if quant == "int4" else 4
    runs = [("portable", True, True), ("fused", False, True)] if quant == "f32" else \
        [("qmoe", False, True), ("matmulnbits", False, False)]
    logits = {}
    for name, portable, experts_fused in runs:
        EXPERTS_FUSED["on"] = experts_fused
        out = export_bundle(c.ckpt, tmp_path / name, portable=portable, quant=quant, block_size=16,
                            accuracy_level=level)
        for kind in ("step", "prefill", "prefill_all"):
            used = {n.op_type for n in onnx.load(str(out / f"{kind}.onnx"), load_external_data=False).graph.node}
            assert ("QMoE" in used) == (name == "qmoe") and "MoE" not in used  # a choice bias: no f32 MoE
        logits[name] = edgeseq.load(out).session().logits_all(c.ids)
    if quant == "f32":
        for name in logits:
            assert np.abs(logits[name] - c.ref).max() < 1e-4, name
    else:
        assert np.abs(logits["qmoe"] - logits["matmulnbits"]).max() < 1e-4  # 8e-6 measured
        assert np.abs(logits["qmoe"] - c.ref).max() > 1.0  # while the quantization itself moves them
