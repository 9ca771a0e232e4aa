"""The cache folder: bundles made once and reused (the demo models, GGUF files converted for ONNX Runtime,
checkpoints run directly), with a size limit and least-recently-used eviction.

    $EDGESEQ_CACHE, else $XDG_CACHE_HOME/edgeseq, else ~/.cache/edgeseq
      demo-rwkv7-f32-0.1.0-<hash>/      a bundle (edgeseq.json inside); its mtime is its last use
      gguf-<name>-<key>/                a GGUF file's bundle; key: the file's identity (path, size, mtime,
                                        inode, its first and last MiB) and the conversion's options
      ckpt-<name>-<key>/                a checkpoint's bundle; key: each file's name, size and mtime
      <entry>/cache-source.json         what a gguf- or ckpt- entry was made from; an entry whose source
                                        is gone is removed at the next conversion
      .<entry>.<pid>.<random>/          an entry being made: renamed into place when whole; removed
                                        on exit, on Ctrl-C, SIGTERM and SIGHUP, or, if the process was
                                        killed outright, by the next process that finds its pid gone
      limits.json                       {"max_bytes": N} set by `edgeseq cache --max-size`
      chat_history                      `edgeseq chat`'s line history

A cache hit costs a stat and two 1 MiB reads. EDGESEQ_CACHE_MAX (e.g. 20G) overrides limits.json.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from typing import Callable

from edgeseq.errors import EdgeseqError

MANIFEST = "edgeseq.json"
SOURCE = "cache-source.json"  # in a converted entry: the file or folder it was made from
LIMITS = "limits.json"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def cache_dir() -> str:
    root = os.environ.get("EDGESEQ_CACHE")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "edgeseq")


# -- keys ---------------------------------------------------------------------------------------------
def file_identity(path: str) -> list:
    """What changes when a file is replaced or rewritten: path, size, mtime, inode, first and last MiB."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, h.hexdigest()]


def folder_identity(path: str) -> list:
    """A checkpoint folder (or one file): each file's name, size and mtime."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.realpath(path), st.st_size, st.st_mtime_ns]
    out = [os.path.realpath(path)]
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            st = os.stat(p)
            out.append([name, st.st_size, st.st_mtime_ns])
    return out


@functools.cache
def code_digest() -> str:
    """A digest of the code that writes a bundle (graphs, quantization, export), so that an entry made by
    other graph code (an upgrade, or a checkout between versions) is made again rather than reused."""
    import importlib.util

    h = hashlib.sha256()
    for pkg in ("edgeseq", "edgeseq.kernels", "edgeseq.quant", "edgeseq.exporters"):
        spec = importlib.util.find_spec(pkg)
        for d in (spec.submodule_search_locations or []) if spec else []:
            for root, dirs, files in os.walk(d):
                dirs[:] = sorted(x for x in dirs if x not in ("__pycache__", "demo", "serve"))
                for f in sorted(x for x in files if x.endswith(".py")):
                    with open(os.path.join(root, f), "rb") as fh:
                        h.update(os.path.relpath(os.path.join(root, f), d).encode() + b"\0" + fh.read())
    return h.hexdigest()[:12]


def entry_name(kind: str, source: str, identity) -> str:
    from edgeseq import __version__

    key = hashlib.sha256(json.dumps([kind, __version__, code_digest(), identity]).encode()).hexdigest()[:12]
    base = os.path.basename(os.path.normpath(source)).replace(" ", "_")
    return f"{kind}-{base[:60]}-{key}"


# -- making an entry ---------------------------------------------------------------------------------------
class _CleanupOnSignal:
    """SIGTERM and SIGHUP end the process through SystemExit (so `finally` removes the staging folder),
    where no other handler is installed; Ctrl-C already raises KeyboardInterrupt."""

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is None:
                continue
            try:
                if signal.getsignal(sig) in (signal.SIG_DFL, None):
                    self._old[sig] = signal.signal(sig, _exit_on_signal)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def sweep_staging(root: str) -> None:
    """Remove staging folders whose process is gone (killed with SIGKILL, or a power cut)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        parts = name.split(".")
        if not name.startswith(".") or len(parts) < 4 or not parts[-2].isdigit():
            continue
        pid = int(parts[-2])
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except PermissionError:
            continue  # another user's live process


