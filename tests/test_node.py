"""examples/node/generate.mjs drives every family's bundle with onnxruntime-node (the npm build, ONNX
Runtime 1.30) from the manifest alone, and decodes the same greedy ids as the Python runtime.

Skips with the reason when node or the npm packages are missing (`make test` installs them)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgeseq

from js_cases import CASE_IDS, CASES, python_greedy, require_node_package, run_node, shared_bundles

SCRIPT = "examples/node/generate.mjs"
PROMPT = [34, 105, 110, 32, 116, 104, 101]  # '"in the'
N = 24


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    require_node_package("onnxruntime-node")
    return shared_bundles(tmp_path_factory)


def node_ids(bundle, prompt=PROMPT, n=N, check_logits: bool = True) -> list[int]:
    """Node's greedy ids; also checks every call's logits against the Python runtime's on those ids
    (equal ids alone could hide a wrong state that argmax happens to survive)."""
    out = Path(bundle).parent / f"{Path(bundle).name}-node-logits.json"
    r = run_node(SCRIPT, bundle, "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens", n, "--logits-out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = json.loads(r.stdout.strip().splitlines()[-1])
    if check_logits:
        got = json.loads(out.read_text())
        s = edgeseq.load(bundle).session()
        ref = [s.prefill(prompt)] + [s.step(t) for t in ids]
        # the prompt may take several calls (slices, or one token at a time with a step-only bundle)
        assert len(got) >= len(ref)
        got = got[len(got) - len(ref):]
        assert max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(got, ref)) < 1e-4
    return ids


@pytest.mark.parametrize("family,portable", CASES, ids=CASE_IDS)
def test_node_greedy_equals_python(bundles, family, portable):
    bundle = bundles.get(family, portable)
    want = python_greedy(bundle, PROMPT, N)
    assert len(want) == N and len(set(want)) >= 3, want  # not one repeated token (the trained fixtures loop " the")
    assert node_ids(bundle) == want


@pytest.mark.parametrize("family,portable,quant,mobile", [
    ("mamba2", False, "int4", False),  # MatMulNBits, GatherBlockQuantized beside LinearAttention
    ("rwkv6", True, "int8", False),  # the portable flavour's block-wise DequantizeLinear
    ("mamba", False, "f16", False),
    ("rwkv5_tuned", False, "f32", True),  # ORT format, step graph only, the tuned initial state
], ids=["mamba2-int4", "rwkv6-portable-int8", "mamba-f16", "rwkv5_tuned-mobile"])
def test_quantized_and_mobile_bundles(bundles, family, portable, quant, mobile):
    bundle = bundles.get(family, portable, quant, mobile)
    want = python_greedy(bundle, PROMPT, N)
    assert len(want) == N and len(set(want)) >= 3, want
    assert node_ids(bundle) == want


@pytest.mark.parametrize("name", ["rwkv7", "mamba2"])
def test_trained_demo_models(bundles, tmp_path, name):
    """The shipped demo models (trained on the KJV Bible): Node writes the Python runtime's text."""
    from edgeseq import demo
    from edgeseq.exporters.export import export

    bundle = Path(export(demo.path(name), str(tmp_path / name)))
    prompt = list(b"And God said")
    ids = node_ids(bundle, prompt, 48)
    assert ids == python_greedy(bundle, prompt, 48)
    assert bytes(ids).decode("utf-8", "replace").count(" ") > 5  # words, not noise


def test_long_prompt_is_fed_in_chunks(bundles, tmp_path):
    """A prompt longer than the manifest's prefill chunk goes in slices, the state carried over, and a
    last slice of one token through the step graph (as the Python runtime does)."""
    bundle = bundles.get("mamba2", False)
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    manifest["graphs"]["prefill"]["chunk"] = 5
    small = tmp_path / "chunked"
    small.mkdir()
    for f in bundle.iterdir():
        (small / f.name).symlink_to(f)
    (small / "edgeseq.json").unlink()
    (small / "edgeseq.json").write_text(json.dumps(manifest))
    prompt = list(range(40, 61))  # 21 tokens: 4 slices of 5 and one token
    assert node_ids(small, prompt, 8) == python_greedy(bundle, prompt, 8)


