"""edgeseq's GGUF files in llama.cpp (llama-cpp-python), against outside references:

- Mamba and Mamba-2 HF checkpoints: edgeseq's tensor names, shapes, types and values, metadata keys,
  types and values, tokenizer keys equal what llama.cpp's own converter (convert_hf_to_gguf.py) writes
  for the same checkpoint; llama.cpp runs edgeseq's file to HF's greedy tokens and logits (1e-3) and
  tokenizes text as HF's tokenizer does;
- rwkv.cpp's RWKV-7 fixture exported to GGUF: llama.cpp reproduces rwkv.cpp's expected logits (1e-3);
- the llama.cpp engine behind edgeseq's session API: prefill = steps, save/load state, fork.

Each test skips with a reason where llama-cpp-python (or the converter, for the comparison) is absent.
"""
from __future__ import annotations

import numpy as np
import pytest

import edgeseq
from conftest import CORPUS, hf_logits64, make_mamba, make_mamba2
from edgeseq.exporters.gguf_writer import export_gguf
from edgeseq.gguf_file import GGUFFile
from gguf_helpers import FIXTURES, convert, llama_cpp, llama_logits, write_neox_tokenizer

RWKV7 = FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin"
RWKV7_EXPECTED = np.fromfile(FIXTURES / "expected-logits-7v0-834K.bin", np.float32)
# keys whose values legitimately differ: the converter title-cases the folder name; it names the NeoX
# pre-tokenizer "mpt" from a table of hashes, edgeseq "gpt-2" from the tokenizer.json (llama.cpp gives
# both the same regex: GPT-2's)
DIFFERENT_VALUES = {"general.name", "tokenizer.ggml.pre"}


