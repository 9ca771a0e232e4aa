"""The ONNX bundle: a directory any language can load with ONNX Runtime.

    edgeseq.json      the manifest (this module): format and versions, family and config, the state
                      spec, each graph's file and inputs/outputs, tokenizer, chat template, special
                      tokens, quantization recipe, file hashes
    step.onnx         one token:  input_ids (b, 1) + state -> logits (b, vocab) + state
    prefill.onnx      t tokens:   input_ids (b, t) + state -> logits (b, vocab) + state
    prefill_all.onnx  t tokens:   input_ids (b, t) + state -> logits (b, t, vocab) + state
    weights.bin       every initializer of every graph, stored once (ONNX external data)
    tokenizer.json    HF tokenizers JSON when the model has one (absent for byte-level models)
"""
from __future__ import annotations

import hashlib
import json
import os

from edgeseq.errors import EdgeseqError

FORMAT = "edgeseq-bundle"
FORMAT_VERSION = 2  # 2: chat_template may be the checkpoint's Jinja template ({"jinja": ...}); 1 still reads
STATE_SPEC_VERSION = 1
MANIFEST = "edgeseq.json"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ONNX TensorProto element types an app may meet in a bundle's graph inputs and outputs
_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}


def graph_tensors(inputs, outputs, state_names) -> dict:
    """dtype and shape of a graph's inputs and outputs other than the state (input_ids, logits, and
    `position` for families with attention), from the graph's ValueInfoProtos, for the manifest: an app
    then knows every tensor it feeds and fetches without opening the graph. Symbolic dims stay names."""
    table = {}
    for v in [*inputs, *outputs]:
        if v.name in state_names:
            continue
        t = v.type.tensor_type
        table[v.name] = {"dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)),
                         "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return table


def write_graphs(family, weights: dict, directory: str, meta: dict, portable: bool, qspecs=None,
                 accuracy_level: int = 4, compute: str = "f32") -> dict:
    """Build every graph kind of `family` over the weights table, quantize them (`qspecs`, for int8/int4),
    save them into `directory` and return the manifest's `graphs` entry. Exports from checkpoints and
    from GGUF files share it, so both write the same graphs and describe them the same way."""
    from edgeseq.families.base import GRAPH_KINDS
    from edgeseq.graph import save_model

    state = family.state_spec()
    state_names = {n for s in state for n in (s.input_name, s.output_name)}
    graphs = {}
    for kind in GRAPH_KINDS:
        b = family.build_graph(kind, weights, fused=not portable)
        if qspecs:
            from edgeseq.quant.onnx_quant import rewrite

            rewrite(b, qspecs, accuracy_level, portable)
        if compute != "f32":
            from edgeseq.quant.half import rewrite as to_half

            to_half(b, compute)
        fname = f"{kind}.onnx"
        save_model(b.to_model({**meta, "edgeseq.graph": kind}), os.path.join(directory, fname))
        graphs[kind] = {"file": fname, "tokens": 1 if kind == "step" else None,
                        "inputs": ["input_ids"] + (["position"] if family.uses_position else [])
                        + [s.input_name for s in state],
                        "outputs": ["logits"] + [s.output_name for s in state],
                        "logits": "all" if kind == "prefill_all" else "last"}
        if kind != "step":
            graphs[kind]["chunk"] = family.prefill_chunk
        graphs[kind]["tensors"] = graph_tensors(b.inputs, b.outputs, state_names)
    return graphs


def write_manifest(directory: str, manifest: dict) -> None:
    # format 2 only where it matters: a bundle whose chat template is Jinja; the rest stay readable by
    # format-1 readers (the Node and web drivers of an older edgeseq)
    ct = manifest.get("chat_template")
    version = 2 if isinstance(ct, dict) and "jinja" in ct else 1
    manifest = {"format": FORMAT, "format_version": version, "state_spec_version": STATE_SPEC_VERSION,
                **manifest}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, MANIFEST))