def test_full_attention_ring_length(bundles):
    """Zamba2's KV ring: --max-context sizes it (the manifest's default is far larger); greedy ids are
    the Python runtime's at the same length, and a call past it stops with "context full"."""
    bundle = bundles.get("zamba2", False)
    assert json.loads((bundle / "edgeseq.json").read_text())["max_context"] > 64
    r = run_node(SCRIPT, bundle, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", N, "--max-context", 32)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == python_greedy(bundle, PROMPT, N)
    r = run_node(SCRIPT, bundle, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", 40, "--max-context", 32)
    assert r.returncode == 1 and "context full: 32 tokens" in r.stderr, r.stderr


def test_bad_input_is_a_clear_error(bundles, tmp_path):
    r = run_node(SCRIPT, tmp_path / "nowhere", "--prompt-ids", "1,2")
    assert r.returncode == 1 and "nowhere/edgeseq.json" in r.stderr, r.stderr
    bundle = bundles.get("mamba", False)
    r = run_node(SCRIPT, bundle, "--prompt-ids", "1,999")
    assert r.returncode == 1 and "token id 999 is outside the vocabulary" in r.stderr, r.stderr
    newer = tmp_path / "newer"
    newer.mkdir()
    m = json.loads((bundle / "edgeseq.json").read_text())
    (newer / "edgeseq.json").write_text(json.dumps({**m, "format_version": 99}))
    r = run_node(SCRIPT, newer, "--prompt-ids", "1")
    assert r.returncode == 1 and "bundle format 99 is newer" in r.stderr, r.stderr
    v2 = tmp_path / "v2"  # format 2 (a Jinja chat template) drives the same graphs the same way
    shutil.copytree(bundle, v2)
    (v2 / "edgeseq.json").write_text(json.dumps({**m, "format_version": 2, "chat_template": {"jinja": "{{ x }}"}}))
    r1, r2 = (run_node(SCRIPT, d, "--prompt-ids", "1,2", "--max-tokens", "4") for d in (bundle, v2))
    assert r2.returncode == 0 and r2.stdout.splitlines()[-1] == r1.stdout.splitlines()[-1], r2.stderr
    r = run_node(SCRIPT, bundle)
    assert r.returncode == 2 and "--prompt-ids" in r.stderr


def test_chat_templates_render_as_in_python():
    """examples/web/chat.mjs (@huggingface/jinja) renders every template the Python tests hold (the published
    ones of tests/data/chat_templates/, Gemma's, LFM2's, Qwen3's, ChatML, and the plain-string RWKV World
    of format 1) to edgeseq's text, which tests/test_chat_templates.py proves equal to transformers'; a
    template's refusal (raise_exception) is an error carrying its message in both."""
    require_node_package("@huggingface/jinja")
    import subprocess

    from edgeseq import EdgeseqError
    from edgeseq.chat_template import CHATML, WORLD, from_spec
    from js_cases import NODE, ROOT
    from test_chat_templates import (CONVERSATIONS, DATA, GEMMA_IT, LFM2, PUBLISHED, QWEN3, SPECIAL_CASES, TOOLS,
                                     _published)

    calls = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}, {"role": "tool", "content": "42"}]
    specs = {"gemma-it": ({"jinja": GEMMA_IT, "special_tokens": {"bos_token": "<bos>"}}, []),
             "lfm2": ({"jinja": LFM2, "special_tokens": {"bos_token": "<|startoftext|>"}},
                      [({"tools": TOOLS}, calls)]),
             "qwen3": ({"jinja": QWEN3, "special_tokens": {}},
                       [({"tools": TOOLS}, calls), ({"enable_thinking": False}, CONVERSATIONS["one turn"])]),
             "chatml": ({"jinja": CHATML, "special_tokens": {}}, []),
             "rwkv-world (format 1)": (WORLD, [])}
    for name in PUBLISHED:
        text, bos, eos = _published(name)
        specs[name] = ({"jinja": text, "special_tokens": {"bos_token": bos, "eos_token": eos}}, SPECIAL_CASES[name])
    assert len(specs) == 5 + len(list(DATA.glob("*.jinja")))
    rendered = 0
    for name, (spec, special) in specs.items():
        cases = [{"messages": m, "add_generation_prompt": g, "vars": {}} for m in CONVERSATIONS.values()
                 for g in (True, False)]
        cases += [{"messages": m, "add_generation_prompt": g, "vars": kw} for kw, m in special for g in (True, False)]
        if "turn" in spec:  # a plain-string template renders the generation prompt with the user's turn
            cases = [c for c in cases if c["add_generation_prompt"] and "tool_calls" not in str(c)]
        r = subprocess.run([NODE, "tests/js_tokenize.mjs"], input=json.dumps({"chat_template": spec, "cases": cases}),
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout)
        t = from_spec(spec)
        assert got["stop"] == t.stop, name
        for c, js in zip(cases, got["rendered"], strict=True):
            try:
                want = t.render(c["messages"], c["add_generation_prompt"]) if not c["vars"] else \
                    __import__("edgeseq.chat_template", fromlist=["x"]).render_jinja(
                        spec["jinja"], c["messages"], c["add_generation_prompt"], spec["special_tokens"], **c["vars"])
            except EdgeseqError as e:
                assert isinstance(js, dict), (name, c, js)
                message = str(e).rsplit("failed: ", 1)[-1]  # the template's own message (raise_exception)
                assert message in js["error"], (name, message, js["error"])
                continue
            assert js == want, (name, c)
            rendered += 1
    assert rendered > 80


