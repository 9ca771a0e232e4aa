"""`edgeseq export CHECKPOINT --format gguf`: one GGUF file llama.cpp loads where it knows the architecture.

    checkpoint -> family.convert (canonical weights) -> gguf_names (llama.cpp's names and layouts, or the
    generic edgeseq-<family> architecture) -> per-tensor type (kept-F32 rules, recipe, fallbacks) -> file

The file is written under a temporary name beside OUT and renamed at the end: a failed export leaves
nothing. Tokenizer keys follow llama.cpp's converter: `gpt2` (tokens, types, merges, `pre`) from a BPE
`tokenizer.json`, `rwkv` for the RWKV World vocabulary; a byte-level model (vocabulary of 256, no
tokenizer file) is written as an `rwkv`-model vocabulary of the 256 single bytes, which llama.cpp's
greedy matcher tokenizes byte for byte.
"""
from __future__ import annotations

import json
import os

import numpy as np

from edgeseq import __version__
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.exporters.checkpoint import open_checkpoint
from edgeseq.exporters.export import _special_tokens, _tokenizer_source
from edgeseq.gguf_names import GENERIC_PREFIX, arch_for, generic_metadata, keep_f32
from edgeseq.tokenizer import RwkvWorldTokenizer

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16"}
# llama_ftype of each recipe (general.file_type); K-quant recipes are the _M mixes' numbers
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 15, "q5_k": 17,
             "q6_k": 18, "bf16": 32}
PAD_VOCAB = {"mamba": 8, "mamba2": 16}  # llama.cpp's converter pads these vocabularies (and needs the rows)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 2, 3, 4, 5


def parse_gguf_quant(name: str) -> str:
    q = _ALIASES.get(name.lower(), name.lower())
    if q not in GGUF_QUANTS:
        raise EdgeseqError(f"--quant {name}: not available for gguf (choose one of {', '.join(GGUF_QUANTS)})")
    return q


# -- tensor types -------------------------------------------------------------------------------------
def _encode(name: str, a: np.ndarray, quant: str, arch: str, tied: bool):
    """(raw data, GGMLQuantizationType) for one tensor: llama.cpp's per-tensor rules (which tensors stay
    F32, the head at Q6_K/Q8_0, row-length fallbacks Q4_K -> Q5_0 ... F16) from edgeseq.quant.gguf_quants.
    The generic architecture's canonical names first pass edgeseq's own keep-F32 rule, then the same
    rules as a `.weight` matrix."""
    from gguf import GGMLQuantizationType as Q

    from edgeseq.quant import gguf_quants

    a = np.ascontiguousarray(a, dtype=np.float32)
    generic = arch.startswith(GENERIC_PREFIX)
    if generic:
        t = "F32" if keep_f32(name, a, True) else gguf_quants.choose_type(name + ".weight", a.shape, quant, "", False)
    else:
        t = gguf_quants.choose_type(name, a.shape, quant, arch, tied)
    if t == "F32":
        return a, Q.F32
    if t == "F16":
        return a.astype(np.float16), Q.F16
    return gguf_quants.quantize(a, t), Q[t]


# -- tokenizer keys -----------------------------------------------------------------------------------
def _pad(tokens: list, types: list, n: int) -> None:
    for i in range(len(tokens), n):
        tokens.append(f"[PAD{i}]".encode())
        types.append(TOKEN_UNUSED)


def _rwkv_escape(b: bytes) -> bytes:
    """llama.cpp's rwkv vocabulary stores each token as Python's bytes repr without b'' (its unescaper)."""
    return repr(b)[2:-1].encode("utf-8")


