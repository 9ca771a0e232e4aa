"""RecurrentGemma: exported bundles against transformers' RecurrentGemmaForCausalLM (float64, full
forward without cache), both graph flavours, every graph kind, the window ring and the position.

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
from conftest import (
    SEQ_LEN,
    TOL,
    Built,
    as_f64,
    check_chunked_and_repeated_prefill,
    check_prefill_all_matches_hf,
    check_prefill_then_steps,
    check_step_matches_hf,
    export_bundle,
    graph_ops,
    hf_logits64,
    max_diff,
    random_ids,
    step_all,
    steps_alone,
)
from edgeseq.errors import EdgeseqError

WINDOW = 8
CONFIGS = {
    # six layers: (rec, rec, attn) twice; MQA; head dim 12 with RoPE on 6 channels; sqrt(48) = 6.928
    # becomes 6.9375 in bfloat16 (the embedding scale HF applies)
    "mqa": dict(hidden_size=48, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=1),
    # two key/value heads (GQA), an RG-LRU wider than the model, a block pattern of its own, conv width 3,
    # and a soft-cap of 4 that bends most logits
    "gqa-cap4": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, lru_width=64, conv1d_width=3, logits_soft_cap=4.0,
                     block_types=["recurrent", "attention"]),
}
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


def add_rg_noise(model, seed: int):
    """conftest's noise recipe (randn · 1.5/sqrt(fan_in)), except the conv taps (fan-in 4) and the
    RG-LRU gate blocks get a fifth and a third of it. With the full recipe the a-gate saturates, a → 1,
    and 1 - a² (the input normaliser) cancels so badly that HF's own float32 forward moves the logits
    by 1.2e-4 to 2.8e-4 from its float64 forward, past the 1e-4 the tests assert; with these scales
    it moves them by ~1e-5 and the logits stay as varied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                scale = 0.3 if "conv_1d" in name else 0.5 if "gate_weight" in name else 1.5
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32) * scale / p.shape[-1] ** 0.5)
    return model


