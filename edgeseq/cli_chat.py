"""`edgeseq chat` at a terminal: line editing and history (the stdlib's readline), multi-line input,
Ctrl-C that stops only the current reply, and a speed/memory line after each reply.

Input conventions, as llama.cpp's and Ollama's users know them: a line ending in `\\` continues on the
next line (llama.cpp); a line starting with `\"\"\"` opens a block that a line ending with `\"\"\"` closes
(Ollama). Ctrl-C while a reply streams stops that reply (the conversation and state keep what was said);
Ctrl-C at an empty prompt, Ctrl-D, /bye, /exit and /quit end the chat with a newline. A second Ctrl-C
during the same reply ends the program, for a prefill that takes too long to wait for.

Reasoning models' `<think> … </think>` sections are shown dimmed on a terminal (--think, the default) or
left out of the display (--hide-think); either way they stay in the conversation the state has seen. A
template whose generation prompt opens the section (Qwen3.5 with enable_thinking writes `<think>\n`,
RWKV-7 G1 `Assistant: <think`) starts the reply inside it.
Input that is not a terminal (a pipe, a file) is read line by line with no prompt.
"""
from __future__ import annotations

import os
import signal
import sys

import typer

from edgeseq.cli_args import peak_rss_mb
from edgeseq.errors import EdgeseqError

PROMPT, MORE = "> ", ". "
DIM, RESET = "\x1b[2m", "\x1b[0m"
HISTORY_LINES = 1000


class _Interrupt:
    """SIGINT while a reply streams: the first sets a flag the reply loop checks between pieces (the
    state is never left half-stepped); a second raises KeyboardInterrupt."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


class _ThinkFilter:
    """Splits streamed text at <think> and </think>: the thinking is dimmed, or dropped when hidden."""

    OPEN, CLOSE = "<think>", "</think>"

    @staticmethod
    def opened(fed: str | None) -> bool:
        """Whether the text fed so far leaves a think section open (`<think` with no `</think>` after)."""
        return bool(fed) and fed.rfind("<think") > fed.rfind("</think>")

    def __init__(self, show: bool, color: bool):
        self.show, self.color = show, color
        self.inside = False
        self.buf = ""

    def feed(self, piece: str) -> str:
        self.buf += piece
        out = []
        while True:
            tag = self.CLOSE if self.inside else self.OPEN
            i = self.buf.find(tag)
            if i < 0:
                keep = next((k for k in range(len(tag) - 1, 0, -1) if self.buf.endswith(tag[:k])), 0)
                out.append(self._style(self.buf[:len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep:]
                return "".join(out)
            out.append(self._style(self.buf[:i]))
            out.append(self._style(tag) if self.show else "")
            self.inside = not self.inside
            self.buf = self.buf[i + len(tag):]

    def flush(self) -> str:
        text, self.buf = self._style(self.buf), ""
        return text + (RESET if self.inside and self.color and self.show else "")

    def _style(self, text: str) -> str:
        if not text or not self.inside:
            return text
        if not self.show:
            return ""
        return f"{DIM}{text}{RESET}" if self.color else text


def _history_file() -> str:
    from edgeseq.cache import cache_dir

    return os.path.join(cache_dir(), "chat_history")


def _setup_readline():
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    path = _history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)
    return readline


def _save_history(rl) -> None:
    if rl is None:
        return
    try:
        os.makedirs(os.path.dirname(_history_file()), exist_ok=True)
        rl.write_history_file(_history_file())
    except OSError:
        pass  # no writable cache folder: history is not kept, nothing else changes


def read_input(interactive: bool, rl) -> str | None:
    """One message: a line, lines joined by a trailing \\, or a \"\"\" block. None: end the chat."""
    lines = []
    block = False
    prompt = PROMPT
    while True:
        try:
            if interactive:
                line = input(prompt)
            else:
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
        except EOFError:  # Ctrl-D: end (a pending block or continuation is dropped)
            if interactive:
                sys.stdout.write("\n")
            return None
        except KeyboardInterrupt:  # Ctrl-C: with text typed, start the line over; at an empty prompt, end
            typed = (rl.get_line_buffer() if rl else "") or lines or block
            sys.stdout.write("\n")
            if typed:
                lines, block, prompt = [], False, PROMPT
                continue
            return None
        if block:
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines)
            lines.append(line)
            continue
        if not lines and line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""') and len(rest.rstrip()) >= 3:  # """one line"""
                return rest.rstrip()[:-3]
            block, prompt = True, MORE
            if rest:
                lines.append(rest)
            continue
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = MORE
            continue
        lines.append(line)
        return "\n".join(lines)


def repl(model, system=None, template=None, show_think=True, stop=(), sampling=None, template_vars=None) -> None:
    from edgeseq.runtime.chat import Chat

    c = Chat(model, system=system, template=template, stop=stop, template_vars=template_vars, **(sampling or {}))
    if system and c.template is not None:  # a template that refuses a system turn says so now, not each turn
        try:
            c.template.render(c.messages + [{"role": "user", "content": "."}], add_generation_prompt=True,
                              **c.template_vars)
        except EdgeseqError as e:
            raise EdgeseqError(f"--system: {e}") from None
    interactive = sys.stdin.isatty()
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    rl = _setup_readline() if interactive else None
    typer.echo(c.banner(), err=True)
    if system and c.template is None:
        typer.echo("[no chat template: --system is fed as the first line of the text]", err=True)
    try:
        while not c.done:
            text = read_input(interactive, rl)
            if text is None:
                break
            try:
                _one(c, text, show_think, color, interactive)
            except KeyboardInterrupt:  # a second Ctrl-C, or one before the reply began: back to the prompt
                sys.stdout.write("\n")
                typer.echo("[interrupted]", err=True)
    finally:
        _save_history(rl)


def _one(c, text: str, show_think: bool, color: bool, interactive: bool) -> None:
    think = _ThinkFilter(show_think, color)
    wrote = False
    stopped = False
    turn = text.strip() and not (text.strip().startswith("/") and "\n" not in text.strip())
    try:
        with _Interrupt() as intr:
            gen = c.handle(text)
            first = True
            for piece in gen:
                if first and turn:  # the prompt is fed now: does the reply start inside <think>?
                    think.inside, first = think.opened(c.consumed), False  # (the reply is added at its end)
                out = think.feed(piece) if turn else piece
                if out:
                    sys.stdout.write(out)
                    sys.stdout.flush()
                    wrote = True
                if intr.hit:
                    gen.close()  # stops the reply: the session keeps every token fed so far
                    stopped = True
                    break
    except EdgeseqError as e:
        tail = think.flush()
        sys.stdout.write(tail + ("\n" if wrote else ""))
        sys.stdout.flush()
        hint = " (/reset starts over; --on-full slide keeps going)" if "context full" in str(e) else ""
        typer.echo(f"error: {e}{hint}", err=True)
        return
    tail = think.flush() if turn else ""
    if c.done:
        return
    sys.stdout.write(tail + ("\n" if wrote or turn else ""))
    sys.stdout.flush()
    if turn:
        line = c.stats_line(peak_rss_mb()) + (" [stopped]" if stopped else "")
        typer.echo(f"{DIM}{line}{RESET}" if color else line, err=True)
