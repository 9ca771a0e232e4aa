"""Does edgeseq's runtime install from wheels alone on aarch64 Linux (Raspberry Pi OS, Ubuntu) and macOS
arm64? `pip download --only-binary=:all:` of the base dependency set for each target platform.

    python benchmarks/wheels_check.py [--python 3.11 3.12 3.13] [--markdown] [--keep DIR]

The dependency set is pyproject.toml's [project] dependencies (numpy, onnx, onnxruntime, safetensors,
tokenizers, gguf, typer, tqdm). pip expands a macOS tag to every older compatible one (macosx_14_0_arm64
accepts 11.0-14.0 arm64 and universal2 wheels) but not a manylinux_2_X tag, so a Linux target passes
every manylinux tag its glibc accepts (manylinux2014 = manylinux_2_17 up to its own):

    linux-aarch64      glibc 2.36   Raspberry Pi OS 12 (bookworm) 64-bit, Debian 12; Ubuntu 22.04 has 2.35
    linux-aarch64-old  glibc 2.28   Debian 10 / Raspberry Pi OS (buster) 64-bit, RHEL 8
    macos-arm64-14 / -13 / -11      macOS 14, 13, 11 on Apple silicon

The whole set is resolved at once (as `pip install edgeseq` would); where that fails each package is
tried alone to name the culprit. Needs the package index (PyPI), run by hand; about 60 MB per target.
edgeseq itself is pure Python (a py3-none-any wheel), so it is not part of the question.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _manylinux(glibc_minor: int, arch: str = "aarch64") -> list[str]:
    return [f"manylinux2014_{arch}"] + [f"manylinux_2_{m}_{arch}" for m in range(17, glibc_minor + 1)]


TARGETS = {
    "linux-aarch64": _manylinux(36),
    "linux-aarch64-old": _manylinux(28),
    "macos-arm64-14": ["macosx_14_0_arm64"],
    "macos-arm64-13": ["macosx_13_0_arm64"],
    "macos-arm64-11": ["macosx_11_0_arm64"],
}


def dependencies() -> list[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def download(reqs: list[str], platforms: list[str], python: str, dest: str) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
           *[x for p in platforms for x in ("--platform", p)], "--python-version", python, "--implementation", "cp", "--abi", "cp" + python.replace(".", ""),
           "--no-cache-dir", "-q", "-d", dest, *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


def wheel_name_version(fname: str) -> tuple[str, str, str]:
    parts = fname[:-4].split("-")  # name-version(-build)?-python-abi-platform.whl
    return parts[0], parts[1], parts[-1]


def check(target: str, platform: list[str], python: str, keep: str | None) -> dict:
    dest = os.path.join(keep, f"{target}-py{python}") if keep else tempfile.mkdtemp(prefix="edgeseq-wheels-")
    os.makedirs(dest, exist_ok=True)
    try:
        reqs = dependencies()
        ok, err = download(reqs, platform, python, dest)
        failed = {}
        if not ok:
            for req in reqs:
                one = tempfile.mkdtemp(prefix="edgeseq-wheel-")
                ok1, err1 = download([req], platform, python, one)
                shutil.rmtree(one, ignore_errors=True)
                if not ok1:
                    line = [x for x in err1.splitlines() if "ERROR" in x]
                    failed[req] = (line[0] if line else err1[-300:]).strip()
        wheels = sorted(wheel_name_version(f) for f in os.listdir(dest) if f.endswith(".whl"))
        size = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
        return {"ok": ok, "wheels": wheels, "failed": failed, "bytes": size,
                "error": "" if ok else re.sub(r"\s+", " ", err)[-400:]}
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", nargs="+", default=["3.11"])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--keep", help="keep the downloaded wheels under this directory")
    a = ap.parse_args()
    rows = []
    for py in a.python:
        for t in a.targets:
            r = check(t, TARGETS[t], py, a.keep)
            rows.append((t, py, r))
            status = "resolves" if r["ok"] else "FAILS: " + "; ".join(f"{k}: {v}" for k, v in r["failed"].items())
            print(f"{t} ({TARGETS[t][-1]}) python {py}: {status}; {len(r['wheels'])} wheels, {r['bytes'] / 1e6:.0f} MB",
                  file=sys.stderr)
            for name, version, plat in r["wheels"]:
                print(f"    {name} {version} {plat}", file=sys.stderr)
    if a.markdown:
        print("| target (pip --platform) | python | wheels only? | wheels (platform-specific ones with their tag) | download |")
        print("|---|---|---|---|---|")
        for t, py, r in rows:
            ws = ", ".join(f"{n} {v}" + ("" if p == "any" else f" ({p})") for n, v, p in r["wheels"])
            status = "yes" if r["ok"] else "NO: " + "; ".join(f"{k}: {v}" for k, v in r["failed"].items())
            print(f"| {t} (`{TARGETS[t][-1]}`) | {py} | {status} | {ws} | {r['bytes'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
