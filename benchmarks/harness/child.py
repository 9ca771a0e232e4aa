"""The child side of the protocol (protocol.py): `python -P -m harness.child TASK`, payload on stdin,
one JSON line on stdout. Tasks import what they need when they run, so a measurement's baseline holds
only the libraries of the system measured."""
from __future__ import annotations

import json
import os
import sys
import traceback


def _task(name: str):
    if name == "build":
        from harness.models import build_task
        return build_task
    from harness import tasks
    return getattr(tasks, name)


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # from here on, anything printed to stdout goes to stderr
    task = sys.argv[1]
    try:
        res = _task(task)(json.load(sys.stdin))
        res["ok"] = True
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        res = {"ok": False, "error": traceback.format_exc()[-4000:]}
    out.write(json.dumps(res) + "\n")
    out.flush()
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
