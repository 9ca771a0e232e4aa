"""Integrity of a bundle: what the manifest says about its files is what is on disk.

At load (cheap, every time): weights.bin has the manifest's size, and a sampled hash (64 spans of 4 KiB
spread evenly over the file, with its size; written at export as `weights.sample_sha256`) matches, so a
replaced file or a damaged region is found without reading gigabytes; every graph's external data
points into the bundle's own weights file and inside it.

`edgeseq verify MODEL` and every export (before its output appears): the full sha256 of weights.bin and
of each file listed in the manifest's `files`.
"""
from __future__ import annotations

import hashlib
import os

from edgeseq import safe_io
from edgeseq.errors import EdgeseqError

SAMPLES = 64
SPAN = 4096


def sample_sha256(path: str, samples: int = SAMPLES, span: int = SPAN) -> str:
    """sha256 of the file's size and `samples` spans of `span` bytes at evenly spread offsets (the whole
    file when it is that small)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= samples * span:
            while block := f.read(1 << 20):
                h.update(block)
        else:
            for i in range(samples):
                f.seek((size - span) * i // (samples - 1))
                h.update(f.read(span))
    return h.hexdigest()


def sample_entry(path: str) -> dict:
    """The manifest's `weights` fields for the sampled check."""
    return {"sample_sha256": sample_sha256(path), "sample": {"spans": SAMPLES, "bytes": SPAN}}


def full_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_at_load(directory: str, m: dict) -> None:
    """Sizes and the sampled hash of weights.bin, the graph files inside the bundle (read_manifest's hook).

    What needs the graphs parsed (external-data ranges, inputs and outputs against the manifest) is
    checked after every export and by `edgeseq verify`, not at each load: parsing means importing onnx
    (~1 s and ~18 MB at every start), and ONNX Runtime itself refuses external data outside the bundle
    folder ("External data path escapes model directory") or past its file, which the engine reports
    as an error naming the graph."""
    where = os.path.join(directory, "edgeseq.json")
    w = m["weights"]
    wpath = safe_io.inside(directory, w.get("file", "weights.bin"), where, "weights file")
    sample = w.get("sample_sha256")
    if sample is not None:
        s = w.get("sample") or {}
        spans = safe_io.need_int(s.get("spans", SAMPLES), where, "weights.sample.spans", 2, 1 << 16)
        span = safe_io.need_int(s.get("bytes", SPAN), where, "weights.sample.bytes", 1, 1 << 24)
        if sample_sha256(wpath, spans, span) != sample:
            raise EdgeseqError(f"{wpath}: damaged: its content does not match the manifest's sampled hash; "
                               f"re-export the bundle (edgeseq verify {directory} checks every file)")
    for kind, g in _onnx_graphs(m):
        safe_io.inside(directory, g["file"], where, f"graph {kind}'s file")


def onnx_io_dims(model) -> dict[str, list]:
    """{input or output name: its shape} of an ONNX ModelProto (symbolic dims by name)."""
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}


def ort_io_dims(session) -> dict[str, list]:
    """The same for an ONNX Runtime InferenceSession (what the engine checks, without importing onnx)."""
    return {v.name: list(v.shape) for v in [*session.get_inputs(), *session.get_outputs()]}


def check_graph_io(dims: dict[str, list], graph_path: str, g: dict, m: dict) -> None:
    """The graph has the inputs and outputs the manifest names, and its state tensors have the manifest's
    shapes: an app (and the session) feeds what the manifest says, so a mismatch would fail in ONNX
    Runtime at the first token. `dims`: onnx_io_dims or ort_io_dims."""
    missing = [n for n in [*g["inputs"], *g["outputs"]] if n not in dims]
    if missing:
        raise EdgeseqError(f"{graph_path}: has no {missing[0]!r}, which the manifest lists among its inputs and "
                           f"outputs (a damaged or replaced graph)")
    for s in m["state"]:
        for name in (s["name"], s["output"]):
            got = dims.get(name)
            if got is None:
                continue
            want = list(s["shape"])
            same = len(got) == len(want) and all(
                a == b or a == "batch" or isinstance(b, str) or isinstance(a, str) or b is None
                for a, b in zip(want, got))
            if not same:
                raise EdgeseqError(f"{graph_path}: {name} is {got} in the graph, the manifest says {want}")


def _onnx_graphs(m: dict):
    """The graphs stored as ONNX with external data (a mobile bundle's .ort graph embeds its weights)."""
    if m["weights"].get("embedded"):
        return []
    return [(k, g) for k, g in m["graphs"].items() if g["file"].endswith(".onnx")]


