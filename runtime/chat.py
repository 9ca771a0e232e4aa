"""A chat over one session: the state carries across turns, so each turn feeds only its new tokens.

The conversation is a list of messages ({"role", "content"}). A chat template renders it to text
(edgeseq.chat_template: the checkpoint's own Jinja template as transformers renders it, or a bundle's
older plain-string template). A recurrent state cannot be rewound, so each turn feeds the difference
between the rendered conversation and the text the state has already consumed: the previous reply's
closing (e.g. `<|im_end|>\\n`, when the reply ended on the end token, which is not fed), the user's turn
and the assistant header. A template that rewrites earlier turns (some drop old `<think>` sections) is
fed from where the texts part.

Without a template the chat is plain continuation: the user's text continues the document, each turn
after the first on a new line (so the model never sees `shallAnd`); `--system` is fed first, as its
own line.

Commands (handle() returns what to print; errors are EdgeseqError, the state is kept):
/help /? · /bye /exit /quit · /reset · /save FILE · /load FILE. /save also writes FILE.chat.json (the
messages and the text consumed), so /load resumes the conversation as well as the state.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from edgeseq.errors import EdgeseqError

HELP = """commands:
  /help, /?          this list
  /bye, /exit, /quit end the chat (so do Ctrl-D, and Ctrl-C at an empty prompt)
  /reset             forget the conversation (back to the initial state)
  /save FILE         save the state (and FILE.chat.json: the conversation) to resume later
  /load FILE         load a state saved by /save
