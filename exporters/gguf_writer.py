"""`edgeseq export CHECKPOINT --format gguf`: one GGUF file llama.cpp loads where it knows the architecture.

    checkpoint -> family.convert (canonical weights) -> gguf_names (llama.cpp's names and layouts, or the
    generic edgeseq-<family> architecture) -> per-tensor type (kept-F32 rules, recipe, fallbacks) -> file

The file is written under a temporary name beside OUT and renamed at the end: a failed export leaves
nothing. It is streamed (one tensor at a time through a spool file beside OUT, see export_gguf), and the
weights are checked against the config (edgeseq.weight_check) before the file is written. The tokenizer
keys follow llama.cpp's converter (exporters/gguf_tokenizer.py).
"""
from __future__ import annotations

import json
import os

import numpy as np

from edgeseq import __version__
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.exporters.checkpoint import open_checkpoint
from edgeseq.exporters.export import _special_tokens, _tokenizer_source
from edgeseq.exporters.gguf_tokenizer import _tokenizer_keys
from edgeseq.exporters.gguf_tokenizer import _FAMILY_PRE, _pre_name  # noqa: F401  (tests reach them here)
from edgeseq.gguf_names import GENERIC_PREFIX, arch_for, generic_metadata, keep_f32

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16"}
# llama_ftype of each recipe (general.file_type); K-quant recipes are the _M mixes' numbers
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 15, "q5_k": 17,
             "q6_k": 18, "bf16": 32}
PAD_VOCAB = {"mamba": 8, "mamba2": 16, "granitehybrid": 8, "nemotron_h": 8, "nemotron_h_moe": 8}  # llama.cpp's converter pads these
# vocabularies (granitehybrid: where it has Mamba layers, as every file of that name edgeseq writes does) and needs the rows


def parse_gguf_quant(name: str) -> str:
    q = _ALIASES.get(name.lower(), name.lower())
    if q not in GGUF_QUANTS:
        raise EdgeseqError(f"--quant {name}: not available for gguf (choose one of {', '.join(GGUF_QUANTS)})")
    return q


# -- tensor types -------------------------------------------------------------------------------------
def _choose(name: str, shape: tuple, quant: str, arch: str, tied: bool) -> str:
    """The GGUF type of one tensor, from its name and shape alone (so the header can be written before
    any data): llama.cpp's per-tensor rules (which tensors stay F32, the head at Q6_K/Q8_0, row-length
    fallbacks Q4_K -> Q5_0 ... F16) from edgeseq.quant.gguf_quants. The generic architecture's canonical
    names first pass edgeseq's own keep-F32 rule, then the same rules as a `.weight` matrix."""
    from edgeseq.quant import gguf_quants

    if arch.startswith(GENERIC_PREFIX):
        shaped = np.broadcast_to(np.float32(0), shape)  # keep_f32 looks at the shape only: no memory
        if keep_f32(name, shaped, True):
            return "F32"
        return gguf_quants.choose_type(name + ".weight", shape, quant, "", False)
    return gguf_quants.choose_type(name, shape, quant, arch, tied)


def _nbytes(shape: tuple, t: str) -> int:
    from edgeseq.quant import gguf_quants

    return int(np.prod(shape[:-1])) * gguf_quants.row_bytes(t, int(shape[-1]))


def _encode(a: np.ndarray, t: str) -> np.ndarray:
    """The tensor's bytes in GGUF type `t` (an array the writer writes as it is)."""
    from edgeseq.quant import gguf_quants

    a = np.ascontiguousarray(a, dtype=np.float32)
    if t == "F32":
        return a
    if t == "F16":
        return a.astype(np.float16)
    return gguf_quants.quantize(a, t)


