"""Sessions: state files, fork, reset, token checks, generation (seeded, greedy, stop strings),
UTF-8-safe streaming, and a runtime that never imports torch."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

import edgeseq
from conftest import TOL, hf_logits64, max_diff, step_all
from edgeseq import EdgeseqError
from edgeseq.tokenizer import ByteTokenizer


def recorder(session) -> list[int]:
    """Record every token the session steps (generate() feeds each sampled token through step)."""
    seen: list[int] = []
    step = session.step

    def recording_step(t):
        seen.append(int(t))
        return step(t)

    session.step = recording_step
    return seen


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# -- state files ---------------------------------------------------------------------------------

# saving, loading (in either flavour) and forking, against the reference: tests/test_conformance.py,
# test_save_load_fork, for every family


def test_state_file_from_another_model(byte_mamba, other_byte_mamba, tmp_path):
    s = other_byte_mamba.model().session()
    s.prefill([1, 2, 3])
    s.save_state(str(tmp_path / "other.state"))
    t = byte_mamba.model().session()
    t.prefill([4, 5])
    before = t.state()
    with pytest.raises(EdgeseqError, match="another model") as ei:
        t.load_state(str(tmp_path / "other.state"))
    assert str(tmp_path / "other.state") in str(ei.value)
    assert t.position == 2 and states_equal(t.state(), before)  # the session is unharmed


@pytest.fixture
def saved_state(byte_mamba, tmp_path):
    s = byte_mamba.model().session()
    s.prefill(byte_mamba.ids[:5])
    path = tmp_path / "s.state"
    s.save_state(str(path))
    return path, path.read_bytes()


def _header_end(data: bytes) -> int:
    n = int.from_bytes(data[14:18], "little")  # after the 14-byte magic "EDGESEQ-STATE\n"
    return 18 + n


@pytest.mark.parametrize("damage", ["payload-byte", "last-byte", "truncated", "magic", "empty", "header-json"])
def test_damaged_state_file(byte_mamba, saved_state, tmp_path, damage):
    path, data = saved_state
    b = bytearray(data)
    if damage == "payload-byte":
        b[(_header_end(data) + len(data)) // 2] ^= 0x01
    elif damage == "last-byte":
        b[-1] ^= 0x80
    elif damage == "truncated":
        b = b[:-7]
    elif damage == "magic":
        b[0] ^= 0x01
    elif damage == "empty":
        b = bytearray()
    elif damage == "header-json":
        b[18] = ord("x")  # the header's opening brace
    bad = tmp_path / "bad.state"
    bad.write_bytes(bytes(b))
    t = byte_mamba.model().session()
    with pytest.raises(EdgeseqError) as ei:
        t.load_state(str(bad))
    assert str(bad) in str(ei.value)
    assert t.position == 0


def test_missing_state_file(byte_mamba, tmp_path):
    with pytest.raises(EdgeseqError, match="cannot read"):
        byte_mamba.model().session().load_state(str(tmp_path / "nope.state"))


def _flip_each_header_byte(byte_mamba, data):
    """Yield (offset, outcome) for a one-bit flip at every byte of the header: 'error' for an
    EdgeseqError, 'accepted' when it loads, or the name of any other exception."""
    m = byte_mamba.model()
    for i in range(14, _header_end(data)):
        b = bytearray(data)
        b[i] ^= 0x01
        t = m.session()
        with tempfile.NamedTemporaryFile(suffix=".state") as f:
            f.write(bytes(b))
            f.flush()
            try:
                t.load_state(f.name)
                yield i, "accepted"
            except EdgeseqError:
                yield i, "error"
            except Exception as e:  # noqa: BLE001 - what we test for
                yield i, type(e).__name__


def test_damaged_header_raises_edgeseq_error(byte_mamba, saved_state):
    _, data = saved_state
    crashes = [(i, chr(data[i]), o) for i, o in _flip_each_header_byte(byte_mamba, data)
               if o not in ("error", "accepted")]
    assert not crashes


def test_damaged_header_is_never_accepted(byte_mamba, saved_state):
    _, data = saved_state
    silent = [(i, chr(data[i])) for i, o in _flip_each_header_byte(byte_mamba, data) if o == "accepted"]
    assert not silent


# -- reset, token checks -------------------------------------------------------------------------

def test_reset(byte_mamba):
    ids = byte_mamba.ids
    s = byte_mamba.model().session()
    first = step_all(s, ids[:16])
    s.prefill(ids[16:40])
    s.reset()
    assert s.position == 0
    assert all(not v.any() for v in s.state().values())
    again = step_all(s, ids[:16])
    assert np.array_equal(again, first)
    assert max_diff(again, byte_mamba.ref[:16]) < TOL


@pytest.mark.parametrize("call", ["step-256", "step-neg", "prefill-256", "prefill-neg", "prefill-empty"])
def test_token_out_of_range(byte_mamba, call):
    s = byte_mamba.model().session()
    s.prefill([1, 2, 3])
    before = s.state()
    kind, arg = call.split("-")
    bad = {"256": 256, "neg": -1}.get(arg)
    with pytest.raises(EdgeseqError) as ei:
        if kind == "step":
            s.step(bad)
        elif arg == "empty":
            s.prefill([])
        else:
            s.prefill([5, bad, 6])
    if bad is not None:
        assert str(bad) in str(ei.value) and "vocabulary" in str(ei.value)
    assert s.position == 3 and states_equal(s.state(), before)  # nothing was fed


@pytest.mark.parametrize("ids", [[5, 256, 6], [-1], []], ids=["256", "neg", "empty"])
def test_logits_all_token_out_of_range(byte_mamba, ids):
    s = byte_mamba.model().session()
    with pytest.raises(EdgeseqError):
        s.logits_all(ids)


# -- generation ------------------------------------------------------------------------------------

def test_generate_with_seed_is_deterministic(bpe_mamba):
    m = bpe_mamba.model()
    kw = dict(max_tokens=40, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = list(m.session().generate("To be, or not", seed=7, **kw))
    b = list(m.session().generate("To be, or not", seed=7, **kw))
    assert a == b and "".join(a)
    others = {"".join(m.session().generate("To be, or not", seed=s, **kw)) for s in (8, 9, 10)}
    assert others != {"".join(a)}


def test_generated_text_is_the_decoded_tokens(bpe_mamba):
    """The pieces streamed by an HF-tokenizer model join to tokenizer.decode of the sampled ids,
    and the session's state afterwards is that of prompt + sampled ids."""
    m = bpe_mamba.model()
    tok = m.tokenizer
    s = m.session()
    seen = recorder(s)
    prompt = "ROMEO: "
    text = "".join(s.generate(prompt, max_tokens=60, temperature=1.0, seed=3))
    assert len(seen) == s.stats.decode_tokens > 0
    assert text == tok.decode(seen)
    assert s.position == len(tok.encode(prompt)) + len(seen)
    fresh = m.session()
    fresh.prefill(tok.encode(prompt) + seen)
    assert max(max_diff(a, b) for a, b in zip(fresh.state().values(), s.state().values())) < TOL


