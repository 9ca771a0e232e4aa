"""The hybrids' byte-level BPE tokenizers in edgeseq's GGUF files, checked against llama.cpp and HF:

- a tokenizer.json built here with each released model's pre-tokenizer settings (its Split regex, NFC or
  no normaliser, a regex-free ByteLevel step, ignore_merges) gets the `tokenizer.ggml.pre` llama.cpp's
  converter gives the family; llama.cpp (llama-cpp-python, vocab_only) then tokenizes a mixed text to
  exactly the ids the `tokenizers` library gives, and edgeseq's GGUF reader rebuilds a tokenizer that
  gives them again. The text tells the splits apart (the same vocabulary under another split gives
  other ids), so a wrong name fails;
- general.* and the special-token keys equal what llama.cpp's own converter writes for the same
  checkpoint (a tiny LFM2-MoE: the "4x1.6M" size label, the model card's and generation_config.json's
  keys).
"""
from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import edgeseq
from conftest import CORPUS, make_mamba
from edgeseq.errors import EdgeseqError
from edgeseq.exporters import gguf_writer
from edgeseq.exporters.gguf_writer import _pre_name, export_gguf
from edgeseq.gguf_bundle import SPLIT_REGEX
from edgeseq.gguf_file import GGUFFile
from gguf_helpers import convert, llama_cpp, write_neox_tokenizer

# digits in runs, contractions in both cases, CJK, emoji (ZWJ sequences), Cyrillic, accents, Devanagari
# and Khmer combining marks, whitespace runs (tabs, blank lines, CRLF, trailing spaces), punctuation runs
MIXED = ("Hello world! I've been 'told he's there, 'RE you sure? We'Ve a'lL 3 33 333 3333 12345678 3.14 "
         "3..3 \n\n  \t\t tabs   and   spaces    \n \n\n 我想在apple工作1314151天～ 日本語のテキスト "
         "🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 нещо на Български café naïve ÀÉÎ ------======= ''''''```````\"\"\"\"......"
         "!!!!!!?????? \u0915\u093e\u0928 \u092e\u0947\u0902 \u1780\u17b6\u1793\u17cb  x\r\ny  CamelCaseWord ABCdef  ")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# (split, NFC, ignore_merges) as the released tokenizer.json files have them; None: GPT-2's byte level
SETTINGS = {
    "gpt-2": (None, False, False),          # GPT-NeoX / Mamba
    "llama-bpe": ("llama3", False, True),   # Llama-3's (Bamba)
    "dbrx": ("llama3", False, False),       # cl100k's (Granite-4.0-H)
    "qwen2": ("qwen2", True, False),        # Qwen2/3 (Qwen3-Next)
    "qwen35": ("qwen35", True, False),      # Qwen3.5
    "tekken": ("tekken", False, True),      # Mistral's Tekken
}


