"""Tokenizers a bundle can carry: HF `tokenizer.json` (any language's tokenizers port reads it), the
RWKV World vocabulary (`rwkv_vocab_v20230424.txt`: greedy longest match over 65,529 byte strings), or
byte-level (vocabulary of 256 byte values, no file). All stream text without splitting UTF-8."""
from __future__ import annotations

import ast
import codecs
import os

from edgeseq.errors import EdgeseqError
from edgeseq.safe_io import foreign_error  # native-library errors and panics, named (docs/reliability.md)

MAX_VOCAB_LINE = 4096


class ByteTokenizer:
    kind = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_split(self, text: str, at: int) -> tuple[list[int], int | None]:
        """encode(text), and how many of its tokens make up exactly text[:at] (None where a token
        straddles that character). Every tokenizer here has it (the server's reply reuse, docs/serve.md)."""
        return self.encode(text), len(text[:at].encode("utf-8"))

    def stream(self) -> "TextStream":
        return _ByteStream()


class RwkvWorldTokenizer:
    """The RWKV World tokenizer: each line of the vocabulary is `id <Python literal> byte_length`; the
    literal (a str or bytes) is parsed with ast.literal_eval, never eval. Encoding takes, at each
    position, the longest vocabulary entry that matches the UTF-8 bytes there."""

    kind = "rwkv_world"
    FILE = "rwkv_vocab_v20230424.txt"
    END_OF_TURN = 261  # "\n\n"

    def __init__(self, path: str):
        self.path = path
        self.id_to_bytes: dict[int, bytes] = {}
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    line = line.rstrip("\n")
                    if not line:
                        continue
                    if len(line) > MAX_VOCAB_LINE:  # the longest real entry is ~300 characters
                        raise EdgeseqError(f"{path}:{n}: a vocabulary line of {len(line)} characters (at most "
                                           f"{MAX_VOCAB_LINE} expected)")
                    try:
                        idx = int(line[:line.index(" ")])
                        tok = ast.literal_eval(line[line.index(" "):line.rindex(" ")].strip())
                        tok = tok.encode("utf-8") if isinstance(tok, str) else tok
                        length = int(line[line.rindex(" "):])
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        raise EdgeseqError(f"{path}:{n}: not a vocabulary line: {line[:60]!r}") from None
                    if not isinstance(tok, bytes) or len(tok) != length:
                        raise EdgeseqError(f"{path}:{n}: entry {idx} does not have the length it declares")
                    self.id_to_bytes[idx] = tok
        except OSError as e:
            raise EdgeseqError(f"{path}: cannot read the RWKV vocabulary ({e.strerror})") from None
        except UnicodeDecodeError as e:  # raised by the line iterator, outside the per-line parse
            raise EdgeseqError(f"{path}: the RWKV vocabulary is not UTF-8 ({e.reason} near byte {e.start})") from None
        self.bytes_to_id = {v: k for k, v in self.id_to_bytes.items()}
        # a position tries only the lengths that can match there (a few), not all ~100: 46 -> 5 ms for 10,000
        # characters, which a server tokenizing a whole conversation each turn feels
        by_start: dict[bytes, set[int]] = {}
        for b in self.bytes_to_id:
            for k in (2, 3):  # an entry of n >= k bytes is a candidate where its first k bytes are
                if len(b) >= k:
                    by_start.setdefault(b[:k], set()).add(len(b))
        # three bytes that start a longer entry: those lengths; else the two-byte key's lengths (2 only, as
        # any longer one would have matched the three-byte key); then one byte
        self._lengths = {key: (*sorted((n for n in ns if n >= len(key)), reverse=True),
                               *((2, 1) if len(key) == 3 else (1,)))
                         for key, ns in by_start.items()}

    def encode(self, text: str) -> list[int]:
        src, i, out = text.encode("utf-8"), 0, []
        lookup, lengths, end = self.bytes_to_id, self._lengths, len(src)
        while i < end:
            for n in lengths.get(src[i:i + 3]) or lengths.get(src[i:i + 2], (1,)):
                tid = lookup.get(src[i:i + n]) if i + n <= end else None
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:  # every single byte is in the vocabulary, so this cannot happen with the real file
                raise EdgeseqError(f"{self.path}: byte {src[i]:#x} is not in the RWKV vocabulary")
        return out

    def decode(self, ids) -> str:
        return b"".join(self.id_to_bytes.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")

    def encode_split(self, text: str, at: int) -> tuple[list[int], int | None]:
        ids, cut, n = self.encode(text), len(text[:at].encode("utf-8")), 0
        for k, t in enumerate(ids):
            if n >= cut:
                return ids, k if n == cut else None
            n += len(self.id_to_bytes[t])
        return ids, len(ids) if n == cut else None

    def stream(self) -> "TextStream":
        return _ByteStream(self.id_to_bytes)


class HFTokenizer:
    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = path
        try:
            self._tok = Tokenizer.from_file(path)
        except BaseException as e:  # the Rust library reports parse errors as plain Exception (or panics)
            raise foreign_error(e, path, "reading this tokenizer.json") from None
        self.encode("edgeseq: ÿ ✓ 😀\n")  # a normalizer or pre-tokenizer that panics is found at load

    def _encoding(self, text: str):
        try:
            return self._tok.encode(text, add_special_tokens=False)
        except BaseException as e:  # a Rust panic (PanicException) is a BaseException
            raise foreign_error(e, self.path, "encoding with this tokenizer.json") from None

    def encode(self, text: str) -> list[int]:
        return self._encoding(text).ids

    def encode_split(self, text: str, at: int) -> tuple[list[int], int | None]:
        enc = self._encoding(text)
        ids, spans = enc.ids, enc.offsets  # character offsets into text
        k = next((i for i, (_, end) in enumerate(spans) if end > at), len(ids))
        if k < len(ids) and spans[k][0] < at:
            return ids, None
        return ids, k

    def decode(self, ids) -> str:
        try:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        except BaseException as e:
            raise foreign_error(e, self.path, "decoding with this tokenizer.json") from None

    def stream(self) -> "TextStream":
        return _DiffStream(self)


class TextStream:
    """Feed token ids one by one; get back only complete characters."""

    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class _ByteStream(TextStream):
    """Tokens that are byte strings (byte-level or RWKV World): an incremental UTF-8 decoder."""

    def __init__(self, table: dict[int, bytes] | None = None):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._table = table

    def push(self, token_id: int) -> str:
        if self._table is not None:
            return self._dec.decode(self._table.get(token_id, b""))
        return self._dec.decode(bytes([token_id])) if 0 <= token_id < 256 else ""

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class _DiffStream(TextStream):
    """Decodes a short window of recent ids and emits what was added once it no longer ends in a partial
    character (U+FFFD); the window restarts after each emitted piece, so cost stays constant per token."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix_len = 0  # characters of decode(self.ids) already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") and len(self.ids) < 8:
            return ""
        piece = text[self.prefix_len:]
        # keep the last id as context so leading spaces of the next token decode the same way
        self.ids = self.ids[-1:]
        self.prefix_len = len(self.tok.decode(self.ids))
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece = text[self.prefix_len:]
        self.ids, self.prefix_len = [], 0
        return piece


def load_tokenizer(directory: str, spec: dict):
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind in ("hf", "rwkv_world"):
        path = os.path.join(directory, spec.get("file", "tokenizer.json"))
        if not os.path.isfile(path):
            raise EdgeseqError(f"{path}: missing (the bundle's tokenizer)")
        return HFTokenizer(path) if kind == "hf" else RwkvWorldTokenizer(path)
    raise EdgeseqError(f"{directory}/edgeseq.json: unknown tokenizer kind {kind!r} (known: hf, rwkv_world, bytes)")


def find_rwkv_vocab(near: str) -> str | None:
    """The RWKV World vocabulary beside a checkpoint, or in the `rwkv` package when installed."""
    here = os.path.join(near if os.path.isdir(near) else os.path.dirname(os.path.abspath(near)),
                        RwkvWorldTokenizer.FILE)
    if os.path.isfile(here):
        return here
    import importlib.util

    spec = importlib.util.find_spec("rwkv")
    if spec and spec.origin:
        packaged = os.path.join(os.path.dirname(spec.origin), RwkvWorldTokenizer.FILE)
        if os.path.isfile(packaged):
            return packaged
    return None


def sentencepiece_to_tokenizer_json(path: str) -> str:
    """A SentencePiece model (`tokenizer.model`, BPE or unigram) as HF tokenizers JSON, so a bundle
    carries one tokenizer format every language reads. Export-side only (needs the sentencepiece proto
    and, for BPE merges, transformers). Encoding (without BOS) gives sentencepiece's own ids: pieces
    as the vocabulary, BPE merges ordered by piece score, control and user-defined pieces as added
    tokens, byte fallback, and the model's normalizer spec (charsmap, extra-whitespace removal,
    dummy prefix, spaces as U+2581)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    m = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            m.ParseFromString(f.read())
    except OSError as e:
        raise EdgeseqError(f"{path}: cannot read the SentencePiece model ({e.strerror})") from None
    except Exception as e:  # protobuf's DecodeError
        raise EdgeseqError(f"{path}: not a SentencePiece model ({e})") from None
    ts, ns = m.trainer_spec, m.normalizer_spec
    if not m.pieces:
        raise EdgeseqError(f"{path}: not a SentencePiece model (no pieces)")
    pieces = [(p.piece, p.score) for p in m.pieces]
    # control, unknown and byte pieces never match text ("<s>" typed is "<", "s", ">")
    never = {p.piece for p in m.pieces if p.type in (p.CONTROL, p.UNKNOWN, p.BYTE)}
    if ts.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        # sentencepiece merges the pair whose result has the highest score first; never from those
        model = BPE(vocab, generate_merges(vocab, pieces, never), unk_token=ts.unk_piece, fuse_unk=True,
                    byte_fallback=ts.byte_fallback)
    elif ts.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        # known difference: tokenizers' lattice can pick a control piece where the text spells it out
        # ("<s>"), which sentencepiece never does (BPE models are exact: those pieces take no merges)
        model = Unigram(pieces, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    else:
        raise EdgeseqError(f"{path}: SentencePiece model type {ts.model_type} is not supported (BPE or unigram)")
    tok = Tokenizer(model)
    # user-defined pieces match verbatim in the text
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in m.pieces if p.type == p.USER_DEFINED])
    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        # one difference remains here: tokenizers normalizes the text between user-defined pieces
        # separately, so each such stretch gets the prefix, where sentencepiece adds one at the start;
        # models with both (rare: Gemma's has no dummy prefix) differ right after a user-defined piece
        norm.append(normalizers.Prepend("\u2581"))
    norm.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())  # one string before the dummy prefix is stripped from its start
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok.to_str()
