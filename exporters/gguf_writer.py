"""`edgeseq export CHECKPOINT --format gguf`: one GGUF file llama.cpp loads where it knows the architecture.

    checkpoint -> family.convert (canonical weights) -> gguf_names (llama.cpp's names and layouts, or the
    generic edgeseq-<family> architecture) -> per-tensor type (kept-F32 rules, recipe, fallbacks) -> file

The file is written under a temporary name beside OUT and renamed at the end: a failed export leaves
nothing. It is streamed (one tensor at a time through a spool file beside OUT, see export_gguf), and the
weights are checked against the config (edgeseq.weight_check) before the file is written. Tokenizer keys follow llama.cpp's converter: `gpt2` (tokens, types, merges, `pre`) from a BPE
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
PAD_VOCAB = {"mamba": 8, "mamba2": 16, "granitehybrid": 8, "nemotron_h": 8, "nemotron_h_moe": 8}  # llama.cpp's converter pads these
# vocabularies (granitehybrid: where it has Mamba layers, as every file of that name edgeseq writes does) and needs the rows
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


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


# -- tokenizer keys -----------------------------------------------------------------------------------
def _pad(tokens: list, types: list, n: int) -> None:
    for i in range(len(tokens), n):
        tokens.append(f"[PAD{i}]".encode())
        types.append(TOKEN_UNUSED)


def _rwkv_escape(b: bytes) -> bytes:
    """llama.cpp's rwkv vocabulary stores each token as Python's bytes repr without b'' (its unescaper)."""
    return repr(b)[2:-1].encode("utf-8")


# architectures whose llama.cpp converter takes a tokenizer.model beside the tokenizer.json first (Jamba's,
# Mamba-2's and so Granite-hybrid's and Bamba's, Qwen2's and so Qwen3-Next's and Qwen3.5's set_vocab)
_SPM_FIRST = ("jamba", "mamba2", "granitehybrid", "qwen3next", "qwen35", "qwen35moe")


def _tokenizer_keys(spec: dict, file: str | None, vocab: int, special: dict, arch: str | None = None):
    """(keys [(key, value, type)], a gguf.SpecialVocab to add or None); `arch` names the pre-tokenizer where
    llama.cpp's converter gives a family's tokenizers their own name (_pre_name)."""
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

        folder = os.path.dirname(os.path.abspath(file))
        spm = os.path.join(folder, "tokenizer.model")
        if arch in _SPM_FIRST and os.path.basename(file) == "tokenizer.json" and os.path.isfile(spm):
            file = spm
        keys = _sentencepiece_keys(file, vocab) if file.endswith(".model") else _bpe_keys(file, vocab, arch)
        try:  # (after the keys: a tokenizer.json it cannot parse is named by _bpe_keys)
            sv = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab)
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # JSON errors are ValueErrors
            raise EdgeseqError(f"{folder}: its tokenizer_config.json, tokenizer.json or config.json does not "
                               f"give the special tokens ({type(e).__name__}: {e})") from None
        return keys, sv
    for key, tid in (("bos", special.get("bos_token_id")), ("eos", special.get("eos_token_id"))):
        if tid is not None and 0 <= int(tid) < vocab:
            keys.append((f"tokenizer.ggml.{key}_token_id", int(tid), "u32"))
    return keys, None


def _bpe_keys(path: str, vocab: int, arch: str | None = None) -> list[tuple[str, object, str]]:
    """gpt2-model keys from a byte-level BPE tokenizer.json (tokens by id, types, merges, pre)."""
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgeseqError(f"{path}: not a readable tokenizer.json ({e})") from None
    if not isinstance(model, dict) or not isinstance(model.get("vocab", {}), dict):
        raise EdgeseqError(f"{path}: not a tokenizer.json (its \"model\" is not an object with a \"vocab\" object)")
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: a {model.get('type')} tokenizer; GGUF export supports byte-level BPE "
                               f"tokenizer.json files (and the RWKV World vocabulary)")
    if model.get("byte_fallback"):
        return _spm_json_keys(path, tj, vocab)
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {}
    for t in tj.get("added_tokens") or []:  # typed as llama.cpp's converter types them
        text = t["content"]
        if t.get("special") or _looks_special(text):
            types[int(t["id"])] = TOKEN_CONTROL
        else:
            text = text.replace("\u2581", " ")  # (a user-defined token's SentencePiece spaces, pre-normalised)
            types[int(t["id"])] = TOKEN_USER_DEFINED
        by_id[int(t["id"])] = text
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
    keys = [("tokenizer.ggml.model", "gpt2", "str"), ("tokenizer.ggml.pre", _pre_name(tj, arch), "str"),
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
    _spm_added(os.path.dirname(os.path.abspath(path)), tokens, scores, types)
    return [("tokenizer.ggml.model", "llama", "str"), ("tokenizer.ggml.pre", "default", "str"),
            ("tokenizer.ggml.tokens", tokens, "strs"), ("tokenizer.ggml.scores", scores, "f32s"),
            ("tokenizer.ggml.token_type", types, "i32s")]


def _spm_json_keys(path: str, tj: dict, vocab: int) -> list[tuple[str, object, str]]:
    """llama-model keys from a SentencePiece-style BPE tokenizer.json ("\u2581" for spaces, byte fallback:
    what transformers makes of a tokenizer.model, as Jamba ships without one), where writing it as `gpt2`
    would make llama.cpp treat "\u2581" as a letter. llama.cpp's converter (LlamaHfVocab) gives every
    piece the score -1000, and llama.cpp's SentencePiece tokenizer, which merges the highest-scoring pair
    first, then merges left to right instead of in the BPE's order; edgeseq scores each piece by the
    rank of the first merge that makes it (-rank), so llama.cpp merges in the BPE's order. Types: <0xNN>
    pieces BYTE, the unknown piece UNKNOWN, added tokens as for gpt2; add_space_prefix from the
    normaliser's Prepend("\u2581") or a Metaspace pre-tokenizer that prepends."""
    model = tj["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    if by_id and max(by_id) >= vocab:
        raise EdgeseqError(f"{path}: token id {max(by_id)} is beyond the model's {vocab} embedding rows")
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    types = {i: TOKEN_UNKNOWN if t == model.get("unk_token") else
             TOKEN_BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else TOKEN_NORMAL
             for i, t in by_id.items()}
    # (a piece no merge makes is never made by the BPE: lowest; single characters are never merged into)
    scores = {i: -float(rank[t]) if t in rank else -1e9 for i, t in by_id.items()}
    for t in tj.get("added_tokens") or []:
        text, i = t["content"], int(t["id"])
        if i >= vocab:
            raise EdgeseqError(f"{path}: token id {i} is beyond the model's {vocab} embedding rows")
        if t.get("special") or _looks_special(text):
            types[i] = TOKEN_CONTROL
        elif i not in by_id or types.get(i) == TOKEN_NORMAL:
            types[i], text = TOKEN_USER_DEFINED, text.replace("\u2581", " ")
        by_id[i] = text
        scores.setdefault(i, -1000.0)
    tokens, sc, ty = [], [], []
    for i in range(vocab):
        tokens.append(by_id[i].encode("utf-8") if i in by_id else f"[PAD{i}]".encode())
        sc.append(scores.get(i, -10000.0))
        ty.append(types.get(i, TOKEN_UNUSED))

    def steps(node):  # the normaliser's or pre-tokenizer's steps, Sequences flattened
        node = node or {}
        inner = node.get("normalizers") or node.get("pretokenizers")
        return [x for n in inner for x in steps(n)] if inner else [node]

    prefix = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in steps(tj.get("normalizer"))) \
        or any(n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") != "never"
               and n.get("add_prefix_space", True) for n in steps(tj.get("pre_tokenizer")))
    return [("tokenizer.ggml.model", "llama", "str"), ("tokenizer.ggml.pre", "default", "str"),
            ("tokenizer.ggml.tokens", tokens, "strs"), ("tokenizer.ggml.scores", sc, "f32s"),
            ("tokenizer.ggml.token_type", ty, "i32s"), ("tokenizer.ggml.add_space_prefix", prefix, "bool")]


