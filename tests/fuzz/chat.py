"""Fuzz targets for chat templates: Jinja text from a manifest, a GGUF or a checkpoint is untrusted input,
and so are the messages (a server request). A case is one JSON file: {"template": Jinja text,
"special_tokens": {...}, "messages": [...], "add_generation_prompt": true}.

    chat        rendered through safe_io.render_untrusted in chat_template's own environment
    chat-as-is  chat_template.from_spec(...).render(...), the path chat and serve take (it calls
                render_untrusted; its errors are re-raised naming the case, since the file is the fuzzer's)

Mutations: runaway loops (nested ranges, loops over long strings), recursion (a macro calling itself,
100,000 parentheses, 5,000 nested ifs), huge outputs and allocations (`'x' * 10**10`, `center(10**9)`,
`'%999999999d' % 1`, `'{:>999999999}'.format(1)`, a string doubled in a namespace, a macro buffering
gigabytes), sandbox escapes (`cycler.__init__.__globals__.os.system`, `__class__.__mro__`, mutating
`messages`), errors raised on purpose (`raise_exception`, a syntax error, `strftime_now(5)`), each
spliced into the seed template at a random tag; the template cut at every tag and with flipped
characters; the document's JSON types (messages not a list, content null, a role that is a number...).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from fuzz.mutations import Mutation, dumps, json_mutations

PWNED = "/tmp/edgeseq-fuzz-pwned-chat"

# a template that uses what real ones use: a system message, a namespace, loop.last, tojson of tools,
# a macro, raise_exception for a bad role, the generation prompt
SEED_TEMPLATE = """{%- macro render(m) -%}
{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}
{%- endmacro -%}
{{ bos_token }}
{%- set ns = namespace(system=false, turns=0) -%}
{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif -%}
{%- for message in messages -%}
  {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}
    {{ raise_exception('unknown role ' + message['role']) }}
  {%- endif -%}
  {%- if message['role'] == 'system' %}{% set ns.system = true %}{% endif -%}
  {%- set ns.turns = ns.turns + 1 -%}
  {{ render(message) }}
  {%- if loop.last and message['role'] == 'assistant' %}{{ eos_token }}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}
