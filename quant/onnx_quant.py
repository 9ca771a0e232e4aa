"""int8 / int4 ONNX bundles: block-wise weight quantization, and the graph rewrite that runs it.

Which tensors are quantized is read from the graphs themselves, not from name lists: the exporter
builds every graph once with the float weights (`collect_usage`), and a 2-D weight qualifies when
each of its uses is one the quantized ops replace:

    MatMul(x, W)              W (K, N) stored (in, out)     -> com.microsoft.MatMulNBits(x, Wq)
    Gemm(x, E, transB=1)      E (N, K): a tied or RWKV head  -> MatMulNBits(x, Eq)
    Gather(E, ids, axis=0)    E (V, d): the embedding        -> com.microsoft.GatherBlockQuantized
                                                                (same bytes as the head when tied)

Everything else (norms, decays, mixing vectors, conv kernels, A, D, the recurrent state) stays f32,
and each family names, through `Family.quant_policy`, the matrices kept at 8 bits under int4 or kept
f32 (Mamba's dt_proj, RWKV-7's LoRA matrices, RWKV-5's embedding and time mix, ...), and through
`Family.quant_block` a smaller block for its 8-bit or 4-bit matrices (RWKV-5's 8-bit ones: 16).

Quantized layout (MatMulNBits'): Wq is (N, K) cut into blocks of `block` along K; per block a float32
scale s and an integer zero point z, weight = s * (q - z), q in 0..2^bits-1; 4-bit q packed two per
byte (element 2i in the low nibble), zero points likewise. Each weight W is stored as three tensors
`W.q` uint8 (N, K/block, block*bits/8), `W.scales` f32 (N, K/block), `W.zp` uint8 (N, ceil(K/block
* bits/8)); MatMulNBits and GatherBlockQuantized read the same bytes under their own shapes.

How q, s and z are chosen: asymmetric min/max per block with the range widened to include 0 (so a
zero weight stays exactly zero), then 8 candidate shrinkings of the range (clipping the outliers
slightly); each block keeps the candidate with the smallest squared error.

The portable flavour cannot use com.microsoft ops: it gets the QDQ form instead, standard
DequantizeLinear (opset 21, block-wise, uint4/uint8 with zero points) feeding the same MatMul /
Gemm / Gather. ONNX Runtime's CPU provider fuses DequantizeLinear + MatMul into MatMulNBits itself.

w8a8: the int8 recipe, except that each MatMul weight and head with both sides of at least W8A8_MIN (the
projections and the head, a tied embedding included, whose Gather then reads rows of the head's bytes as
columns; not the LoRAs, an untied embedding or MoE experts, which stay as int8 makes them) is stored per
output column,
`W.u8` uint8 (K, N) = q + 128 (q = rint(W / s), |q| <= 127: symmetric) and `W.cs` f32 (N,)
(s = max |W[:, n]| / 127), and runs as integer GEMM: the activations quantized per row in the graph (u8,
zero point 128, scale max |x| / 127, one chain per input shared by the matrices that read it, so batched
rows stay independent), ONNX Runtime's MatMulInteger (u8 x u8, both zero points 128), then both scales.
Not u8 x s8, MLAS's fastest form: its AVX2 kernel sums pairs of u8·s8 products in saturating 16-bit
lanes (vpmaddubsw), which overflow at 255·127·2; u8 x u8 widens first and is exact (measured: 0.63 against
0.75 ms at 16 rows of 768 x 3072, still 1.8x MatMulNBits'). Standard ops only, in both flavours. On
CPUs whose MatMulNBits int8 path scales badly with rows (AVX2 without VNNI: docs/benchmarks.md, the W8A8
probe) it prefills and decodes batches faster; per-row activations are coarser than MatMulNBits'
per-block ones, so it loses some accuracy that int8 does not (docs/quantization.md).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeseq.errors import EdgeseqError
from edgeseq.graph import MS_DOMAIN, GraphBuilder, WeightInfo, WeightStore, walk_nodes

BITS = {"int8": 8, "int4": 4, "w8a8": 8}
W8A8_MIN = 128  # a MatMul weight runs as W8A8 when both its sides are at least this
BLOCK_SIZES = (16, 32, 64, 128, 256)
_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79)
_CHUNK = 1 << 22  # weights per vectorised pass (bounds temporary memory)


# -- block quantization -------------------------------------------------------------------------
def quantize_blocks(w: np.ndarray, bits: int, block: int, shrink: tuple = _SHRINK):
    """w (N, K) f32 -> q uint8 (N, nblk, block) unpacked, scales f32 (N, nblk), zp uint8 (N, nblk).
    K is padded with zeros to a whole number of blocks (MatMulNBits does the same). Each block keeps
    the best of its min-max range shrunk by each factor of `shrink` (lowest squared error)."""
    n, k = w.shape
    nblk = -(-k // block)
    if nblk * block != k:
        w = np.pad(w, ((0, 0), (0, nblk * block - k)))
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(n * nblk, block)
    qmax = (1 << bits) - 1
    q = np.empty(x.shape, np.uint8)
    scales = np.empty(x.shape[0], np.float32)
    zps = np.empty(x.shape[0], np.uint8)
    step = max(1, _CHUNK // block)
    for a in range(0, x.shape[0], step):
        q[a:a + step], scales[a:a + step], zps[a:a + step] = _fit(x[a:a + step], qmax, shrink)
    return q.reshape(n, nblk, block), scales.reshape(n, nblk), zps.reshape(n, nblk)


def _fit(x: np.ndarray, qmax: int, shrink: tuple):
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = np.maximum(x.max(axis=1), 0.0)
    best_err = np.full(x.shape[0], np.inf, np.float32)
    best = None
    for f in shrink:
        s = (hi - lo) * f / qmax
        s = np.where(s > 0, s, 1.0).astype(np.float32)
        z = np.clip(np.rint(-lo * f / s), 0, qmax)
        q = np.clip(np.rint(x / s[:, None]) + z[:, None], 0, qmax)
        err = (((q - z[:, None]) * s[:, None] - x) ** 2).sum(axis=1)
        if best is None:
            best = [q, s, z]
            best_err = err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best[0] = np.where(better[:, None], q, best[0])
        best[1] = np.where(better, s, best[1])
        best[2] = np.where(better, z, best[2])
    return best[0].astype(np.uint8), best[1].astype(np.float32), best[2].astype(np.uint8)


def quantize_columns(w: np.ndarray):
    """w (K, N) f32 -> q int8 (K, N), scales f32 (N,): symmetric per column, q = rint(w / s) in -127..127."""
    scales = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0))
    return np.clip(np.rint(w / scales), -127, 127).astype(np.int8), scales


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis: 8 bits as is; 4 bits two per byte, element 2i in the low nibble (an odd
    count gets a zero high nibble)."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def unpack(p: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return p[..., :count]
    return np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[:-1] + (-1,))[..., :count]


def dequantize(qpacked: np.ndarray, scales: np.ndarray, zp_packed: np.ndarray, bits: int, block: int, k: int):
    """The numpy reference of what MatMulNBits computes with: (N, nblk, blob) -> W (N, K) f32."""
    n, nblk, _ = qpacked.shape
    q = unpack(qpacked, bits, block).astype(np.float32)  # (N, nblk, block)
    z = unpack(zp_packed.reshape(n, -1), bits, nblk).astype(np.float32)  # (N, nblk)
    w = (q - z[:, :, None]) * scales.reshape(n, nblk)[:, :, None]
    return w.reshape(n, nblk * block)[:, :k]


# -- which weights, how -------------------------------------------------------------------------
@dataclasses.dataclass
class QuantSpec:
    name: str
    bits: int
    block: int
    n: int  # output features (rows of the quantized matrix)
    k: int  # input features (quantized along)
    transpose: bool  # stored (K, N) for MatMul: transposed before quantization
    uses: tuple[str, ...]
    form: str = "blocks"  # "w8a8": per-column int8 through MatMulInteger (the module's docstring)

    @property
    def nblk(self) -> int:
        return -(-self.k // self.block)

    @property
    def zp_cols(self) -> int:
        return -(-self.nblk * self.bits // 8)

    def to_json(self) -> dict:
        if self.form == "w8a8":
            return {"bits": 8, "form": "w8a8", "shape": [self.n, self.k], "uses": list(self.uses)}
        return {"bits": self.bits, "block_size": self.block, "shape": [self.n, self.k], "uses": list(self.uses)}


def _builder_nodes(b: GraphBuilder):
    for node in b.nodes:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(a.g)


def _weight_of(b: GraphBuilder, init_name: str) -> str | None:
    """The stored weight an initializer name refers to (an alias such as 'embed.T' included)."""
    t = b.initializers.get(init_name)
    if t is None or t.data_location != TensorProto.EXTERNAL:
        return None
    offset = next((e.value for e in t.external_data if e.key == "offset"), None)
    for cand in (init_name, init_name[:-2] if init_name.endswith(".T") else None):
        if cand and cand in b.weights and str(b.weights[cand].offset) == offset:
            return cand
    return None


def moe_expert_readers(b: GraphBuilder) -> set[int]:
    """The nodes (by id) that read a stored expert matrix only to lay it out for a com.microsoft MoE: the
    Reshape/Transpose/Concat chains edgeseq.mixers.moe builds from the canonical (d, E·f) / (E·f, d) MatMul
    weights. Those weights count as MatMul weights: the recipe quantizes them as it would for MatMulNBits,
    and the fused flavour's MoE block then reads those bytes through QMoE (or falls back to MatMulNBits)."""
    made = {out: node for node in b.nodes for out in node.output}
    found: set[int] = set()

    def back(value: str) -> None:
        node = made.get(value)
        if node is None or node.op_type not in ("Reshape", "Transpose", "Concat"):
            return
        data = node.input if node.op_type == "Concat" else node.input[:1]
        for inp in data:
            if _weight_of(b, inp) is not None:
                found.add(id(node))
            else:
                back(inp)

    for node in b.nodes:
        if node.op_type == "MoE" and node.domain == MS_DOMAIN:
            for pos in (2, 4, 6):  # fc1, fc2, fc3 experts' weights
                if pos < len(node.input) and node.input[pos]:
                    back(node.input[pos])
    return found