def _tokenizer_keys(spec: dict, file: str | None, vocab: int, special: dict):
    """(keys [(key, value, type)], a gguf.SpecialVocab to add or None)."""
    kind = spec["kind"]
    keys: list[tuple[str, object, str]] = []
    if kind == "bytes":
        tokens = [_rwkv_escape(bytes([i])) for i in range(256)]
        types = [TOKEN_NORMAL] * 256
        _pad(tokens, types, vocab)
        keys += [("tokenizer.ggml.model", "rwkv", "str"), ("tokenizer.ggml.tokens", tokens, "strs"),
                 ("tokenizer.ggml.token_type", types, "i32s")]
    elif kind == "rwkv_world":
        world = RwkvWorldTokenizer(file)
        tokens, types = [b"<s>"], [TOKEN_CONTROL]
        for i in range(1, max(world.id_to_bytes) + 1):
            if i in world.id_to_bytes:
                tokens.append(_rwkv_escape(world.id_to_bytes[i]))
                types.append(TOKEN_NORMAL)
            else:
                tokens.append(f"[PAD{i}]".encode())
                types.append(TOKEN_UNUSED)
        if len(tokens) > vocab:
            raise EdgeseqError(f"{file}: {len(tokens)} tokens, more than the model's {vocab} embedding rows")
        _pad(tokens, types, vocab)
        return [("tokenizer.ggml.model", "rwkv", "str"), ("tokenizer.ggml.tokens", tokens, "strs"),
                ("tokenizer.ggml.token_type", types, "i32s"), ("tokenizer.chat_template", "rwkv-world", "str"),
                ("tokenizer.ggml.bos_token_id", 0, "u32"), ("tokenizer.ggml.eos_token_id", 0, "u32"),
                ("tokenizer.ggml.eot_token_id", RwkvWorldTokenizer.END_OF_TURN, "u32")], None
    else:
        # the special ids, add_bos/add_eos and chat template as llama.cpp's converter finds them (the gguf
        # package's SpecialVocab: tokenizer.json, tokenizer_config.json, config.json beside the tokenizer)
        import gguf

        sv = gguf.SpecialVocab(os.path.dirname(os.path.abspath(file)), load_merges=False, n_vocab=vocab)
        keys = _sentencepiece_keys(file, vocab) if file.endswith(".model") else _bpe_keys(file, vocab)
        return keys, sv
    for key, tid in (("bos", special.get("bos_token_id")), ("eos", special.get("eos_token_id"))):
        if tid is not None and 0 <= int(tid) < vocab:
            keys.append((f"tokenizer.ggml.{key}_token_id", int(tid), "u32"))
    return keys, None


def _bpe_keys(path: str, vocab: int) -> list[tuple[str, object, str]]:
    """gpt2-model keys from a byte-level BPE tokenizer.json (tokens by id, types, merges, pre)."""
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgeseqError(f"{path}: not a readable tokenizer.json ({e})") from None
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: a {model.get('type')} tokenizer; GGUF export supports byte-level BPE "
                               f"tokenizer.json files (and the RWKV World vocabulary)")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {}
    for t in tj.get("added_tokens") or []:
        by_id[int(t["id"])] = t["content"]
        types[int(t["id"])] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    if by_id and max(by_id) >= vocab:
        raise EdgeseqError(f"{path}: token id {max(by_id)} is beyond the model's {vocab} embedding rows")
    tokens, ttypes = [], []
    for i in range(vocab):
        if i in by_id:
            tokens.append(by_id[i].encode("utf-8"))
            ttypes.append(types.get(i, TOKEN_NORMAL))
        else:
            tokens.append(f"[PAD{i}]".encode())
            ttypes.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    keys = [("tokenizer.ggml.model", "gpt2", "str"), ("tokenizer.ggml.pre", _pre_name(tj), "str"),
            ("tokenizer.ggml.tokens", tokens, "strs"), ("tokenizer.ggml.token_type", ttypes, "i32s")]
    if not merges:
        merges = [_inert_merge(by_id)]
    keys.append(("tokenizer.ggml.merges", [m.encode("utf-8") for m in merges], "strs"))
    return keys


