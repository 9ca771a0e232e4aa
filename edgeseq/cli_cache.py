"""`edgeseq cache`: what the cache folder holds (demo bundles, converted GGUFs, exported checkpoints)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="List, remove or cap what the cache folder holds.")


@app.command("list")
def list_():
    """List the cached bundles."""