def _pre(split):
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_REGEX[split]), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@functools.lru_cache(maxsize=None)
def _trained() -> str:
    """One vocabulary for every split: BPE trained on the corpus and the mixed text with no split at all
    (merges across spaces, digits and punctuation), so that each split gives its own ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    text = CORPUS.read_text()[:20000]
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS)
    tok.train_from_iterator([text[i:i + 200] for i in range(0, len(text), 200)] + [MIXED] * 30, trainer)
    return tok.to_str()


def build_tokenizer(folder, split, nfc=False, ignore_merges=False) -> Tokenizer:
    """The trained vocabulary with the given pre-tokenizer, saved into `folder`; tokenizer_config.json
    with BOS, EOS, PAD, add_bos/add_eos and a chat template, as the released checkpoints carry them."""
    tj = json.loads(_trained())
    tj["model"]["ignore_merges"] = ignore_merges
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = _pre(split)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "add_eos_token": False, "chat_template": TEMPLATE}))
    return tok


def _text():
    return MIXED + CORPUS.read_text()[:1500]


# llama.cpp's Tekken regex is an adaptation (its regex engine lacks \p{Lo}, \p{M}, ...) that splits a
# letter from its combining mark (Devanagari "का" as "क" + "ा"): Tekken is checked on text without them
MARKS = "\u0915\u093e\u0928 \u092e\u0947\u0902 \u1780\u17b6\u1793\u17cb"


def check_in_llama_cpp_and_back(gguf, tok: Tokenizer, pre: str):
    text = _text().replace(MARKS, "") if pre == "tekken" else _text()
    assert MARKS in _text()
    want = tok.encode(text).ids
    llm = llama_cpp().Llama(str(gguf), vocab_only=True, verbose=False)
    md = llm.metadata
    assert md["tokenizer.ggml.pre"] == pre
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"], md["tokenizer.ggml.padding_token_id"]) \
        == tuple(str(tok.token_to_id(t)) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert (md["tokenizer.ggml.add_bos_token"], md["tokenizer.ggml.add_eos_token"]) == ("false", "false")
    assert md["tokenizer.chat_template"] == TEMPLATE
    # special tokens written in the text are those tokens in llama.cpp (CONTROL), one id each
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == tok.token_to_id("<|im_start|>")
    m = edgeseq.load(str(gguf))  # edgeseq's GGUF reader: a tokenizer rebuilt from the GGUF's keys
    assert m.tokenizer.encode(text) == want
    assert m.manifest["add_bos"] is False


@pytest.mark.parametrize("pre", list(SETTINGS))
def test_pre_tokenizer_in_llama_cpp_and_edgeseq(tmp_path, pre):
    split, nfc, ignore_merges = SETTINGS[pre]
    ckpt = make_mamba(tmp_path / "hf", vocab_size=608)
    tok = build_tokenizer(ckpt, split, nfc, ignore_merges)
    # the text tells this split from the others: the same vocabulary split otherwise gives other ids
    for other in {s for s, *_ in SETTINGS.values()} - {split}:
        alt = Tokenizer.from_str(tok.to_str())
        alt.pre_tokenizer = _pre(other)
        assert alt.encode(_text()).ids != tok.encode(_text()).ids, other
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(out))
    check_in_llama_cpp_and_back(out, tok, pre)


def test_family_names(tmp_path, monkeypatch):
    """Where the converter's table gives a family's tokenizers their own name for Llama-3's split (LFM2:
    lfm2, Falcon-H1: falcon-h1) edgeseq writes it, and llama.cpp splits by it as HF does; the other
    hybrids' names follow the split (Qwen3-Next's Qwen2 regex: qwen2; Qwen3.5's: qwen35; Granite-4.0-H's
    cl100k: dbrx; Bamba's Llama-3: llama-bpe); a split edgeseq does not know is llama.cpp's `default`."""
    import families  # noqa: F401  (tests/families.py registers the family cases before their modules load)
    from family_lfm2 import make_lfm2

    ckpt = make_lfm2(tmp_path / "lfm2", vocab_size=600)
    tok = build_tokenizer(ckpt, "llama3", ignore_merges=False)
    out = tmp_path / "lfm2.gguf"
    info = export_gguf(str(ckpt), str(out))
    assert info["architecture"] == "lfm2"
    check_in_llama_cpp_and_back(out, tok, "lfm2")

    tj = json.loads((ckpt / "tokenizer.json").read_text())
    assert [_pre_name(tj, a) for a in ("lfm2moe", "falcon-h1", "granitehybrid", "nemotron_h", "jamba")] == \
        ["lfm2", "falcon-h1", "dbrx", "dbrx", "dbrx"]
    tj["model"]["ignore_merges"] = True
    assert _pre_name(tj, "granitehybrid") == "llama-bpe"
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = SPLIT_REGEX["qwen2"]
    assert [_pre_name(tj, a) for a in ("qwen3next", "lfm2", "falcon-h1")] == ["qwen2"] * 3
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}+| ?\p{L}+"
    assert _pre_name(tj, "lfm2") == "default"
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = SPLIT_REGEX["llama3"]
    tj["normalizer"] = {"type": "Lowercase"}  # a normaliser llama.cpp's BPE does not run
    assert _pre_name(tj, "lfm2") == "default"

    # falcon-h1 through llama.cpp: a Mamba file carrying the name (Falcon-H1's family is not edgeseq's yet)
    monkeypatch.setitem(gguf_writer._FAMILY_PRE, ("llama3", "mamba"), "falcon-h1")
    mamba = make_mamba(tmp_path / "fh", vocab_size=608)
    shutil.copy(ckpt / "tokenizer.json", mamba / "tokenizer.json")
    shutil.copy(ckpt / "tokenizer_config.json", mamba / "tokenizer_config.json")
    export_gguf(str(mamba), str(tmp_path / "fh.gguf"))
    check_in_llama_cpp_and_back(tmp_path / "fh.gguf", tok, "falcon-h1")


def test_added_tokens_typed_as_the_converter_types_them(tmp_path):
    """A `<|...|>` token the tokenizer does not call special is CONTROL (llama.cpp's converter's rule);
    another added token is USER_DEFINED, its SentencePiece spaces written as spaces."""
    ckpt = make_mamba(tmp_path / "hf", vocab_size=608)
    tok = build_tokenizer(ckpt, "llama3")
    tok.add_tokens(["<|tool|>", "\u2581my\u2581word"])
    tok.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(out))
    with GGUFFile(out) as g:
        toks, types = g.kv["tokenizer.ggml.tokens"], [int(t) for t in g.kv["tokenizer.ggml.token_type"]]
    i, j = tok.token_to_id("<|tool|>"), tok.token_to_id("\u2581my\u2581word")
    assert (toks[i], types[i]) == ("<|tool|>", 3) and (toks[j], types[j]) == (" my word", 4)
    assert types[tok.token_to_id("<|im_end|>")] == 3 and types[tok.token_to_id("e")] == 1


@pytest.mark.slow
def test_general_and_special_keys_as_llama_cpp_converter(tmp_path):
    """general.* (name, basename, finetune and size label from the folder name; the model card's license,
    languages, tags and base model; generation_config.json's sampling settings) and the tokenizer keys
    equal llama.cpp's converter's for a tiny LFM2-MoE; the size label counts one expert ("4x1.6M")."""
    import families  # noqa: F401
    from family_lfm2 import make_lfm2

    ckpt = make_lfm2(tmp_path / "LFM2-Tiny-MoE-Instruct", vocab_size=50304,
                     moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1))
    write_neox_tokenizer(ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- liquid\n"
                                    "base_model: LiquidAI/LFM2-8B-A1B\n---\n# A tiny model\n")
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen.update(temperature=0.3, top_p=0.9, top_k=50, min_p=0.15, repetition_penalty=1.05)
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    ref = convert(ckpt, tmp_path / "ref.gguf")
    ours = tmp_path / "ours.gguf"
    export_gguf(str(ckpt), str(ours))
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        keys = {k for k in b.kv if k.startswith(("general.", "tokenizer."))}
        assert keys == {k for k in a.kv if k.startswith(("general.", "tokenizer."))}
        assert {"general.size_label", "general.basename", "general.finetune", "general.license",
                "general.sampling.temp", "general.sampling.penalty_repeat", "general.base_model.count",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"} - keys == set() or \
            "tokenizer.chat_template" not in b.kv
        assert a.kv["general.size_label"] == b.kv["general.size_label"] == "4x1.6M"
        for k in sorted(keys - {"tokenizer.ggml.pre"}):
            assert a.kv_types[k] == b.kv_types[k], k
            va, vb = a.kv[k], b.kv[k]
            assert (np.array_equal(va, vb) if isinstance(vb, np.ndarray) else va == vb), k
        # the converter names GPT-NeoX's vocabulary "olmo" from its hash table, edgeseq "gpt-2": llama.cpp
        # splits both with GPT-2's regex
        assert (a.kv["tokenizer.ggml.pre"], b.kv["tokenizer.ggml.pre"]) == ("gpt-2", "olmo")


def test_broken_model_card_is_one_error(tmp_path):
    ckpt = make_mamba(tmp_path / "hf", vocab_size=608)
    build_tokenizer(ckpt, "llama3")
    (ckpt / "README.md").write_text("---\nlicense: [apache\n---\n")
    out = tmp_path / "m.gguf"
    with pytest.raises(EdgeseqError, match="model card"):
        export_gguf(str(ckpt), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.slow
def test_jamba_sentencepiece_as_llama_cpp_converter(tmp_path):
    """Jamba ships tokenizer.model beside tokenizer.json: llama.cpp's converter writes the SentencePiece
    model (`llama`, pre `default`), and so does edgeseq, with tokenizer_config.json's added tokens typed
    as the converter types them; every tokenizer key equals the converter's, and llama.cpp and edgeseq's
    reader tokenize as sentencepiece does."""
    import sentencepiece as spm

    import families  # noqa: F401
    from family_jamba import make_jamba
    from edgeseq.tokenizer import sentencepiece_to_tokenizer_json

    ckpt = make_jamba(tmp_path / "jamba", vocab_size=408)
    spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(ckpt / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   input_sentence_size=20000, minloglevel=2, user_defined_symbols=["<|tool|>", "<x>"],
                                   # as Llama's and Jamba's: no normalisation (nmt_nfkc would fold "\n" into a space)
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    (ckpt / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(str(ckpt / "tokenizer.model")))
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tool, x = sp.piece_to_id("<|tool|>"), sp.piece_to_id("<x>")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(tool): {"content": "<|tool|>", "special": False},
                                 str(x): {"content": "<x>", "special": False}},
        "chat_template": TEMPLATE}))
    ref = convert(ckpt, tmp_path / "ref.gguf")
    ours = tmp_path / "ours.gguf"
    export_gguf(str(ckpt), str(ours))
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        keys = {k for k in b.kv if k.startswith(("general.", "tokenizer."))}
        assert keys == {k for k in a.kv if k.startswith(("general.", "tokenizer."))}
        for k in sorted(keys):
            assert a.kv_types[k] == b.kv_types[k], k
            va, vb = a.kv[k], b.kv[k]
            assert (np.array_equal(va, vb) if isinstance(vb, np.ndarray) else va == vb), k
        assert a.kv["tokenizer.ggml.model"] == "llama" and a.kv["tokenizer.ggml.pre"] == "default"
        types = [int(t) for t in a.kv["tokenizer.ggml.token_type"]]
        assert (types[tool], types[x]) == (3, 4)  # "<|tool|>" looks special: CONTROL; "<x>" user-defined
    text = CORPUS.read_text()[:1500] + " 3 33 333 café 日本 🚀  spaces\n\n"
    llm = llama_cpp().Llama(str(ours), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)
    m = edgeseq.load(str(ours))
    assert m.tokenizer.encode(text) == sp.encode(text) and m.manifest["add_bos"] is True


@pytest.mark.parametrize("pre", ["llama-bpe", "dbrx", "qwen35"])
def test_bos_where_the_file_does_not_say(tmp_path, pre):
    """Without tokenizer.ggml.add_bos_token llama.cpp adds a BOS for some names (Llama-3's, Tekken's) and
    not for others; edgeseq's reader does as llama.cpp does."""
    split, nfc, ignore_merges = SETTINGS[pre]
    ckpt = make_mamba(tmp_path / "hf", vocab_size=608)
    tok = build_tokenizer(ckpt, split, nfc, ignore_merges)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(out))
    with GGUFFile(out) as g:
        assert "tokenizer.ggml.add_bos_token" not in g.kv
    llm = llama_cpp().Llama(str(out), vocab_only=True, verbose=False)
    adds = llm.tokenize(b"hi", add_bos=True, special=False)[0] == tok.token_to_id("<|im_start|>")
    assert adds == (pre == "llama-bpe")
    assert edgeseq.load(str(out)).manifest["add_bos"] is adds