# -- the export ---------------------------------------------------------------------------------------
def _add(w, key: str, value, kind: str) -> None:
    from gguf import GGUFValueType as V

    if kind == "u32":
        w.add_uint32(key, value)
    elif kind == "f32":
        w.add_float32(key, value)
    elif kind == "bool":
        w.add_bool(key, value)
    elif kind == "str":
        w.add_string(key, value)
    elif kind == "strs":
        w.add_key_value(key, list(value), V.ARRAY, sub_type=V.STRING)
    elif kind == "i32s":
        w.add_key_value(key, list(value), V.ARRAY, sub_type=V.INT32)
    elif kind == "f32s":
        w.add_key_value(key, list(value), V.ARRAY, sub_type=V.FLOAT32)
    elif kind == "bools":
        w.add_key_value(key, [bool(v) for v in value], V.ARRAY, sub_type=V.BOOL)
    else:
        raise ValueError(kind)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] >= rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


def _gguf_tensors(fam, amap, ckpt, vocab: int, canonical: dict):
    """(GGUF name, array, shape as written) one at a time, in the file's order; `canonical` collects the
    canonical weights' shapes on the way, for the shape check. The embedding and head rows are padded
    to `vocab` only where the caller pads them (`_pad_rows`): the shape says what the file holds."""
    from edgeseq.graph import WeightInfo

    def recorded(weights):
        for name, a in weights:
            canonical[name] = WeightInfo(name, "float32", tuple(int(d) for d in a.shape), 0, 4 * int(a.size))
            yield name, a

    weights = recorded(fam.convert(ckpt))
    for name, a in (weights if amap is None else amap.to_gguf(fam, weights)):
        if len(name.encode()) >= 64:
            raise UnsupportedError(f"tensor name {name!r} is longer than GGUF's 63 bytes")
        shape = tuple(int(d) for d in a.shape)
        if name in ("token_embd.weight", "output.weight") and shape[0] < vocab:
            shape = (vocab, *shape[1:])  # llama.cpp checks the rows against the (padded) token count
        yield name, a, shape


def _template_text(spec) -> str | None:
    """What tokenizer.chat_template holds for a manifest-style template spec: the Jinja text, or a
    plain-string template's name (llama.cpp and edgeseq's reader know "rwkv-world"); None for none."""
    from edgeseq.chat_template import NAMES

    if not spec:
        return None
    if isinstance(spec, dict) and isinstance(spec.get("jinja"), str):
        return spec["jinja"]
    return next((n for n, v in NAMES.items() if v == spec), None)


def _set_template(tok_keys: list, special_vocab, text: str | None) -> None:
    """tokenizer.chat_template = `text` (None: no template). A gpt2/llama vocabulary writes it through
    the gguf package's SpecialVocab (which may hold named templates: kept when their default is `text`)."""
    tok_keys[:] = [k for k in tok_keys if k[0] != "tokenizer.chat_template"]
    if special_vocab is not None:
        cur = special_vocab.chat_template
        named = {t.get("name"): t.get("template") for t in cur if isinstance(t, dict)} if isinstance(cur, list) else {}
        if not (named and named.get("default") == text):
            special_vocab.chat_template = text
    elif text is not None:
        tok_keys.append(("tokenizer.chat_template", text, "str"))


def _spool(tensors, spool, quant: str, arch: str) -> list[list]:
    """Each (GGUF name, array, shape) encoded and appended to `spool`; returns the plan, a row per tensor:
    [name, shape, type, offset in the spool, bytes, spooled as f32]. token_embd's type with a quantized
    recipe depends on whether an output.weight follows (llama.cpp then treats it as the head): it is
    spooled as f32, its type left None, and encoded when the file is written."""
    plan = []
    for tname, a, shape in tensors:
        if shape != a.shape:
            a = _pad_rows(a, shape[0])
        t = _choose(tname, shape, quant, arch, True)
        if t != _choose(tname, shape, quant, arch, False):
            t, data = None, np.ascontiguousarray(a, dtype=np.float32)
        else:
            data = _encode(a, t)
        plan.append([tname, shape, t, spool.tell(), data.nbytes, t is None])
        data.tofile(spool)
        del a, data  # (only one tensor at a time)
    return plan