def _compare_with_converter(ours: GGUFFile, ref: GGUFFile) -> None:
    assert set(ours.kv) == set(ref.kv)
    for k in ref.kv:
        assert ours.kv_types[k] == ref.kv_types[k], k
        if k in DIFFERENT_VALUES:
            continue
        a, b = ours.kv[k], ref.kv[k]
        if isinstance(b, np.ndarray):
            assert np.array_equal(a, b), k
        elif isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-6), k
        else:
            assert a == b, k
    assert set(ours.tensors) == set(ref.tensors)
    for n, t in ref.tensors.items():
        o = ours.tensors[n]
        assert (o.shape, o.type_name) == (t.shape, t.type_name), n
        np.testing.assert_allclose(ours.array(n), ref.array(n), rtol=1e-6, atol=1e-7, err_msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_same_file_as_llama_cpp_converter_and_hf_in_llama_cpp(tmp_path, arch):
    llama_cpp()
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    n_tok = write_neox_tokenizer(ckpt)
    vocab = 50280 if arch == "mamba" else 50288  # the converter's padding: multiples of 8 and 16
    assert n_tok <= vocab
    (make_mamba if arch == "mamba" else make_mamba2)(ckpt, vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                                                      pad_token_id=1)
    ref = convert(ckpt, tmp_path / "ref.gguf")
    ours = tmp_path / "ours.gguf"
    info = export_gguf(str(ckpt), str(ours))
    assert info["architecture"] == arch and info["generic_because"] is None
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        _compare_with_converter(a, b)

    # llama.cpp tokenizes as HF's tokenizer does, and runs to HF's greedy tokens and logits
    from tokenizers import Tokenizer

    text = CORPUS.read_text()[:400]
    hf_ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids
    llm = llama_cpp().Llama(str(ours), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf_ids
    prompt = hf_ids[:12]
    got, greedy = llama_logits(ours, prompt, steps=6)
    want = hf_logits64(ckpt, prompt + greedy)
    assert [int(np.argmax(r)) for r in want[len(prompt) - 1:-1]] == greedy
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    # edgeseq's engine runs the converter's file (and its own) to the same logits
    for f in (ref, ours):
        m = edgeseq.load(f)
        assert m.tokenizer.encode(text) == hf_ids
        np.testing.assert_allclose(m.session().prefill(prompt), want[len(prompt) - 1], atol=1e-4)


def test_rwkv7_fixture_in_llama_cpp(tmp_path):
    llama_cpp()
    out = tmp_path / "r7.gguf"
    info = export_gguf(str(RWKV7), str(out))
    assert info["architecture"] == "rwkv7"
    got, _ = llama_logits(out, [34, 105, 110])
    assert np.abs(got[-1] - RWKV7_EXPECTED).sum() < 1e-3  # rwkv.cpp's own test: sum of differences
    np.testing.assert_allclose(got[-1], RWKV7_EXPECTED, atol=1e-5)
    # byte-level vocabulary: llama.cpp tokenizes UTF-8 byte for byte
    llm = llama_cpp().Llama(str(out), vocab_only=True, verbose=False)
    text = "naïve café, 東京\n\n"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == list(text.encode())
    # edgeseq's own engine on the same file
    m = edgeseq.load(out)
    np.testing.assert_allclose(m.session().prefill([34, 105, 110]), RWKV7_EXPECTED, atol=1e-5)


def test_llama_cpp_engine_session_api(tmp_path):
    llama_cpp()
    ckpt = make_mamba2(tmp_path / "hf", tokenizer_vocab=256)
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(out))
    ids = [5, 9, 200, 31, 7, 77, 12, 150]
    want = hf_logits64(ckpt, ids)
    m = edgeseq.load(out, engine="llama.cpp", threads=1)
    s = m.session()
    np.testing.assert_allclose(s.prefill(ids[:5]), want[4], atol=1e-3)
    t = s.fork()
    path = tmp_path / "s.state"
    s.save_state(str(path))
    for i in ids[5:]:  # the fork and the original interleave: each swaps its own state in
        a, b = s.step(i), t.step(i)
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, want[-1], atol=1e-3)
    u = m.session()
    u.load_state(str(path))
    assert u.position == 5
    np.testing.assert_allclose(u.prefill(ids[5:]), want[-1], atol=1e-3)
    u.reset()
    np.testing.assert_allclose(u.step(ids[0]), want[0], atol=1e-3)
    text = "".join(m.session().generate("To be", max_tokens=8, temperature=0))
    # the same file in edgeseq's engine gives the same tokens (greedy)
    e = edgeseq.load(out)
    assert "".join(e.session().generate("To be", max_tokens=8, temperature=0)) == text
    # a state file of the ONNX engine is not one of llama.cpp's
    e.session().save_state(str(tmp_path / "e.state"))
    with pytest.raises(edgeseq.EdgeseqError):
        m.session().load_state(str(tmp_path / "e.state"))


def test_llama_cpp_refuses_what_it_does_not_run(tmp_path):
    llama_cpp()
    ckpt = make_mamba(tmp_path / "hf", expand=3)  # llama.cpp's mamba needs expand 2
    out = tmp_path / "m.gguf"
    info = export_gguf(str(ckpt), str(out))
    assert info["architecture"] == "edgeseq-mamba" and "expand" in info["generic_because"]
    with pytest.raises(edgeseq.EdgeseqError, match="does not run in llama.cpp"):
        edgeseq.load(out, engine="llama.cpp")
    want = hf_logits64(ckpt, [1, 2, 3])
    np.testing.assert_allclose(edgeseq.load(out).session().prefill([1, 2, 3]), want[-1], atol=1e-4)