@pytest.mark.parametrize("templated", [True, False], ids=["qwen3-template", "no-template"])
def test_chat_turn_as_python_chat(bundles, tmp_path, templated):
    """generate.mjs --chat: the turn rendered with the bundle's template (or, without one, the plain text
    with --system on its own line first) is the prompt edgeseq's Python chat feeds, and the greedy reply
    is the Python runtime's, ids and text."""
    require_node_package("@huggingface/jinja")
    from edgeseq.runtime.chat import Chat
    from edgeseq.runtime.session import encode_prompt
    from test_chat_templates import QWEN3

    bundle = tmp_path / "chat"
    shutil.copytree(bundles.get("mamba", False), bundle)
    if templated:
        m = json.loads((bundle / "edgeseq.json").read_text())
        m.update(format_version=2, chat_template={"jinja": QWEN3, "special_tokens": {}, "source": "qwen3"})
        (bundle / "edgeseq.json").write_text(json.dumps(m))
    model = edgeseq.load(bundle)
    c = Chat(model, system="Be brief.", max_tokens=N, temperature=0)
    fed = []
    generate = c.session.generate
    c.session.generate = lambda prompt, **kw: (fed.append(prompt), generate(prompt, **kw))[1]
    said = "".join(c.handle("2+2 is"))
    assert fed[0].startswith("<|im_start|>system\nBe brief.") == templated
    want = python_greedy(bundle, encode_prompt(model.session(), fed[0]), N)
    r = run_node(SCRIPT, bundle, "--chat", "2+2 is", "--system", "Be brief.", "--max-tokens", N)
    assert r.returncode == 0, r.stderr[-2000:]
    body, ids = r.stdout.rstrip("\n").rsplit("\n", 1)
    assert json.loads(ids) == want and len(want) >= 8, want
    assert body == said
    r = run_node(SCRIPT, bundle, "--prompt", "x", "--system", "s")
    assert r.returncode == 2 and "--system goes with --chat" in r.stderr