def _spm_added(folder: str, tokens: list, scores: list, types: list) -> None:
    """The added tokens beside a SentencePiece model, as llama.cpp's converter writes them (score -1000):
    added_tokens.json's are USER_DEFINED; tokenizer_config.json's added_tokens_decoder's CONTROL where
    special or special-looking, else USER_DEFINED with their SentencePiece spaces written as spaces.
    Ids past the vocabulary are left out (the converter warns and skips them)."""
    def read(name):
        f = os.path.join(folder, name)
        if not os.path.isfile(f):
            return {}
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as e:
            raise EdgeseqError(f"{f}: not readable JSON ({e})") from None
        if not isinstance(data, dict):
            raise EdgeseqError(f"{f}: expected a JSON object")
        return data

    def put(tid, text, ttype, where):
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0 or not isinstance(text, str):
            raise EdgeseqError(f"{os.path.join(folder, where)}: an added token needs a string and an id, got "
                               f"{text!r}: {tid!r}")
        if tid < len(tokens):
            tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, ttype

    for text, tid in read("added_tokens.json").items():
        put(tid, text, TOKEN_USER_DEFINED, "added_tokens.json")
    decoder = read("tokenizer_config.json").get("added_tokens_decoder") or {}
    for tid, data in (decoder.items() if isinstance(decoder, dict) else ()):
        text = data.get("content") if isinstance(data, dict) else None
        tid = int(tid) if isinstance(tid, str) and tid.isdigit() else tid
        if isinstance(text, str) and (data.get("special") or _looks_special(text)):
            put(tid, text, TOKEN_CONTROL, "tokenizer_config.json")
        else:
            put(tid, text.replace("\u2581", " ") if isinstance(text, str) else text, TOKEN_USER_DEFINED,
                "tokenizer_config.json")


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