def test_llama_cpp_quantizer_files_run_in_edgeseq(tmp_path):
    """A "Q4_0" file from llama.cpp's own quantizer mixes types (Q6_K head, F16 rows it cannot block, F32
    norms): edgeseq reads it, repacks the Q4_0 blocks for MatMulNBits (equal to dequantizing them, at
    accuracy_level 0), re-quantizes the Q6_K head to 8 bits (close), and agrees with llama.cpp running
    the same file."""
    import ctypes

    lc = llama_cpp()
    ckpt = make_mamba(tmp_path / "hf", hidden_size=256, num_hidden_layers=1, state_size=16, vocab_size=256)
    f32 = tmp_path / "f32.gguf"
    export_gguf(str(ckpt), str(f32))
    q = tmp_path / "q4_0.gguf"
    params = lc.llama_model_quantize_default_params()
    params.ftype = 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert lc.llama_model_quantize(str(f32).encode(), str(q).encode(), ctypes.byref(params)) == 0
    with GGUFFile(q) as g:
        types = {t.type_name for t in g.tensors.values()}
    assert {"Q4_0", "Q6_K", "F16", "F32"} <= types, types
    ids = [34, 105, 110, 7, 9]
    m = edgeseq.load(q, accuracy_level=0, requant8=False)  # Q4_0 repacked, the rest f32
    assert m.manifest["quant"]["recipe"] == "int4"
    assert {t["bits"] for t in m.manifest["quant"]["tensors"].values()} == {4}
    exact = edgeseq.load(q, portable=True).session().prefill(ids)  # every tensor dequantized to f32
    np.testing.assert_allclose(m.session().prefill(ids), exact, atol=1e-4)
    d = edgeseq.load(q, accuracy_level=0)  # the default: the Q6_K head re-quantized to 8 bits as well
    assert d.manifest["quant"]["tensors"]["embed"]["bits"] == 8 and d.weights_bytes < m.weights_bytes
    np.testing.assert_allclose(d.session().prefill(ids), exact, atol=0.03 * np.abs(exact).max())
    theirs, _ = llama_logits(q, ids)
    # llama.cpp rounds the activations to 8 bits inside its quantized dot products; edgeseq at
    # accuracy_level 0 does not: close, not equal
    assert np.abs(theirs[-1] - exact).max() < 0.05 * np.abs(exact).max()
    assert int(np.argmax(theirs[-1])) == int(np.argmax(exact))


@pytest.mark.slow
def test_rwkv6_pth_in_llama_cpp(tmp_path):
    """A random BlinkDL RWKV-6 .pth: its GGUF runs in llama.cpp (and in edgeseq) to the `rwkv` package's
    logits at every position."""
    llama_cpp()
    from rwkv_builders import RwkvCase, attach_references

    case = RwkvCase("a", "6.0", {}, tmp_path / "r6")
    attach_references([case], False)
    out = tmp_path / "r6.gguf"
    assert export_gguf(str(case.pth), str(out))["architecture"] == "rwkv6"
    got, _ = llama_logits(out, case.ids[:16])
    np.testing.assert_allclose(got, case.ref[:16], atol=1e-3)
    s = edgeseq.load(out).session()
    np.testing.assert_allclose(np.stack([s.step(t) for t in case.ids[:16]]), case.ref[:16], atol=1e-4)