def check_structure(m: dict, path: str) -> None:
    """What an app relies on to drive the graphs from the manifest alone (schema/edgeseq.schema.json
    is the full contract; this is its part ONNX Runtime would otherwise trip over later): every state
    tensor has a name, an output, a shape whose symbolic dims the manifest defines, a dtype and an
    initial value; every graph names its file, and its inputs and outputs are input_ids, position,
    logits or state tensors, the whole state included."""
    state = m.get("state")
    if not isinstance(state, list) or not state:
        raise EdgeseqError(f"{path}: damaged manifest: no state spec")
    for i, s in enumerate(state):
        missing = [k for k in ("name", "output", "shape", "dtype", "init") if not isinstance(s, dict) or k not in s]
        if missing:
            raise EdgeseqError(f"{path}: damaged manifest: state tensor {i} lacks {', '.join(missing)}")
        for d in s["shape"][1:]:
            if isinstance(d, str) and not isinstance(m.get(d), int):
                raise EdgeseqError(f"{path}: state tensor {s['name']} has dim {d!r}, which the manifest does not define")
    ins = {s["name"] for s in state}
    outs = {s["output"] for s in state}
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or "step" not in graphs:
        raise EdgeseqError(f"{path}: damaged manifest: no step graph")
    for kind, g in graphs.items():
        if not isinstance(g, dict) or not isinstance(g.get("file"), str):
            raise EdgeseqError(f"{path}: damaged manifest: graph {kind} has no file")
        g_in, g_out = g.get("inputs") or [], g.get("outputs") or []
        bad = [n for n in g_in if n not in ins and n not in ("input_ids", "position")]
        bad += [n for n in g_out if n not in outs and n != "logits"]
        lost = sorted((ins - set(g_in)) | (outs - set(g_out)))
        if bad or lost or "input_ids" not in g_in or "logits" not in g_out:
            raise EdgeseqError(f"{path}: damaged manifest: graph {kind}'s inputs and outputs do not match the state "
                               f"spec ({', '.join(bad) or 'missing: ' + ', '.join(lost or ['input_ids/logits'])})")


def read_manifest(directory: str) -> dict:
    """Read and check a bundle's manifest; every problem is an error naming the file."""
    if not os.path.exists(directory):
        raise EdgeseqError(f"{directory}: no such file or directory")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise EdgeseqError(f"{directory}: not an edgeseq bundle (no {MANIFEST}); create one with 'edgeseq export'")
    from edgeseq import integrity, manifest_check, safe_io  # reliability checks (docs/reliability.md)

    m = safe_io.load_json_file(path, "manifest", 64 << 20)
    if not isinstance(m, dict):
        raise EdgeseqError(f"{path}: damaged manifest (not a JSON object)")
    if m.get("format") != FORMAT:
        raise EdgeseqError(f"{path}: not an edgeseq bundle manifest (format {m.get('format')!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EdgeseqError(f"{path}: bundle format {version} is newer than this edgeseq reads ({FORMAT_VERSION}); "
                           f"upgrade edgeseq (pip install -U edgeseq)")
    manifest_check.check_manifest(m, directory)
    if m.get("state_spec_version", 0) > STATE_SPEC_VERSION:
        raise EdgeseqError(f"{path}: state spec version {m['state_spec_version']} is newer than this edgeseq reads")
    check_structure(m, path)
    w = m.get("weights", {})
    wpath = os.path.join(directory, w.get("file", "weights.bin"))
    if not os.path.isfile(wpath):
        raise EdgeseqError(f"{wpath}: missing (the bundle's weights)")
    if os.path.getsize(wpath) != w.get("bytes"):
        raise EdgeseqError(f"{wpath}: truncated or replaced: {os.path.getsize(wpath)} bytes, the manifest says "
                           f"{w.get('bytes')}")
    for g in m.get("graphs", {}).values():
        if not os.path.isfile(os.path.join(directory, g["file"])):
            raise EdgeseqError(f"{os.path.join(directory, g['file'])}: missing (a graph of the bundle)")
    integrity.check_at_load(directory, m)
    return m
