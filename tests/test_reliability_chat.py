"""Chat templates are untrusted input (a manifest's, a GGUF's or a checkpoint's Jinja text, and a request's
messages): safe_io.render_untrusted renders them bounded in time, output, memory and arithmetic, with
one EdgeseqError naming the source for anything that goes wrong. Its text is transformers' own
(render_jinja_template) where nothing goes wrong. The fuzz target is tests/fuzz/chat.py."""
from __future__ import annotations

import os
import sys
import time

import pytest

from edgeseq import safe_io
from edgeseq.chat_template import CHATML, _environment
from edgeseq.errors import EdgeseqError
from fuzz import chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é ✓ 😀"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}, {"role": "user", "content": "2+2?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {"a": "int"}}}]


def render(source, messages=MESSAGES, tools=None, where="model/edgeseq.json", **kw):
    ctx = dict(messages=messages, tools=tools, documents=None, add_generation_prompt=True, bos_token="<s>",
               eos_token="</s>", **kw)
    return safe_io.render_untrusted(_environment(), source, ctx, where)


@pytest.mark.parametrize("name, source, tools", [("chatml", CHATML, None), ("seed", chat.SEED_TEMPLATE, TOOLS),
                                                 ("seed-no-tools", chat.SEED_TEMPLATE, None)])
def test_same_text_as_transformers(name, source, tools):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = MESSAGES if name != "chatml" else [m for m in MESSAGES if isinstance(m["content"], str)]
    want, _ = render_jinja_template([messages], tools=tools, chat_template=source, add_generation_prompt=True,
                                    bos_token="<s>", eos_token="</s>")
    got = render(source, messages, tools)
    assert got == want[0] and "<|im_start|>assistant\n" in got


@pytest.mark.parametrize("kind, detail, snippet", chat.HOSTILE, ids=[d for _, d, _ in chat.HOSTILE])
def test_hostile_template_is_one_clear_error(kind, detail, snippet):
    if os.path.exists(chat.PWNED):
        os.remove(chat.PWNED)
    tracer = sys.gettrace()
    t0 = time.monotonic()
    with pytest.raises(EdgeseqError) as e:
        render(snippet + chat.SEED_TEMPLATE)
    assert time.monotonic() - t0 < 2.0 + 3.0, "the render was not stopped in time"
    assert str(e.value).startswith("model/edgeseq.json: the chat template"), str(e.value)
    assert not os.path.exists(chat.PWNED), "the template ran a command"
    assert sys.gettrace() is tracer, "the render left its tracer behind"


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": None}], "TypeError"),
    ([{"role": 7, "content": "x"}], "TypeError"),
    ("hi", "the chat template"),  # a string iterates as characters, which have no role
    ([{"role": "root", "content": "x"}], "unknown role root"),
])
def test_bad_messages_are_one_clear_error(messages, words):
    with pytest.raises(EdgeseqError, match="model/edgeseq.json: the chat template") as e:
        render(chat.SEED_TEMPLATE, messages)
    assert words in str(e.value)


def test_limits_are_limits():
    long = [{"role": "user", "content": "x" * 1000}] * 200  # 200 KB of text: rendered
    assert len(render(CHATML, long)) > 200_000
    with pytest.raises(EdgeseqError, match="output passed 100000 characters"):
        safe_io.render_untrusted(_environment(), CHATML, dict(messages=long, add_generation_prompt=True), "t",
                                 max_chars=100_000)
    with pytest.raises(EdgeseqError, match="ran longer than 0.2 s"):
        t0 = time.monotonic()
        safe_io.render_untrusted(_environment(), chat.HOSTILE[0][2], {}, "t", seconds=0.2)
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(EdgeseqError, match=r"the chat template is 5 \(int\), expected text"):
        render(5)
    assert render("{{ 'ab' * 3 }}{{ '%5d' % 7 }}{{ 'x' | center(5) }}{{ 2 ** 10 }}") == "ababab    7  x  1024"
