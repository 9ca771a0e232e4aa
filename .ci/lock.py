"""The exact versions `make demo` and `make test` install: constraints.txt.

    python3.11 .ci/lock.py write    # resolve anew (today's PyPI) and rewrite constraints.txt  (= make lock)
    python .ci/lock.py check        # every package installed in this environment is pinned at its version

`write` asks pip for one resolution of everything the Makefile installs (pip and the build backends
included, since the Makefile builds edgeseq and llama-cpp-python without build isolation) in a throw-away
virtual environment, with `--dry-run --report`: nothing is installed, nothing is built. The pins are made
for CPython 3.11 on Linux x86-64, the platform where `torch==2.13.0` is a local CPU build.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
# what the Makefile installs, beside `-e .[test]`: the build tools and the optional engine
TOP = ["pip", "setuptools", "scikit-build-core", "torch==2.13.0", "llama-cpp-python==0.3.36"]
HEADER = """\
# Exact versions of everything `make demo` and `make test` install (PIP_CONSTRAINT in the Makefile).
# Made for CPython 3.11 on Linux x86-64. Refresh: `make lock` (one pip resolution, then `make test`).
"""


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_canon(name)] = version
    return pins


def write() -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"error: the pins are made for Python 3.11; this is {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        py, report = os.path.join(tmp, "bin", "python"), os.path.join(tmp, "report.json")
        env = {**os.environ, "PIP_CONSTRAINT": ""}  # resolve anew, not from the old pins
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True, env=env)
        subprocess.run([py, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", report,
                        *TOP, "-e", f"{ROOT}[test]"], check=True, env=env)
        items = json.load(open(report))["install"]
    pins = sorted((_canon(i["metadata"]["name"]), i["metadata"]["version"].split("+")[0]) for i in items)
    body = "".join(f"{n}=={v}\n" for n, v in pins if n != "edgeseq")
    tmp_lock = LOCK.with_suffix(".tmp")
    tmp_lock.write_text(HEADER + body)
    tmp_lock.replace(LOCK)
    print(f"{LOCK.name}: {body.count(chr(10))} pins")


def check() -> None:
    pins = read_lock()
    bad = []
    for dist in metadata.distributions():
        name, version = _canon(dist.metadata["Name"]), dist.version.split("+")[0]
        if name == "edgeseq":
            continue
        if pins.get(name) != version:
            bad.append(f"{name}=={version} (constraints.txt: {pins.get(name, 'not pinned')})")
    if bad:
        sys.exit("error: installed packages that constraints.txt does not pin at that version: " + ", ".join(bad)
                 + "\n(add the dependency to pyproject.toml, then `make lock`)")
    print(f"constraints.txt: all {sum(1 for _ in metadata.distributions()) - 1} installed packages pinned")


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1] if len(sys.argv) > 1 else "check"]()
