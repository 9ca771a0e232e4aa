"""Chat templates: edgeseq renders a checkpoint's Jinja chat template to the same text as transformers'
apply_chat_template, reads it from where checkpoints and GGUF files keep it, carries it in the bundle
manifest (format 2), and chats with it; bundles with the older plain-string templates still chat."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from edgeseq import EdgeseqError
from edgeseq.chat_template import CHATML, checkpoint_template, from_spec, load_template_option, render_jinja

# The published templates (facts about the models, as their tokenizer_config.json / chat_template.jinja
# hold them). recurrentgemma-2b-it: Gemma's template (no system role; roles must alternate).
GEMMA_IT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# LiquidAI LFM2.5 (LFM2's ChatML-like format; macros, namespaces, {% generation %}, tojson, strftime_now)
LFM2 = r'''{{- bos_token -}}
{%- set preserve_thinking = preserve_thinking | default(false) -%}
{%- macro parse_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- set _ns = namespace(result="") -%}
        {%- for item in content -%}
            {%- if item["type"] == "text" -%}
                {%- set _ns.result = _ns.result + item["text"] -%}
            {%- else -%}
                {%- set _ns.result = _ns.result + item | tojson -%}
            {%- endif -%}
        {%- endfor -%}
        {{- _ns.result -}}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system_prompt="", last_user_index=-1) -%}
{%- if messages[0]["role"] == "system" -%}
    {%- if messages[0].get("content") -%}
        {%- set ns.system_prompt = parse_content(messages[0]["content"]) -%}
    {%- endif -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- set ns.system_prompt = ns.system_prompt + ("\n\n" if ns.system_prompt else "") + "List of tools: " + (tools | tojson) -%}
{%- endif -%}
{%- if ns.system_prompt -%}
    {{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message["role"] == "user" -%}
        {%- set ns.last_user_index = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {{- "<|im_start|>" + message.role + "\n" -}}
    {%- if message.role == "assistant" -%}
        {%- generation -%}
        {%- if message.content is defined -%}
            {%- set content = parse_content(message.content) -%}
            {%- if not (preserve_thinking or loop.index0 > ns.last_user_index) -%}
                {%- if "</think>" in content -%}
                    {%- set content = content.split("</think>")[-1] | trim -%}
                {%- endif -%}
            {%- endif -%}
            {{- content -}}
        {%- endif -%}
        {{- "<|im_end|>\n" -}}
        {%- endgeneration -%}
    {%- else %}
        {%- if message.get("content") -%}
            {{- parse_content(message["content"]) -}}
        {%- endif -%}
        {{- "<|im_end|>\n" -}}
    {%- endif %}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
{%- endif -%}
'''
# Qwen3 (Qwen/Qwen3-0.6B): ChatML with <think> sections dropped from earlier turns, tools, tool calls
QWEN3 = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''
TEMPLATES = {"recurrentgemma-it": (GEMMA_IT, "<bos>", "<eos>"), "lfm2": (LFM2, "<|startoftext|>", "<|im_end|>"),
             "qwen3": (QWEN3, "<|endoftext|>", "<|im_end|>"), "chatml": (CHATML, "<s>", "</s>")}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hello there"}],
    "three turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! \n"},
                    {"role": "user", "content": "What is 2+2? ünïcödé"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "thinking": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>hm</think> b"},
                 {"role": "user", "content": "c"}],
}


def hf_tokenizer(template: str, bos: str, eos: str):
    """A small tokenizer carrying the template and its special tokens, as a checkpoint's files hold them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<unk>", bos, eos, "<|im_start|>", "a", "b"]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   chat_template=template)


