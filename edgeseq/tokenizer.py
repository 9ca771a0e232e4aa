"""Tokenizers a bundle can carry: HF `tokenizer.json` (any language's tokenizers port reads it) or
byte-level (vocabulary of 256 byte values, no file). Both stream text without splitting UTF-8."""
from __future__ import annotations

import codecs
import os

from edgeseq.errors import EdgeseqError


class ByteTokenizer:
    kind = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def stream(self) -> "TextStream":
        return _ByteStream()


class HFTokenizer:
    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust library reports parse errors as plain Exception
            raise EdgeseqError(f"{path}: cannot read this tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def stream(self) -> "TextStream":
        return _DiffStream(self)


class TextStream:
    """Feed token ids one by one; get back only complete characters."""

    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class _ByteStream(TextStream):
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
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
    if kind == "hf":
        path = os.path.join(directory, spec.get("file", "tokenizer.json"))
        if not os.path.isfile(path):
            raise EdgeseqError(f"{path}: missing (the bundle's tokenizer)")
        return HFTokenizer(path)
    raise EdgeseqError(f"{directory}/edgeseq.json: unknown tokenizer kind {kind!r} (known: hf, bytes)")
