"""Run mutated inputs through the readers, each under a time and memory limit, and classify the outcome.

The readers run in a worker process (started once, reused while it lives): its address space is capped
with RLIMIT_AS, so a reader that asks for a huge allocation fails there with MemoryError (a "blow-up")
instead of taking the machine; the parent waits at most `time_limit` seconds for each input and kills
the worker on a hang; a worker that dies by a signal is a "crash". Outcomes:

    clean      an EdgeseqError that names the input (its file or folder), nothing left behind
    unnamed    an EdgeseqError that does not name the input
    traceback  any other exception
    crash      the worker died (a signal, an abort in native code)
    hang       no answer within the time limit
    blow-up    MemoryError, or an allocation failure reported by native code
    debris     refused, but an output or a temporary folder was left behind
    silent     accepted, though the mutation must be refused (`Mutation.must_fail`)
    accepted   accepted, and the mutation may be harmless (a flipped bit in float data)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FAILURES = ("unnamed", "traceback", "crash", "hang", "blow-up", "debris")
COLUMNS = ("clean", "traceback", "crash", "hang", "blow-up", "silent", "unnamed", "debris", "accepted")
TESTS = str(Path(__file__).resolve().parents[1])


def _worker(conn, mem_bytes: int) -> None:
    import resource

    if mem_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    sys.path.insert(0, TESTS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["RUST_BACKTRACE"] = "0"  # a panic is one line, not a native backtrace
    from edgeseq.errors import EdgeseqError
    from fuzz.targets import READERS

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    conn.send(("ready", ""))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        reader, case, out, seeds, root = msg
        try:
            READERS[reader].run(Path(case), Path(out), seeds)
            res = ("accepted", "")
        except EdgeseqError as e:
            res = ("clean" if str(root) in str(e) else "unnamed", str(e)[:400])
        except MemoryError as e:
            res = ("blow-up", f"MemoryError: {e}"[:400])
        except BaseException as e:  # noqa: BLE001 -- the point is to see everything, panics included
            text = f"{type(e).__name__}: {e}"
            if "alloc" in text.lower() and not isinstance(e, (KeyboardInterrupt, SystemExit)):
                res = ("blow-up", text[:400])
            else:
                tb = traceback.extract_tb(e.__traceback__)
                where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
                res = ("traceback", (text[:300] + where))
        conn.send(res)


class Worker:
    def __init__(self, mem_bytes: int):
        self.mem_bytes = mem_bytes
        self.proc = None
        self.starts = 0

    def _start(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.mem_bytes), daemon=True)
        self.proc.start()
        child.close()
        self.starts += 1
        if not self.conn.poll(120):
            raise RuntimeError("the fuzz worker did not start")
        self.conn.recv()

    def run(self, msg, time_limit: float) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(msg)
        if self.conn.poll(time_limit):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        else:
            self.stop(kill=True)
            return "hang", f"no answer in {time_limit} s"
        self.proc.join(5)
        code = self.proc.exitcode
        self.proc = None
        return "crash", f"worker exit code {code}"

    def stop(self, kill: bool = False):
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None


@dataclass
class Result:
    counts: dict = field(default_factory=dict)  # reader -> Counter of outcomes
    cases: list = field(default_factory=list)  # (reader, kind, detail, outcome, message)
    seconds: float = 0.0

    def failures(self):
        return [c for c in self.cases if c[3] in FAILURES]

    def table(self) -> str:
        rows = ["| reader | runs | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
        for r, c in self.counts.items():
            rows.append(f"| {r} | {sum(c.values())} | " + " | ".join(str(c.get(k, 0)) for k in COLUMNS) + " |")
        return "\n".join(rows)


def materialize(reader, seeds: dict, mutation, root: Path) -> tuple[Path, Path]:
    """A copy of the reader's seed in `root` with the mutation applied; returns (input, output path)."""
    src = seeds[reader.seed]
    if src.is_dir():
        case = root / src.name
        shutil.copytree(src, case)
    else:
        case = root / src.name
        shutil.copyfile(src, case)
    mutation.apply(case)
    return case, root / "out"


def fuzz(readers, seeds: dict, work: Path, seed: int = 0, per_reader: int = 20, time_limit: float = 10,
         mem_bytes: int = 4 << 30, budget_s: float | None = None, log=None) -> Result:
    """`per_reader` inputs for each reader (seeded: the same seed gives the same inputs)."""
    from fuzz.targets import READERS

    res = Result()
    worker = Worker(mem_bytes)
    t0 = time.monotonic()
    seeds = {k: Path(v) for k, v in seeds.items()}
    try:
        for name in readers:
            reader = READERS[name]
            counts = res.counts.setdefault(name, Counter())
            seen, rnd = set(), 0
            while sum(counts.values()) < per_reader:
                rng = random.Random(f"{seed}-{name}-{rnd}")
                muts = reader.mutations(seeds, rng, per_reader)
                rng.shuffle(muts)
                fresh = [m for m in muts if (m.kind, m.detail) not in seen]
                if not fresh:
                    break
                for m in fresh:
                    if sum(counts.values()) >= per_reader or budget_s and time.monotonic() - t0 > budget_s:
                        break
                    seen.add((m.kind, m.detail))
                    root = work / f"{name}-{len(seen)}"
                    shutil.rmtree(root, ignore_errors=True)
                    root.mkdir(parents=True)
                    try:
                        case, out = materialize(reader, seeds, m, root)
                    except Exception as e:  # a mutation that cannot be made on this seed: skip it
                        if log:
                            log(f"skip {name} {m.detail}: {type(e).__name__}: {e}")
                        shutil.rmtree(root, ignore_errors=True)
                        continue
                    before = set(os.listdir(root))
                    outcome, msg = worker.run((name, str(case), str(out), {k: str(v) for k, v in seeds.items()},
                                               str(root)), time_limit)
                    if outcome == "accepted" and m.must_fail:
                        outcome = "silent"
                    if outcome == "clean" and set(os.listdir(root)) - before:
                        outcome, msg = "debris", f"left {sorted(set(os.listdir(root)) - before)}; {msg}"
                    counts[outcome] += 1
                    res.cases.append((name, m.kind, m.detail, outcome, msg))
                    if log and outcome in FAILURES + ("silent",):
                        log(f"{outcome:9} {name:11} {m.kind:8} {m.detail[:60]!r}: {msg[:200]}")
                    shutil.rmtree(root, ignore_errors=True)
                rnd += 1
                if budget_s and time.monotonic() - t0 > budget_s:
                    break
    finally:
        worker.stop()
    res.seconds = time.monotonic() - t0
    return res
