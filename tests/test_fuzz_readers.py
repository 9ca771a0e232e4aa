"""A short seeded run of the reader fuzzer (tests/fuzz): 30 structure-aware mutations of a tiny valid
input for each reader (chat templates through safe_io.render_untrusted and through chat_template's own
Template, which calls it), each run in a worker process under a 20 s and 4 GiB limit. Every input
must give a clean EdgeseqError naming it or be accepted where the mutation may be harmless: no
traceback, crash, hang, blow-up, unnamed error, debris, and no silent accept of damage that must be
refused. The long run is `python -P tests/fuzz/run.py --per-reader 400 --seed 1` (docs/reliability.md)."""
from __future__ import annotations

import pytest

from fuzz import seeds as seeds_mod
from fuzz.harness import fuzz
from fuzz.targets import READERS

PER_READER = 30
SUITE = list(READERS)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seeds_mod.build_all(tmp_path_factory.mktemp("fuzz-seeds"))


def test_short_seeded_fuzz_run(seeds, tmp_path):
    res = fuzz(SUITE, seeds, tmp_path / "cases", seed=0, per_reader=PER_READER, time_limit=20,
               mem_bytes=4 << 30)
    print(f"\n{res.seconds:.0f} s\n{res.table()}")
    assert all(sum(c.values()) >= PER_READER * 0.8 for c in res.counts.values()), res.table()
    bad = [c for c in res.cases if c[3] in ("unnamed", "traceback", "crash", "hang", "blow-up", "debris", "silent")]
    assert not bad, "\n".join(f"{r} {k} {d!r}: {o}: {m}" for r, k, d, o, m in bad)


def test_same_seed_same_inputs(seeds):
    import random

    for name, reader in READERS.items():
        a = [(m.kind, m.detail) for m in reader.mutations(seeds, random.Random(f"7-{name}-0"), 20)]
        b = [(m.kind, m.detail) for m in reader.mutations(seeds, random.Random(f"7-{name}-0"), 20)]
        assert a == b, name
