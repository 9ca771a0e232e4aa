"""BOS at the start of a sequence: models whose own tokenizer starts every sequence with BOS (Gemma,
Mistral/Llama SentencePiece tokenizers: `add_bos_token`, or a BOS in tokenizer.json's post-processor)
get it prepended to a text prompt at position 0, as transformers' tokenizer does with its default
`add_special_tokens=True`; others (GPT-NeoX, RWKV, byte-level) do not."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeseq
from conftest import make_mamba, write_tokenizer
from edgeseq.exporters.export import export


def _with_bos_template(path, bos: int) -> None:
    """Give tokenizer.json a TemplateProcessing post-processor that starts with token `bos` (as Gemma's)."""
    tj = json.loads(path.read_text())
    name = "<bos>"
    tj["added_tokens"] = tj.get("added_tokens", [])
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": name, "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"SpecialToken": {"id": name, "type_id": 0}},
                                     {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {name: {"id": name, "ids": [bos], "tokens": [name]}}}
    path.write_text(json.dumps(tj))


@pytest.mark.parametrize("how", ["tokenizer_config", "post_processor", "none"])
def test_bos_prepended_at_position_zero_only(tmp_path, how):
    ckpt = make_mamba(tmp_path / "m", vocab_size=512, bos_token_id=1, eos_token_id=2)
    write_tokenizer(ckpt / "tokenizer.json", 512)
    if how == "tokenizer_config":
        (ckpt / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    elif how == "post_processor":
        _with_bos_template(ckpt / "tokenizer.json", 1)
    m = edgeseq.load(export(str(ckpt), str(tmp_path / "b")))
    assert m.manifest["add_bos"] is (how != "none")
    prompt = "To be, or not to be"
    ids = m.tokenizer.encode(prompt)
    assert ids[0] != 1
    fed = [1] + ids if how != "none" else ids
    s = m.session()
    text = "".join(s.generate(prompt, max_tokens=1, temperature=0))
    assert s.stats.prompt_tokens == len(fed)
    # the first token is the argmax after exactly `fed`, and the state is the one `fed` + that token gives
    ref = m.session()
    first = int(np.argmax(ref.prefill(fed)))
    assert text == m.tokenizer.decode([first])
    a, b = m.session(), m.session()
    list(a.generate(prompt, max_tokens=1, temperature=0))
    b.prefill(fed + [first])
    for k, v in a.state().items():
        assert np.allclose(v, b.state()[k], atol=1e-6), k
    # a later call (position > 0) gets no BOS
    list(a.generate(" again", max_tokens=1, temperature=0))
    assert a.stats.prompt_tokens == len(m.tokenizer.encode(" again"))


def test_hf_tokenizer_config_false_wins(tmp_path):
    ckpt = make_mamba(tmp_path / "m", vocab_size=512, bos_token_id=1)
    write_tokenizer(ckpt / "tokenizer.json", 512)
    _with_bos_template(ckpt / "tokenizer.json", 1)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert edgeseq.load(export(str(ckpt), str(tmp_path / "b"))).manifest["add_bos"] is False