def cached_bundle(kind: str, source: str, identity, build: Callable[[str], None],
                  name: str | None = None) -> tuple[str, bool]:
    """(the bundle folder for `source`, whether it was made now). `build(folder)` writes a bundle at a
    path that does not exist yet; it runs in a staging folder, and the result is renamed into place.
    `name`: the entry's folder name, where the caller keys it itself (default: entry_name)."""
    root = cache_dir()
    out = os.path.join(root, name or entry_name(kind, source, identity))
    if os.path.isfile(os.path.join(out, MANIFEST)):
        touch(out)
        return out, False
    try:
        os.makedirs(root, exist_ok=True)
        sweep_staging(root)
        sweep_orphans()
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.{os.getpid()}.", dir=root)
    except OSError as e:
        raise EdgeseqError(f"{root}: cannot create the cache folder ({e.strerror}); set EDGESEQ_CACHE to a "
                           f"writable folder") from None
    try:
        with _CleanupOnSignal():
            staged = os.path.join(tmp, "bundle")
            build(staged)
            with open(os.path.join(staged, SOURCE), "w") as f:
                json.dump({"source": os.path.realpath(source), "kind": kind}, f)
            try:
                os.rename(staged, out)
            except OSError:
                if not os.path.isfile(os.path.join(out, MANIFEST)):  # not another process's finished entry
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    touch(out)
    enforce_limit(keep=out)
    return out, True


def source_of(entry: str) -> str | None:
    try:
        with open(os.path.join(entry, SOURCE)) as f:
            return json.load(f).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def sweep_orphans() -> list[str]:
    """Remove converted entries whose source file or folder is gone: they can never be hit again."""
    gone = []
    for e in entries():
        src = e["source"]
        if src and not os.path.exists(src):
            shutil.rmtree(e["path"], ignore_errors=True)
            gone.append(e["name"])
    return gone


def touch(entry: str) -> None:
    try:
        os.utime(entry)
    except OSError:
        pass


# -- listing, removing, limiting ---------------------------------------------------------------------------
def _size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def entries() -> list[dict]:
    """The cached bundles, least recently used first: name, path, bytes, last_used (epoch seconds)."""
    root = cache_dir()
    out = []
    try:
        names = os.listdir(root)
    except OSError:
        return out
    for name in names:
        p = os.path.join(root, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(p, MANIFEST)):
            continue
        out.append({"name": name, "path": p, "bytes": _size(p), "last_used": os.path.getmtime(p),
                    "source": source_of(p)})
    return sorted(out, key=lambda e: e["last_used"])


def remove(name: str) -> None:
    root = cache_dir()
    p = os.path.join(root, name)
    if os.sep in name or name.startswith(".") or not os.path.isfile(os.path.join(p, MANIFEST)):
        raise EdgeseqError(f"{name}: not in the cache ({root}); `edgeseq cache list` shows what is")
    shutil.rmtree(p)


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    try:
        n = float(t[:len(t) - len(unit)])
    except ValueError:
        raise EdgeseqError(f"{text!r}: not a size (e.g. 500M, 20G, 0 for no limit)") from None
    if n < 0:
        raise EdgeseqError(f"{text!r}: a size cannot be negative")
    return int(n * _UNITS[unit])


def max_bytes() -> int | None:
    env = os.environ.get("EDGESEQ_CACHE_MAX")
    if env:
        return parse_size(env) or None
    try:
        with open(os.path.join(cache_dir(), LIMITS)) as f:
            return int(json.load(f).get("max_bytes") or 0) or None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def set_max_bytes(n: int) -> None:
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, LIMITS + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"max_bytes": n}, f)
    os.replace(tmp, os.path.join(root, LIMITS))


def enforce_limit(keep: str | None = None) -> list[str]:
    """Remove least recently used entries until the cache fits its limit; never `keep`. Returns names."""
    limit = max_bytes()
    if not limit:
        return []
    es = entries()
    total = sum(e["bytes"] for e in es)
    gone = []
    for e in es:
        if total <= limit:
            break
        if keep and os.path.samefile(e["path"], keep):
            continue
        shutil.rmtree(e["path"], ignore_errors=True)
        total -= e["bytes"]
        gone.append(e["name"])
    return gone
