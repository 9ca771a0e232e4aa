"""`edgeseq serve`: an OpenAI-compatible HTTP server (edgeseq/serve/, docs/serve.md).

register(app) adds the command to the typer app of edgeseq/cli.py. Until cli.py calls it, run it as
`python -m edgeseq.cli_serve serve [MODEL] ...` (the same app, the same error handling).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Optional

import typer

from edgeseq.errors import EdgeseqError

MODEL_HELP = ("bundle folder, .gguf file, or a checkpoint (HF folder, .pth, .bin, .pt) exported once into the cache; "
              "default: $EDGESEQ_MODEL, else the demo model")


def serve(
    model: Optional[str] = typer.Argument(None, metavar="MODEL", show_default=False, help=MODEL_HELP),
    model_opt: Optional[str] = typer.Option(None, "-m", "--model", metavar="MODEL", help="the model, as an option"),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDR", help="address to listen on (0.0.0.0: every "
                             "interface; then set --api-key)"),
    port: int = typer.Option(8080, "--port", metavar="N", help="TCP port (0: any free one, printed at start)"),
    parallel: int = typer.Option(4, "--parallel", "-np", metavar="N", help="sequences decoded at once (rows of "
                                 "the batch); a request with n choices takes n"),
    cache_ram: float = typer.Option(256, "--cache-ram", metavar="MB", help="RAM for cached states (0: no cache)"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", metavar="DIR", help="spill cached states to DIR as "
                                            "state files (kept across restarts)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", metavar="KEY", envvar="EDGESEQ_API_KEY",
                                          help="require Authorization: Bearer KEY (also $EDGESEQ_API_KEY)"),
    max_prompt_tokens: int = typer.Option(32768, "--max-prompt-tokens", metavar="N", help="longest prompt taken"),
    queue: int = typer.Option(64, "--queue", metavar="N", help="requests waiting for a row; more get 429"),
    max_body: float = typer.Option(8, "--max-body", metavar="MB", help="largest request body; more get 413"),
    cors: list[str] = typer.Option([], "--cors", metavar="ORIGIN", help="allow browser requests from ORIGIN "
                                   "(repeatable; '*': any); default: none"),
    timeout: float = typer.Option(600, "--timeout", metavar="S", help="seconds a request may take: past them it "
                                  "gets 503 while still queued, or its reply ends (finish_reason length)"),
    alias: Optional[str] = typer.Option(None, "--alias", metavar="NAME", help="the model's id in the API (default: "
                                        "the file or folder name)"),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", help="CPU threads (default: ONNX "
                                          "Runtime's choice)"),
    max_context: Optional[int] = typer.Option(None, "--max-context", "--ctx-size", "-c", metavar="N",
                                              help="KV ring length of full-attention models (Zamba, Zamba2)"),
    retokenize: bool = typer.Option(False, "--retokenize", help="tokenize every text prompt afresh, also the "
                                    "replies it repeats (default: a reply sent back keeps the token ids it was "
                                    "generated as, so its cached state is found)"),
):
    """An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)
    that caches every conversation's state and decodes sequences together."""
    if model_opt is not None:
        if model is not None:
            raise EdgeseqError("give MODEL once: as an argument or with -m, not both")
        model = model_opt
    for name, value, lo, hi in (("--port", port, 0, 65535), ("--parallel", parallel, 1, 256),
                                ("--max-prompt-tokens", max_prompt_tokens, 1, 1 << 24), ("--queue", queue, 1, 1 << 16)):
        if not lo <= value <= hi:
            raise EdgeseqError(f"{name} {value}: must be from {lo} to {hi}")
    if not 0 < timeout < 1e7:
        raise EdgeseqError(f"--timeout {timeout:g}: must be a number of seconds above 0")
    for name, value in (("--cache-ram", cache_ram), ("--max-body", max_body)):
        if not 0 <= value < 1 << 24:
            raise EdgeseqError(f"{name} {value:g}: must be a size in MB, 0 or more")
    if threads is not None and threads < 1:
        raise EdgeseqError(f"--threads {threads}: must be 1 or more")
    if max_context is not None and max_context < 1:
        raise EdgeseqError(f"--max-context {max_context}: must be 1 or more")
    if api_key is not None and (not api_key or any(c.isspace() for c in api_key)):
        raise EdgeseqError("--api-key: must be a non-empty word (no spaces)")
    if cache_dir is not None and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise EdgeseqError(f"--cache-dir {cache_dir}: not a folder")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise EdgeseqError(f"edgeseq serve needs the serve extra ({e.name} is missing): "
                           f"pip install 'edgeseq[serve]'") from None
    sock = _listen(host, port)

    import edgeseq
    from edgeseq.cli_args import resolve_model
    from edgeseq.serve.app import Server
    from edgeseq.serve.malloc import pin_mmap_threshold

    pin_mmap_threshold()  # before the model's memory: a long-running server's RSS levels off (serve/malloc.py)

    path, is_demo = resolve_model(model)
    m = edgeseq.load(path, threads=threads, max_context=max_context)
    name = alias or ("edgeseq-demo" if is_demo else os.path.basename(os.path.normpath(model or path)))
    server = Server(m, name, parallel=parallel, cache_ram_mb=cache_ram, cache_dir=cache_dir, api_key=api_key,
                    max_prompt_tokens=max_prompt_tokens, queue=queue, max_body_mb=max_body, cors=cors, timeout=timeout,
                    reuse_replies=not retokenize)
    where = sock.getsockname()
    batching = "batched rows" if server.scheduler.rows.batched else "one row per step (attention family)"
    print(f"edgeseq serve: {name} ({m.family_name}, state {m.state_bytes / 1024:.0f} KiB) on "
          f"http://{host if ':' not in host else f'[{host}]'}:{where[1]} · parallel {parallel}, {batching} · "
          f"state cache {cache_ram:g} MB{f' + {cache_dir}' if cache_dir else ''}", file=sys.stderr, flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"edgeseq serve: warning: listening on {host} without --api-key: anyone who can reach this port "
              f"can use the model", file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app(), log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                            timeout_keep_alive=5)
    # uvicorn drains on SIGTERM, then raises the signal again once its handlers are gone: this one takes it,
    # so a drained server exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("edgeseq serve: stopped", file=sys.stderr, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, made here so that a taken port is one clear error line before any loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise EdgeseqError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def register(app: typer.Typer) -> None:
    app.command(name="serve")(serve)


if __name__ == "__main__":
    from edgeseq import cli

    if "serve" not in [c.name for c in cli.app.registered_commands]:
        register(cli.app)
    cli.main()