def _sentencepiece_keys(path: str, vocab: int) -> list[tuple[str, object, str]]:
    """llama-model keys from a SentencePiece tokenizer.model: pieces, scores and types by id, padded with
    [PAD{i}] (score -10000, UNUSED). Types as llama.cpp's converter reads them from the processor:
    unknown, control, unused and byte pieces keep their type, everything else (user-defined included)
    is NORMAL."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise EdgeseqError(f"{path}: reading a SentencePiece model needs the sentencepiece package") from None
    m = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            m.ParseFromString(f.read())
    except Exception as e:  # OSError or protobuf's DecodeError
        raise EdgeseqError(f"{path}: not a SentencePiece model ({e})") from None
    if len(m.pieces) > vocab:
        raise EdgeseqError(f"{path}: {len(m.pieces)} pieces, more than the model's {vocab} embedding rows")
    P = sentencepiece_model_pb2.ModelProto.SentencePiece
    kept = {P.UNKNOWN: 2, P.CONTROL: 3, P.UNUSED: 5, P.BYTE: 6}
    tokens = [p.piece.encode("utf-8") for p in m.pieces]
    scores = [float(p.score) for p in m.pieces]
    types = [kept.get(p.type, TOKEN_NORMAL) for p in m.pieces]
    for i in range(len(tokens), vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-10000.0)
        types.append(TOKEN_UNUSED)
    return [("tokenizer.ggml.model", "llama", "str"), ("tokenizer.ggml.pre", "default", "str"),
            ("tokenizer.ggml.tokens", tokens, "strs"), ("tokenizer.ggml.scores", scores, "f32s"),
            ("tokenizer.ggml.token_type", types, "i32s")]


def _inert_merge(by_id: dict[int, str]) -> str:
    """llama.cpp refuses a gpt2 vocabulary without merges, and GGUF has no empty arrays. A tokenizer
    with no merges (its tokens are its alphabet) gets one merge whose result is not a token: llama.cpp
    then spells that pair with the two original tokens, so every id stays what the tokenizer gives."""
    have = set(by_id.values())
    toks = [by_id[i] for i in sorted(by_id)]
    for a in toks:
        for b in toks:
            if a + b not in have and " " not in a + b:
                return f"{a} {b}"
    raise EdgeseqError("tokenizer.json: cannot find a pair of tokens for llama.cpp's merges list")


def _pre_name(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name. llama.cpp's converter identifies it by hashing the ids of a test
    string against a table of known models; edgeseq reads the tokenizer.json instead: a plain
    byte-level pre-tokenizer (GPT-2's regex: GPT-2, GPT-NeoX, Mamba) is `gpt-2`; anything else gets
    llama.cpp's `default` regex, which may split some text differently than the original."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"
    return "default"


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
    else:
        raise ValueError(kind)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] >= rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


def export_gguf(checkpoint: str, out: str, quant: str = "f32", tokenizer: str | None = None, force: bool = False,
                progress: bool = False) -> dict:
    """Write `checkpoint` as the GGUF file `out`. Returns a summary (architecture, types used, why generic)."""
    import gguf

    quant = parse_gguf_quant(quant)
    if os.path.exists(out) and not force:
        raise EdgeseqError(f"{out}: already exists (choose another output or pass --force)")
    ckpt = open_checkpoint(checkpoint)
    from edgeseq import safe_io
    from edgeseq.exporters.export import read_family

    fam = read_family(ckpt, checkpoint)  # config checked against the file (docs/reliability.md)
    amap, why_generic = arch_for(fam)
    arch = amap.arch if amap else GENERIC_PREFIX + fam.name
    generic = amap is None
    tok_spec, tok_file = _tokenizer_source(ckpt, tokenizer, fam)
    vocab = fam.vocab_size
    pad = PAD_VOCAB.get(arch)
    if pad:
        vocab = -(-vocab // pad) * pad

    weights = fam.convert(ckpt)
    items = weights if generic else amap.to_gguf(fam, weights)
    tensors: list[tuple[str, np.ndarray]] = []
    with safe_io.converting(checkpoint):
        for name, a in items:
            if len(name.encode()) >= 64:
                raise UnsupportedError(f"tensor name {name!r} is longer than GGUF's 63 bytes")
            if name in ("token_embd.weight", "output.weight") and a.shape[0] != vocab:
                a = _pad_rows(a, vocab)  # llama.cpp checks the rows against the (padded) token count
            tensors.append((name, a))
    shapes = {n: a.shape for n, a in tensors}
    tied = "output.weight" not in shapes

    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.{os.getpid()}.tmp")
    used: dict[str, int] = {}
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type("model")
        name = os.path.basename(os.path.normpath(checkpoint))
        w.add_name(name)
        n_params = sum(int(np.prod(a.shape)) for _, a in tensors)
        w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
        meta = generic_metadata(fam) if generic else amap.metadata(fam, shapes)
        for key, value, kind in meta:
            _add(w, key if generic else f"{arch}.{key}", value, kind)
        w.add_file_type(FILE_TYPE[quant])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok_keys, special_vocab = _tokenizer_keys(tok_spec, tok_file, vocab, _special_tokens(ckpt))
        for key, value, kind in tok_keys:
            _add(w, key, value, kind)
        if special_vocab is not None:
            special_vocab.add_to_gguf(w, quiet=True)
        if generic:
            w.add_string("edgeseq.version", __version__)
        for tname, a in tensors:
            data, qt = _encode(tname, a, quant, arch, tied)
            used[qt.name] = used.get(qt.name, 0) + 1
            w.add_tensor(tname, data, raw_dtype=qt)  # quantized bytes: the writer derives the shape
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        safe_io.fsync_tree(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk: named, and the partial file is gone
            raise safe_io.disk_error(e, out) from None
        raise
    return {"architecture": arch, "family": fam.name, "types": used, "generic_because": why_generic,
            "vocab": vocab}