"""

SEED = {"template": SEED_TEMPLATE, "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é ✓ 😀"},
                     {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                     {"role": "user", "content": "2+2?"}],
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}],
        "add_generation_prompt": True}

# (kind, detail, snippet): each must be refused, wherever it is spliced in
HOSTILE = [
    ("hang", "nested ranges", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    ("hang", "nested loops over one range", "{% set x = range(100000) %}{% for i in x %}{% for j in x %}{% endfor %}{% endfor %}"),
    ("hang", "nested loops over a string", "{% set x = 'ab' * 50000 %}{% for i in x %}{% for j in x %}{% endfor %}{% endfor %}"),
    ("recursion", "a macro calling itself", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"),
    ("recursion", "100,000 parentheses", "{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}"),
    ("recursion", "5,000 nested ifs", "{% if 1 %}" * 5000 + "{% endif %}" * 5000),
    ("recursion", "a list nested 100,000 deep", "{{ " + "[" * 100_000 + "]" * 100_000 + " }}"),
    ("huge", "'x' * 10**10", "{{ 'x' * 10**10 }}"),
    ("huge", "a list repeated 10**5 times", "{{ (range(100000) | list) * 100000 }}"),
    ("huge", "center(10**9)", "{{ 'x' | center(10**9) }}"),
    ("huge", "indent(10**9)", "{{ 'x\\ny' | indent(10**9) }}"),
    ("huge", "'%999999999d' % 1", "{{ '%999999999d' % 1 }}"),
    ("huge", "'%*d' % (10**9, 1)", "{{ '%*d' % (10**9, 1) }}"),
    ("huge", "'{:>999999999}'.format(1)", "{{ '{:>999999999}'.format(1) }}"),
    ("huge", "'x'.ljust(10**9)", "{{ 'x'.ljust(10**9) }}"),
    ("huge", "a string doubled 60 times", "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
    ("huge", "10 GB of output", "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"),
    ("huge", "a macro buffering 10 GB", "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}{% endmacro %}{{ m() | length }}"),
    ("huge", "10 ** 10 ** 10", "{{ 10 ** (10 ** 10) }}"),
    ("sandbox", "cycler's globals: os.system", "{{ cycler.__init__.__globals__.os.system('touch " + PWNED + "') }}"),
    ("sandbox", "__class__.__mro__", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("sandbox", "messages.append", "{% set x = messages.append(1) %}"),
    ("sandbox", "a format string reading attributes", "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}"),
    ("types", "raise_exception", "{{ raise_exception('refused on purpose') }}"),
    ("types", "a syntax error", "{% for %}"),
    ("types", "an unclosed tag", "{{ messages"),
    ("types", "strftime_now(5)", "{{ strftime_now(5) }}"),
    ("types", "tojson of a function", "{{ raise_exception | tojson }}"),
    ("types", "an unknown filter", "{{ 1 | nope }}"),
    ("types", "1 / 0", "{{ 1 / 0 }}"),
]
# harmless: a sandbox that holds renders these as empty text or as data
HARMLESS = [
    ("sandbox", "self's context", "{{ self._TemplateReference__context }}"),
    ("sandbox", "lipsum's globals", "{{ lipsum.__globals__ }}"),
    ("types", "an undefined name", "{{ nothing_here }}"),
    ("huge", "range(10**9) (the sandbox refuses it)", "{{ range(10**9) | length }}"),
]


def _read(c: Path):
    return json.loads(c.read_text())


def _write(c: Path, doc) -> None:
    c.write_bytes(dumps(doc))


def _tag_starts(text: str) -> list[int]:
    return [i for i in range(len(text) - 1) if text[i] == "{" and text[i + 1] in "{%#"] + [len(text)]


def chat_mutations(file, seed: Path, rng: random.Random, n: int) -> list[Mutation]:
    doc = _read(seed)
    text = doc["template"]
    tags = _tag_starts(text)

    def splice(snippet, at):
        def apply(c):
            d = _read(file(c))
            d["template"] = d["template"][:at] + snippet + d["template"][at:]
            _write(file(c), d)
        return apply

    def template(value):
        def apply(c):
            d = _read(file(c))
            d["template"] = value
            _write(file(c), d)
        return apply

    top = [0, len(text)]  # before the macro or after the last tag: run whatever the messages are
    out = [Mutation(k, f"{d} at {at}", True, splice(s, at)) for k, d, s in HOSTILE for at in [rng.choice(top)]]
    # inside the template, a snippet may land in a branch that never runs: refused or not, never a traceback
    out += [Mutation(k, f"{d} at {at}", False, splice(s, at)) for k, d, s in HOSTILE + HARMLESS
            for at in [rng.choice(tags)]]
    out += [Mutation("types", "the template is a number", True, template(5)),
            Mutation("types", "the template is a list", True, template([text])),
            Mutation("huge", "a 2 MB template", True, template("x" * (2 << 20)))]
    for at in rng.sample(tags, min(6, len(tags))):  # cut at a tag (may be valid) or inside one
        out.append(Mutation("truncate", f"template cut at {at}", False, template(text[:at])))
        out.append(Mutation("truncate", f"template cut at {at + 2}", False, template(text[:at + 2])))
    for _ in range(6):
        i = rng.randrange(len(text))
        ch = chr(rng.choice([ord("{"), ord("}"), ord("%"), ord("("), ord("'"), 0, 0x202E, 0xD800]))
        out.append(Mutation("flip", f"template[{i}] = {ch!r}", False, template(text[:i] + ch + text[i + 1:])))
    def field(path, value):
        def apply(c):
            doc = _read(file(c))
            *head, last = path
            d = doc
            for k in head:
                d = d[k]
            d[last] = value
            _write(file(c), doc)
        return apply
    # messages and tokens of the wrong type: a template may render them or fail, never a traceback
    edits = [(("messages",), None), (("messages",), "hi"), (("messages",), {"role": "user"}),
             (("messages", 1, "content"), None), (("messages", 1, "content"), 5), (("messages", 1, "role"), 7),
             (("messages", 1), "user"), (("messages", 2, "content"), [{"text": None}]),
             (("messages", 2, "content"), [[[[1]]]]), (("special_tokens", "bos_token"), {"a": 1}),
             (("add_generation_prompt",), "no"), (("tools",), [{"a": float("inf")}]),
             (("messages", 1, "content"), "é" * (1 << 20)), (("messages", 1, "role"), "root"),
             (("messages",), [{"role": "user", "content": "x"}] * 20_000)]
    out += [Mutation("types", f"{'.'.join(map(str, p))} = {v!r}"[:80], False, field(p, v)) for p, v in edits]
    out += [m for m in json_mutations(lambda c: _read(file(c)), lambda c, d: _write(file(c), d), doc, rng,
                                      max(0, n - len(out)))]
    return out


def _case(case: Path):
    from edgeseq import safe_io
    from edgeseq.errors import EdgeseqError

    doc = safe_io.load_json_file(str(case), "chat case")
    if not isinstance(doc, dict):
        raise EdgeseqError(f"{case}: a chat case is an object")
    special = doc.get("special_tokens") if isinstance(doc.get("special_tokens"), dict) else {}
    return doc.get("template"), doc.get("messages"), special, doc.get("tools"), doc.get("add_generation_prompt", True)


def _sandbox_held(case: Path) -> None:
    import os

    if os.path.exists(PWNED):
        os.remove(PWNED)
        raise AssertionError(f"{case}: the template ran a command outside the sandbox")


def _run_chat(case: Path, out, seeds) -> None:
    from edgeseq import safe_io
    from edgeseq.chat_template import _environment

    template, messages, special, tools, agp = _case(case)
    ctx = dict(messages=messages, tools=tools, documents=None, add_generation_prompt=agp, **special)
    try:
        safe_io.render_untrusted(_environment(), template, ctx, str(case))
    finally:
        _sandbox_held(case)


def _run_chat_as_is(case: Path, out, seeds) -> None:
    from edgeseq.chat_template import from_spec
    from edgeseq.errors import EdgeseqError

    template, messages, special, tools, agp = _case(case)
    try:
        t = from_spec({"jinja": template, "special_tokens": special})
        if t is not None:
            t.render(messages, agp)
    except EdgeseqError as e:
        raise EdgeseqError(f"{case}: {e}") from None
    finally:
        _sandbox_held(case)


def chat_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dumps(SEED))
