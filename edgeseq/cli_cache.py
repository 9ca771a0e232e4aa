"""`edgeseq cache`: what the cache folder holds (demo bundles, converted GGUF files, exported checkpoints),
its size limit, and removal.

    edgeseq cache list                 name, size, last use, source (--json too)
    edgeseq cache rm NAME... | --all   remove entries
    edgeseq cache --max-size 20G       keep the cache under 20 GiB (least recently used removed first;
                                       0: no limit); remembered in the cache folder's limits.json
"""
from __future__ import annotations

import json
import time
from typing import Optional

import typer

from edgeseq.errors import EdgeseqError

app = typer.Typer(add_completion=False, rich_markup_mode=None, invoke_without_command=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="List, remove or cap what the cache folder holds (converted GGUF files, exported "
                       "checkpoints, the demo models).")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@app.callback()
def _cache(ctx: typer.Context,
           max_size: Optional[str] = typer.Option(None, "--max-size", metavar="SIZE",
                                                  help="keep the cache under SIZE (e.g. 500M, 20G; 0: no limit), "
                                                       "removing the least recently used entries now and later")):
    """List, remove or cap what the cache folder holds (converted GGUF files, exported checkpoints, demos)."""
    from edgeseq import cache

    if max_size is not None:
        n = cache.parse_size(max_size)
        try:
            cache.set_max_bytes(n)
        except OSError as e:
            raise EdgeseqError(f"{cache.cache_dir()}: cannot write the limit ({e.strerror})") from None
        gone = cache.enforce_limit()
        typer.echo(f"cache limit {_human(n) if n else 'none'}" + (f"; removed {', '.join(gone)}" if gone else ""))
    elif ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="print the entries as JSON")):
    """The cached bundles, most recently used first."""
    from edgeseq import cache

    es = list(reversed(cache.entries()))
    if json_out:
        typer.echo(json.dumps({"folder": cache.cache_dir(), "max_bytes": cache.max_bytes(), "entries": es}))
        return
    limit = cache.max_bytes()
    typer.echo(f"{cache.cache_dir()}: {len(es)} entries, {_human(sum(e['bytes'] for e in es))}"
               + (f" (limit {_human(limit)})" if limit else ""))
    for e in es:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        typer.echo(f"  {e['name']:<56} {_human(e['bytes']):>10}  {when}  {e['source'] or ''}")


@app.command("rm")
def rm(names: Optional[list[str]] = typer.Argument(None, metavar="NAME...", show_default=False,
                                                   help="entries to remove (as `edgeseq cache list` names them)"),
       all_: bool = typer.Option(False, "--all", help="remove every entry")):
    """Remove cached bundles (they are made again when next needed)."""
    from edgeseq import cache

    if all_ == bool(names):
        raise EdgeseqError("give entry names to remove, or --all")
    targets = [e["name"] for e in cache.entries()] if all_ else list(names)
    for n in targets:
        cache.remove(n)
    typer.echo(f"removed {len(targets)} entr{'y' if len(targets) == 1 else 'ies'}")
