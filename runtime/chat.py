"""A chat over one session: the state carries across turns, so each turn feeds only its new tokens.

A bundle's chat template is a set of plain strings (no Jinja), e.g. for RWKV World:

    {"system": "System: {system}\\n\\n", "turn": "User: {user}\\n\\nAssistant:{assistant}\\n\\n",
     "stop": ["\\n\\n"], "stop_token_ids": [261]}

The part of `turn` before {assistant} is fed as the prompt; the reply is generated until a stop
string or end token; the part after {assistant} closes the turn (unless the stop string already did).
Without a template, chat is plain continuation of what the user types.
"""
from __future__ import annotations

import os
from typing import Iterator

from edgeseq.errors import EdgeseqError


class Chat:
    def __init__(self, model, system: str = "", **sampling):
        self.model = model
        self.session = model.session()
        self.template = model.manifest.get("chat_template") or None
        self.system = system
        self.sampling = sampling
        self.done = False
        self._started = False

    def banner(self) -> str:
        mode = "chat template" if self.template else "plain continuation (no chat template)"
        return (f"edgeseq chat · {self.model.family_name} · {mode} · state {self.model.state_bytes / 1024:.0f} KiB"
                f" · /reset /save FILE /load FILE /quit")

    def handle(self, line: str) -> Iterator[str]:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "/quit" or cmd == "/exit":
            self.done = True
            return
        if cmd == "/reset":
            self.session.reset()
            self._started = False
            yield "[state reset]"
            return
        if cmd in ("/save", "/load"):
            if not arg.strip():
                raise EdgeseqError(f"{cmd} needs a file name")
            path = os.path.expanduser(arg.strip())
            if cmd == "/save":
                self.session.save_state(path)
                yield f"[saved state at position {self.session.position} to {path}]"
            else:
                self.session.load_state(path)
                self._started = True
                yield f"[loaded state at position {self.session.position} from {path}]"
            return
        yield from self._turn(line)

    def _turn(self, text: str) -> Iterator[str]:
        s, t = self.session, self.template
        if not t:
            yield from s.generate(text, **self.sampling)
            self._started = True
            return
        prompt = ""
        if not self._started and self.system and t.get("system"):
            prompt += t["system"].replace("{system}", self.system)
        before, _, after = t["turn"].partition("{assistant}")
        prompt += before.replace("{user}", text)
        stops = list(t.get("stop") or [])
        yield from s.generate(prompt, stop=stops, stop_token_ids=t.get("stop_token_ids"), **self.sampling)
        self._started = True
        if after and s.stats.stopped_by != "stop_string":
            s.prefill(self.model.tokenizer.encode(after))