# -- generate("") continues only from logits it really has --------------------------------------------

@pytest.fixture
def bos_model(byte_mamba):
    """A private model of the byte Mamba whose manifest declares a BOS token (id 1) that it prepends."""
    m = edgeseq.load(byte_mamba.bundle())
    m.manifest["bos_token_id"], m.manifest["add_bos"] = 1, True
    return m


def test_empty_prompt_continues_where_the_last_call_stopped(bos_model):
    s = bos_model.session()
    list(s.generate("Hello", max_tokens=3, temperature=0))
    ref = s.fork()
    seen = recorder(s)
    a = "".join(s.generate("", max_tokens=8, temperature=0))
    assert seen and seen[0] != 1 and s.stats.prompt_tokens == 0  # no BOS mid-sequence, nothing re-fed
    # the fork carries the logits too, so it continues identically
    assert "".join(ref.generate("", max_tokens=8, temperature=0)) == a


def test_empty_prompt_at_the_start_feeds_bos(bos_model):
    s = bos_model.session()
    seen = recorder(s)
    list(s.generate("", max_tokens=2, temperature=0))
    assert seen[0] == 1 and s.stats.prompt_tokens == 1


@pytest.mark.parametrize("how", ["load_state", "set_state"])
def test_empty_prompt_after_restoring_a_state_is_a_clear_error(bos_model, tmp_path, how):
    s = bos_model.session()
    list(s.generate("Hello there", max_tokens=4, temperature=0))
    s.save_state(str(tmp_path / "s"))
    want = "".join(s.fork().generate(" again", max_tokens=6, temperature=0))
    t = bos_model.session()
    list(t.generate("something else entirely", max_tokens=5, temperature=0))  # stale logits to ignore
    if how == "load_state":
        t.load_state(str(tmp_path / "s"))
    else:
        t.set_state(s.state(), s.position)
    before, seen = t.state(), recorder(t)
    with pytest.raises(EdgeseqError, match="nothing to continue from"):
        list(t.generate("", max_tokens=4, temperature=0))
    assert seen == [] and states_equal(t.state(), before)  # nothing was fed, no BOS
    assert "".join(t.generate(" again", max_tokens=6, temperature=0)) == want  # text continues it


