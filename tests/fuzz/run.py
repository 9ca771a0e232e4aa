"""The fuzzer's command line. Long run (about 3 minutes on two shared cores), from the repository root:

    .venv/bin/python -P tests/fuzz/run.py --per-reader 400 --seed 1 --time-limit 10 --mem-gib 4

Prints every failure as it happens and the per-reader table (docs/reliability.md) at the end; exits 1
if any input gave a traceback, crash, hang, blow-up, unnamed error or debris. `--readers a,b` picks
readers; `--work DIR` keeps the seeds (built once) and scratch space there (default /tmp/edgeseq-fuzz).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, so that `fuzz` imports

from fuzz import seeds as seeds_mod  # noqa: E402
from fuzz.harness import fuzz  # noqa: E402
from fuzz.targets import READERS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--per-reader", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=10)
    ap.add_argument("--mem-gib", type=float, default=4)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--work", default="/tmp/edgeseq-fuzz")
    a = ap.parse_args(argv)
    work = Path(a.work)
    seeds = seeds_mod.build_all(work / "seeds")
    res = fuzz(a.readers.split(","), seeds, work / "cases", a.seed, a.per_reader, a.time_limit,
               int(a.mem_gib * 2 ** 30), a.budget_s, log=lambda s: print(s, flush=True))
    print(f"\n{sum(sum(c.values()) for c in res.counts.values())} inputs in {res.seconds:.0f} s (seed {a.seed})")
    print(res.table())
    return 1 if res.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