input:
  a line ending in \\ continues on the next line; \"\"\" starts and ends a block of several lines
  Ctrl-C stops a reply and keeps the conversation"""
QUIT = ("/bye", "/exit", "/quit")


class Chat:
    def __init__(self, model, system: str | None = "", template=None, stop=(), template_vars=None, **sampling):
        """template_vars: the chat template's own variables (e.g. {"enable_thinking": True} for Qwen3.5)."""
        from edgeseq.chat_template import for_model, from_spec

        self.model = model
        self.session = model.session()
        # template: a manifest-style spec from --chat-template ({}: none, plain continuation), else the model's
        self.template = (from_spec(template, model.tokenizer) if template is not None
                         else for_model(model.manifest, model.tokenizer))
        self.system = system or ""
        self.template_vars = dict(template_vars or {})
        self.stop = [s for s in stop if s]
        self.sampling = sampling
        self.done = False
        self.reset_conversation()

    def reset_conversation(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.consumed: str | None = ""  # the text the state has seen (None: unknown, after /load of a bare state)
        self._fed_stop = ""  # the stop string that ended the last reply (fed, not shown)
        self.stopped = False

    @property
    def mode(self) -> str:
        return f"chat template {self.template.name}" if self.template else "plain continuation (no chat template)"

    def banner(self) -> str:
        return (f"edgeseq chat · {self.model.family_name} · {self.mode} · state {self.model.state_bytes / 1024:.0f} "
                f"KiB · /help for commands, /bye to end")

    # -- commands -----------------------------------------------------------------------------------
    def handle(self, line: str) -> Iterator[str]:
        """One input (a line or a block): a command, or a turn whose reply is streamed."""
        text = line.strip()
        if not text:
            return  # an empty line sends nothing (the state is left as it is)
        if text.startswith("/") and "\n" not in text:
            cmd, _, arg = text.partition(" ")
            yield from self._command(cmd.lower(), arg.strip())
            return
        yield from self._turn(line)

    def _command(self, cmd: str, arg: str) -> Iterator[str]:
        if cmd in QUIT:
            self.done = True
            return
        if cmd in ("/help", "/?"):
            yield HELP
            return
        if cmd == "/reset":
            self.session.reset()
            self.reset_conversation()
            yield "[state reset]"
            return
        if cmd in ("/save", "/load"):
            if not arg:
                raise EdgeseqError(f"{cmd} needs a file name")
            path = os.path.expanduser(arg)
            if cmd == "/save":
                self._save(path)
                yield f"[saved state at position {self.session.position} to {path}]"
            else:
                self._load(path)
                yield f"[loaded state at position {self.session.position} from {path}]"
            return
        raise EdgeseqError(f"unknown command {cmd} (/help lists them; to send text starting with /, put a space "
                           f"before it)")

    def _save(self, path: str) -> None:
        try:
            self.session.save_state(path)
            tmp = path + ".chat.json.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"messages": self.messages, "consumed": self.consumed, "mode": self.mode}, f)
            os.replace(tmp, path + ".chat.json")
        except OSError as e:
            raise EdgeseqError(f"{path}: cannot save the state ({e.strerror or e})") from None

    def _load(self, path: str) -> None:
        self.session.load_state(path)  # an EdgeseqError leaves the session as it was
        try:
            with open(path + ".chat.json", encoding="utf-8") as f:
                side = json.load(f)
            self.messages, self.consumed = list(side["messages"]), side["consumed"]
        except (OSError, ValueError, KeyError, TypeError):  # a bare state file: the text history is unknown
            self.messages, self.consumed = [], None

    # -- turns ----------------------------------------------------------------------------------------
    def _turn(self, text: str) -> Iterator[str]:
        s = self.session
        if self.template is None:
            prompt = text
            if s.position > 0 or self.consumed:
                prompt = "\n" + text  # a new line per turn: the model never sees two turns run together
            elif self.system:
                prompt = self.system + "\n" + text
            stops, ends = list(self.stop), None
        else:
            self.messages.append({"role": "user", "content": text})
            target = self.template.render(self.messages, add_generation_prompt=True, **self.template_vars)
            prompt = self._delta(target)
            stops = self.template.stop + self.stop
            ends = self.template.stop_token_ids
        reply = []
        self.stopped = False
        self.consumed = (self.consumed or "") + prompt
        try:
            for piece in s.generate(prompt, stop=stops, stop_token_ids=ends, **self.sampling):
                reply.append(piece)
                yield piece
        finally:  # also when the reply is stopped (Ctrl-C closes this generator): keep what was said
            said = "".join(reply)
            self._fed_stop = s.stats.extra.get("stop", "") if s.stats.stopped_by == "stop_string" else ""
            said_fed = said + self._fed_stop
            self.consumed += said_fed
            if self.template is not None:
                self.messages.append({"role": "assistant", "content": said})

    def _delta(self, target: str) -> str:
        """What to feed so that the state has seen the conversation `target` renders: the rest of it after
        what was consumed. A template that rewrites earlier turns (Qwen3 drops old <think> sections) makes
        the texts part: then what follows the last reply when the reply is rendered as a marker (its
        closing, e.g. `<|im_end|>\\n`, unfed when the reply ended on its end token, and the new turn)."""
        consumed = self.consumed
        if consumed is None:
            return target
        if target.startswith(consumed):
            return target[len(consumed):]
        prev = len(self.messages) - 2
        if prev >= 0 and self.messages[prev]["role"] == "assistant":
            # render the last reply as a marker: what follows it is its closing and the new turn
            mark = "\x00edgeseq-reply\x00"
            marked = [*self.messages[:prev], {**self.messages[prev], "content": mark}, self.messages[-1]]
            text = self.template.render(marked, add_generation_prompt=True, **self.template_vars)
            if text.count(mark) == 1:
                delta = text[text.index(mark) + len(mark):]
                if self._fed_stop and delta.startswith(self._fed_stop):
                    delta = delta[len(self._fed_stop):]  # the reply's stop string was fed already
                return delta
        n = next((i for i, (a, b) in enumerate(zip(consumed, target)) if a != b), min(len(consumed), len(target)))
        return target[n:]  # otherwise: from where the two texts part

    def stats_line(self, rss_mb: float | None = None) -> str:
        st = self.session.stats
        mem = f" | RSS {rss_mb:.0f} MB" if rss_mb else ""
        return (f"[{st.decode_tokens} tok, {st.decode_tps:.1f} tok/s | prompt {st.prompt_tokens} tok, "
                f"{st.prompt_tps:.0f} tok/s | state {self.model.state_bytes / 1024:.0f} KiB at position "
                f"{self.session.position}{mem}]")



