"""The types and ranges of every manifest field the runtime uses (schema/edgeseq.schema.json is the full
contract; this is the part that must hold before any of it is used): a wrong type, a path out of the
bundle or a size that asks for an absurd allocation is an EdgeseqError naming edgeseq.json, never a
traceback or a `std::bad_alloc` in ONNX Runtime. Called by bundle.read_manifest before anything else
reads the manifest's fields."""
from __future__ import annotations

import os
import re

from edgeseq import safe_io
from edgeseq.errors import EdgeseqError
from edgeseq.safe_io import need, need_int, need_float, need_str

FLAVOURS = ("fused", "portable", "mobile")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
MAX_STATE_TENSORS = 1 << 16
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def check_manifest(m: dict, directory: str) -> None:
    p = os.path.join(directory, "edgeseq.json") + ": damaged manifest"
    from edgeseq.bundle import STATE_SPEC_VERSION

    if need_int(m.get("state_spec_version", 0), p, "state_spec_version", 0, 1 << 16) > STATE_SPEC_VERSION:
        return  # read_manifest says: newer than this edgeseq reads
    need_int(m.get("format_version"), p, "format_version", 1, 1 << 16)
    for key in ("family", "architecture", "edgeseq_version"):
        need_str(m.get(key), p, key, 256)
    if m.get("flavour") not in FLAVOURS:
        raise EdgeseqError(f"{p}: flavour is {safe_io._show(m.get('flavour'))}, expected one of {', '.join(FLAVOURS)}")
    need(m.get("config"), dict, p, "config")
    q = need(m.get("quant"), dict, p, "quant")
    need_str(q.get("recipe"), p, "quant.recipe", 64)

    w = need(m.get("weights"), dict, p, "weights")
    safe_io.inside(directory, w.get("file", "weights.bin"), p, "weights.file")
    wbytes = need_int(w.get("bytes"), p, "weights.bytes", 0, 1 << 50)
    sha = need_str(w.get("sha256"), p, "weights.sha256", 64)
    if not _HEX64.match(sha):
        raise EdgeseqError(f"{p}: weights.sha256 {sha!r} is not a sha256 (64 hex digits)")
    # the embedding holds at least half a byte per token (int4), so no vocabulary outgrows the weights
    vocab = need_int(m.get("vocab_size"), p, "vocab_size", 1, min(1 << 31, 2 * wbytes + 256))

    # what is missing is left to bundle.check_structure, which names it; what is there must have its type
    dims = {}
    state = need(m.get("state") or [], list, p, "state")
    if len(state) > MAX_STATE_TENSORS:
        raise EdgeseqError(f"{p}: state has {len(state)} tensors (1 to {MAX_STATE_TENSORS} expected)")
    names = set()
    for i, s in enumerate(state):
        what = f"state[{i}]"
        need(s, dict, p, what)
        name = need_str(s.get("name"), p, f"{what}.name", 256)
        output = need_str(s.get("output"), p, f"{what}.output", 256)
        layer = need_int(s.get("layer"), p, f"{what}.layer", 0, MAX_STATE_TENSORS)
        kind = need_str(s.get("kind"), p, f"{what}.kind", 64)
        # the runtime names the tensors it feeds from layer and kind; they must agree with the names
        if (name, output) != (f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"):
            raise EdgeseqError(f"{p}: {what} is named {name!r} / {output!r}, but its layer {layer} and kind {kind!r} "
                               f"make past_key_values.{layer}.{kind} / present.{layer}.{kind}")
        if name in names:
            raise EdgeseqError(f"{p}: {what} {name!r} appears twice")
        names.add(name)
        if s.get("dtype") not in DTYPES:
            raise EdgeseqError(f"{p}: {what}.dtype is {safe_io._show(s.get('dtype'))}, expected one of "
                               f"{', '.join(DTYPES)}")
        if "init" in s:
            need_float(s["init"], p, f"{what}.init")
        shape = need(s.get("shape"), list, p, f"{what}.shape")
        if not 1 <= len(shape) <= 8 or shape[0] not in ("batch", 1):  # 1: a mobile bundle's fixed batch
            raise EdgeseqError(f"{p}: {what}.shape is {safe_io._show(shape)}, expected ['batch' or 1, dims...]")
        for j, d in enumerate(shape[1:], 1):
            if isinstance(d, str) and m.get(d) is not None:
                dims[d] = need_int(m[d], p, d, 1, 1 << 24)
            elif isinstance(d, str):
                continue
            else:
                need_int(d, p, f"{what}.shape[{j}]", 1, safe_io.MAX_DIM)

    graphs = need(m.get("graphs") or {}, dict, p, "graphs")
    for kind, g in graphs.items():
        what = f"graphs.{kind}"
        need(g, dict, p, what)
        safe_io.inside(directory, g.get("file"), p, f"{what}.file")
        for io in ("inputs", "outputs"):
            names = need(g.get(io) or [], list, p, f"{what}.{io}")
            for j, n in enumerate(names):
                need_str(n, p, f"{what}.{io}[{j}]", 256)
        for key, lo in (("chunk", 1), ("tokens", 1)):
            if g.get(key) is not None:
                need_int(g[key], p, f"{what}.{key}", lo, 1 << 20)
        if g.get("logits") is not None and g["logits"] not in ("all", "last"):
            raise EdgeseqError(f"{p}: {what}.logits is {safe_io._show(g['logits'])}, expected 'all' or 'last'")

    tok = need(m.get("tokenizer"), dict, p, "tokenizer")
    need_str(tok.get("kind"), p, "tokenizer.kind", 64)
    if tok.get("file") is not None:
        safe_io.inside(directory, tok["file"], p, "tokenizer.file")
    for key in ("bos_token_id", "eos_token_id"):
        if m.get(key) is not None:
            need_int(m[key], p, key, 0, vocab - 1)
    stops = m.get("stop_token_ids")
    if stops is not None:
        for j, t in enumerate(need(stops, list, p, "stop_token_ids")):
            need_int(t, p, f"stop_token_ids[{j}]", 0, vocab - 1)
    if m.get("add_bos") is not None:
        need(m["add_bos"], bool, p, "add_bos")
    init = m.get("initial_state")
    if init is not None:
        need(init, dict, p, "initial_state")
        safe_io.inside(directory, init.get("file"), p, "initial_state.file")
    files = m.get("files")
    if files is not None:
        need(files, dict, p, "files")
    check_state_memory(state, dims, p)


def check_state_memory(state: list, dims: dict, where: str, budget: int | None = None) -> int:
    """Bytes of one sequence's state (symbolic dims at `dims`); more than the machine's memory is an
    error that names the dims to lower, instead of an allocation failure deep in ONNX Runtime."""
    total = 0
    for s in state:
        shape = s["shape"][1:] if isinstance(s, dict) else s.shape
        n = 4
        for d in shape:
            n *= dims.get(d, 0) if isinstance(d, str) else d
        total += n
    budget = budget or physical_memory()
    if total * 2 > budget:  # the session's ping-pong pair holds two copies
        named = ", ".join(f"{k}={v}" for k, v in dims.items())
        raise EdgeseqError(f"{where}: one sequence's state would take {total * 2 / 2**30:.1f} GiB (two copies), more "
                           f"than this machine's {budget / 2**30:.1f} GiB" + (f"; lower {named}" if named else ""))
    return total


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 36