def test_set_state_with_logits_continues(bos_model):
    s = bos_model.session()
    list(s.generate("Hello", max_tokens=3, temperature=0))
    t = bos_model.session()
    t.set_state(s.state(), s.position, s.last_logits())
    assert "".join(t.generate("", max_tokens=6, temperature=0)) == "".join(s.generate("", max_tokens=6,
                                                                                          temperature=0))


def test_prefill_takes_text_or_ids_and_names_anything_else(bos_model):
    s, t = bos_model.session(), bos_model.session()
    assert np.array_equal(s.prefill("Hi"), t.prefill([1, *b"Hi"]))  # text: encoded, BOS at position 0
    for bad in (["a", "b"], [1.5j], None):
        with pytest.raises(EdgeseqError, match="token ids"):
            s.prefill(bad)
    with pytest.raises(EdgeseqError, match="not valid UTF-8"):
        list(s.generate("bad \udc80 text", max_tokens=2))
    assert s.position == 3


def hf_greedy(hf, prompt_ids, n, stop_ids):
    """Greedy continuation by HF in float64 (full forward each step, no cache)."""
    ids = list(prompt_ids)
    out = []
    for _ in range(n):
        logits = hf_logits64(hf, ids)[-1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-3, "a near tie: choose another prompt"
        nxt = int(np.argmax(logits))
        if nxt in stop_ids:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_greedy_matches_hf(byte_mamba):
    m = byte_mamba.model()
    prompt = "Hello"
    want = hf_greedy(byte_mamba.hf64, list(prompt.encode()), 24, set(m.stop_token_ids))
    assert len(set(want)) > 3  # not a degenerate repetition
    s = m.session()
    seen = recorder(s)
    text = "".join(s.generate(prompt, max_tokens=24, temperature=0))
    assert seen == want
    assert text == ByteTokenizer().decode(want)


def test_stop_strings(bpe_mamba):
    m = bpe_mamba.model()
    full = "".join(m.session().generate("KING: ", max_tokens=50, temperature=0))
    clean = [i for i in range(8, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
    assert clean, full
    stop = full[clean[0]:clean[0] + 3]
    expected = full[:full.find(stop)]
    s = m.session()
    pieces = list(s.generate("KING: ", max_tokens=50, temperature=0, stop=[stop]))
    assert "".join(pieces) == expected
    assert s.stats.stopped_by == "stop_string"
    # of two stop strings, the earlier in the text wins; one that never occurs changes nothing
    later = full[clean[-1]:clean[-1] + 3]
    assert "".join(m.session().generate("KING: ", max_tokens=50, temperature=0, stop=[later, stop])) == expected
    assert "".join(m.session().generate("KING: ", max_tokens=50, temperature=0, stop=["\x00never"])) == full


def test_stop_token_ids(byte_mamba):
    m = byte_mamba.model()
    want = hf_greedy(byte_mamba.hf64, list(b"Hello"), 12, set(m.stop_token_ids))
    end = want[6]
    s = m.session()
    text = "".join(s.generate("Hello", max_tokens=12, temperature=0, stop_token_ids=[end]))
    cut = want[:want.index(end)]
    assert text == ByteTokenizer().decode(cut)
    assert s.stats.stopped_by == "end_token"
    assert s.position == 5 + len(cut)  # the end token is not fed


# -- streaming never splits a UTF-8 character ----------------------------------------------------------------

# a byte-level Markov chain whose every path is valid UTF-8 mixing 1-, 2-, 3- and 4-byte characters:
# each byte's role (lead, 2nd, 3rd, last) is told by the byte alone, so a successor table suffices
ASCII = [ord(c) for c in "abcdefghij "]
LEADS = [0xC3, 0xE6, 0xF0]
FINALS = [0xA9, 0xB1, 0xB6, 0xA5, 0xAC, 0x80, 0x89]
NEXT = {0xC3: [0xA9, 0xB1, 0xB6],  # é ñ ö
        0xE6: [0x97, 0x9C], 0x97: [0xA5, 0xAC], 0x9C: [0xA5, 0xAC],  # 日 本 ...
        0xF0: [0x9F], 0x9F: [0x8E, 0x98], 0x8E: [0x80, 0x89], 0x98: [0x80, 0x89]}  # 🎀 🎉 😀 😉


@pytest.fixture(scope="module")
def utf8_bundle(tmp_path_factory):
    """A byte model that writes only valid UTF-8: mixers silenced (out_proj = 0) so the logits are
    lm_head(norm(embedding[current byte])); one-hot embeddings make lm_head a transition table."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    d = tmp_path_factory.mktemp("utf8")
    model = MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=256, state_size=4, num_hidden_layers=1,
                                         expand=1, tie_word_embeddings=False)).eval()
    table = -np.ones((256, 256), np.float32)  # [next, current]
    for cur in range(256):
        for nxt in NEXT.get(cur, ASCII + LEADS):
            table[nxt, cur] = 1.0
    with torch.no_grad():
        model.backbone.embeddings.weight.copy_(torch.eye(256))
        model.backbone.layers[0].mixer.out_proj.weight.zero_()
        model.lm_head.weight.copy_(torch.from_numpy(table))
    model.save_pretrained(d / "ckpt")
    from edgeseq.exporters.export import export

    return export(str(d / "ckpt"), str(d / "bundle"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_text_never_splits_a_character(utf8_bundle, seed):
    m = edgeseq.load(utf8_bundle)
    s = m.session()
    seen = recorder(s)
    pieces = list(s.generate("ab", max_tokens=200, temperature=1.0, seed=seed))  # prompt: prefill, unrecorded
    raw = bytes(seen)
    whole = raw.decode("utf-8", errors="replace")
    # the model did its part: only the last character may be cut off by max_tokens
    complete = raw[:len(raw) - next(i for i in range(4) if _ends_on_boundary(raw[:len(raw) - i]))]
    complete.decode("utf-8")  # strict: raises if the model wrote invalid UTF-8
    assert sum(len(c.encode()) > 1 for c in complete.decode()) > 20  # many multi-byte characters
    assert "".join(pieces) == whole
    assert len(pieces) > 50  # streamed, not held back to the end
    body = pieces if _ends_on_boundary(raw) else pieces[:-1]
    assert not any("\ufffd" in p for p in body), [p for p in body if "\ufffd" in p]


def _ends_on_boundary(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_hf_tokenizer_stream_never_splits_a_character(bpe_mamba):
    """Characters outside the tokenizer's training text become several byte tokens; the stream
    must emit each character whole."""
    tok = bpe_mamba.model().tokenizer
    text = "Héllo wörld — ñandú, 日本語 and 🎉🎉! Fin."
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) * 0.6  # mostly byte tokens
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# -- the runtime stays torch-free ----------------------------------------------------------------------------

def test_runtime_does_not_import_torch(byte_mamba, bpe_mamba, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import edgeseq
        import edgeseq.runtime.model, edgeseq.runtime.session, edgeseq.runtime.statefile
        import edgeseq.runtime.engine_ort, edgeseq.runtime.sampling, edgeseq.tokenizer, edgeseq.bundle
        import edgeseq.families.mamba, edgeseq.families.mamba2
        for path in ({str(byte_mamba.bundle())!r}, {str(bpe_mamba.bundle())!r}):
            m = edgeseq.load(path)
            s = m.session()
            s.step(1)
            s.prefill([1, 2, 3])
            s.logits_all([4, 5])
            s.save_state({str(tmp_path / "x.state")!r})
            s.fork().load_state({str(tmp_path / "x.state")!r})
            "".join(s.generate("ab", max_tokens=5, seed=0))
        bad = sorted(k for k in sys.modules
                     if k.split(".")[0] in ("torch", "transformers") or k.startswith("edgeseq.exporters"))
        assert not bad, bad
        print("torch-free")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch-free" in r.stdout