def make_recurrent_gemma(path, seed: int = 0, **cfg):
    """A tiny random RecurrentGemmaForCausalLM (vocab 256: byte-level) saved into `path`."""
    torch.manual_seed(seed)
    config = RecurrentGemmaConfig(**{"vocab_size": 256, "attention_window_size": WINDOW, **cfg})
    model = add_rg_noise(RecurrentGemmaForCausalLM(config).eval(), seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Built:
    d = tmp_path_factory.mktemp(f"rg-{request.param}")
    ckpt = make_recurrent_gemma(d / "hf", seed=3, **CONFIGS[request.param])
    c = Built(ckpt, d, random_ids(256, SEQ_LEN, seed=8))
    c.name = request.param
    # the reference must not be degenerate, or agreement would prove little
    assert c.ref.std() > 0.5 and len(set(c.ref.argmax(-1).tolist())) > 8
    return c


@pytest.fixture(scope="module")
def mqa(tmp_path_factory) -> Built:
    d = tmp_path_factory.mktemp("rg-mqa-only")
    ckpt = make_recurrent_gemma(d / "hf", seed=3, **CONFIGS["mqa"])
    return Built(ckpt, d, random_ids(256, SEQ_LEN, seed=8))


# -- numbers against transformers --------------------------------------------------------------

@FLAVOURS
def test_step_matches_hf(case, portable):
    check_step_matches_hf(case, portable)


@FLAVOURS
def test_prefill_all_matches_hf(case, portable):
    check_prefill_all_matches_hf(case, portable)


@FLAVOURS
@pytest.mark.parametrize("t", [3, WINDOW, 2 * WINDOW + 3, 50])
def test_prefill_then_steps(case, portable, t):
    """Prefills shorter than, equal to and longer than the window (50: the ring wraps six times inside
    one call), then steps."""
    check_prefill_then_steps(case, portable, t)


@FLAVOURS
def test_chunked_and_repeated_prefill(case, portable):
    check_chunked_and_repeated_prefill(case, portable)


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


def test_graphs_with_plain_onnxruntime(mqa):
    """Drive the graphs as an app would: plain onnxruntime, names from the manifest, the state and the
    position fed back by hand; a prefill that starts at position 40 continues the sequence."""
    import onnxruntime as ort

    bundle = mqa.bundle(False)
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    spec = manifest["state"]
    for g in manifest["graphs"].values():
        assert g["inputs"][:2] == ["input_ids", "position"]
    zeros = {s["name"]: np.zeros([1, *s["shape"][1:]], np.float32) for s in spec}
    sess = {k: ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
            for k, g in manifest["graphs"].items()}

    def run(kind, ids, state, pos):
        g = manifest["graphs"][kind]
        feeds = {"input_ids": np.asarray([ids], np.int64), "position": np.array([pos], np.int64), **state}
        outs = sess[kind].run(g["outputs"], feeds)
        return outs[0], {s["name"]: o for s, o in zip(spec, outs[1:])}

    state, logits = dict(zeros), []
    for p, t in enumerate(mqa.ids):
        out, state = run("step", [t], state, p)
        logits.append(out[0])
    assert max_diff(np.stack(logits), mqa.ref) < TOL
    last, mid = run("prefill", mqa.ids[:40], zeros, 0)
    assert max_diff(last[0], mqa.ref[39]) < TOL
    last, end = run("prefill", mqa.ids[40:], mid, 40)
    assert max_diff(last[0], mqa.ref[-1]) < TOL
    for name in state:
        assert max_diff(end[name], state[name]) < TOL * max(1.0, np.abs(state[name]).max())
    # the position is an input the numbers depend on: the same call at position 0 resets the RG-LRU and
    # reads the ring as empty
    wrong, _ = run("prefill", mqa.ids[40:], mid, 0)
    assert max_diff(wrong[0], mqa.ref[-1]) > 1e-2


# -- state and position ------------------------------------------------------------------------

def test_state_spec(mqa):
    c = mqa.hf.config
    want = {}
    for i in range(c.num_hidden_layers):
        if c.block_types[i % 3] == "recurrent":
            want[f"past_key_values.{i}.conv_state"] = (1, c.lru_width, c.conv1d_width - 1)
            want[f"past_key_values.{i}.recurrent_state"] = (1, c.lru_width)
        else:
            want[f"past_key_values.{i}.key"] = (1, c.num_key_value_heads, WINDOW, c.head_dim)
            want[f"past_key_values.{i}.value"] = (1, c.num_key_value_heads, WINDOW, c.head_dim)
    manifest = json.loads((mqa.bundle(False) / "edgeseq.json").read_text())
    assert {s["name"]: (1, *s["shape"][1:]) for s in manifest["state"]} == want
    assert manifest["state_bytes_per_sequence"] == sum(4 * int(np.prod(v)) for v in want.values())
    st = mqa.model().session().state()
    assert {k: v.shape for k, v in st.items()} == want and not any(v.any() for v in st.values())


@FLAVOURS
def test_state_is_constant_over_300_tokens(mqa, portable):
    """300 tokens wrap the ring 37 times; nothing is reallocated and the state keeps its size."""
    model = mqa.model(portable)
    s = model.session()
    arena = [[ov.data_ptr() for ov in half] for half in s._bufs]
    for t in random_ids(256, 300, seed=9):
        logits = s.step(t)
    assert np.isfinite(logits).all() and s.position == 300
    assert [[ov.data_ptr() for ov in half] for half in s._bufs] == arena
    assert model.state_bytes == sum(v.nbytes for v in s.state().values())


@FLAVOURS
def test_save_load_fork_keep_the_position(mqa, portable, tmp_path):
    model = mqa.model(portable)
    s = model.session()
    s.prefill(mqa.ids[:29])
    s.save_state(str(tmp_path / "s.state"))
    fork = s.fork()
    assert fork.position == 29
    t = model.session()
    t.load_state(str(tmp_path / "s.state"))
    assert t.position == 29
    for sess in (s, fork, t):
        assert max_diff(step_all(sess, mqa.ids[29:]), mqa.ref[29:]) < TOL
    # reset: back to position 0 and the first token's numbers
    s.reset()
    assert s.position == 0 and max_diff(s.step(mqa.ids[0]), mqa.ref[0]) < TOL


def test_flavour_ops(mqa):
    fused, portable = mqa.bundle(False), mqa.bundle(True)
    for kind in ("step", "prefill", "prefill_all"):
        assert ("com.microsoft", "CausalConvWithState") in graph_ops(fused, kind)
        assert {d for d, _ in graph_ops(portable, kind)} == {""}, kind
    for b in (fused, portable):
        assert not {op for _, op in graph_ops(b, "step")} & {"Loop", "Scan", "If"}


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


def test_gguf_round_trip(mqa, tmp_path):
    """A GGUF file (edgeseq's own architecture name: llama.cpp has no RecurrentGemma) runs the same
    numbers as HF, position and rings included."""
    from edgeseq.exporters.gguf_writer import export_gguf

    gguf = tmp_path / "rg.gguf"
    export_gguf(str(mqa.ckpt), str(gguf))
    s = edgeseq.load(gguf).session()
    assert max_diff(s.prefill(mqa.ids[:20]), mqa.ref[19]) < TOL
    assert max_diff(step_all(s, mqa.ids[20:]), mqa.ref[20:]) < TOL


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
