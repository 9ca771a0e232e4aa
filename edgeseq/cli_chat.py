"""`edgeseq chat` at a terminal."""
from __future__ import annotations

import sys

import typer

from edgeseq.errors import EdgeseqError


def repl(model, system=None, template=None, show_think=True, stop=(), sampling=None) -> None:
    from edgeseq.runtime.chat import Chat

    c = Chat(model, system=system or "", **(sampling or {}))
    interactive = sys.stdin.isatty()
    typer.echo(c.banner(), err=True)
    while True:
        if interactive:
            typer.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        try:
            for piece in c.handle(line):
                typer.echo(piece, nl=False)
        except EdgeseqError as e:
            typer.echo(f"error: {e}", err=True)
        if c.done:
            break
        typer.echo("")
