"""The interleaved round-robin driver: N rounds × cells (model, quant, threads) × systems, one fresh
child per measurement, the systems' order rotating from round to round so that the machine's drifts
hit them alike; the JSON results are saved after every measurement."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

from harness import report
from harness.canary import contended, wait_quiet
from harness.proc import MIB, git, log, machine
from harness.protocol import BENCHMARKS, ChildError, spawn
from harness.systems import SYSTEMS

RESULTS = os.path.join(BENCHMARKS, "results")


class Ctx:
    def __init__(self, work: str, timeout: float, pythonpath: str | None = None, nice: int = 0):
        self.work, self.timeout, self.pythonpath, self.nice = work, timeout, pythonpath, nice
        self._done: dict = {}

    def once(self, key: str, fn):
        """An artifact is prepared once per run (several systems share one)."""
        if key not in self._done:
            self._done[key] = fn()
        return self._done[key]


def snapshot_head(repo: str) -> tuple[str, str]:
    """HEAD of `repo` (git archive) laid out as the installed package under
    /tmp/edgeseq-bench-src/<commit>/pkg, once per commit: (that folder, commit). With --pin every
    edgeseq child of the harness's own Python imports it first (PYTHONPATH), so a run measures one
    commit while the working tree moves on."""
    from harness.checkout import package_tree

    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dest = os.path.join("/tmp", "edgeseq-bench-src", commit[:12])
    pkg = os.path.join(dest, "pkg")
    if not os.path.isdir(pkg):
        src = os.path.join(dest, "src")
        os.makedirs(src, exist_ok=True)
        arch = subprocess.run(["git", "-C", repo, "archive", "--format=tar", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", src], input=arch.stdout, check=True)
        package_tree(src, pkg)
    return pkg, commit


def make_systems(names: list[str], edgeseq_python: str | None, edgeseq_label: str, llamacpp_python: str | None,
                 pythonpath: str | None) -> list:
    out = []
    for n in names:
        if n not in SYSTEMS:
            raise SystemExit(f"unknown system {n!r}; known: {', '.join(SYSTEMS)}")
        py = llamacpp_python if n == "llamacpp" else None
        out.append(SYSTEMS[n](python=py, pythonpath=None if py else pythonpath))
    if edgeseq_python:
        for n in names:
            if n.startswith("edgeseq"):
                out.append(SYSTEMS[n](label=f"{n}@{edgeseq_label}", python=edgeseq_python))
    return out


def run(a) -> dict:
    """`bench.py run`: see cli.py for the arguments."""
    repo = os.path.dirname(BENCHMARKS)
    pythonpath, pinned = None, None
    if a.pin:
        pythonpath, commit = snapshot_head(repo)
        pinned = {"commit": commit, "pythonpath": pythonpath}
        log(f"edgeseq pinned at {commit[:12]}: {pythonpath}")
    ctx = Ctx(a.work, a.timeout, pythonpath, a.nice)
    systems = make_systems(a.systems, a.edgeseq_python, a.edgeseq_label, a.llamacpp_python, pythonpath)
    g = git(repo)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = a.out or os.path.join(RESULTS, f"{stamp:%Y%m%d-%H%M%S}-{g.get('short') or 'nogit'}.json")
    results = {"harness": 1, "argv": sys.argv[1:], "started": stamp.isoformat(timespec="seconds"),
               "machine": machine(), "git": g, "pinned": pinned,
               "config": {k: getattr(a, k) for k in ("systems", "models", "quant", "threads", "rounds", "decode",
                                                     "prefill", "marks", "contention", "min_clean", "max_context", "nice")},
               "systems": {}, "models": {}, "artifacts": {}, "skipped": [], "errors": [], "runs": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        results["summary"] = report.summarize(results, a.min_clean)
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out + ".tmp", out)

    infos: dict = {}
    for s in systems:
        key = (s.python, s.pythonpath)
        if key not in infos:
            infos[key] = spawn(s.python, "info", {}, pythonpath=s.pythonpath, timeout=a.timeout)
        results["systems"][s.label] = {"name": s.name, **infos[key], "pythonpath": s.pythonpath}
        log(f"{s.label}: {s.python}" + (f" edgeseq {infos[key].get('edgeseq_file')} "
                                        f"{(infos[key].get('edgeseq_git') or {}).get('short')}" if s.name.startswith(
                                            "edgeseq") else ""))

    t_start = time.perf_counter()
    cells = []
    for m in a.models:
        log(f"building {m}")
        built = spawn(sys.executable, "build", {"model": m, "root": a.work}, timeout=a.timeout)
        results["models"][m] = built
        for q in a.quant:
            for s in systems:
                reason = s.skip(built, q)
                if reason:
                    results["skipped"].append({"system": s.label, "model": m, "quant": q, "reason": reason})
                    continue
                try:
                    art = s.prepare(ctx, built, q)
                except ChildError as e:
                    log(f"FAILED to prepare {s.label} for {m} {q}: {e}")
                    results["errors"].append({"system": s.label, "model": m, "quant": q, "stage": "prepare",
                                              "error": str(e)})
                    continue
                results["artifacts"].setdefault(m, {}).setdefault(q, {})[s.label] = art
                for t in a.threads:
                    cells.append((m, q, t, s))
    save()
    log(f"prepared in {time.perf_counter() - t_start:.0f} s; {len(cells)} measurements per round")

    t_rounds = time.perf_counter()
    deadline = t_rounds + 60 * a.budget_min if a.budget_min else None
    for rnd in range(a.rounds):
        if rnd and deadline and time.perf_counter() > deadline:
            log(f"time budget ({a.budget_min} min) spent: stopping after {rnd} rounds")
            break
        groups: dict = {}
        for m, q, t, s in cells:
            groups.setdefault((m, q, t), []).append(s)
        for (m, q, t), syss in groups.items():
            k = rnd % len(syss)
            for s in syss[k:] + syss[:k]:
                waited = wait_quiet(a.quiet_wait, t, a.contention) if a.quiet_wait else 0.0
                t0 = time.perf_counter()
                try:
                    res = s.measure(ctx, results["models"][m], results["artifacts"][m][q][s.label], a.decode,
                                    a.prefill, t, a.marks, a.max_context)
                except ChildError as e:
                    res = {"error": str(e)[-3000:]}
                r = {"round": rnd, "model": m, "quant": q, "threads": t, "system": s.label,
                     "wall_s": round(time.perf_counter() - t0, 2), "waited_s": round(waited, 1), **res}
                r["contended"] = any(contended(c, t, a.contention) for c in res.get("canary", {}).values())
                results["runs"].append(r)
                log(line(r, rnd, a.rounds))
                save()
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["measure_s"] = round(time.perf_counter() - t_rounds, 1)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    save()
    results["out"] = out
    return results


def line(r: dict, rnd: int, rounds: int) -> str:
    head = f"round {rnd + 1}/{rounds} {r['model']} {r['quant']} {r['threads']}t {r['system']}:"
    if "error" in r:
        return f"{head} FAILED {r['error'].strip().splitlines()[-1][:200]}"
    c = r.get("canary", {})
    can = " ".join(f"{k} wait {100 * v.get('wait', 0):.0f}% foreign {100 * v['foreign']:.0f}%" for k, v in c.items())
    return (f"{head} decode {r.get('decode_tps', 0):.1f} tok/s, prefill {r.get('prefill_tps', 0):.0f} tok/s, "
            f"peak {r['peak'] / MIB:.0f} MiB ({r['wall_s']:.1f} s; {can}){' CONTENDED' if r['contended'] else ''}")
