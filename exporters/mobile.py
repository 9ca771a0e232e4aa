"""`edgeseq export --mobile`: a bundle for ONNX Runtime Mobile (Android, iOS) and reduced builds.

The mobile bundle is the portable flavour's step graph (standard ONNX ops, no loops) with every shape
static (batch fixed to 1; a full-attention KV ring to the manifest's max_context), converted to ONNX
Runtime's ORT format:

    edgeseq.json               the manifest: flavour "mobile", one graph (step), the state spec with
                               batch 1, tokenizer, special tokens, initial values (RWKV-4's running
                               maximum starts at -1e30; a tuned RWKV state ships as a file)
    step.ort                   input_ids (1, 1) int64 + state -> logits (1, vocab) + state; the weights
                               are embedded (an ORT-format file holds its initializers)
    required_operators.config  the operators step.ort uses, for a reduced ONNX Runtime build
                               (build.py --include_ops_by_config required_operators.config)
    tokenizer.json | rwkv_vocab_v20230424.txt | nothing (byte-level models)
    initial_state.safetensors  RWKV state-tuned bundles only

Only the step graph ships: an ORT file embeds its weights, so every further graph (a prefill Scan)
would hold another copy of the model. Apps feed prompts one token at a time through the step graph;
edgeseq's own runtime does the same with a mobile bundle.

ORT's optimizer runs at level "basic" before saving (constant folding, redundant nodes removed): the
standard ops stay standard, so NNAPI, CoreML, QNN and XNNPACK can still take them (level "extended" and
up fuse into com.microsoft ops that only the CPU provider runs). An f16 bundle keeps its f16 weights
and their Cast nodes unfolded (ConstantFolding off): otherwise ORT would fold them into f32 weights
and the file would be as large as an f32 one. int8 stays int8 (ORT does not fold DequantizeLinear);
int4 cannot be stored in an ORT file (onnxruntime 1.32 writes it, then refuses to load it).
"""
from __future__ import annotations

import json
import os
import shutil

from edgeseq import safe_io
from edgeseq.bundle import MANIFEST, read_manifest, sha256_file, write_manifest
from edgeseq.errors import EdgeseqError

BATCH = 1
GRAPH_FILE = "step.ort"
OPS_CONFIG = "required_operators.config"
# an ORT-format file is one flatbuffer: 32-bit offsets, so it cannot reach 2 GiB (weights included)
ORT_FILE_LIMIT = 2 ** 31 - 1


def fix_batch(model, batch: int = BATCH, dims: dict[str, int] | None = None):
    """Set the symbolic `batch` axis (and any other symbolic dim named in `dims`, such as a full-attention
    KV ring's `max_context`) of every graph input, output and value_info to a size (in place)."""
    sizes = {"batch": batch, **(dims or {})}
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    for v in values:
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]  # setting the value clears the oneof's dim_param
    return model


def dedupe_initializers(model) -> int:
    """Make initializers that point at the same bytes of the weights file one initializer (in place).

    The bundle's graphs give a tied embedding a second name for the head (edgeseq.graph's `alias`: ONNX
    Runtime then prepacks one and leaves the other mapped). An ORT-format file embeds every initializer,
    so there the alias would store the matrix twice. Returns how many were merged."""
    from onnx import TensorProto

    def where(t):
        d = {e.key: e.value for e in t.external_data}
        return (d.get("location"), d.get("offset", "0"), d.get("length"), t.data_type, tuple(t.dims))

    first: dict = {}
    rename: dict[str, str] = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            rename[t.name] = first.setdefault(where(t), t.name)
    rename = {k: v for k, v in rename.items() if k != v}
    if rename:
        keep = [t for t in model.graph.initializer if t.name not in rename]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
    return len(rename)


def dynamic_axes(model) -> list[str]:
    """Names of graph inputs and outputs that still have a symbolic or unknown axis."""
    out = []
    for v in list(model.graph.input) + list(model.graph.output):
        if any(d.dim_param or not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim):
            out.append(v.name)
    return out