@pytest.fixture(scope="module")
def tokenizers():
    import transformers  # noqa: F401  (a test extra: missing means a broken install, not a skip)
    return {name: hf_tokenizer(*t) for name, t in TEMPLATES.items()}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_renders_as_transformers_does(tokenizers, name, tmp_path):
    tok = tokenizers[name]
    tok.save_pretrained(tmp_path)  # the files a checkpoint carries: what edgeseq export reads
    spec = checkpoint_template(str(tmp_path))
    assert spec["jinja"] == TEMPLATES[name][0]
    assert spec["special_tokens"]["bos_token"] == TEMPLATES[name][1]
    for what, messages in CONVERSATIONS.items():
        for gen in (True, False):
            try:
                want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # the template refuses it (raise_exception): so must edgeseq, saying why
                with pytest.raises(EdgeseqError, match="chat template: ") as ours:
                    render_jinja(spec["jinja"], messages, gen, spec["special_tokens"])
                assert str(e) in str(ours.value)
                continue
            assert render_jinja(spec["jinja"], messages, gen, spec["special_tokens"]) == want, (name, what, gen)
    tools = [{"type": "function", "function": {"name": "f", "description": "é", "parameters": {}}}]
    calls = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "42"}]
    if name in ("lfm2", "qwen3"):
        for messages in (CONVERSATIONS["one turn"], calls):
            want = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            assert render_jinja(spec["jinja"], messages, True, spec["special_tokens"], tools=tools) == want
    if name == "qwen3":  # a template variable of the model's own: passed through, as transformers does
        want = tok.apply_chat_template(CONVERSATIONS["one turn"], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
        assert render_jinja(spec["jinja"], CONVERSATIONS["one turn"], True, spec["special_tokens"],
                            enable_thinking=False) == want


def test_raise_exception_is_an_error_naming_the_template():
    with pytest.raises(EdgeseqError, match="System role not supported"):
        render_jinja(GEMMA_IT, CONVERSATIONS["system"], True, {"bos_token": "<bos>"})


def test_the_sandbox_holds(tmp_path):
    bad = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception):
        render_jinja(bad, [], True)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %")
    with pytest.raises(EdgeseqError, match="t.jinja:1: not a Jinja template"):
        load_template_option(str(tmp_path / "t.jinja"))


def test_named_templates_in_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]}))
    spec = checkpoint_template(str(tmp_path))
    assert spec["jinja"] == CHATML and spec["special_tokens"] == {"bos_token": "<s>", "eos_token": "</s>"}
    assert load_template_option(str(tmp_path / "tokenizer_config.json"))["jinja"] == CHATML
    assert load_template_option("chatml")["jinja"] == CHATML and load_template_option("none") == {}


# -- in bundles and chats ----------------------------------------------------------------------------------
def _bundle_with(byte_mamba, tmp_path, template, version):
    b = tmp_path / "bundle"
    shutil.copytree(byte_mamba.bundle(), b)
    m = json.loads((b / "edgeseq.json").read_text())
    m["chat_template"], m["format_version"] = template, version
    (b / "edgeseq.json").write_text(json.dumps(m))
    return b


def _fed(chat) -> list[str]:
    prompts = []
    gen = chat.session.generate

    def recording(prompt, **kw):
        prompts.append(prompt)
        return gen(prompt, **kw)

    chat.session.generate = recording
    return prompts


def _script(chat, reply: str) -> list[str]:
    """The model replaced by a scripted reply ending on its end token (which is not fed); returns the list
    that collects what each turn feeds."""
    from edgeseq.runtime.session import Stats

    fed = []

    def scripted(prompt, **kw):
        fed.append(prompt)
        chat.session.stats = Stats(stopped_by="end_token")
        yield reply

    chat.session.generate = scripted
    return fed


def test_chat_feeds_only_what_the_template_adds(byte_mamba, tmp_path):
    import edgeseq
    from edgeseq.runtime.chat import Chat

    spec = {"jinja": GEMMA_IT, "special_tokens": {"bos_token": "<bos>"}, "source": "tokenizer_config.json"}
    b = _bundle_with(byte_mamba, tmp_path, spec, 2)
    c = Chat(edgeseq.load(b), max_tokens=3, temperature=0)
    fed = _fed(c)
    first = "".join(c.handle("Hi"))
    "".join(c.handle("Again"))
    assert fed[0] == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    # the reply ended at max_tokens: its closing comes first, then the new turn, nothing fed twice
    assert fed[1] == "<end_of_turn>\n<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n"
    assert c.messages[1] == {"role": "assistant", "content": first}
    assert c.consumed == render_jinja(GEMMA_IT, c.messages, False, {"bos_token": "<bos>"})[:len(c.consumed)]


