"""`edgeseq chat` through a real pseudo-terminal (pexpect): line editing and history, Ctrl-C mid-reply
keeps the session, /save and /load (and their errors), multi-line input, Ctrl-C and Ctrl-D to end."""
from __future__ import annotations

import os
import re
import sys
import time

import pytest

import pexpect

LEFT, UP, CTRL_C, CTRL_D = "\x1b[D", "\x1b[A", "\x03", "\x04"
STATS = re.compile(rb"\[(\d+) tok, [\d.]+ tok/s \| prompt (\d+) tok.*?position (\d+).*?\]( \[stopped\])?")


def default_sigint():
    """In the child: Ctrl-C's default. A shell that starts a job in the background (`make test &`) makes
    it ignore SIGINT, and the programs it runs inherit that; the tests press Ctrl-C on purpose."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(bundle, tmp_path, *args):
    env = {**os.environ, "EDGESEQ_MODEL": "", "EDGESEQ_CACHE": str(tmp_path / "cache"), "TERM": "xterm",
           "NO_COLOR": "1"}
    # greedy decoding of a random model never reaches its end token: -n -1 replies until Ctrl-C
    return pexpect.spawn(sys.executable, ["-m", "edgeseq", "chat", str(bundle), "--temp", "0", *args], env=env,
                         timeout=60, dimensions=(40, 200), cwd=str(tmp_path), preexec_fn=default_sigint)


def settle():
    """Let readline take the terminal over after it prints the prompt: keys typed before that arrive in
    the terminal's cooked mode, which no user types fast enough to meet."""
    time.sleep(0.2)


def stopped_reply(p, last_line: bytes):
    p.expect_exact(last_line + b"\r\n")  # readline's echo of the last input line
    p.expect(rb"\S")  # the reply streams
    p.sendintr()
    p.expect(STATS)
    m = p.match
    assert m.group(4), "the reply should be marked [stopped]"
    p.expect_exact(b"> ")
    return m


def test_chat_in_a_terminal(byte_mamba, tmp_path):
    p = spawn(byte_mamba.bundle(), tmp_path, "-n", "-1")
    p.expect_exact(b"/help for commands")
    p.expect_exact(b"> ")
    # editing: the cursor moves left and a character goes in the middle
    p.send(f"/save ab{LEFT}X\r")
    p.expect(rb"\[saved state at position 0 to aXb\]")
    p.expect_exact(b"> ")
    # history: the last line comes back with the up arrow, and can be edited
    p.send(f"{UP}\x7fc\r")
    p.expect(rb"\[saved state at position 0 to aXc\]")
    assert (tmp_path / "aXb").is_file() and (tmp_path / "aXc").is_file()
    # Ctrl-C mid-reply stops only the reply; the conversation and the program go on
    p.expect_exact(b"> ")
    p.send("Hello\r")
    m = stopped_reply(p, b"Hello")
    first = int(m.group(3))
    assert int(m.group(2)) == 5 and first > 5
    p.send("/save s1\r")
    p.expect(rb"\[saved state at position (\d+) to s1\]")
    assert int(p.match.group(1)) == first  # nothing lost, nothing extra
    p.expect_exact(b"> ")
    # a multi-line block is one turn (one prompt of 1 + 7 tokens: a newline, then "one\ntwo")
    p.send('"""\rone\rtwo"""\r')
    m = stopped_reply(p, b'two"""')
    assert int(m.group(2)) == 8
    # a trailing backslash continues the line
    p.send("a\\\rb\r")
    m = stopped_reply(p, b". b")
    assert int(m.group(2)) == 4
    # errors are error: lines, the state stays
    p.send("/save /nonexistent/dir/x.state\r")
    p.expect(rb"error: /nonexistent/dir/x.state: cannot (save|write)")
    p.expect_exact(b"> ")
    p.send("/load missing.state\r")
    p.expect(rb"error: missing.state")
    p.expect_exact(b"> ")
    p.send("/load s1\r")
    p.expect(rb"\[loaded state at position (\d+) from s1\]")
    assert int(p.match.group(1)) == first
    p.expect_exact(b"> ")
    p.send("/help\r")
    p.expect_exact(b"/reset")
    # Ctrl-C with text typed clears the line (the chat goes on); Ctrl-D at the prompt ends it
    p.expect_exact(b"> ")
    settle()
    p.send("some text")
    settle()
    p.sendcontrol("c")
    p.expect_exact(b"> ")
    p.send("/save s2\r")
    p.expect(rb"\[saved state at position (\d+) to s2\]")
    assert int(p.match.group(1)) == first  # /load put the state back
    p.expect_exact(b"> ")
    settle()
    p.send(CTRL_D)
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0, p.before
    assert (tmp_path / "cache" / "chat_history").is_file()  # history is kept for the next chat


