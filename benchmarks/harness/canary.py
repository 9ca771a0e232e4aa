"""The CPU canary: how much the rest of the machine took from a measurement, read beside every timed phase.

A reading over one timed phase (a prefill, the decode loop) holds:

- wait: of the time this process's threads were runnable, the share they spent waiting for a CPU (the
  run-queue delay the scheduler records per thread in /proc/self/task/*/schedstat). ~0 when the process
  has its cores to itself; it is contention itself, whatever caused it. This sets the flag.
- foreign: the share of the machine's CPU time other processes used (/proc/stat busy ticks minus this
  process's own), for the record; on a 2-core box a 1-thread run leaves room for 0.5 of it.
- load: the 1-minute load average at the end.

A measurement is contended when either phase's wait exceeds the limit (default 0.10; without schedstat,
when foreign exceeds the share of the machine the run leaves free by more than that). The driver
flags a round contended when any of its measurements is, and keeps such rounds out of the medians while
enough clean rounds remain.
"""
from __future__ import annotations

import os
import time

LIMIT = 0.10


def _tasks() -> dict[str, tuple[int, int]]:
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait = f.read().split()[:2]
            out[tid] = (int(run), int(wait))
        except (OSError, ValueError):
            pass  # a thread that ended meanwhile
    return out


def _ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    with open("/proc/self/stat") as f:
        w = f.read().rsplit(")", 1)[1].split()
    return busy, int(w[11]) + int(w[12])  # this process's utime + stime


class Canary:
    """start() before a timed phase, stop() after it: the phase's reading (see the module docstring)."""

    def start(self) -> "Canary":
        self.t0, self.ticks0, self.tasks0 = time.perf_counter(), _ticks(), _tasks()
        self.cpu0 = time.process_time()
        return self

    def stop(self) -> dict:
        secs, cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        ticks, tasks = _ticks(), _tasks()
        hz, n = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
        other = (ticks[0] - self.ticks0[0]) - (ticks[1] - self.ticks0[1])
        out = {"s": round(secs, 6), "cpu_s": round(cpu, 6), "foreign": round(max(0.0, other / (hz * max(secs, 1e-9) * n)), 4),
               "load": round(os.getloadavg()[0], 2)}
        if tasks:
            run = wait = 0
            for tid, (r, w) in tasks.items():
                r0, w0 = self.tasks0.get(tid, (0, 0))
                run, wait = run + r - r0, wait + w - w0
            out["wait"] = round(wait / (run + wait), 4) if run + wait > 0 else 0.0
        return out


def contended(reading: dict, threads: int, limit: float = LIMIT) -> bool:
    if "wait" in reading:
        return reading["wait"] > limit
    n = os.cpu_count() or 1
    return reading["foreign"] > max(0.0, 1.0 - threads / n) + limit


def wait_quiet(max_wait: float, threads: int, limit: float = LIMIT, window: float = 1.0) -> float:
    """Wait up to max_wait seconds until other processes leave this run's share of the machine free
    (foreign load over `window` within the limit); returns the seconds waited."""
    t0 = time.perf_counter()
    n = os.cpu_count() or 1
    while time.perf_counter() - t0 < max_wait:
        a = _ticks()
        time.sleep(window)
        b = _ticks()
        other = (b[0] - a[0]) - (b[1] - a[1])
        if other / (os.sysconf("SC_CLK_TCK") * window * n) <= max(0.0, 1.0 - threads / n) + limit:
            break
    return time.perf_counter() - t0