def test_an_old_bundle_with_a_plain_template_still_chats(byte_mamba, tmp_path):
    import edgeseq
    from edgeseq.chat_template import WORLD
    from edgeseq.runtime.chat import Chat

    b = _bundle_with(byte_mamba, tmp_path, WORLD, 1)
    c = Chat(edgeseq.load(b), system="Be kind.", max_tokens=3, temperature=0)
    fed = _fed(c)
    "".join(c.handle("Hi"))
    assert fed[0] == "System: Be kind.\n\nUser: Hi\n\nAssistant:"
    assert c.mode == "chat template plain"


def test_gguf_to_bundle_keeps_the_template(byte_mamba, tmp_path):
    from edgeseq.bundle import read_manifest
    from edgeseq.exporters.gguf_writer import export_gguf
    from edgeseq.gguf_bundle import gguf_to_bundle

    plain = tmp_path / "plain.gguf"
    export_gguf(str(byte_mamba.ckpt), str(plain), quant="f32")
    with_t = tmp_path / "chat.gguf"
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(plain), str(with_t),
                        "--chat-template", GEMMA_IT, "--force"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    gguf_to_bundle(str(with_t), str(tmp_path / "b"))
    m = read_manifest(str(tmp_path / "b"))
    assert m["format_version"] == 2 and m["chat_template"]["jinja"] == GEMMA_IT
    assert m["chat_template"]["source"] == "GGUF tokenizer.chat_template"
    t = from_spec(m["chat_template"])
    assert "<end_of_turn>" in t.stop


def test_a_template_that_drops_old_thinking_feeds_only_the_new_turn(byte_mamba, tmp_path):
    """Qwen3's template renders an earlier reply without its <think> section: the state already saw it,
    so the next turn feeds the reply's closing and the new user turn only (never the reply again)."""
    import edgeseq
    from edgeseq.runtime.chat import Chat

    b = _bundle_with(byte_mamba, tmp_path, {"jinja": QWEN3, "special_tokens": {}, "source": "qwen3"}, 2)
    c = Chat(edgeseq.load(b), max_tokens=3, temperature=0)
    fed = _script(c, "<think>\nhm\n</think>\n\n4")
    "".join(c.handle("2+2?"))
    "".join(c.handle("and 3+3?"))
    assert fed == ["<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
                   "<|im_end|>\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n"]


# -- published templates kept as data (tests/data/chat_templates/README.md says where each came from) --------
DATA = pathlib.Path(__file__).parent / "data" / "chat_templates"
PUBLISHED = {  # file: (bos, eos) as the model's tokenizer_config.json names them
    "qwen3.5.jinja": ("<|endoftext|>", "<|im_end|>"),
    "granite-4.0-h.jinja": ("<|end_of_text|>", "<|end_of_text|>"),
    "rwkv7-g1.jinja": ("<|rwkv_tokenizer_end_of_text|>", "<|rwkv_tokenizer_end_of_text|>"),
    "falcon-h1-tiny.jinja": ("<|begin_of_text|>", "<|end_of_text|>"),
}
TOOLS = [{"type": "function", "function": {"name": "f", "description": "é", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}}}}]
# what each template special-cases, beyond system prompts, several turns and the generation prompt
SPECIAL_CASES = {
    "qwen3.5.jinja": [
        ({}, CONVERSATIONS["thinking"]),  # an earlier reply's <think> is dropped, the last one's kept
        ({"enable_thinking": True}, CONVERSATIONS["one turn"]),
        ({"enable_thinking": False}, CONVERSATIONS["one turn"]),
        ({}, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"}]),
        ({}, [{"role": "system", "content": "s"}]),  # no user turn: the template refuses
        ({}, [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]),  # refused too
        ({"tools": TOOLS}, [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"type": "function", "function": {"name": "f", "arguments": {"x": [1, 2]}}}]},
                            {"role": "tool", "content": "3"}]),
    ],
    "granite-4.0-h.jinja": [
        ({}, CONVERSATIONS["one turn"]),  # no system message: the default one is written
        ({"documents": [{"doc_id": 1, "title": "t", "text": "ünï"}]}, CONVERSATIONS["system"]),
        ({"tools": TOOLS}, CONVERSATIONS["one turn"]),
        ({"tools": TOOLS, "documents": [{"text": "d"}]}, CONVERSATIONS["system"]),
    ],
    "rwkv7-g1.jinja": [
        ({"enable_thinking": False}, CONVERSATIONS["three turns"]),
        ({"enable_thinking": True}, CONVERSATIONS["system"]),
        ({}, [{"role": "user", "content": "a\n\nb"}]),  # the template leaves a blank line in a message as it is
    ],
    "falcon-h1-tiny.jinja": [
        ({"tools": TOOLS}, CONVERSATIONS["system"]),
        ({"tools": TOOLS}, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}, {"role": "tool", "content": "2"}]),
    ],
}


