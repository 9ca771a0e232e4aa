"""Facts about this process and this machine: the one memory reader, the logger, machine and git info."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

MIB = 2 ** 20
_STATUS = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def memory(pss: bool = False) -> dict:
    """This process's memory in bytes, from /proc/self/status: rss (VmRSS), peak (VmHWM, the high-water
    mark since exec: not getrusage's ru_maxrss, which Linux carries over from the parent across exec),
    anon (RssAnon: memory the process owns) and file (RssFile: mapped files, e.g. weights). With pss, the
    proportional set size from smaps_rollup: a page this process maps twice counts once."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in _STATUS:
                out[_STATUS[k]] = int(v.split()[0]) * 1024
    if pss:
        try:
            with open("/proc/self/smaps_rollup") as f:
                out["pss"] = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return out


def machine() -> dict:
    cpu, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
              "asimd", "asimddp", "sve")
    return {"hostname": platform.node(), "nproc": os.cpu_count(), "cpu": cpu,
            "cpu_flags": [x for x in wanted if x in flags], "mem_total": mem, "kernel": platform.release(),
            "machine": platform.machine(), "loadavg": list(os.getloadavg())}


def git(path: str) -> dict:
    """The commit of the git checkout holding `path`, and whether its tracked files differ from it."""
    d = path if os.path.isdir(path) else os.path.dirname(path)

    def run(*args):
        r = subprocess.run(["git", "-C", d, *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if not commit:
        return {"commit": None}
    dirty = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "short": commit[:7], "dirty": bool(dirty), "subject": run("log", "-1", "--format=%s"),
            "root": run("rev-parse", "--show-toplevel")}
