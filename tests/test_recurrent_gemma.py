"""RecurrentGemma: what is special to it: the window is what HF computes, the position is an input the
numbers depend on, the RG-LRU reference, the bfloat16 embedding scale, the `recurrentgemma` package's
layout, the SentencePiece tokenizer, and the input normaliser. The common checks (transformers'
RecurrentGemmaForCausalLM in float64, both flavours, every graph kind, the state contract, plain
onnxruntime, save/load/fork, GGUF) run over the cases registered in tests/families.py (RG_CONFIGS), in
tests/test_conformance.py.

The window is 8 tokens and the sequences 64, so every attention layer's ring wraps eight times; the
RG-LRU reset at position 0 and the position fed to every call are checked through prefills that start
mid-sequence, state files and forks.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

import edgeseq
from conftest import SEQ_LEN, TOL, as_f64, export_bundle, hf_logits64, max_diff, plain_ort, random_ids, \
    step_all, steps_alone
from edgeseq.errors import EdgeseqError
# tests/make_golden.py, tests/pi and test_gguf_runtime build RecurrentGemma models from these
from families import RG_CONFIGS as CONFIGS, RG_WINDOW as WINDOW, make_recurrent_gemma  # noqa: F401


@pytest.fixture(scope="module")
def mqa(family_case):
    return family_case("recurrent_gemma/mqa")


def test_the_window_is_what_hf_computes(mqa):
    """The same weights with a window of 64 (no token ever leaves it) give other logits once the
    sequence passes 8 tokens: the agreement above is the window's, not full attention's."""
    cfg = mqa.hf.config.to_dict()
    cfg["attention_window_size"] = SEQ_LEN
    wide = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**{k: v for k, v in cfg.items()
                                                             if k not in ("sliding_window", "layer_types")}))
    wide.load_state_dict(mqa.hf.state_dict())
    ref_wide = hf_logits64(wide.eval(), mqa.ids)
    assert max_diff(ref_wide[:WINDOW], mqa.ref[:WINDOW]) < 1e-9
    assert max_diff(ref_wide, mqa.ref) > 1e-2
    got = steps_alone(mqa, False)
    assert max_diff(got, mqa.ref) < TOL and max_diff(got, ref_wide) > 1e-2


def test_position_is_an_input_the_numbers_depend_on(mqa):
    """A prefill that starts at position 40 continues the sequence (the conformance suite's plain
    onnxruntime test); the same call at position 0 resets the RG-LRU and reads the ring as empty."""
    app = plain_ort(mqa, False)
    _, mid = app.run("prefill", mqa.ids[:40])
    last, _ = app.run("prefill", mqa.ids[40:], mid, position=40)
    assert max_diff(last[0], mqa.ref[-1]) < TOL
    wrong, _ = app.run("prefill", mqa.ids[40:], mid, position=0)
    assert max_diff(wrong[0], mqa.ref[-1]) > 1e-2


# -- pieces --------------------------------------------------------------------------------------

def test_rglru_reference_matches_hf_module():
    """kernels.rglru's numpy reference against HF's RG-LRU module, from a reset and from a state."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    from edgeseq.kernels.rglru import rglru_ref

    torch.manual_seed(0)
    cfg = RecurrentGemmaConfig(hidden_size=16, lru_width=24, num_attention_heads=3)
    m = RecurrentGemmaRglru(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    x = torch.randn(1, 7, 24, dtype=torch.float64)
    prm = {k: v.detach().numpy() for k, v in m.named_parameters()}
    args = (prm["input_gate_weight"], prm["input_gate_bias"], prm["recurrent_gate_weight"],
            prm["recurrent_gate_bias"], prm["recurrent_param"])
    for start, h0 in ((0, torch.zeros(1, 24, dtype=torch.float64)), (5, torch.randn(1, 24, dtype=torch.float64))):
        pos = torch.arange(start, start + 7)[None]
        m.recurrent_states = h0.clone()
        want = m(x, pos).detach().numpy()
        got, h = rglru_ref(x.numpy(), pos[0].numpy(), h0.numpy(), *args)
        # HF accumulates the scan in float32 whatever the input dtype (acc_dtype): agreement to ~1e-7
        assert max_diff(got, want) < 1e-6 and max_diff(h, m.recurrent_states.detach().numpy()) < 1e-6
        # and the numbers depend on the reset: from position 0 the state h0 is dropped
        if start:
            assert max_diff(rglru_ref(x.numpy(), pos[0].numpy() - start, h0.numpy(), *args)[0], want) > 1e-2


def test_embedding_scale_is_rounded_like_torch():
    from edgeseq.families.recurrent_gemma import bf16_round

    for d in (32, 48, 2560, 4096, 5, 7):
        want = float(torch.tensor(d ** 0.5, dtype=torch.bfloat16).float())
        assert bf16_round(d ** 0.5) == want
    assert bf16_round(48 ** 0.5) != np.float32(48 ** 0.5)


# -- the recurrentgemma package's layout -------------------------------------------------------

def write_package_layout(hf_model, path):
    """Rename an HF checkpoint's tensors into the `recurrentgemma` package's PyTorch layout (its
    torch/modules.py and layers.py names and shapes) and save one state dict, as its 2b.pt. This tests
    edgeseq's mapping of that layout, not the package's numbers (the package imports JAX; see FACTS)."""
    c = hf_model.config
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    out = {"embedder.input_embedding": sd.pop("model.embed_tokens.weight"),
           "final_norm.scale": sd.pop("model.final_norm.weight")}
    sd.pop("lm_head.weight")
    for i in range(c.num_hidden_layers):
        hp, pp = f"model.layers.{i}.", f"blocks.{i}."
        out[pp + "temporal_pre_norm.scale"] = sd.pop(hp + "temporal_pre_norm.weight")
        out[pp + "channel_pre_norm.scale"] = sd.pop(hp + "channel_pre_norm.weight")
        t = hp + "temporal_block."
        if c.layers_block_type[i] == "linear_attention":
            r = pp + "recurrent_block."
            for n in ("linear_x", "linear_y", "linear_out"):
                out[r + n + ".weight"], out[r + n + ".bias"] = sd.pop(t + n + ".weight"), sd.pop(t + n + ".bias")
            out[r + "conv_1d.w"] = sd.pop(t + "conv_1d.weight")[:, 0, :].T.contiguous()  # (k, W)
            out[r + "conv_1d.b"] = sd.pop(t + "conv_1d.bias")
            for hn, pn in (("recurrent_param", "a_param"), ("input_gate_weight", "input_gate.w"),
                           ("input_gate_bias", "input_gate.b"), ("recurrent_gate_weight", "a_gate.w"),
                           ("recurrent_gate_bias", "a_gate.b")):
                out[r + "rg_lru." + pn] = sd.pop(t + "rg_lru." + hn)
        else:
            a = pp + "attention_block."
            for hn, pn in (("q_proj", "proj_q"), ("k_proj", "proj_k"), ("v_proj", "proj_v"), ("o_proj", "proj_final")):
                out[a + pn + ".weight"] = sd.pop(t + hn + ".weight")
                if t + hn + ".bias" in sd:
                    out[a + pn + ".bias"] = sd.pop(t + hn + ".bias")
        m = hp + "mlp_block."
        out[pp + "mlp_block.ffw_up.w"] = torch.stack([sd.pop(m + "gate_proj.weight").T, sd.pop(m + "up_proj.weight").T])
        out[pp + "mlp_block.ffw_up.b"] = torch.stack([sd.pop(m + "gate_proj.bias"),
                                                      sd.pop(m + "up_proj.bias")]).reshape(2, 1, 1, -1)
        out[pp + "mlp_block.ffw_down.weight"] = sd.pop(m + "down_proj.weight")
        out[pp + "mlp_block.ffw_down.bias"] = sd.pop(m + "down_proj.bias")
    assert not sd, f"tensors left unmapped: {sorted(sd)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return path


def test_package_layout(mqa, tmp_path):
    """A `recurrentgemma` package checkpoint (2b.pt, no config.json) exports to the same model. Without
    a config it takes the v1 presets (window 2048); a config.json beside it sets the window."""
    pt = write_package_layout(mqa.hf, tmp_path / "pkg" / "2b.pt")
    bundle = export_bundle(pt, tmp_path / "preset")
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    assert manifest["architecture"] == "Griffin" and manifest["config"]["window"] == 2048
    assert (manifest["bos_token_id"], manifest["eos_token_id"]) == (2, 1)
    got = step_all(edgeseq.load(bundle).session(), mqa.ids[:WINDOW])  # inside the window: same numbers
    assert max_diff(got, mqa.ref[:WINDOW]) < TOL
    (tmp_path / "pkg" / "config.json").write_text(json.dumps({"attention_window_size": WINDOW}))
    bundle = export_bundle(pt, tmp_path / "windowed")
    assert max_diff(edgeseq.load(bundle).session().logits_all(mqa.ids), mqa.ref) < TOL


def test_damaged_package_checkpoint(mqa, tmp_path):
    pt = write_package_layout(mqa.hf, tmp_path / "2b.pt")
    sd = torch.load(pt, weights_only=True)
    del sd["blocks.1.recurrent_block.rg_lru.a_gate.w"]
    torch.save(sd, pt)
    with pytest.raises(EdgeseqError, match=r"2b\.pt.*blocks\.1\.recurrent_block\.rg_lru\.a_gate\.w"):
        export_bundle(pt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(EdgeseqError, match=r"other\.pt.*embedder\.input_embedding"):
        export_bundle(tmp_path / "other.pt", tmp_path / "out2")


# -- tokenizer: SentencePiece converted at export ------------------------------------------------

def train_sentencepiece(prefix, vocab: int) -> str:
    """A small Gemma-like SentencePiece model (BPE, byte fallback, no dummy prefix, digits split;
    <pad> 0, <eos> 1, <bos> 2, <unk> 3) trained on 200 KB of tiny Shakespeare."""
    import sentencepiece as spm

    from conftest import CORPUS

    text = CORPUS.read_text()[:200_000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0,
        minloglevel=2)
    return str(prefix) + ".model"


def test_sentencepiece_tokenizer_in_the_bundle(tmp_path):
    """tokenizer.model beside the checkpoint becomes the bundle's tokenizer.json (part A's converter);
    it encodes as sentencepiece does, the model reads those ids as HF does, and generation streams text."""
    import shutil

    import sentencepiece as spm

    vocab = 400
    ckpt = make_recurrent_gemma(tmp_path / "hf", seed=5, vocab_size=vocab, hidden_size=32, intermediate_size=96,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1)
    shutil.copyfile(train_sentencepiece(tmp_path / "spm", vocab), ckpt / "tokenizer.model")
    bundle = export_bundle(ckpt, tmp_path / "bundle")
    assert (bundle / "tokenizer.json").is_file()
    model = edgeseq.load(bundle)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    for text in ("First Citizen:\nBefore we proceed any further, hear me speak.", "  two  spaces, digits 12345",
                 "héllo wörld — ✓ ünïcödé 日本", "ROMEO: O, she doth teach the torches to burn bright!"):
        ids = model.tokenizer.encode(text)
        assert ids == sp.encode(text), text
        assert model.tokenizer.decode(ids) == sp.decode(ids) == text
    ids = model.tokenizer.encode("KING RICHARD III:\nNow is the winter of our discontent")
    assert len(ids) > WINDOW  # the prompt wraps the ring
    assert max_diff(model.session().logits_all(ids), hf_logits64(ckpt, ids)) < TOL
    s = model.session()
    text = "".join(s.generate("ROMEO:", max_tokens=24, temperature=0))
    assert s.stats.decode_tokens > 0 and isinstance(text, str)


def test_input_normaliser_without_cancellation(tmp_path):
    """With conftest's full noise recipe the a-gate saturates (a → 1) and HF's own float32 forward drifts
    by >1e-4 from its float64 forward, mostly in sqrt(1 - a²). edgeseq computes 1 - a² as -2·a·sinh(log a)
    and stays closer to float64 than HF's float32 does."""
    from conftest import add_noise

    torch.manual_seed(3)
    config = RecurrentGemmaConfig(vocab_size=256, attention_window_size=WINDOW, **CONFIGS["mqa"])
    hf = add_noise(RecurrentGemmaForCausalLM(config).eval(), 3)
    hf.save_pretrained(tmp_path / "hf")
    ids = random_ids(256, SEQ_LEN, seed=8)
    ref = hf_logits64(as_f64(hf), ids)
    with torch.no_grad():
        hf32 = hf(torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
    got = edgeseq.load(export_bundle(tmp_path / "hf", tmp_path / "b")).session().logits_all(ids)
    assert max_diff(hf32, ref) > TOL  # the ill-conditioned case this test is about
    assert max_diff(got, ref) < TOL and max_diff(got, ref) < max_diff(hf32, ref) / 2