def _published(name):
    text = (DATA / name).read_text(encoding="utf-8")
    bos, eos = PUBLISHED[name]
    return text, bos, eos


def _same_as_transformers(tok, spec, messages, gen, **kw):
    """Both render the same text, or both refuse (edgeseq's error carries the template's message)."""
    try:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
    except Exception as e:
        with pytest.raises(EdgeseqError, match="chat template: ") as ours:
            render_jinja(spec["jinja"], messages, gen, spec["special_tokens"], **kw)
        assert str(e) in str(ours.value)
        return None
    got = render_jinja(spec["jinja"], messages, gen, spec["special_tokens"], **kw)
    assert got == want, (messages, gen, kw)
    return want


def test_published_templates_are_the_files_the_readme_names():
    assert sorted(p.name for p in DATA.glob("*.jinja")) == sorted(PUBLISHED)
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for name in PUBLISHED:
        assert f"`{name}`" in readme
    # the two whose length and sha256 prefix the source printed
    import hashlib
    for name, n, sha in (("qwen3.5.jinja", 7816, "7f0e529032c25183"), ("granite-4.0-h.jinja", 6418, "9524df67b77a7b25")):
        text = (DATA / name).read_text(encoding="utf-8")
        assert (len(text), hashlib.sha256(text.encode()).hexdigest()[:16]) == (n, sha)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_template_renders_as_transformers_does(name, tmp_path):
    import transformers  # noqa: F401

    text, bos, eos = _published(name)
    tok = hf_tokenizer(text, bos, eos)
    tok.save_pretrained(tmp_path)  # as a checkpoint folder holds it: what `edgeseq export` reads
    spec = checkpoint_template(str(tmp_path))
    assert spec["jinja"] == text and spec["special_tokens"]["bos_token"] == bos
    rendered = 0
    for what, messages in CONVERSATIONS.items():
        for gen in (True, False):
            rendered += _same_as_transformers(tok, spec, messages, gen) is not None
    for kw, messages in SPECIAL_CASES[name]:
        for gen in (True, False):
            rendered += _same_as_transformers(tok, spec, messages, gen, **kw) is not None
    assert rendered >= 8  # most conversations render (a refusal is checked too, but is not the point)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_chat_with_a_published_template_feeds_what_transformers_renders(name, byte_mamba, tmp_path):
    """Two turns through Chat: the first feed is transformers' rendering of the first turn; the second is
    what transformers' rendering of the whole conversation holds after the first reply (its closing and the
    new turn), so the state has seen exactly the conversation, the reply as the model said it."""
    import edgeseq
    from edgeseq.runtime.chat import Chat

    text, bos, eos = _published(name)
    tok = hf_tokenizer(text, bos, eos)
    b = _bundle_with(byte_mamba, tmp_path, {"jinja": text, "special_tokens": {"bos_token": bos, "eos_token": eos},
                                            "source": name}, 2)
    c = Chat(edgeseq.load(b), system="Be brief.", max_tokens=3, temperature=0)
    fed = _script(c, "Four.")
    "".join(c.handle("2+2?"))
    "".join(c.handle("and 3+3?"))
    system = [{"role": "system", "content": "Be brief."}]
    first = [*system, {"role": "user", "content": "2+2?"}]
    assert fed[0] == tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    mark = "\x00reply\x00"
    whole = tok.apply_chat_template([*first, {"role": "assistant", "content": mark},
                                     {"role": "user", "content": "and 3+3?"}],
                                    tokenize=False, add_generation_prompt=True)
    assert fed[1] == whole.split(mark)[1]
    assert c.messages[-1] == {"role": "assistant", "content": "Four."}