def test_sentencepiece_style_tokenizer_json(tmp_path):
    """A SentencePiece BPE shipped only as tokenizer.json (what transformers makes of a tokenizer.model:
    "\u2581" for spaces, byte fallback) is written as a `llama` vocabulary, each piece scored by the rank of
    the merge that makes it: llama.cpp and edgeseq's reader tokenize as sentencepiece and HF do (as
    `gpt2`, llama.cpp would read "\u2581" as a letter)."""
    import sentencepiece as spm

    from edgeseq.tokenizer import sentencepiece_to_tokenizer_json

    ckpt = make_mamba(tmp_path / "hf", vocab_size=408, bos_token_id=1, eos_token_id=2)
    spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.999,
                                   input_sentence_size=20000, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    (ckpt / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(str(tmp_path / "sp.model")))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = CORPUS.read_text()[:3000] + " 3 33 333 café naïve 日本語 🚀  two  spaces\n\n\ttab x"
    want = sp.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == want
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(out))
    with GGUFFile(out) as g:
        assert (g.kv["tokenizer.ggml.model"], g.kv["tokenizer.ggml.pre"]) == ("llama", "default")
        assert bool(g.kv["tokenizer.ggml.add_space_prefix"]) is True
    llm = llama_cpp().Llama(str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    assert llm.tokenize(b"hi", add_bos=True)[0] == sp.bos_id()
    m = edgeseq.load(str(out))
    assert m.tokenizer.encode(text) == want and m.manifest["add_bos"] is True


def test_unreadable_tokenizer_json_is_one_error(tmp_path):
    ckpt = make_mamba(tmp_path / "hf", vocab_size=608)
    build_tokenizer(ckpt, "llama3")
    (ckpt / "tokenizer.json").write_text("{bad")
    with pytest.raises(EdgeseqError, match="tokenizer.json"):
        export_gguf(str(ckpt), str(tmp_path / "m.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_malformed_pre_tokenizer_is_default_and_malformed_model_an_error(tmp_path):
    for pre in ("x", {"type": "Sequence", "pretokenizers": 3}, {"type": "Sequence", "pretokenizers": ["x"]},
                {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": "x", "behavior": "Isolated"},
                                                       {"type": "ByteLevel", "use_regex": False}]}):
        assert _pre_name({"pre_tokenizer": pre, "normalizer": None, "model": {}}, "lfm2") == "default"
    ckpt = make_mamba(tmp_path / "hf", vocab_size=608)
    (ckpt / "tokenizer.json").write_text(json.dumps({"model": ["BPE"]}))
    with pytest.raises(EdgeseqError, match="tokenizer.json"):
        export_gguf(str(ckpt), str(tmp_path / "m.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
