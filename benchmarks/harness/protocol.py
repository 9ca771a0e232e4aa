"""The one child-process protocol.

The parent runs `PYTHON -P -m harness.child TASK` with the benchmarks folder on PYTHONPATH (so the
child imports this package and nothing from the repository root: with -P neither the current folder
nor the script's is put on sys.path), writes the task's payload to its stdin as JSON and reads exactly
one JSON line back from its stdout. The child moves its own stdout to stderr before doing anything, so
whatever a library prints cannot get in the way; its stderr is kept for the error report. PYTHON is any
interpreter: the one running the harness, another checkout's venv (`--edgeseq-python`), a venv with a
native llama.cpp build (`--llamacpp-python`); the child imports edgeseq, torch, llama_cpp, ... from
that interpreter's site-packages. One child per measurement: every figure comes from a fresh process.
"""
from __future__ import annotations

import json
import os
import subprocess

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildError(RuntimeError):
    pass


def child_env(threads: int | None = None, pythonpath: str | None = None, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    paths = [p for p in (pythonpath, BENCHMARKS, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra or {})
    return env


def spawn(python: str, task: str, payload: dict, *, threads: int | None = None, pythonpath: str | None = None,
          env: dict | None = None, timeout: float = 900, nice: int = 0) -> dict:
    """Run TASK in a fresh PYTHON (at niceness +nice) and return its JSON result; ChildError if it failed."""
    cmd = [python, "-P", "-m", "harness.child", task]
    try:
        p = subprocess.run(cmd, input=json.dumps(payload), capture_output=True, text=True, timeout=timeout,
                           env=child_env(threads, pythonpath, env), cwd="/",
                           preexec_fn=(lambda: os.nice(nice)) if nice else None)
    except subprocess.TimeoutExpired:
        raise ChildError(f"{task} in {python}: no answer within {timeout:.0f} s") from None
    lines = p.stdout.strip().splitlines()
    res = None
    if lines:
        try:
            res = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if p.returncode != 0 or not isinstance(res, dict) or not res.get("ok"):
        err = (res or {}).get("error") or p.stderr[-3000:] or f"exit status {p.returncode}"
        raise ChildError(f"{task} in {python} failed: {err}")
    res.pop("ok")
    return res