def test_llama_cpp_engine_chats_with_the_gguf_template(tmp_path):
    """`--engine llama.cpp` renders the GGUF's tokenizer.chat_template with edgeseq's renderer: the first turn
    fed is transformers' rendering, and the llama.cpp chat feeds and (greedy) says what the ONNX Runtime
    chat of the same file does; a GGUF without a template chats as plain continuation on both engines."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")
    import edgeseq
    from conftest import make_mamba2
    from edgeseq.exporters.gguf_writer import export_gguf
    from edgeseq.runtime.chat import Chat

    ckpt = make_mamba2(tmp_path / "hf", tokenizer_vocab=256)
    plain = tmp_path / "plain.gguf"
    export_gguf(str(ckpt), str(plain))
    with_t = tmp_path / "chat.gguf"
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(plain), str(with_t),
                        "--chat-template", QWEN3, "--force"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    turns = ["Hi there", "and again"]
    said = {}
    for engine in ("llama.cpp", "onnxruntime"):
        c = Chat(edgeseq.load(with_t, engine=engine, threads=1), system="Be brief.", max_tokens=4, temperature=0)
        assert c.template is not None and c.template.spec["jinja"] == QWEN3, engine
        fed = _fed(c)
        said[engine] = ["".join(c.handle(t)) for t in turns], fed
    assert said["llama.cpp"] == said["onnxruntime"]
    tok = hf_tokenizer(QWEN3, "<|endoftext|>", "<|im_end|>")
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": turns[0]}]
    assert said["llama.cpp"][1][0] == tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    # no template in the file: plain continuation, as the ONNX path; --chat-template still applies
    m = edgeseq.load(plain, engine="llama.cpp", threads=1)
    assert Chat(m).template is None and Chat(m).mode.startswith("plain")
    assert Chat(m, template=load_template_option("chatml")).template.spec["jinja"] == CHATML
    # the command line: the banner names the template (stdin is not a terminal: read line by line)
    r = subprocess.run([sys.executable, "-m", "edgeseq", "chat", str(with_t), "--engine", "llama.cpp", "-n", "2",
                        "--temp", "0", "--threads", "1"], input="Hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "chat template GGUF tokenizer.chat_template" in r.stderr and "Traceback" not in r.stderr


def test_template_variables_reach_the_template(byte_mamba, tmp_path):
    """--chat-template-kwargs '{"enable_thinking": true}' (Chat(template_vars=...)): Qwen3.5's generation
    prompt opens a think section, each turn fed as transformers renders the conversation with the variable."""
    import edgeseq
    from edgeseq.runtime.chat import Chat

    text, bos, eos = _published("qwen3.5.jinja")
    tok = hf_tokenizer(text, bos, eos)
    b = _bundle_with(byte_mamba, tmp_path, {"jinja": text, "special_tokens": {}, "source": "qwen3.5"}, 2)
    c = Chat(edgeseq.load(b), template_vars={"enable_thinking": True}, max_tokens=3, temperature=0)
    fed = _script(c, "hm\n</think>\n\n4")
    "".join(c.handle("2+2?"))
    "".join(c.handle("and 3+3?"))
    first = [{"role": "user", "content": "2+2?"}]
    assert fed[0] == tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert fed[0].endswith("<|im_start|>assistant\n<think>\n")
    mark = "\x00reply\x00"
    whole = tok.apply_chat_template([*first, {"role": "assistant", "content": mark},
                                     {"role": "user", "content": "and 3+3?"}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=True)
    assert fed[1] == whole.split(mark)[1] == "<|im_end|>\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    plain = Chat(edgeseq.load(b), max_tokens=3, temperature=0)  # without it: the empty, closed section
    fed = _script(plain, "4")
    "".join(plain.handle("2+2?"))
    assert fed[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
