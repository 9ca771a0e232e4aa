"""SentencePiece models converted to tokenizer.json at export (edgeseq.tokenizer): the converted
tokenizer encodes text to sentencepiece's own ids and decodes them back to its text. References: the
Mistral v0.1 model (Zamba2's) shipped in the mistral-common wheel, and small BPE / unigram models
trained here with sentencepiece's trainer."""
from __future__ import annotations

import importlib.util
import os

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from conftest import CORPUS
from edgeseq.errors import EdgeseqError
from edgeseq.tokenizer import sentencepiece_to_tokenizer_json

TEXTS = ["Hello world", "  two  spaces\tand a tab\n\nnewlines", "Ünïcödé — 東京 🤖 emoji ẞ", " leading", "trailing ",
         "print('x')  # code\n    indented", "a<s>b</s><unk>", "1234567890 3.14159", "", "   ", "\n"]


def corpus_lines(n=300):
    lines = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:n] + ["\n".join(lines[n:n + 40])]


def check_same(model_path, texts):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tok = Tokenizer.from_str(sentencepiece_to_tokenizer_json(str(model_path)))
    assert tok.get_vocab_size() == sp.get_piece_size()
    bad = [t for t in texts if tok.encode(t, add_special_tokens=False).ids != sp.encode(t)]
    assert not bad, bad[:5]
    for t in texts:
        ids = sp.encode(t)
        if sp.unk_id() not in ids:  # sentencepiece writes an unknown piece as " \u2047 ", tokenizers as "<unk>"
            assert tok.decode(ids) == sp.decode(ids), t


def test_mistral_v1():
    if importlib.util.find_spec("mistral_common") is None:
        pytest.skip("mistral-common is not installed (pip install -e '.[test]')")
    path = os.path.join(os.path.dirname(importlib.util.find_spec("mistral_common").origin), "data",
                        "tokenizer.model.v1")
    check_same(path, TEXTS + corpus_lines())


# (model type, byte fallback, Gemma-like: no dummy prefix, whitespace kept, user-defined pieces)
TRAINED = [("bpe", True, False), ("unigram", False, False), ("bpe", True, True), ("unigram", True, True)]


@pytest.mark.parametrize("model_type,byte_fallback,gemma_like", TRAINED)
def test_trained_models(tmp_path, model_type, byte_fallback, gemma_like):
    prefix = tmp_path / "sp"
    extra = dict(add_dummy_prefix=False, remove_extra_whitespaces=False,
                 user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n\n"]) if gemma_like else {}
    spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(prefix), vocab_size=400,
                                   model_type=model_type, byte_fallback=byte_fallback, character_coverage=1.0,
                                   input_sentence_size=20000, minloglevel=2, **extra)
    texts = TEXTS + corpus_lines(200)
    if model_type == "unigram":  # a documented difference: the lattice may match "<s>" spelled out in text
        texts = [t for t in texts if "<s>" not in t]
    if gemma_like:
        texts += ["<start_of_turn>user\nhi there<end_of_turn>\n\n", "x<end_of_turn> y"]
    check_same(f"{prefix}.model", texts)


def test_damaged_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x08\x96\x01 this is not a sentencepiece model")
    with pytest.raises(EdgeseqError, match="tokenizer.model"):
        sentencepiece_to_tokenizer_json(str(bad))
    with pytest.raises(EdgeseqError, match="cannot read"):
        sentencepiece_to_tokenizer_json(str(tmp_path / "missing.model"))