def check_external_data(directory: str, graph_path: str, weights_size: int | None = None,
                        weights_file: str = "weights.bin") -> None:
    """Every initializer of the graph that lives outside it names a file inside the bundle (the bundle's
    weights file) and a byte range inside that file."""
    import onnx

    try:
        model = onnx.load(graph_path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise EdgeseqError(f"{graph_path}: not a readable ONNX graph ({type(e).__name__}: {str(e)[:200]})") from None
    sizes: dict[str, int] = {}
    for t in _initializers(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        full = safe_io.inside(directory, loc, graph_path, f"the external data of {t.name!r}")
        if os.path.normpath(loc) != os.path.normpath(weights_file):
            raise EdgeseqError(f"{graph_path}: initializer {t.name!r} reads {loc!r}, not the bundle's {weights_file}")
        if loc not in sizes:
            sizes[loc] = weights_size if weights_size is not None else os.path.getsize(full)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise EdgeseqError(f"{graph_path}: initializer {t.name!r} has a damaged offset/length") from None
        if offset < 0 or length < 0 or offset + length > sizes[loc]:
            raise EdgeseqError(f"{graph_path}: initializer {t.name!r} reads bytes {offset}..{offset + length} of "
                               f"{loc}, which has {sizes[loc]}")
    return model


def _initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.g is not None and a.HasField("g"):
                yield from _initializers(a.g)
            for sub in a.graphs:
                yield from _initializers(sub)


def verify_bundle(directory: str, full: bool = True) -> list[str]:
    """Every check there is: the manifest (read_manifest), the full sha256 of weights.bin and of every
    file in the manifest's `files`, the graphs' external data. Returns what was checked (for the CLI);
    the first problem is an EdgeseqError naming the file."""
    from edgeseq.bundle import read_manifest

    m = read_manifest(directory)
    where = os.path.join(directory, "edgeseq.json")
    w = m["weights"]
    wpath = safe_io.inside(directory, w.get("file", "weights.bin"), where, "weights file")
    done = []
    if full and not w.get("embedded"):  # a mobile bundle's weights are inside its graph, listed in files
        if full_sha256(wpath) != w.get("sha256"):
            raise EdgeseqError(f"{wpath}: damaged: its sha256 does not match the manifest's")
        done.append(f"{os.path.basename(wpath)}: {os.path.getsize(wpath)} bytes, sha256 {w['sha256'][:16]}… ok")
    files = m.get("files") or {}
    safe_io.need(files, dict, where, "files")
    for name, digest in sorted(files.items()):
        path = safe_io.inside(directory, name, where, "a listed file")
        if not os.path.isfile(path):
            raise EdgeseqError(f"{path}: missing (the manifest lists it)")
        if full_sha256(path) != digest:
            raise EdgeseqError(f"{path}: damaged: its sha256 does not match the manifest's")
        done.append(f"{name}: sha256 ok")
    for kind, g in _onnx_graphs(m):
        gpath = os.path.join(directory, g["file"])
        model = check_external_data(directory, gpath, os.path.getsize(wpath), w.get("file", "weights.bin"))
        check_graph_io(onnx_io_dims(model), gpath, g, m)
    done.append(f"graphs: {', '.join(m['graphs'])}: external data inside {os.path.basename(wpath)}, "
                f"inputs and outputs as the manifest lists them")
    return done


def verify(path: str) -> str:
    """`edgeseq verify MODEL`: a bundle's every check (verify_bundle), or a GGUF file read whole (its
    header, metadata types, every tensor's bytes inside the file, the family and config it describes)."""
    from edgeseq.gguf_file import is_gguf

    if not os.path.exists(path):
        raise EdgeseqError(f"{path}: no such file or folder")
    if os.path.isfile(path) and is_gguf(path):
        from edgeseq.gguf_file import GGUFFile
        from edgeseq.gguf_names import family_of

        with GGUFFile(path) as g:
            fam, _, _ = family_of(g)
            h = hashlib.sha256()
            for name in g.tensors:
                h.update(g.raw(name))
            return (f"{path}: GGUF v{g.version}, {len(g.tensors)} tensors inside the file, {fam.name} config ok; "
                    f"tensor data sha256 {h.hexdigest()[:16]}…")
    return "\n".join(f"{path}/{line}" for line in verify_bundle(path)) + f"\n{path}: ok"