# the name llama.cpp's converter gives a family's released tokenizers (its table of hashes) where that
# name differs from the split's own: LFM2's and Falcon-H1's Llama-3 split
_FAMILY_PRE = {("llama3", "lfm2"): "lfm2", ("llama3", "lfm2moe"): "lfm2", ("llama3", "falcon-h1"): "falcon-h1"}


def _pre_name(tj: dict, arch: str | None = None) -> str:
    """llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`, which picks the regex llama.cpp splits text
    with). llama.cpp's converter hashes the ids of a test string against a table of released models;
    edgeseq reads the tokenizer.json instead: GPT-2's byte-level regex alone (GPT-2, GPT-NeoX, Mamba) is
    `gpt-2`; a Split by one of the published regexes (gguf_bundle.SPLIT_REGEX) before a regex-free
    ByteLevel step, after no normaliser or Qwen's NFC, is that split's name: `qwen2`, `qwen35`, `tekken`,
    and for Llama-3's `lfm2` / `falcon-h1` for those families, else `llama-bpe` where BPE ignores merges
    (Llama-3, Bamba) and `dbrx` where it does not (cl100k: Granite-4.0). Anything else gets llama.cpp's
    `default` regex, which may split some text differently than the original."""
    from edgeseq.gguf_bundle import SPLIT_REGEX

    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    norm = tj.get("normalizer") or {}
    if (not isinstance(parts, list) or not all(isinstance(p, dict) for p in [*parts, norm])
            or norm.get("type") not in (None, "NFC")):
        return "default"
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert") and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)):
        pattern = parts[0].get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        split = next((k for k, v in SPLIT_REGEX.items() if v == regex), None)
        if split == "llama3":
            return _FAMILY_PRE.get((split, arch)) or ("llama-bpe" if tj["model"].get("ignore_merges") else "dbrx")
        if split is not None:
            return split
    return "default"


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter marks CONTROL though the tokenizer does not call them special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


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