def test_ctrl_c_at_an_empty_prompt_ends_cleanly(byte_mamba, tmp_path):
    p = spawn(byte_mamba.bundle(), tmp_path)
    p.expect_exact(b"> ")
    settle()
    p.sendintr()
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0 and b"Traceback" not in p.before
    assert p.before.endswith(b"\r\n")


# -- what the terminal shows, without a terminal ------------------------------------------------------------
def test_think_sections_dimmed_or_hidden():
    from edgeseq.cli_chat import DIM, RESET, _ThinkFilter

    pieces = ["Sure. <th", "ink>let me", " see</thi", "nk> 42"]
    shown = _ThinkFilter(show=True, color=False)
    assert "".join(shown.feed(p) for p in pieces) + shown.flush() == "Sure. <think>let me see</think> 42"
    hidden = _ThinkFilter(show=False, color=False)
    assert "".join(hidden.feed(p) for p in pieces) + hidden.flush() == "Sure.  42"
    dim = _ThinkFilter(show=True, color=True)
    out = "".join(dim.feed(p) for p in pieces) + dim.flush()
    assert out.startswith("Sure. ") and DIM in out and out.endswith(RESET + " 42")


def test_a_full_context_stops_the_reply_and_keeps_the_chat(byte_mamba, capsys):
    """A full-attention model's KV ring full (here: a ring of 12 tokens on the byte Mamba): an error line
    naming the ways on, the conversation kept, /reset starting over."""
    import edgeseq
    from edgeseq.cli_chat import _one
    from edgeseq.runtime.chat import Chat

    m = edgeseq.load(byte_mamba.bundle())
    m.max_context = 12
    c = Chat(m, max_tokens=-1, temperature=0)
    _one(c, "Hello", show_think=True, color=False, interactive=False)
    err = capsys.readouterr().err
    assert "error: context full: 12 tokens" in err and "/reset" in err and "--on-full slide" in err
    assert c.session.position == 12 and not c.done
    _one(c, "/reset", show_think=True, color=False, interactive=False)
    assert c.session.position == 0


def test_ctrl_c_stops_run_with_its_speed_line(byte_mamba):
    """`run -n -1` decodes until Ctrl-C, which ends it as llama.cpp does: the text so far, the speed
    line marked interrupted, exit status 130, no traceback."""
    import signal
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "edgeseq", "run", str(byte_mamba.bundle()), "-p", "Hi", "-n", "-1",
                          "--temp", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "EDGESEQ_MODEL": ""}, preexec_fn=default_sigint)
    assert p.stdout.read(4).startswith(b"Hi")  # the reply streams
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and b"| interrupted]" in err and b"Traceback" not in err, err


def test_a_reply_inside_a_think_section_the_prompt_opened(byte_mamba, capsys, tmp_path):
    """RWKV-7 G1's published template ends its generation prompt with `Assistant: <think`: the reply starts
    inside the thinking, so --hide-think shows only what follows </think>, and --think dims it."""
    import json
    import shutil
    from pathlib import Path

    import edgeseq
    from edgeseq.cli_chat import DIM, RESET, _one
    from edgeseq.runtime.chat import Chat
    from edgeseq.runtime.session import Stats

    b = tmp_path / "bundle"
    shutil.copytree(byte_mamba.bundle(), b)
    m = json.loads((b / "edgeseq.json").read_text())
    g1 = (Path(__file__).parent / "data" / "chat_templates" / "rwkv7-g1.jinja").read_text(encoding="utf-8")
    m.update(format_version=2, chat_template={"jinja": g1, "special_tokens": {}, "source": "rwkv7-g1.jinja"})
    (b / "edgeseq.json").write_text(json.dumps(m))
    c = Chat(edgeseq.load(b), max_tokens=3, temperature=0)

    def scripted(prompt, **kw):
        c.session.stats = Stats(stopped_by="end_token")
        yield from [">\nhm, 2", "+2</th", "ink>\n4"]

    c.session.generate = scripted
    _one(c, "2+2?", show_think=False, color=False, interactive=False)
    assert capsys.readouterr().out == "\n4\n"
    _one(c, "again", show_think=True, color=True, interactive=False)
    out = capsys.readouterr().out
    assert out.startswith(DIM + ">\nhm, 2") and out.endswith(RESET + "\n4\n"), repr(out)
    assert c.consumed.endswith("User: again\n\nAssistant: <think>\nhm, 2+2</think>\n4")  # all of it was fed