@pytest.mark.slow
def test_rwkv_world_vocabulary_keys(tmp_path):
    """The RWKV World vocabulary as llama.cpp's `rwkv` tokenizer keys: llama.cpp and edgeseq (reading
    the GGUF back) tokenize text as the World tokenizer itself does."""
    llama_cpp()
    import torch

    from edgeseq.tokenizer import RwkvWorldTokenizer, find_rwkv_vocab
    from rwkv_builders import v7_state_dict

    vocab = find_rwkv_vocab(str(tmp_path))
    if vocab is None:
        pytest.skip("the RWKV World vocabulary (rwkv package) is not installed")
    torch.save(v7_state_dict(C=32, L=1, H=1, F=64, vocab=65536), tmp_path / "w.pth")
    out = tmp_path / "w.gguf"
    export_gguf(str(tmp_path / "w.pth"), str(out))
    text = CORPUS.read_text()[:2000] + " naïve 東京 \n\n😀"
    want = RwkvWorldTokenizer(vocab).encode(text)
    llm = llama_cpp().Llama(str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    m = edgeseq.load(out)
    assert m.manifest["tokenizer"]["kind"] == "rwkv_world" and m.tokenizer.encode(text) == want
    assert m.stop_token_ids == [0, 261]


@pytest.mark.slow
def test_sentencepiece_vocabulary_keys(tmp_path):
    """A SentencePiece tokenizer.model (Mistral v0.1's, as Mamba-Codestral and Zamba2 use) beside a
    Mamba-2 checkpoint: the `llama` tokenizer keys equal llama.cpp's converter's; llama.cpp tokenizes as
    sentencepiece does, and so does edgeseq reading the file back."""
    import shutil

    llama_cpp()
    import sentencepiece
    from test_zamba2 import mistral_v1

    if not mistral_v1():
        pytest.skip("mistral-common (Mistral's SentencePiece model) is not installed")
    ckpt = make_mamba2(tmp_path / "hf", vocab_size=32000)
    shutil.copyfile(mistral_v1(), ckpt / "tokenizer.model")
    ref = convert(ckpt, tmp_path / "ref.gguf")
    ours = tmp_path / "ours.gguf"
    export_gguf(str(ckpt), str(ours))
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        _compare_with_converter(a, b)
        assert a.kv["tokenizer.ggml.model"] == "llama"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    text = CORPUS.read_text()[:1500] + " naïve 東京 😀"
    want = sp.encode(text)
    llm = llama_cpp().Llama(str(ours), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    assert edgeseq.load(ours).tokenizer.encode(text) == want  # the converter's file has the same keys


@pytest.mark.slow
def test_rwkv7_pth_in_llama_cpp(tmp_path):
    """A random BlinkDL RWKV-7 .pth whose LoRA ranks differ (a 16, v 8: llama.cpp sizes layer 0's unused
    v LoRA at the a rank, the others at the value-residual rank): llama.cpp and edgeseq on its GGUF give
    the `rwkv` package's logits."""
    llama_cpp()
    from rwkv_builders import RwkvCase, attach_references

    case = RwkvCase("a", "7", {}, tmp_path / "r7")
    attach_references([case], True)
    out = tmp_path / "r7.gguf"
    assert export_gguf(str(case.pth), str(out))["architecture"] == "rwkv7"
    got, _ = llama_logits(out, case.ids[:16])
    np.testing.assert_allclose(got, case.ref[:16], atol=1e-3)
    s = edgeseq.load(out).session()
    np.testing.assert_allclose(np.stack([s.step(t) for t in case.ids[:16]]), case.ref[:16], atol=1e-4)


def test_trained_fla_rwkv7_in_llama_cpp(tmp_path):
    """The shipped demo model (a trained RWKV-7 in flash-linear-attention's layout, byte-level) as a
    GGUF: llama.cpp gives the logits and the greedy text of edgeseq's bundle of the same checkpoint."""
    llama_cpp()
    from conftest import export_bundle
    from gguf_helpers import REPO

    demo = REPO / "edgeseq" / "demo" / "rwkv7"
    if not (demo / "model.safetensors").is_file():
        pytest.skip("the demo model (edgeseq/demo/rwkv7) is not in this checkout")
    out = tmp_path / "demo.gguf"
    assert export_gguf(str(demo), str(out))["architecture"] == "rwkv7"
    ids = list(b"And God said, Let there be light")
    bundle = edgeseq.load(export_bundle(demo, tmp_path / "b"))
    s = bundle.session()
    want = np.stack([s.step(t) for t in ids])
    got, _ = llama_logits(out, ids)
    np.testing.assert_allclose(got, want, atol=1e-4)
    m = edgeseq.load(out, engine="llama.cpp", threads=1)
    text = "".join(m.session().generate("And God said", max_tokens=40, temperature=0))
    assert text == "".join(bundle.session().generate("And God said", max_tokens=40, temperature=0))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fla-rwkv7", "hf-rwkv6"])
def test_rwkv_same_file_as_llama_cpp_converter(tmp_path, layout):
    """RWKV-7 in flash-linear-attention's layout and RWKV-6 in the RWKV organisation's HF layout, World
    vocabulary: edgeseq's GGUF equals llama.cpp's converter's (tensors, shapes, types, values, metadata,
    tokenizer keys). LoRA widths are the converter's defaults for this width (it derives RWKV-6's from
    the width alone)."""
    import shutil

    from edgeseq.tokenizer import find_rwkv_vocab
    from rwkv_builders import v6_state_dict, v7_state_dict
    from test_rwkv_hf_layouts import _np, fla_config, fla_layout, hf6_layout, write_dir

    world = find_rwkv_vocab(str(tmp_path))
    if world is None:
        pytest.skip("the RWKV World vocabulary (rwkv package) is not installed")
    C, H, L = 64, 1, 2
    if layout == "fla-rwkv7":
        sd = _np(v7_state_dict(C=C, L=L, H=H, F=256, D_W=32, D_A=32, D_V=32, D_G=64, vocab=65536))
        conf = {**fla_config(C, H, L, 256, 65536), "decay_low_rank_dim": 32, "a_low_rank_dim": 32,
                "v_low_rank_dim": 32, "gate_low_rank_dim": 64}
        ckpt = write_dir(tmp_path / "hf", fla_layout(sd, H), conf)
    else:
        sd = _np(v6_state_dict(C=C, L=L, H=H, F=224, D_MIX=32, D_DECAY=64, vocab=65536))
        conf = {"architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "hidden_size": C,
                "num_hidden_layers": L, "head_size": C // H, "head_size_divisor": 8, "attention_hidden_size": C,
                "intermediate_size": 224, "layer_norm_epsilon": 1e-5, "vocab_size": 65536, "rescale_every": 0}
        ckpt = write_dir(tmp_path / "hf", hf6_layout(sd), conf)
    shutil.copyfile(world, ckpt / "rwkv_vocab_v20230424.txt")
    ref = convert(ckpt, tmp_path / "ref.gguf")
    ours = tmp_path / "ours.gguf"
    export_gguf(str(ckpt), str(ours))
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        _compare_with_converter(a, b)


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_template_in_llama_cpp_and_back(tmp_path):
    """The checkpoint's own Jinja template goes into tokenizer.chat_template (the key llama.cpp reads),
    for a byte-level model too (no tokenizer.json, so the gguf package's SpecialVocab does not see it);
    where a folder holds two, the one edgeseq's bundles carry (chat_template.jinja over
    tokenizer_config.json) wins; edgeseq reading the GGUF back carries it into the bundle verbatim."""
    import json

    from edgeseq.chat_template import checkpoint_template, for_model, load_template_option
    from edgeseq.gguf_bundle import gguf_to_bundle

    ckpt = make_mamba(tmp_path / "hf", seed=3)  # vocabulary of 256 bytes
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'older' }}"}))
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), str(out))
    llm = llama_cpp().Llama(str(out), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    bundle = gguf_to_bundle(str(out), str(tmp_path / "b"))
    manifest = json.loads((tmp_path / "b" / "edgeseq.json").read_text())
    assert manifest["chat_template"]["jinja"] == TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    assert (for_model(manifest).render(messages) == for_model({"chat_template": checkpoint_template(str(ckpt))})
            .render(messages) == "<|user|>\nhi<|end|>\n<|assistant|>\n")
    assert edgeseq.load(bundle).manifest["chat_template"]["jinja"] == TEMPLATE

    # a BPE vocabulary goes through the gguf package's SpecialVocab, which reads tokenizer_config.json's
    bpe = make_mamba(tmp_path / "bpe", seed=3, vocab_size=301, tokenizer_vocab=301)
    (bpe / "chat_template.jinja").write_text(TEMPLATE)
    (bpe / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'older' }}"}))
    export_gguf(str(bpe), str(tmp_path / "bpe.gguf"))
    llm = llama_cpp().Llama(str(tmp_path / "bpe.gguf"), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.model"] == "gpt2" and llm.metadata["tokenizer.chat_template"] == TEMPLATE

    # --chat-template NAME replaces it; none leaves the key out
    export_gguf(str(ckpt), str(out), force=True, chat_template=load_template_option("chatml"))
    with GGUFFile(out) as g:
        assert g.kv["tokenizer.chat_template"] == load_template_option("chatml")["jinja"]
    export_gguf(str(ckpt), str(out), force=True, chat_template=load_template_option("none"))
    llm = llama_cpp().Llama(str(out), vocab_only=True, verbose=False)
    assert "tokenizer.chat_template" not in llm.metadata