def _param_counts(shapes: dict) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) parameters, counted as the gguf package's writer counts
    them for llama.cpp's converter: a 3-D `*_exps.*` tensor holds one matrix per expert."""
    total = shared = expert = n_sum = n_tensors = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        total += size
        if "_exps." in name and len(shape) >= 3:
            count = shape[-2] if ".bias" in name else shape[-3]  # (numpy order: experts first)
            expert += size // count
            n_sum, n_tensors = n_sum + count, n_tensors + 1
        else:
            shared += size
    return total, shared, expert, (n_sum // n_tensors if n_tensors else 0)


def _general(w, checkpoint: str, shapes: dict) -> None:
    """general.* as llama.cpp's converter writes them: the gguf package's Metadata from the checkpoint
    folder (README.md's model card, config.json, generation_config.json's sampling settings, the folder
    name's heuristics), the name falling back to the folder's, and the size label from the parameters
    ("8x1.5B" for experts: the count, then shared plus one expert's parameters)."""
    import gguf
    from pathlib import Path

    total, shared, expert, n_expert = _param_counts(shapes)
    folder = Path(checkpoint) if os.path.isdir(checkpoint) else None
    try:
        meta = gguf.Metadata.load(None, folder, None, total)
    except Exception as e:  # (yaml's and json's errors in a model card or config)
        raise EdgeseqError(f"{checkpoint}: cannot read the model card or generation_config.json for GGUF "
                           f"metadata ({type(e).__name__}: {e})") from None
    gen = os.path.join(checkpoint, "generation_config.json") if folder else ""
    if meta.sampling_penalty_repeat is None and os.path.isfile(gen):
        try:  # the converter's gguf-py reads transformers' spelling too
            with open(gen, encoding="utf-8") as f:
                penalty = json.load(f).get("repetition_penalty")
        except (OSError, ValueError, AttributeError):
            penalty = None
        if isinstance(penalty, (int, float)) and not isinstance(penalty, bool):
            meta.sampling_penalty_repeat = penalty
    if meta.name is None:
        meta.name = os.path.basename(os.path.normpath(checkpoint))
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)


