"""Qwen3-Next: what is special to it: the fused in_proj_qkvz / in_proj_ba split (more head ratios checked
for logits against transformers' float64), which layers are sparse (decoder_sparse_step, mlp_only_layers),
norm_topk_prob false, llama.cpp's converter file to file and llama.cpp on both files, the generic GGUF
where llama.cpp's qwen3next cannot express the model, bad configurations. The common checks run over
tests/family_qwen35_moe.py's Qwen3-Next case in tests/test_conformance.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import families  # noqa: F401  (first: it imports the family modules and registers their cases)
from family_qwen35_moe import L, A, build_qwen3_next, make_qwen3_next, next_modeling
from test_qwen35_moe import LLAMA_IDS, compare_with_converter
from edgeseq.errors import EdgeseqError
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.qwen3_next import Qwen3Next

VARIANTS = {
    # four value heads per key head, experts every second layer (decoder_sparse_step 2), no renormalisation
    # of the top 3 of 4, MQA, tied
    "gva4-step2-nonorm": dict(linear_num_key_heads=1, linear_num_value_heads=4, decoder_sparse_step=2,
                              num_experts=4, num_experts_per_tok=3, norm_topk_prob=False, num_key_value_heads=1,
                              layer_types=[L, L, A, L], tie_word_embeddings=True, seed=6),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_logits(name, tmp_path):
    c = build_qwen3_next(name, tmp_path, VARIANTS[name])
    cfg = Qwen3Next.read_config(Checkpoint(str(c.ckpt))).__dict__
    assert cfg["moe_layers"] == [1, 3] and cfg["norm_topk"] is False
    for fused in (False, True):
        assert np.abs(c.model(fused).session().logits_all(c.ids) - c.ref).max() < 1e-4


def test_dense_layers_write_the_generic_gguf(family_case, tmp_path):
    """llama.cpp's qwen3next has experts in every layer: a model with a dense layer is written as the
    generic edgeseq-qwen3_next, which edgeseq reads back to the same logits (the conformance suite's round
    trip); the reason names the config keys."""
    from edgeseq.exporters.gguf_writer import export_gguf

    c = family_case("qwen3_next/top2-of-6-untied-dense1")
    info = export_gguf(str(c.ckpt), str(tmp_path / "m.gguf"))
    assert info["architecture"] != "qwen3next" and "mlp_only_layers" in info["generic_because"]


BAD = [
    ("step", lambda t: t.update(decoder_sparse_step=0), "decoder_sparse_step 0"),
    ("only", lambda t: t.update(mlp_only_layers="1"), "mlp_only_layers"),
    ("top_k", lambda t: t.update(num_experts_per_tok=7), "num_experts_per_tok 7"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_named(bad, family_case, tmp_path):
    _, edit, named = bad
    ck = tmp_path / "ckpt"
    shutil.copytree(family_case("qwen3_next/top2-of-6-untied-dense1").ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeseqError) as e:
        Qwen3Next.read_config(Checkpoint(str(ck)))
    assert named in str(e.value) and "config.json" in str(e.value)


@pytest.mark.slow
def test_same_tensors_and_metadata_as_llama_cpp_converter(tmp_path):
    """llama.cpp's converter (--no-mtp) on a Qwen3-Next checkpoint with experts in every layer and two
    value heads per key head: tensors (the fused projections split as llama.cpp splits them, ssm_ba as
    stored) and qwen3next.* metadata equal; llama.cpp runs both files to transformers' float64 logits."""
    from gguf_helpers import write_neox_tokenizer

    ck = tmp_path / "hf"
    ck.mkdir()
    write_neox_tokenizer(ck)
    make_qwen3_next(ck, seed=3, vocab_size=50288, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                    linear_value_head_dim=8, head_dim=16, layer_types=[L, A, L, L], tie_word_embeddings=False)
    errs = compare_with_converter(tmp_path, ck, Qwen3Next, "qwen3next", next_modeling, LLAMA_IDS)
    print(errs)
