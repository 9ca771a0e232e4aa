"""Chat templates: the checkpoint's own Jinja template, rendered the way transformers renders it.

transformers (`PreTrainedTokenizerBase.apply_chat_template`, utils/chat_template_utils.py) compiles the
template in jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols
extension and a `{% generation %}` tag, the filter `tojson` (ensure_ascii off) and the globals
`raise_exception` and `strftime_now`, and renders it with `messages`, `tools`, `documents`,
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as strings.
edgeseq does the same, so the text fed to the model is the text transformers would tokenize.

Where a template comes from: a checkpoint folder's `chat_template.jinja`, `chat_template.json` or
`tokenizer_config.json` ("chat_template": a string, or a list of named templates: "default" is used), a
GGUF's `tokenizer.chat_template`, or `--chat-template FILE|NAME`. The bundle manifest carries it
verbatim (format_version 2): {"jinja": TEXT, "special_tokens": {"bos_token": "<s>", ...}, "source": ...}
so that other languages render it with their Jinja ports (JavaScript: @huggingface/jinja). Older
bundles' plain-string templates ({"system", "turn", "stop", "stop_token_ids"}, RWKV World) still chat.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

from edgeseq.errors import EdgeseqError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# end-of-turn markers: a template that writes one ends a reply there (as a token id where it is one)
END_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
               "<|return|>", "<|end_of_role|>")
WORLD = {"system": "System: {system}\n\n", "turn": "User: {user}\n\nAssistant:{assistant}\n\n",
         "stop": ["\n\n"], "stop_token_ids": [261]}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
NAMES = {"chatml": {"jinja": CHATML, "special_tokens": {}, "source": "edgeseq: chatml"},
         "rwkv-world": WORLD, "none": None}


# -- rendering ---------------------------------------------------------------------------------------
def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' {% generation %} ... {% endgeneration %}: marks the assistant's text; renders it."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_jinja(template: str, messages: list[dict], add_generation_prompt: bool = True,
                 special_tokens: dict | None = None, where: str = "chat template", **kwargs) -> str:
    """The text transformers' apply_chat_template(messages, tokenize=False, ...) gives for `template`.
    The template is untrusted code (a manifest's, a GGUF's, a checkpoint's): it runs bounded in time,
    memory and output (safe_io.render_untrusted), and whatever goes wrong is one error naming `where`."""
    from edgeseq import safe_io

    context = {"messages": messages, "tools": kwargs.pop("tools", None), "documents": kwargs.pop("documents", None),
               "add_generation_prompt": add_generation_prompt, **(special_tokens or {}), **kwargs}
    return safe_io.render_untrusted(_environment(), template, context, where)


class Template:
    """A renderer for Chat: render(messages, add_generation_prompt) -> text, plus where replies end."""

    def __init__(self, spec: dict, name: str = "jinja"):
        self.spec = spec
        self.name = name
        self.stop: list[str] = []
        self.stop_token_ids: list[int] = []
        if "jinja" in spec:
            if not isinstance(spec["jinja"], str):
                raise EdgeseqError(f"{spec.get('source', name)}: the chat template is "
                                   f"{type(spec['jinja']).__name__}, expected text")
            self.stop = [m for m in END_MARKERS if m in spec["jinja"]]
        else:
            self.stop = list(spec.get("stop") or [])
            self.stop_token_ids = [int(t) for t in spec.get("stop_token_ids") or []]

    def bind(self, tokenizer) -> "Template":
        """End markers that are single tokens also end a reply as tokens (they may decode to nothing)."""
        for m in self.stop:
            try:
                ids = tokenizer.encode(m)
            except Exception:  # a tokenizer that cannot encode the marker: the stop string still works
                continue
            if len(ids) == 1 and ids[0] not in self.stop_token_ids:
                self.stop_token_ids.append(ids[0])
        return self

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """variables: the template's own (enable_thinking, tools, ...); a plain-string template has none."""
        if "jinja" in self.spec:
            return render_jinja(self.spec["jinja"], messages, add_generation_prompt, self.spec.get("special_tokens"),
                                where=str(self.spec.get("source") or self.name), **variables)
        return _render_plain(self.spec, messages, add_generation_prompt)


def _render_plain(t: dict, messages: list[dict], add_generation_prompt: bool) -> str:
    """A plain-string template ({system}, {user}, {assistant} slots), as a whole conversation."""
    before, _, after = t["turn"].partition("{assistant}")
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(t.get("system", "{system}\n\n").replace("{system}", m["content"]))
        elif m["role"] == "user":
            out.append(before.replace("{user}", m["content"]))
        else:
            out.append(m["content"] + after)
    return "".join(out)  # the user's part ends with the assistant's header either way


def for_model(manifest: dict, tokenizer=None) -> Template | None:
    spec = manifest.get("chat_template")
    return from_spec(spec, tokenizer)


def from_spec(spec, tokenizer=None) -> Template | None:
    if not spec:
        return None
    if isinstance(spec, str):  # a name (a GGUF's "rwkv-world") or Jinja text
        spec = NAMES[spec] if spec in NAMES else {"jinja": spec, "special_tokens": {}}
        if spec is None:
            return None
    name = "plain" if "turn" in spec else os.path.basename(str(spec.get("source") or "jinja"))
    t = Template(spec, name)
    return t.bind(tokenizer) if tokenizer is not None else t


def describe(spec) -> str:
    if not spec:
        return "none (plain continuation)"
    if isinstance(spec, dict) and "jinja" in spec:
        return f"Jinja, {len(spec['jinja'])} characters, from {spec.get('source') or 'the checkpoint'}"
    return "plain-string template (RWKV World style)"


# -- where templates come from -------------------------------------------------------------------------
def _token_text(v) -> str | None:
    if isinstance(v, dict):  # {"content": "<s>", "lstrip": ...} (an AddedToken in tokenizer_config.json)
        v = v.get("content")
    return v if isinstance(v, str) else None


def checkpoint_template(path: str) -> dict | None:
    """The Jinja template of a checkpoint folder (or of the folder beside a .pth/.bin), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise EdgeseqError(f"{cfg_path}: cannot read ({e})") from None
        if not isinstance(cfg, dict):
            raise EdgeseqError(f"{cfg_path}: not a JSON object")
    text, source = None, None
    jinja_file = os.path.join(folder, "chat_template.jinja")
    json_file = os.path.join(folder, "chat_template.json")
    if os.path.isfile(jinja_file):  # transformers >= 4.43 saves it on its own; it wins over the config
        with open(jinja_file, encoding="utf-8") as f:
            text, source = f.read(), "chat_template.jinja"
    elif os.path.isfile(json_file):
        with open(json_file, encoding="utf-8") as f:
            text, source = json.load(f).get("chat_template"), "chat_template.json"
    elif cfg.get("chat_template"):
        text, source = cfg["chat_template"], "tokenizer_config.json"
    if isinstance(text, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default") or next(iter(named.values()), None)
    if not isinstance(text, str) or not text:
        return None
    special = {k: _token_text(cfg.get(k)) for k in SPECIAL_KEYS if _token_text(cfg.get(k)) is not None}
    return {"jinja": text, "special_tokens": special, "source": source}


def gguf_template(g, tokens: list[str] | None = None) -> dict | str | None:
    """A GGUF's tokenizer.chat_template with its special tokens' texts (from tokenizer.ggml.tokens)."""
    text = g.get("tokenizer.chat_template") if hasattr(g, "get") else None
    if not isinstance(text, str) or not text:
        return None
    if text in NAMES:
        return NAMES[text]
    special = {}
    for key, meta in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                      ("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id")):
        i = g.get(meta)
        if tokens is not None and isinstance(i, int) and 0 <= i < len(tokens):
            special[key] = tokens[i]
    return {"jinja": text, "special_tokens": special, "source": "GGUF tokenizer.chat_template"}


def load_template_option(value: str):
    """--chat-template FILE|NAME: a Jinja file (or a tokenizer_config.json / chat_template.json holding
    one), or a name: chatml, rwkv-world, none (plain continuation). Returns a manifest spec ("none": {})."""
    if value in NAMES:
        return NAMES[value] if NAMES[value] is not None else {}
    if not os.path.isfile(value):
        raise EdgeseqError(f"--chat-template {value}: no such file, and not a name ({', '.join(NAMES)})")
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeseqError(f"--chat-template {value}: cannot read ({e})") from None
    special = {}
    if value.endswith(".json"):
        try:
            cfg = json.loads(text)
        except ValueError as e:
            raise EdgeseqError(f"--chat-template {value}: not JSON ({e})") from None
        text = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(text, list):
            text = {t.get("name"): t.get("template") for t in text}.get("default")
        if not isinstance(text, str):
            raise EdgeseqError(f"--chat-template {value}: holds no chat_template")
        special = {k: _token_text(cfg.get(k)) for k in SPECIAL_KEYS if _token_text(cfg.get(k)) is not None}
    import jinja2

    try:
        _environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise EdgeseqError(f"--chat-template {value}:{e.lineno}: not a Jinja template ({e.message})") from None
    return {"jinja": text, "special_tokens": special, "source": os.path.basename(value)}
