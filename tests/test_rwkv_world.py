"""The RWKV World tokenizer against the `rwkv` package's reference, and a World-vocabulary model end
to end: the vocabulary found and bundled, the chat template, streamed text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.errors import EdgeseqError
from edgeseq.exporters.export import export
from edgeseq.runtime.chat import Chat
from edgeseq.tokenizer import RwkvWorldTokenizer, find_rwkv_vocab

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora" / "tinyshakespeare.txt"
from rwkv import rwkv_tokenizer as rwkv_tok


@pytest.fixture(scope="module")
def vocab_file():
    path = find_rwkv_vocab(".")
    assert path and path.endswith(RwkvWorldTokenizer.FILE)
    return path


def test_encode_decode_match_the_reference(vocab_file):
    ours, ref = RwkvWorldTokenizer(vocab_file), rwkv_tok.TRIE_TOKENIZER(vocab_file)
    text = CORPUS.read_text()[:30000] + " héllo wörld 世界 🙂 \x00 \n\n\t end"
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == text and len(ids) < len(text.encode()) / 2
    assert ours.encode("\n\n") == [RwkvWorldTokenizer.END_OF_TURN]


def test_encode_matches_the_reference_on_glued_vocabulary_pieces(vocab_file):
    """Strings made of whole entries (long ones among them) and of random characters: where the longest
    match starts inside a run of entries and at the text's end, the shortcut by an entry's first bytes
    must find what the reference's trie finds."""
    import random

    ours, ref = RwkvWorldTokenizer(vocab_file), rwkv_tok.TRIE_TOKENIZER(vocab_file)
    rng = random.Random(0)
    alphabet = list("abc xyz\n\t.,;!?'\"éü世界🙂") + [chr(c) for c in range(0x20, 0x7f)]
    for _ in range(600):
        if rng.random() < 0.5:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        else:
            s = "".join(ours.id_to_bytes[rng.randrange(1, 65530)].decode("utf-8", "ignore")
                        for _ in range(rng.randint(1, 12)))
        assert ours.encode(s) == ref.encode(s), s


def test_stream_never_splits_a_character(vocab_file):
    t = RwkvWorldTokenizer(vocab_file)
    text = "日本語のテキスト 🙂🙂 ok"
    # feed single-byte tokens (ids 1..256 are the bytes 0..255) so characters arrive split
    byte_ids = [b + 1 for b in text.encode()]
    assert all(t.id_to_bytes[i] == bytes([i - 1]) for i in byte_ids)
    st = t.stream()
    pieces = [st.push(i) for i in byte_ids] + [st.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_damaged_vocabulary_is_a_clear_error(tmp_path):
    bad = tmp_path / RwkvWorldTokenizer.FILE
    bad.write_text("1 '\\x00' 1\n2 __import__('os') 1\n")
    with pytest.raises(EdgeseqError, match=r":2: not a vocabulary line"):
        RwkvWorldTokenizer(str(bad))


@pytest.fixture(scope="module")
def world_bundle(tmp_path_factory):
    import torch
    d = tmp_path_factory.mktemp("world")
    g = torch.Generator().manual_seed(0)
    C, F, V, L = 32, 64, 65536, 2

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    sd = {"emb.weight": r(V, C, s=0.5), "blocks.0.ln0.weight": torch.ones(C), "blocks.0.ln0.bias": torch.zeros(C),
          "ln_out.weight": torch.ones(C), "ln_out.bias": torch.zeros(C), "head.weight": r(V, C, s=0.3)}
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        sd[p + "att.time_decay"], sd[p + "att.time_first"] = r(C), r(C)
        for m in "kvr":
            sd[p + f"att.time_mix_{m}"] = torch.rand(1, 1, C, generator=g)
        for m in ("key", "value", "receptance", "output"):
            sd[p + f"att.{m}.weight"] = r(C, C, s=C ** -0.5)
        for m in "kr":
            sd[p + f"ffn.time_mix_{m}"] = torch.rand(1, 1, C, generator=g)
        sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = r(F, C, s=C ** -0.5), r(C, F, s=F ** -0.5)
        sd[p + "ffn.receptance.weight"] = r(C, C, s=C ** -0.5)
    pth = d / "RWKV-4-World-tiny.pth"
    torch.save(sd, pth)
    return export(str(pth), str(d / "bundle"))


def test_world_model_bundles_the_vocabulary_and_chat_template(world_bundle):
    m = edgeseq.load(world_bundle)
    assert m.manifest["tokenizer"] == {"kind": "rwkv_world", "file": RwkvWorldTokenizer.FILE}
    assert (Path(world_bundle) / RwkvWorldTokenizer.FILE).is_file()
    assert m.manifest["chat_template"]["turn"] == "User: {user}\n\nAssistant:{assistant}\n\n"
    assert m.tokenizer.decode(m.tokenizer.encode("Hello, world")) == "Hello, world"
    s = m.session()
    text = "".join(s.generate("The", max_tokens=12, temperature=0.0))
    ids = m.tokenizer.encode("The")
    logits = m.session().prefill(ids)
    assert text.startswith(m.tokenizer.decode([int(np.argmax(logits))])[:1] or "")


def test_world_chat_turn_ends_at_end_of_turn_token(world_bundle):
    m = edgeseq.load(world_bundle)
    c = Chat(m, temperature=0.0, max_tokens=8)
    reply = "".join(c.handle("Hi"))
    prompt_len = len(m.tokenizer.encode("User: Hi\n\nAssistant:"))
    s = c.session
    assert s.position >= prompt_len + 1  # the turn's prompt, the reply, and the turn's close were fed
    assert "\n\n" not in reply