def collect_usage(builders: list[GraphBuilder]) -> dict[str, set[str]]:
    """For every stored weight: how the graphs use it ('matmul', 'gemm_t', 'gather' or 'other:<op>')."""
    uses: dict[str, set[str]] = {}
    for b in builders:
        moe = moe_expert_readers(b)
        for node in _builder_nodes(b):
            for pos, inp in enumerate(node.input):
                w = _weight_of(b, inp)
                if w is None:
                    continue
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if id(node) in moe and (pos == 0 or node.op_type == "Concat") or node.op_type == "MatMul" and pos == 1:
                    use = "matmul"
                elif (node.op_type == "Gemm" and pos == 1 and attrs.get("transB") == 1 and not attrs.get("transA")
                      and len(node.input) == 2 and attrs.get("alpha", 1.0) == 1.0):
                    use = "gemm_t"
                elif node.op_type == "Gather" and pos == 0 and attrs.get("axis", 0) == 0:
                    use = "gather"
                else:
                    use = f"other:{node.op_type}"
                uses.setdefault(w, set()).add(use)
    return uses


def moe_weights(builders: list[GraphBuilder]) -> set[str]:
    """The stored expert matrices a com.microsoft MoE block reads (they keep MatMulNBits' layout)."""
    out = set()
    for b in builders:
        readers = moe_expert_readers(b)
        for node in _builder_nodes(b):
            if id(node) in readers:
                out.update(w for w in map(lambda i: _weight_of(b, i), node.input) if w)
    return out


