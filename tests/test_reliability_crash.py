"""Crash safety: an export or a state save killed (SIGKILL) at seeded random moments leaves the old complete
output or none, and the next run sweeps the killed one's temporary files; a full disk (ENOSPC injected
into every file the writer opens) is an EdgeseqError naming the output, with nothing half-written."""
from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgeseq
from edgeseq.errors import EdgeseqError
from edgeseq.integrity import verify_bundle
from fuzz import seeds as seeds_mod


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seeds_mod.build_all(tmp_path_factory.mktemp("seeds"))


def _child(code: str) -> subprocess.Popen:
    """A Python process that runs `code` after its imports, printing 'ready' first."""
    p = subprocess.Popen([sys.executable, "-P", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


EXPORT = """
import sys
from edgeseq.exporters.export import export
print("ready", flush=True)
for i in range(1000):
    export(sys.argv[1], sys.argv[2], force=True)
""".replace("sys.argv[1]", "{src!r}").replace("sys.argv[2]", "{out!r}")


def test_export_killed_at_random_moments_leaves_old_or_none(seeds, tmp_path):
    src, out = seeds["safetensors"], tmp_path / "bundle"
    from edgeseq.exporters.export import export

    export(str(src), str(out))
    rng = random.Random(0)
    seen = {"complete": 0, "none": 0}
    for _ in range(4):
        p = _child(EXPORT.format(src=str(src), out=str(out)))
        time.sleep(rng.uniform(0.0, 0.8))  # an export of this seed takes ~0.3 s: replaced several times over
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            verify_bundle(str(out))  # complete: every hash as its manifest says
            seen["complete"] += 1
        else:
            seen["none"] += 1
            export(str(src), str(out))
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".edgeseq-export-")]
    export(str(src), str(tmp_path / "again"))  # the next export sweeps the killed ones' folders
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".edgeseq-export-")], leftovers
    assert seen["complete"] >= 1, seen


MOBILE = """
from edgeseq.exporters.mobile import export_mobile
export_mobile({src!r}, {out!r}, force=True)  # warm: the loop below replaces the bundle every ~0.5 s
print("ready", flush=True)
for i in range(1000):
    export_mobile({src!r}, {out!r}, force=True)
"""


def test_mobile_export_killed_at_random_moments_leaves_old_or_none(seeds, tmp_path):
    """Before, `export --mobile --force` removed the old bundle file by file and then renamed the new one
    in: a kill midway left a bundle without some of its files."""
    src, out = seeds["safetensors"], tmp_path / "mobile"
    from edgeseq.exporters.mobile import export_mobile

    export_mobile(str(src), str(out))
    rng = random.Random(2)
    seen = {"complete": 0, "none": 0}
    for _ in range(5):
        p = _child(MOBILE.format(src=str(src), out=str(out)))
        time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            verify_bundle(str(out))  # complete: every file listed, each with its hash
            seen["complete"] += 1
        else:
            seen["none"] += 1
            export_mobile(str(src), str(out))
    export_mobile(str(src), str(tmp_path / "again"))  # the next mobile export sweeps the killed ones' folders
    assert sorted(os.listdir(tmp_path)) == ["again", "mobile"], os.listdir(tmp_path)
    assert seen["complete"] >= 1, seen


def test_mobile_export_dying_while_removing_the_old_bundle(seeds, tmp_path, monkeypatch):
    """The moment the random kills above rarely hit, made certain: the process dies after removing one
    file of a folder. The bundle at `out` is still a complete one (the old or the new)."""
    from edgeseq.exporters.mobile import export_mobile

    src, out = seeds["safetensors"], tmp_path / "mobile"
    export_mobile(str(src), str(out))

    def dies(path, *a, **k):
        if os.path.isdir(path):
            first = sorted(os.listdir(path))
            if first and os.path.isfile(os.path.join(path, first[0])):
                os.remove(os.path.join(path, first[0]))
        raise SystemExit("killed while removing " + str(path))
    monkeypatch.setattr(shutil, "rmtree", dies)
    with pytest.raises(SystemExit):
        export_mobile(str(src), str(out), force=True)
    monkeypatch.undo()
    verify_bundle(str(out))


