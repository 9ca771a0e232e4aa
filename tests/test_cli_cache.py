"""The cache folder: a GGUF is converted for ONNX Runtime once and reused (keyed by the file's identity),
a checkpoint run directly is exported once, staging folders go away on SIGTERM (and after SIGKILL, at the
next conversion), and `edgeseq cache list | rm | --max-size` manage it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import edgeseq


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("EDGESEQ_CACHE", str(d))
    monkeypatch.delenv("EDGESEQ_CACHE_MAX", raising=False)
    return d


@pytest.fixture(scope="module")
def small_gguf(byte_mamba, tmp_path_factory):
    from edgeseq.exporters.gguf_writer import export_gguf

    p = tmp_path_factory.mktemp("cache_gguf") / "small.gguf"
    export_gguf(str(byte_mamba.ckpt), str(p), quant="q8_0")
    return p


def _staging(cache) -> list[str]:
    return [n for n in os.listdir(cache) if n.startswith(".")] if cache.exists() else []


def test_a_gguf_is_converted_once(small_gguf, cache, tmp_path):
    a = edgeseq.load(small_gguf)
    b = edgeseq.load(small_gguf)
    assert a.converted_now and not b.converted_now and a.path == b.path
    assert os.path.dirname(a.path) == str(cache) and _staging(cache) == []
    assert b.session().prefill([1, 2, 3]).shape == (256,)
    # another file (a copy: another identity) is another entry; a changed file is converted again
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(small_gguf.read_bytes())
    c = edgeseq.load(copy)
    assert c.converted_now and c.path != a.path
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert edgeseq.load(copy).converted_now
    # without the cache: a temporary folder, as before
    assert edgeseq.load(small_gguf, cache=False).path != a.path


SLOW_CONVERSION = r"""
import sys, time
from edgeseq.cache import cached_bundle
def slow(out):
    import os; os.makedirs(out); open(os.path.join(out, "partial"), "w").write("x")
    print("converting", flush=True); time.sleep(60)
cached_bundle("gguf", sys.argv[1], ["slow"], slow)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_a_killed_conversion_leaves_nothing(small_gguf, cache, sig):
    """The staging code every conversion goes through (edgeseq.cache.cached_bundle), killed mid-way."""
    p = subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION, str(small_gguf)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=os.environ.copy())
    assert p.stdout.readline() == b"converting\n"
    assert len(_staging(cache)) == 1
    p.send_signal(sig)
    p.wait(30)
    if sig == signal.SIGKILL:  # nothing runs in a killed process: the next conversion sweeps its folder
        assert len(_staging(cache)) == 1
        edgeseq.load(small_gguf)
    assert _staging(cache) == [] and not [n for n in os.listdir(cache) if n.startswith("gguf-") and
                                          not (cache / n / "edgeseq.json").exists()]


def edgeseq_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "edgeseq", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "EDGESEQ_MODEL": "", **env}, timeout=120)


def test_run_a_checkpoint_and_manage_the_cache(byte_mamba, small_gguf, cache):
    from edgeseq.exporters.cache import cached_checkpoint

    env = {"EDGESEQ_CACHE": str(cache)}
    r = edgeseq_cli("run", byte_mamba.ckpt, "-p", "hi", "-n", "3", env=env)
    assert r.returncode == 0 and "exporting" in r.stderr, r.stderr
    first = [n for n in os.listdir(cache) if n.startswith("ckpt-")]
    assert len(first) == 1 and cached_checkpoint(str(byte_mamba.ckpt)) == str(cache / first[0])  # reused
    time.sleep(0.01)
    assert edgeseq.load(small_gguf).converted_now
    listing = json.loads(edgeseq_cli("cache", "list", "--json", env=env).stdout)
    names = [e["name"] for e in listing["entries"]]
    assert len(names) == 2 and names[0].startswith("gguf-") and names[1].startswith("ckpt-")  # newest first
    assert listing["entries"][1]["source"] == os.path.realpath(byte_mamba.ckpt)
    # a limit smaller than both keeps only what fits, the least recently used going first
    r = edgeseq_cli("cache", "--max-size", str(listing["entries"][0]["bytes"] + 1), env=env)
    assert r.returncode == 0 and names[1] in r.stdout
    from edgeseq import cache as cache_mod

    assert [e["name"] for e in cache_mod.entries()] == [names[0]]
    assert edgeseq_cli("cache", "rm", "--all", env=env).returncode == 0
    assert cache_mod.entries() == []


def test_entries_are_keyed_by_the_graph_code(monkeypatch):
    """A cache entry made by other graph code (an upgrade, a checkout between versions) is not reused: the
    digest of the code that writes bundles is part of every entry's key, the demo's included."""
    from edgeseq import cache

    monkeypatch.setattr(cache, "code_digest", lambda: "aaaaaaaaaaaa")
    a = cache.entry_name("ckpt", "/m/x", ["id"])
    monkeypatch.setattr(cache, "code_digest", lambda: "bbbbbbbbbbbb")
    assert cache.entry_name("ckpt", "/m/x", ["id"]) != a
    monkeypatch.undo()
    cache.code_digest.cache_clear()
    d = cache.code_digest()
    assert len(d) == 12 and cache.code_digest() == d  # computed once per process, from the source files
