"""The tokenizer keys of a GGUF file (exporters/gguf_writer.py writes them), as llama.cpp's converter
writes them: `gpt2` (tokens, types, merges, `pre`) from a byte-level BPE tokenizer.json, `llama` from a
SentencePiece tokenizer.model or a SentencePiece-style tokenizer.json, `rwkv` for the RWKV World
vocabulary; a byte-level model (vocabulary of 256, no tokenizer file) is written as an `rwkv`-model
vocabulary of the 256 single bytes, which llama.cpp's greedy matcher tokenizes byte for byte.
"""
from __future__ import annotations

import json
import os

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.tokenizer import RwkvWorldTokenizer

# llama.cpp's token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


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