@pytest.mark.parametrize("budget", [0, 20_000])
def test_mobile_export_on_a_full_disk(seeds, tmp_path, full_disk, budget):
    from edgeseq.exporters.mobile import export_mobile

    full_disk[0] = budget
    out = tmp_path / "mobile"
    with pytest.raises(EdgeseqError, match="disk is full") as e:
        export_mobile(str(seeds["safetensors"]), str(out))
    assert str(out) in str(e.value)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


SAVE = """
import sys, numpy as np, edgeseq
s = edgeseq.load({bundle!r}).session()
s.prefill([1, 2, 3])
print("ready", flush=True)
for i in range(100000):
    s.step(i % 200)
    s.save_state({path!r})
"""


def test_state_save_killed_at_random_moments_leaves_a_whole_file(seeds, tmp_path):
    path = tmp_path / "chat.state"
    m = edgeseq.load(str(seeds["bundle"]))
    m.session().save_state(str(path))
    rng = random.Random(1)
    for _ in range(4):
        p = _child(SAVE.format(bundle=str(seeds["bundle"]), path=str(path)))
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        s = m.session()
        s.load_state(str(path))  # whole: checksum, header and payload all as written
        assert s.position >= 0
    m.session().save_state(str(path))  # the next save sweeps the killed ones' temporary files
    assert [n for n in os.listdir(tmp_path)] == ["chat.state"], os.listdir(tmp_path)


class _Full:
    """A file whose writes fail with ENOSPC once `budget` bytes have been written (a full disk)."""

    def __init__(self, f, budget: list):
        self.f, self.budget = f, budget

    def write(self, b):
        n = len(b.encode()) if isinstance(b, str) else memoryview(b).nbytes
        if n > self.budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(self.f, "name", None))
        self.budget[0] -= n
        return self.f.write(b)

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()

    def close(self):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """Files opened for writing under tmp_path get `budget` bytes in all, then ENOSPC."""
    budget = [0]
    real_open, real_fdopen = builtins.open, os.fdopen

    def wrap(f, mode):
        return _Full(f, budget) if any(c in str(mode) for c in "wax+") else f

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return wrap(f, mode) if str(file).startswith(str(tmp_path)) else f

    def fake_fdopen(fd, mode="r", *a, **k):
        return wrap(real_fdopen(fd, mode, *a, **k), mode)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)
    return budget


@pytest.mark.parametrize("budget", [0, 5_000, 30_000, 60_000])
def test_export_on_a_full_disk(seeds, tmp_path, full_disk, budget):
    from edgeseq.exporters.export import export

    full_disk[0] = budget
    out = tmp_path / "bundle"
    with pytest.raises(EdgeseqError, match="disk is full") as e:
        export(str(seeds["safetensors"]), str(out))
    assert str(out) in str(e.value)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("budget", [0, 1_000])  # tensor data is written through the file descriptor (numpy)
def test_gguf_export_on_a_full_disk(seeds, tmp_path, full_disk, budget):
    from edgeseq.exporters.gguf_writer import export_gguf

    full_disk[0] = budget
    out = tmp_path / "m.gguf"
    with pytest.raises(EdgeseqError, match="disk is full"):
        export_gguf(str(seeds["safetensors"]), str(out))
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("budget", [0, 100])
def test_state_save_on_a_full_disk_keeps_the_old_file(seeds, tmp_path, full_disk, budget):
    path = tmp_path / "chat.state"
    s = edgeseq.load(str(seeds["bundle"])).session()
    full_disk[0] = 1 << 30
    s.save_state(str(path))
    old = path.read_bytes()
    s.step(5)
    full_disk[0] = budget
    with pytest.raises(EdgeseqError, match="disk is full") as e:
        s.save_state(str(path))
    assert str(path) in str(e.value)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["chat.state"]