def _metadata(w, checkpoint: str, fam, amap, arch: str, shapes: dict, quant: str, ckpt, tok_spec: dict,
              tok_file: str | None, vocab: int, chat_template) -> None:
    """Every key-value pair: general.*, the architecture's (or edgeseq's generic) keys, the tokenizer."""
    import gguf

    generic = amap is None
    w.add_type("model")
    _general(w, checkpoint, shapes)
    for key, value, kind in (generic_metadata(fam) if generic else amap.metadata(fam, shapes)):
        _add(w, key if generic else f"{arch}.{key}", value, kind)
    w.add_file_type(FILE_TYPE[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_keys, special_vocab = _tokenizer_keys(tok_spec, tok_file, vocab, _special_tokens(ckpt), arch)
    if chat_template is not None:  # ({}: --chat-template none)
        _set_template(tok_keys, special_vocab, _template_text(chat_template))
    for key, value, kind in tok_keys:
        _add(w, key, value, kind)
    if special_vocab is not None:
        special_vocab.add_to_gguf(w, quiet=True)
    if generic:
        w.add_string("edgeseq.version", __version__)


def export_gguf(checkpoint: str, out: str, quant: str = "f32", tokenizer: str | None = None, force: bool = False,
                progress: bool = False, chat_template=None) -> dict:
    """Write `checkpoint` as the GGUF file `out`. Returns a summary (architecture, types used, why generic).

    `chat_template`: a manifest-style spec (edgeseq.chat_template.load_template_option; `{}` for none);
    by default the checkpoint's own Jinja template, written as tokenizer.chat_template.

    Streamed, so memory holds about one tensor (as the ONNX export does): each tensor is converted once,
    encoded and appended to a spool file beside OUT (the data section to be: GGUF's header, which
    comes first, needs every tensor's name, shape and type). The weights' shapes are then checked
    against the config, and the file written: metadata, tensor infos, the spooled bytes tensor by
    tensor. token_embd's type depends on whether an output.weight follows (llama.cpp then treats it as
    the head), so with a quantized recipe it is spooled as f32 and encoded at the end. The file is byte
    for byte what writing it from memory gives; the price is disk: the spool, as large as the file,
    until the file is complete."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from edgeseq import safe_io
    from edgeseq.chat_template import checkpoint_template
    from edgeseq.exporters.export import read_family
    from edgeseq.weight_check import check_weights

    quant = parse_gguf_quant(quant)
    if os.path.exists(out) and not force:
        raise EdgeseqError(f"{out}: already exists (choose another output or pass --force)")
    ckpt = open_checkpoint(checkpoint)
    fam = read_family(ckpt, checkpoint)  # config checked against the file (docs/reliability.md)
    amap, why_generic = arch_for(fam)
    arch = amap.arch if amap else GENERIC_PREFIX + fam.name
    tok_spec, tok_file = _tokenizer_source(ckpt, tokenizer, fam)
    vocab = fam.vocab_size
    pad = PAD_VOCAB.get(arch)
    if pad:
        vocab = -(-vocab // pad) * pad
    if chat_template is None:
        chat_template = checkpoint_template(checkpoint)
    if progress:
        from tqdm import tqdm

    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    # beside OUT, named as safe_io's temporary files are (`.{name}.{pid}-...tmp`): the file, renamed over
    # OUT at the end, and the spool; both removed on an error
    tmp, spool_path = (os.path.join(parent, f".{os.path.basename(out)}.{os.getpid()}-{part}.tmp")
                       for part in ("gguf", "data"))
    w = None
    try:
        with open(spool_path, "w+b") as spool:
            canonical: dict = {}
            with safe_io.converting(checkpoint):
                plan = _spool(_gguf_tensors(fam, amap, ckpt, vocab, canonical), spool, quant, arch)
            # a tensor of the wrong shape is an error now (naming it), not a file llama.cpp or ONNX Runtime refuses
            check_weights(fam, canonical, checkpoint)
            shapes = {tname: shape for tname, shape, *_ in plan}
            tied = "output.weight" not in shapes
            for entry in plan:
                entry[2] = entry[2] or _choose(entry[0], entry[1], quant, arch, tied)
            w = gguf.GGUFWriter(tmp, arch)
            _metadata(w, checkpoint, fam, amap, arch, shapes, quant, ckpt, tok_spec, tok_file, vocab, chat_template)
            for tname, shape, t, *_ in plan:
                w.add_tensor_info(tname, shape, np.dtype(np.float32), _nbytes(shape, t), raw_dtype=Q[t])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            rows = tqdm(plan, desc="tensors", unit="tensor", leave=False, disable=None) if progress else plan
            for tname, shape, t, offset, nbytes, as_f32 in rows:  # the spooled data, one tensor at a time
                spool.seek(offset)
                if as_f32:  # its type known now
                    w.write_tensor_data(_encode(np.fromfile(spool, np.float32, nbytes // 4).reshape(shape), t))
                else:
                    w.write_tensor_data(np.fromfile(spool, np.uint8, nbytes))
        w.close()
        safe_io.fsync_tree(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        if w is not None:
            w.close()  # (idempotent) the partial file's handle, before it goes
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk: named, and the partial file is gone
            raise safe_io.disk_error(e, out) from None
        raise
    finally:
        if os.path.exists(spool_path):
            os.remove(spool_path)
    used: dict[str, int] = {}
    for _, _, t, *_ in plan:
        used[t] = used.get(t, 0) + 1
    return {"architecture": arch, "family": fam.name, "types": used, "generic_because": why_generic,
            "vocab": vocab}