def plan(table: dict[str, WeightInfo], uses: dict[str, set[str]], quant: str, block: int, family,
         portable: bool = False, experts: frozenset = frozenset()) -> dict:
    """{weight name: QuantSpec} for the weights the recipe quantizes; the rest stay as stored. A row
    length the block does not divide gets the largest power-of-two block (down to 16) that does,
    rather than padding (a 64-wide row in blocks of 128 would store as many bytes as 128); failing
    that, MatMulNBits pads the last block."""
    if block not in BLOCK_SIZES:
        raise EdgeseqError(f"--block-size {block}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    bits = BITS[quant]
    out = {}
    for name, u in uses.items():
        info = table[name]
        if len(info.shape) != 2 or info.dtype != "float32" or any(x.startswith("other:") for x in u):
            continue
        if u == {"matmul"}:
            k, n = info.shape
            transpose = True
        elif u <= {"gemm_t", "gather"}:
            n, k = info.shape
            transpose = False
        else:
            continue
        policy = family.quant_policy(name, (n, k)) if family is not None else None
        if policy == "f32" or min(n, k) < 16:
            continue
        # the LM head at 8 bits under int4, as llama.cpp keeps output.weight (and a tied token_embd) at
        # Q6_K/Q8_0: every logit passes through it (on the RWKV-7 fixture, perplexity +1.84 % with a
        # 4-bit head, +0.2 % with an 8-bit one)
        is_head = "gemm_t" in u or name == "lm_head"
        b_bits = 8 if policy == "int8" or is_head else bits
        blk = family.quant_block(b_bits, block) if family is not None else block
        while blk > BLOCK_SIZES[0] and k % blk:
            blk //= 2  # a row shorter than (or not a multiple of) the block: the largest block that fits
        if k % blk and ("gather" in u or portable):
            continue  # GatherBlockQuantized and the QDQ form take whole blocks only
        # w8a8: the projections and the head (a tied embedding too: its rows are read from the same bytes);
        # not an embedding alone (GatherBlockQuantized reads it), nor an MoE block's experts
        form = "w8a8" if (quant == "w8a8" and (u == {"matmul"} or "gemm_t" in u) and policy is None
                          and min(n, k) >= W8A8_MIN and name not in experts) else "blocks"
        out[name] = QuantSpec(name, b_bits, blk, n, k, transpose, tuple(sorted(u)), form)
    return out


def requantize_store(path: str, table: dict[str, WeightInfo], specs: dict[str, QuantSpec],
                     portable: bool = False) -> WeightStore:
    """Rewrite the weights file at `path` (written in f32 by the exporter) with the planned tensors
    quantized; returns the closed new store (its table names W.q, W.scales, W.zp for each).

    Fused flavour: MatMulNBits' layout (per row of N: blocks along K, 4-bit pairs packed per row).
    Portable flavour (QDQ): the element order DequantizeLinear reads, packed over the whole tensor:
    (K, N) with blocks along axis 0 for a MatMul weight (the pattern ONNX Runtime fuses back into
    MatMulNBits), (N, K) with blocks along axis 1 for a head or an embedding."""
    src = np.memmap(path, dtype=np.uint8, mode="r")
    tmp = path + ".q"
    store = WeightStore(tmp)
    try:
        for name, info in sorted(table.items(), key=lambda kv: kv[1].offset):
            raw = src[info.offset:info.offset + info.nbytes]
            arr = np.frombuffer(raw, dtype=info.dtype).reshape(info.shape)
            spec = specs.get(name)
            if spec is None:
                store.add(name, arr)
                continue
            if spec.form == "w8a8":  # stored (K, N), as MatMulInteger reads it
                q, scales = quantize_columns(np.asarray(arr if spec.transpose else arr.T, np.float32))
                store.add(name + ".u8", (q.astype(np.int16) + 128).astype(np.uint8))
                store.add(name + ".cs", scales)
                continue
            w = arr.T if spec.transpose else arr  # (N, K)
            q, scales, zp = quantize_blocks(np.asarray(w, np.float32), spec.bits, spec.block)
            if not portable:
                store.add(name + ".q", pack(q, spec.bits))
                store.add(name + ".scales", scales)
                store.add(name + ".zp", pack(zp, spec.bits))
            elif spec.transpose:
                store.add(name + ".q", pack(q.reshape(spec.n, -1)[:, :spec.k].T.reshape(-1), spec.bits))
                store.add(name + ".scales", np.ascontiguousarray(scales.T))
                store.add(name + ".zp", pack(zp.T.reshape(-1), spec.bits))
            else:
                store.add(name + ".q", pack(q.reshape(spec.n, -1)[:, :spec.k].reshape(-1), spec.bits))
                store.add(name + ".scales", scales)
                store.add(name + ".zp", pack(zp.reshape(-1), spec.bits))
        store.sha256 = store.close()
    except BaseException:
        store._f.close()
        os.remove(tmp)
        raise
    del src
    os.replace(tmp, path)
    return store


def build_table(store: WeightStore, old: dict[str, WeightInfo], specs: dict[str, QuantSpec]) -> dict:
    """The table the families build graphs with: the new store's tensors, plus each quantized weight
    under its own name (shape as before) so family code can still say b.w(name); `rewrite` then
    replaces every such reference."""
    t = dict(store.table)
    for name in specs:
        t[name] = dataclasses.replace(old[name], offset=-1)
    return t


# -- the graph rewrite --------------------------------------------------------------------------
def _external(b: GraphBuilder, weight: str, alias: str, dims, ) -> str:
    """An initializer named `alias` over the stored bytes of `weight`, with its own dims."""
    if alias not in b.initializers:
        info = b.weights[weight]
        t = TensorProto()
        t.name = alias
        t.data_type = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}[info.dtype]
        t.dims.extend(int(d) for d in dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", b.weights_file), ("offset", str(info.offset)), ("length", str(info.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        b.initializers[alias] = t
    return alias


def _typed_external(b: GraphBuilder, weight: str, alias: str, dims, data_type: int) -> str:
    name = _external(b, weight, alias, dims)
    b.initializers[name].data_type = data_type
    return name


def rewrite(b: GraphBuilder, specs: dict[str, QuantSpec], accuracy_level: int = 4, portable: bool = False) -> None:
    """Replace every use of a quantized weight in `b` (top-level nodes: weights are not read inside
    Scan bodies) with MatMulNBits / GatherBlockQuantized, or with DequantizeLinear in the portable
    flavour; then drop the float placeholders."""
    placeholders = {n: w for n, w in ((n, _weight_of_placeholder(b, n, specs)) for n in list(b.initializers)) if w}
    if not placeholders:
        return
    new_nodes, rows = [], {}
    for node in b.nodes:
        hit = [i for i, x in enumerate(node.input) if x in placeholders]
        if not hit:
            new_nodes.append(node)
            continue
        spec = specs[placeholders[node.input[hit[0]]]]
        if spec.form == "w8a8":
            new_nodes.extend(_w8a8(b, node, spec, rows))
            continue
        new_nodes.extend(_replace(b, node, spec, accuracy_level, portable))
    b.nodes[:] = new_nodes
    for n in placeholders:
        del b.initializers[n]
    for node in _builder_nodes(b):
        if any(x in placeholders for x in node.input):
            raise EdgeseqError(f"graph {b.name}: weight {node.input} is read by {node.op_type} inside a subgraph, "
                               "which the quantized recipe cannot rewrite")


def _weight_of_placeholder(b: GraphBuilder, init_name: str, specs) -> str | None:
    t = b.initializers[init_name]
    if t.data_location != TensorProto.EXTERNAL:
        return None
    off = next((e.value for e in t.external_data if e.key == "offset"), None)
    if off != "-1":
        return None
    for cand in (init_name, init_name[:-2] if init_name.endswith(".T") else None):
        if cand in specs:
            return cand
    return None


def _q_inputs(b: GraphBuilder, s: QuantSpec, shape_kind: str):
    """Names of (data, scales, zero points) initializers for one consumer's expected shapes."""
    blob = s.block * s.bits // 8
    if shape_kind == "matmulnbits":
        return (_external(b, s.name + ".q", s.name + ".q", (s.n, s.nblk, blob)),
                _external(b, s.name + ".scales", s.name + ".scales", (s.n * s.nblk,)),
                _external(b, s.name + ".zp", s.name + ".zp", (s.n * s.zp_cols,)))
    if shape_kind == "gather":
        return (_external(b, s.name + ".q", s.name + ".q.rows", (s.n, s.k * s.bits // 8)),
                _external(b, s.name + ".scales", s.name + ".scales.rows", (s.n, s.nblk)),
                _external(b, s.name + ".zp", s.name + ".zp.rows", (s.n, s.zp_cols)))
    # QDQ: DequantizeLinear over the layout requantize_store wrote for the portable flavour
    dt = TensorProto.UINT4 if s.bits == 4 else TensorProto.UINT8
    if s.transpose:  # (K, N), blocks along axis 0
        return (_typed_external(b, s.name + ".q", s.name + ".q.qdq", (s.k, s.n), dt),
                _external(b, s.name + ".scales", s.name + ".scales.qdq", (s.nblk, s.n)),
                _typed_external(b, s.name + ".zp", s.name + ".zp.qdq", (s.nblk, s.n), dt))
    return (_typed_external(b, s.name + ".q", s.name + ".q.qdq", (s.n, s.k), dt),
            _external(b, s.name + ".scales", s.name + ".scales.qdq", (s.n, s.nblk)),
            _typed_external(b, s.name + ".zp", s.name + ".zp.qdq", (s.n, s.nblk), dt))


def _replace(b: GraphBuilder, node: onnx.NodeProto, s: QuantSpec, accuracy_level: int, portable: bool):
    out = list(node.output)
    if portable:
        q, sc, zp = _q_inputs(b, s, "qdq")
        w = b.fresh("dq")
        deq = helper.make_node("DequantizeLinear", [q, sc, zp], [w], axis=0 if s.transpose else 1,
                               block_size=s.block)
        inputs = list(node.input)
        inputs[0 if node.op_type == "Gather" else 1] = w
        return [deq, helper.make_node(node.op_type, inputs, out, **{a.name: helper.get_attribute_value(a)
                                                                   for a in node.attribute})]
    b.uses_ms_domain = True
    if node.op_type in ("MatMul", "Gemm"):
        q, sc, zp = _q_inputs(b, s, "matmulnbits")
        return [helper.make_node("MatMulNBits", [node.input[0], q, sc, zp], out, domain=MS_DOMAIN, K=s.k, N=s.n,
                                 bits=s.bits, block_size=s.block, accuracy_level=accuracy_level)]
    if node.op_type == "Gather":
        q, sc, zp = _q_inputs(b, s, "gather")
        return [helper.make_node("GatherBlockQuantized", [q, node.input[1], sc, zp], out, domain=MS_DOMAIN,
                                 gather_axis=0, quantize_axis=1, block_size=s.block, bits=s.bits)]
    raise EdgeseqError(f"{s.name}: {node.op_type} cannot read a quantized weight")


def _w8a8(b: GraphBuilder, node: onnx.NodeProto, s: QuantSpec, rows: dict) -> list:
    """MatMul(x, W) or a head's Gemm(x, E, transB=1) as integer GEMM: x quantized per row (once per x:
    `rows` keeps the chain's outputs), MatMulInteger with the stored (K, N) u8, then the row scales and the
    column scales. A tied embedding's Gather reads rows of E as columns of the same bytes."""
    mk = helper.make_node
    q = _external(b, s.name + ".u8", s.name + ".u8", (s.k, s.n))
    cs = _external(b, s.name + ".cs", s.name + ".cs", (s.n,))
    if node.op_type == "Gather":  # E[ids] = (column ids of the (K, N) bytes - 128) * their scales
        ids, y, p = node.input[1], node.output[0], b.fresh("w8a8_rows")
        flat, last = b.ints([-1]), b.ints([s.k])
        return [mk("Reshape", [ids, flat], [p + "_ids"]), mk("Gather", [q, p + "_ids"], [p + "_cols"], axis=1),
                mk("Transpose", [p + "_cols"], [p + "_t"], perm=[1, 0]), mk("Cast", [p + "_t"], [p + "_f"], to=TensorProto.FLOAT),
                mk("Sub", [p + "_f", b.const(128.0)], [p + "_c"]), mk("Gather", [cs, p + "_ids"], [p + "_s"], axis=0),
                mk("Unsqueeze", [p + "_s", b.ints([1])], [p + "_s1"]), mk("Mul", [p + "_c", p + "_s1"], [p + "_rows"]),
                mk("Shape", [ids], [p + "_shape"]), mk("Concat", [p + "_shape", last], [p + "_out"], axis=0),
                mk("Reshape", [p + "_rows", p + "_out"], [y])]
    if node.op_type not in ("MatMul", "Gemm"):
        raise EdgeseqError(f"{s.name}: {node.op_type} cannot read a W8A8 weight")
    x = node.input[0]
    out = []
    if x not in rows:
        p = b.fresh("w8a8_rows")
        c = {k: b.const(v, dt) for k, v, dt in (("inv", 1 / 127, np.float32), ("tiny", 1e-30, np.float32),
                                                 ("mid", 128.0, np.float32), ("lo", 0.0, np.float32),
                                                 ("hi", 255.0, np.float32))}
        axes, zp = b.ints([-1]), b.const(128, np.uint8)
        out += [mk("Abs", [x], [p + "_abs"]), mk("ReduceMax", [p + "_abs", axes], [p + "_max"], keepdims=1),
                mk("Max", [p + "_max", c["tiny"]], [p + "_max1"]), mk("Mul", [p + "_max1", c["inv"]], [p + "_scale"]),
                mk("Div", [x, p + "_scale"], [p + "_div"]), mk("Round", [p + "_div"], [p + "_round"]),
                mk("Add", [p + "_round", c["mid"]], [p + "_shift"]),
                mk("Clip", [p + "_shift", c["lo"], c["hi"]], [p + "_clip"]),
                mk("Cast", [p + "_clip"], [p + "_u8"], to=TensorProto.UINT8)]
        rows[x] = (p + "_u8", p + "_scale", zp)
    xq, xs, zp = rows[x]
    y = node.output[0]
    return out + [mk("MatMulInteger", [xq, q, zp, zp], [y + "_i32"]), mk("Cast", [y + "_i32"], [y + "_f"], to=TensorProto.FLOAT),
                  mk("Mul", [y + "_f", xs], [y + "_rows"]), mk("Mul", [y + "_rows", cs], [y])]


def implied_bytes(table: dict[str, WeightInfo], specs: dict[str, QuantSpec]) -> int:
    """The weight bytes the recipe implies: bits/8 per quantized weight plus 4 bytes of scale and
    bits/8 of zero point per block; every other tensor as stored (alignment padding not counted)."""
    total = 0
    for name, info in table.items():
        if info.offset == -1:
            continue
        base = name.rsplit(".", 1)[0]
        if base in specs and name.endswith((".q", ".scales", ".zp", ".u8", ".cs")):
            continue
        total += info.nbytes
    for s in specs.values():
        if s.form == "w8a8":
            total += s.n * s.k + 4 * s.n
            continue
        total += s.n * s.nblk * s.block * s.bits // 8 + 4 * s.n * s.nblk + s.n * s.zp_cols
    return total


def quantize_bundle_weights(store: WeightStore, family, quant: str, block: int, portable: bool,
                            graph_kinds=("step", "prefill", "prefill_all")):
    """The exporter's one call: plan from the graphs' uses, rewrite the weights file. Returns the new
    store, the table to build graphs with, and the plan."""
    builders = [family.build_graph(kind, store.table, fused=not portable) for kind in graph_kinds]
    specs = plan(store.table, collect_usage(builders), quant, block, family, portable, frozenset(moe_weights(builders)))
    new = requantize_store(store.path, store.table, specs, portable)
    return new, build_table(new, store.table, specs), specs


def recipe_json(quant: str, block: int, accuracy_level: int, portable: bool, specs: dict[str, QuantSpec]) -> dict:
    """The manifest's quantization record: what every quantized matrix became; the rest is f32."""
    return {"block_size": block, "accuracy_level": None if portable else accuracy_level,
            "form": "qdq" if portable else "matmulnbits", "tensors": {n: s.to_json() for n, s in sorted(specs.items())}}
