"""Qwen3.5-MoE: what is special to it: more layouts checked for logits against transformers' float64
(Qwen3_5MoeForConditionalGeneration's nesting, fused 3-D experts, sharded bf16), routers f32 under
int4/int8, llama.cpp's converter file to file and llama.cpp on both files, bad configurations. The
common checks run over tests/family_qwen35_moe.py's case in tests/test_conformance.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import families  # noqa: F401  (first: it imports the family modules and registers their cases)
from conftest import SEQ_LEN, random_ids
from families import not_degenerate
from family_qwen35_moe import CONFIGS, MARGIN, MoeBuilt, make_qwen35_moe, modeling, routing_margin
from family_qwen35 import float64_delta_rule
from test_qwen35 import _Reader
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.qwen35_moe import FUSED, Qwen35Moe, Qwen35MoeGguf


class Reader(_Reader):
    def __init__(self, path, arch):
        super().__init__(path)
        self.architecture, self._arch = arch, arch

    def arch_key(self, key):
        return f"{self._arch}.{key}"


def logits_err(c) -> float:
    return max(float(np.abs(c.model(fused).session().logits_all(c.ids) - c.ref).max()) for fused in (False, True))


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """The released layout: Qwen3_5MoeForConditionalGeneration (text_config nested, the language model
    under model.language_model., a vision tower), top-3 of 6 experts, MQA, untied, bf16, two shards."""
    d = tmp_path_factory.mktemp("q35moe-cond")
    cfg = dict(conditional=True, num_experts=6, num_experts_per_tok=3, num_key_value_heads=1,
               linear_num_key_heads=1, linear_num_value_heads=4, layer_types=["linear_attention", "full_attention",
                                                                                "linear_attention"],
               num_hidden_layers=3, tie_word_embeddings=False, shard="60KB")
    c = MoeBuilt(make_qwen35_moe(d / "hf", seed=7, dtype=torch.bfloat16, **cfg), d, random_ids(256, SEQ_LEN, seed=10))
    not_degenerate(c.ref)
    assert routing_margin(c.hf64, c.ids) > MARGIN  # seed 7: 8.5e-4 (seeds 0-6 fall under 1e-4 or near it)
    return c


def test_conditional_generation_bf16_sharded(conditional):
    ck = Checkpoint(str(conditional.ckpt))
    assert ck.architecture == "Qwen3_5MoeForConditionalGeneration"
    keys = list(ck.keys())
    assert any(k.startswith("model.visual.") for k in keys)
    assert any(k.startswith("model.language_model.layers.0.mlp.experts.5.") for k in keys)
    assert len(list(conditional.ckpt.glob("*.safetensors"))) > 1
    c = Qwen35Moe.read_config(ck)
    assert (c.n_experts, c.top_k, c.expert_dim, c.shared_dim, c.ffn_dim) == (6, 3, 16, 24, 0)
    assert logits_err(conditional) < 1e-4


def test_fused_3d_experts(tmp_path):
    """Fused 3-D experts (`mlp.experts.gate_up_proj` (E, 2f, d), `mlp.experts.down_proj` (E, d, f):
    transformers' in-memory layout) give the per-expert checkpoint's canonical weights."""
    from safetensors.numpy import load_file, save_file

    ck = make_qwen35_moe(tmp_path / "hf", seed=0, **CONFIGS["top2-of-4-tied"])
    src = Checkpoint(str(ck))
    fam = Qwen35Moe(Qwen35Moe.read_config(src))
    want = dict(fam.convert(src))
    fused = tmp_path / "fused"
    shutil.copytree(ck, fused)
    (f,) = fused.glob("*.safetensors")
    w = load_file(str(f))
    n = fam.config.n_layer
    for i in range(n):
        p = f"model.layers.{i}.mlp.experts."
        E = fam.config.n_experts
        gate = [w.pop(f"{p}{e}.gate_proj.weight") for e in range(E)]
        up = [w.pop(f"{p}{e}.up_proj.weight") for e in range(E)]
        w[p + "gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        w[p + "down_proj"] = np.stack([w.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
    save_file(w, str(f), metadata={"format": "pt"})
    src = Checkpoint(str(fused))
    assert fam.layout(src)[0] == FUSED
    got = dict(fam.convert(src))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_routers_stay_f32():
    fam = Qwen35Moe.__new__(Qwen35Moe)
    assert fam.quant_policy("layers.0.router", (32, 4)) == "f32"
    assert fam.quant_policy("layers.0.shexp_router", (32, 1)) == "f32"
    assert fam.quant_policy("layers.0.experts_up", (32, 64)) is None


BAD = [
    ("top_k", lambda t: t.update(num_experts_per_tok=9), "num_experts_per_tok 9"),
    ("norm_topk", lambda t: t.update(norm_topk_prob=False), "norm_topk_prob"),
    ("experts", lambda t: t.pop("num_experts"), "num_experts"),
]


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    return make_qwen35_moe(tmp_path_factory.mktemp("q35moe-bad") / "hf", seed=0, **CONFIGS["top2-of-4-tied"])


def edited(ck0, tmp_path, edit):
    ck = tmp_path / "ckpt"
    shutil.copytree(ck0, ck)
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_named(bad, good_ckpt, tmp_path):
    from edgeseq.errors import EdgeseqError

    _, edit, named = bad
    with pytest.raises(EdgeseqError) as e:
        Qwen35Moe.read_config(Checkpoint(str(edited(good_ckpt, tmp_path, edit))))
    assert named in str(e.value) and "config.json" in str(e.value)


def test_bad_config_is_one_error_line(good_ckpt, tmp_path):
    ck = edited(good_ckpt, tmp_path, BAD[0][1])
    r = subprocess.run([sys.executable, "-P", "-m", "edgeseq", "export", str(ck), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and BAD[0][2] in lines[0] and "config.json" in lines[0]
    assert not (tmp_path / "out").exists()


def compare_with_converter(tmp_path, ck, fam_cls, arch, module, ids, conv_args=("--no-mtp",)):
    """llama.cpp's converter on `ck`: every tensor the table writes (names, shapes, values) and every
    `<arch>.*` metadata key (value and type) equal the converter's; its file reads back to the canonical
    weights and the config; llama.cpp runs its file and edgeseq's to transformers' float64 logits (1e-3),
    and edgeseq runs the converter's file to them."""
    from gguf import GGUFValueType as V
    from gguf_helpers import converter_dir
    from conftest import hf_logits64

    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    # transformers' AutoTokenizer maps model_type qwen3_5_moe_text to Qwen3_5Tokenizer, whose own
    # pre-tokenizer replaces the test's GPT-NeoX one (llama.cpp's converter then refuses it): the converter
    # runs with AutoTokenizer reading tokenizer.json as it is (the checkpoint and config untouched)
    run = ("import runpy, sys, transformers; from transformers import PreTrainedTokenizerFast as F; "
           "transformers.AutoTokenizer.from_pretrained = lambda p, *a, **k: F.from_pretrained(p); "
           "sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", run, str(converter_dir() / "convert_hf_to_gguf.py"), str(ck),
                        "--outtype", "f32", *conv_args, "--outfile", str(tmp_path / "ref.gguf")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = Reader(tmp_path / "ref.gguf", arch)

    src = Checkpoint(str(ck))
    fam = fam_cls(fam_cls.read_config(src))
    canon = dict(fam.convert(src))
    ours = dict(fam.table().to_gguf(canon.items(), arch))
    assert set(ours) == set(ref.arrays)
    for n, a in ref.arrays.items():
        assert ours[n].shape == a.shape, n
        np.testing.assert_allclose(ours[n], a, rtol=1e-6, atol=1e-7, err_msg=n)
    back = dict(fam.table().from_gguf(ref))
    assert set(back) == set(canon)
    for n, a in canon.items():
        np.testing.assert_allclose(back[n], a, rtol=1e-6, atol=1e-7, err_msg=n)

    kinds = {"u32": [V.UINT32], "f32": [V.FLOAT32], "bools": [V.ARRAY, V.BOOL], "i32s": [V.ARRAY, V.INT32]}
    gg = fam_cls.gguf
    meta = gg.metadata(fam, {})
    assert {f"{arch}." + k for k, _, _ in meta} == {k for k in ref.kv if k.startswith(f"{arch}.")}
    for k, v, kind in meta:
        assert ref.types[f"{arch}." + k] == kinds[kind], k
        assert ref.kv[f"{arch}." + k] == (pytest.approx(v, rel=1e-6) if kind == "f32" else v), k
    got = gg.config(ref)  # the floats come back through float32
    assert got.pop("norm_eps") == pytest.approx(fam.config.norm_eps, rel=1e-6)
    assert fam_cls.Config(**got, norm_eps=fam.config.norm_eps) == fam.config
    assert gg.supports(fam) is None

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")
    hf = __import__("conftest").load_hf(ck)
    hf.set_experts_implementation("eager")
    with float64_delta_rule(module):
        want = hf_logits64(__import__("conftest").as_f64(hf), ids)
    assert routing_margin(__import__("conftest").as_f64(hf), ids, module) > MARGIN

    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    info = export_gguf(str(ck), str(tmp_path / "ours.gguf"))
    assert info["architecture"] == arch and not info["generic_because"]
    errs = {}
    for name in ("ref.gguf", "ours.gguf"):
        # an f32 KV cache (type 0): llama.cpp's default f16 cache alone moved a Qwen3-Next test model's logits
        # by 2e-2 (1.5e-4 with f32)
        llm = llama_cpp.Llama(str(tmp_path / name), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                              type_k=0, type_v=0)
        llm.eval(ids)
        errs[name] = float(np.abs(np.array(llm.scores[:len(ids)]) - want).max())
        del llm
    model = edgeseq.load(str(tmp_path / "ref.gguf"))
    assert model.family_name == fam_cls.name
    errs["edgeseq on ref.gguf"] = float(np.abs(model.session().logits_all(ids) - want).max())
    assert max(errs.values()) < 1e-3, errs
    return errs


# llama.cpp's qwen35/qwen35moe need dv = dk and mrope sections within half the rotated channels
LLAMA_SHAPE = dict(vocab_size=50288, bos_token_id=0, eos_token_id=0, pad_token_id=1, linear_value_head_dim=8,
                   head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                                                 "mrope_interleaved": True})
LLAMA_IDS = [5, 42, 0, 63, 17, 31, 8, 50, 1000, 20000, 7, 9]


@pytest.mark.slow
def test_same_tensors_and_metadata_as_llama_cpp_converter(tmp_path):
    from gguf_helpers import write_neox_tokenizer

    ck = tmp_path / "hf"
    ck.mkdir()
    write_neox_tokenizer(ck)
    make_qwen35_moe(ck, seed=0, **{**CONFIGS["top2-of-4-tied"], **LLAMA_SHAPE, "tie_word_embeddings": False})
    print(compare_with_converter(tmp_path, ck, Qwen35Moe, "qwen35moe", modeling, LLAMA_IDS))