def to_ort(onnx_path: str, ort_path: str, fold_constants: bool = True) -> None:
    """Optimize at level basic with ONNX Runtime's CPU provider and save in ORT format."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = ort_path
    so.add_session_config_entry("session.save_model_format", "ORT")
    disabled = [] if fold_constants else ["ConstantFolding"]
    try:
        ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as e:  # onnxruntime raises its own exception types
        raise EdgeseqError(f"{onnx_path}: ONNX Runtime could not convert this graph to ORT format: {e}") from None
    if not os.path.isfile(ort_path):
        raise EdgeseqError(f"{onnx_path}: ONNX Runtime wrote no ORT-format file")
    # load it back (no optimization, no prepacking: a check, not a session): ONNX Runtime has written
    # files it then refuses ("ORT model verification failed"), and an app should never get one
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    try:
        ort.InferenceSession(ort_path, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise EdgeseqError(f"{ort_path}: ONNX Runtime wrote an ORT-format file it cannot load back ({e}); "
                           f"use the portable bundle (export --portable) for this model") from None


def write_ops_config(ort_paths: list[str], config_path: str) -> None:
    """The operator list a reduced ONNX Runtime build needs (ORT's own tool reads the ORT files)."""
    import logging
    import pathlib

    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs every file at INFO
    create_config_from_models([pathlib.Path(p) for p in ort_paths], pathlib.Path(config_path),
                              enable_type_reduction=False)
    with open(config_path) as f:  # ORT names the files it read (a temporary path here): name the bundle's
        ops = [line for line in f if not line.startswith("#")]
    with open(config_path, "w") as f:
        f.write("# Operators of " + ", ".join(os.path.basename(p) for p in ort_paths) + " (edgeseq export --mobile)\n")
        f.writelines(ops)


def mobile_from_portable(src: str, dst: str) -> dict:
    """Build the mobile bundle in the empty directory `dst` from the portable bundle `src` (which
    must sit on the same filesystem: step.onnx's weights are read from src/weights.bin)."""
    import onnx

    m = read_manifest(src)
    if m.get("flavour") != "portable":
        raise EdgeseqError(f"{src}: a mobile bundle is made from the portable flavour, this is {m.get('flavour')!r}")
    if m["quant"]["recipe"] == "int4":  # measured with onnxruntime 1.32: the ORT file is written, then refused
        raise EdgeseqError(f"{src}: ONNX Runtime's ORT format cannot hold int4 tensors; export the mobile bundle "
                           f"with --quant int8 or f16")
    if m["weights"]["bytes"] >= ORT_FILE_LIMIT:
        raise EdgeseqError(f"{src}: the weights take {m['weights']['bytes'] / 2 ** 30:.2f} GiB; an ORT-format file "
                           f"(weights embedded) must stay under 2 GiB: export with --quant f16, or use the "
                           f"portable bundle (export --portable), whose weights live in weights.bin")
    step = onnx.load(os.path.join(src, m["graphs"]["step"]["file"]), load_external_data=False)
    # symbolic state dims (Zamba's KV ring length max_context) take the manifest's default: fixed here
    sym = {k: int(m[k]) for k in {d for st in m["state"] for d in st["shape"][1:] if isinstance(d, str)}}
    fix_batch(step, BATCH, sym)
    dedupe_initializers(step)
    left = dynamic_axes(step)
    if left:
        raise EdgeseqError(f"{src}: the step graph still has dynamic axes after fixing the batch: {', '.join(left)}")
    fixed = os.path.join(src, "step.batch1.onnx")  # beside weights.bin, so its external data resolves
    onnx.save(step, fixed)
    ort_path = os.path.join(dst, GRAPH_FILE)
    to_ort(fixed, ort_path, fold_constants=m["quant"]["recipe"] != "f16")
    os.remove(fixed)
    write_ops_config([ort_path], os.path.join(dst, OPS_CONFIG))
    for name in (m["tokenizer"].get("file"), (m.get("initial_state") or {}).get("file")):
        if name:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))

    import onnxruntime as ort

    graph = dict(m["graphs"]["step"], file=GRAPH_FILE, batch=BATCH)
    sizes = {"batch": BATCH, **sym}
    if "tensors" in graph:  # dtype/shape of the graph's other inputs and outputs: batch is now 1
        graph["tensors"] = {k: dict(t, shape=[sizes.get(d, d) for d in t["shape"]])
                            for k, t in graph["tensors"].items()}
    manifest = {k: v for k, v in m.items() if k not in ("format", "format_version", "state_spec_version")}
    manifest.update(
        flavour="mobile",
        state=[dict(s, shape=[sizes.get(d, d) for d in s["shape"]]) for s in m["state"]],
        graphs={"step": graph},
        # the weights live inside step.ort; sha256 stays the weights' identity (that of the portable
        # bundle's weights.bin), so state files move between a mobile bundle and its portable twin
        weights={"file": GRAPH_FILE, "bytes": os.path.getsize(ort_path), "sha256": m["weights"]["sha256"],
                 "embedded": True, "weights_bytes": m["weights"]["bytes"]},
        mobile={"format": "ort", "onnxruntime": ort.__version__, "optimization": "basic",
                "operators_config": OPS_CONFIG, "batch": BATCH},
        files={f: sha256_file(os.path.join(dst, f)) for f in sorted(os.listdir(dst))},
    )
    write_manifest(dst, manifest)
    return manifest


def export_mobile(checkpoint: str, out: str, quant: str = "f32", tokenizer: str | None = None,
                  chat_template: dict | None = None, force: bool = False, progress: bool = False,
                  initial_state: str | None = None) -> str:
    """Export `checkpoint` to the mobile bundle directory `out` (see the module docstring). Returns `out`.

    Everything is built in a private temporary sibling directory `.edgeseq-mobile-<pid>-*` (the portable
    bundle first, then the mobile one) and published with safe_io.replace_dir: a kill at any moment leaves
    the old complete bundle, the new one, or none (the next mobile export sweeps a killed one's folder);
    a failure or a full disk leaves nothing behind."""
    from edgeseq.exporters.export import export

    if os.path.exists(out) and not force:
        raise EdgeseqError(f"{out}: already exists (choose another output or pass --force)")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    work = safe_io.temp_dir(parent, ".edgeseq-mobile-")
    try:
        portable = export(checkpoint, os.path.join(work, "portable"), quant=quant, portable=True, tokenizer=tokenizer,
                          chat_template=chat_template, progress=progress, initial_state=initial_state)
        mobile = os.path.join(work, "mobile")
        os.mkdir(mobile)
        mobile_from_portable(portable, mobile)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(mobile, 0o777 & ~umask)
        safe_io.fsync_tree(mobile)
        safe_io.replace_dir(mobile, out)  # the old bundle is renamed aside into `work`, then removed with it
    except OSError as e:  # a full disk: a clear error; the temporary folder goes below
        raise safe_io.disk_error(e, out) from None
    except EdgeseqError as e:  # the portable export's errors name the output, not the temporary folder
        if os.path.join(work, "portable") not in str(e):
            raise
        raise type(e)(str(e).replace(os.path.join(work, "portable"), out)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def ort_sizes(bundle: str) -> dict:
    """File sizes of a mobile bundle (bytes), for reports."""
    with open(os.path.join(bundle, MANIFEST)) as f:
        m = json.load(f)
    return {"step.ort": os.path.getsize(os.path.join(bundle, m["graphs"]["step"]["file"])),
            "weights (portable weights.bin)": m["weights"]["weights_bytes"]}
