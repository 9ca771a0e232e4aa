"""tokenizer.encode_split(text, at): the whole text's ids, and how many of them make up exactly text[:at]
(None where a token straddles that character), for every tokenizer kind a bundle can carry. The server
uses it to put a reply's own ids in front of the rest of a prompt (docs/serve.md)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import write_tokenizer
from edgeseq.tokenizer import ByteTokenizer, HFTokenizer, RwkvWorldTokenizer, find_rwkv_vocab

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora" / "tinyshakespeare.txt"


def _bytes_of(tok, ids) -> bytes:
    if isinstance(tok, ByteTokenizer):
        return bytes(ids)
    if isinstance(tok, RwkvWorldTokenizer):
        return b"".join(tok.id_to_bytes[i] for i in ids)
    return tok.decode(ids).encode()  # byte-level BPE of valid text: decode is exact


@pytest.fixture(scope="module", params=["bytes", "rwkv_world", "hf"])
def tok(request, tmp_path_factory):
    if request.param == "bytes":
        return ByteTokenizer()
    if request.param == "rwkv_world":
        return RwkvWorldTokenizer(find_rwkv_vocab("."))
    return HFTokenizer(str(write_tokenizer(tmp_path_factory.mktemp("bpe") / "tokenizer.json", 301)))


def test_split_is_a_token_boundary_or_none(tok):
    rng = random.Random(0)
    text = CORPUS.read_text()[:600] + " héllo wörld 世界 🙂\n\nend"
    found = missed = 0
    for at in sorted(rng.sample(range(len(text) + 1), 120)) + [0, len(text)]:
        ids, k = tok.encode_split(text, at)
        assert ids == tok.encode(text)
        head = text[:at].encode()
        cuts = [j for j in range(len(ids) + 1) if _bytes_of(tok, ids[:j]) == head]
        if k is None:
            assert not cuts, at  # no token boundary there: the split must say so
            missed += 1
        else:
            assert cuts == [k] or k in cuts, at
            assert _bytes_of(tok, ids[k:]) == text[at:].encode()
            found += 1
    assert found > 20 and (missed > 20 or isinstance(tok, ByteTokenizer))
