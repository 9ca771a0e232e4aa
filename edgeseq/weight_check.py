"""Weights checked against the config before a bundle is written: a tensor of the wrong shape (a norm's
bias at half its width, a projection of the wrong size) must be an error naming the file at export, not
an ONNX Runtime failure at run time (or, worse, a broadcast that runs and gives wrong numbers).

Families do not yet keep a table of every weight's expected shape (the architecture issue's tensor
tables; when those exist, check against them here). Until then the check is the graph's own: the
portable step graph is built over the weights' shapes (no data is read) and ONNX shape inference runs in
strict mode, which refuses every MatMul, Add, Mul, Concat or Reshape whose operands do not fit; the
operators whose inference does not look at their parameters (LayerNormalization's scale and bias,
Gather's table) are checked here, and the embedding must have one row per vocabulary entry.
"""
from __future__ import annotations

from edgeseq.errors import EdgeseqError


def check_weights(family, table: dict, where: str) -> None:
    """`table`: {canonical name: WeightInfo (shape, dtype)} as streamed into weights.bin."""
    embed = table.get("embed")
    if embed is not None and embed.shape[:1] != (family.vocab_size,) and len(embed.shape) == 2:
        raise EdgeseqError(f"{where}: the embedding is {embed.shape}, but the vocabulary has {family.vocab_size} "
                           f"tokens")
    for name in ("head", "lm_head"):
        t = table.get(name)
        if t is not None and family.vocab_size not in t.shape:
            raise EdgeseqError(f"{where}: the LM head is {t.shape}, but the vocabulary has {family.vocab_size} "
                               f"tokens")
        # the head reads the embedding's width: a head of (vocab, C/2) made the graph's Reshape(-1, C/2)
        # fold two tokens' hidden states into one row, which inference accepts and ONNX Runtime does not
        if t is not None and embed is not None and len(embed.shape) == 2 and len(t.shape) == 2 \
                and sorted(t.shape) != sorted((family.vocab_size, embed.shape[1])):
            raise EdgeseqError(f"{where}: the LM head is {tuple(t.shape)}, but the embedding is {tuple(embed.shape)}: "
                               f"the head must be ({family.vocab_size}, {embed.shape[1]}) or its transpose")
    # the portable step (batch 1, one token) reads every weight a step reads; the fused prefill (batch 1,
    # two tokens) reads those only a prefill reads (RWKV-5's log_decay, which the fused LinearAttention
    # takes in place of the step's decay: at half its width it passed before, and failed in ONNX Runtime)
    for kind, fused, tokens in (("step", False, 1), ("prefill", True, 2)):
        _check_graph(family, table, where, kind, fused, tokens)
    # inference stops knowing shapes after the first fused contrib op (LinearAttention, ...), so the
    # weights after it are checked by their layer-0 twins: every layer's weight of one name has one shape
    _same_in_every_layer(family, table, where)


def _same_in_every_layer(family, table: dict, where: str) -> None:
    import re
    from collections import Counter

    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, info in table.items():
        m = re.match(r"(?:layers|blocks)\.\d+\.(.+)\Z", name)
        if m:
            groups.setdefault(m.group(1), []).append((name, tuple(info.shape)))
    for suffix, items in groups.items():
        shapes = Counter(shape for _, shape in items)
        if len(shapes) > 1:
            first = items[0][1] if shapes[items[0][1]] * 2 >= len(items) else shapes.most_common(1)[0][0]
            odd = next((n, sh) for n, sh in items if sh != first)
            like = next(n for n, sh in items if sh == first)
            raise EdgeseqError(f"{where}: weight {odd[0]!r} is {odd[1]}, but {like!r} is {first} (the {family.name} "
                               f"config gives every layer's {suffix} one shape)")


def _check_graph(family, table: dict, where: str, kind: str, fused: bool, tokens: int) -> None:
    import onnx

    try:
        model = family.build_graph(kind, table, fused=fused).to_model({})
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise EdgeseqError(f"{where}: the weights do not fit the {family.name} config ({type(e).__name__}: "
                           f"{str(e)[:300]})") from None
    for v in model.graph.input:  # every shape concrete, so a Reshape that cannot be made is found
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in ("batch", "sequence"):
                d.dim_value = 1 if d.dim_param == "batch" else tokens  # (a KV ring's max_context stays symbolic)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx's InferenceError / ValidationError: a tensor does not fit its operator
        first = str(e).split("\n")[0][:400]
        raise EdgeseqError(f"{where}: the weights' shapes do not fit the {family.name} config ({first})"
                           f"{_suspects(str(e), model, table)}") from None
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in [*inferred.graph.value_info, *inferred.graph.input]}
    for out in inferred.graph.output:  # the state comes out as the state spec declares it
        dims = [d.dim_value if d.HasField("dim_value") else None for d in out.type.tensor_type.shape.dim]
        shapes.setdefault(out.name, dims)
    for s in family.state_spec():
        got = shapes.get(s.output_name)
        want = [None, *s.resolve(family.symbolic_dims).shape]
        if got and len(got) == len(want) and any(g is not None and g != w for g, w in zip(got[1:], want[1:])):
            raise EdgeseqError(f"{where}: the weights make state {s.output_name} {tuple(got[1:])}, the "
                               f"{family.name} config declares {tuple(want[1:])}")
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    inits = {t.name for t in model.graph.initializer}
    for node in inferred.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[0] in shapes:
            # a weight with more axes than a matrix would broadcast the activations over its extra axes
            a, w = shapes[node.input[0]], shapes[node.input[1]]
            extra = w[:-2]
            lead = a[:-2][-len(extra):] if extra else []
            if extra and (len(w) > len(a) or any(d != 1 and d != x for d, x in zip(extra, lead))):
                raise EdgeseqError(f"{where}: weight {node.input[1]!r} is {tuple(w)}, which does not fit its input "
                                   f"{tuple(a)} (the {family.name} config)")
        if node.op_type != "LayerNormalization" or not node.input[0] in shapes:
            continue
        x = shapes[node.input[0]]
        if not x:  # rank unknown (after a contrib op inference does not know): nothing to compare
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        want = x[axis:]
        for param in node.input[1:]:
            got = shapes.get(param)
            if param and got is not None and None not in want and len(got) and got != want[-len(got):]:
                raise EdgeseqError(f"{where}: weight {_weight_name(param, table)} is {tuple(got)}, its layer norm "
                                   f"needs {tuple(want)} (the {family.name} config)")


def _suspects(message: str, model, table: dict) -> str:
    """The weights the failing node reads: inference names a node (`node name: Add_25`), not a weight."""
    import re

    m = re.search(r"node name: ([^)]+)\)", message)
    node = next((n for n in model.graph.node if m and n.name == m.group(1)), None)
    names = [i for i in (node.input if node is not None else ()) if i in table]
    return f"; that node reads weight {', '.join(f'{n!r} {tuple(table[n].shape)}' for n in names)}" if names else ""


def _weight_name(onnx_name: str, table: dict) -> str:
    return repr(onnx_name) if onnx_name in table else repr(onnx_name)
