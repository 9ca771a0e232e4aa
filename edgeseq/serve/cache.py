"""The state cache: a session's state after a token prefix, found again by the longest prefix of a prompt.

A recurrent state is kilobytes to megabytes whatever the length of the text behind it, so the server keeps
one at every turn boundary (end of each earlier message, end of the prompt, end of the reply) and a new
request prefills only the tokens after the longest cached prefix of its prompt. Resuming is exact: the
state after a prefix is the state a cold prefill reaches there.

Lookup is a hash chain over token ids: every entry is keyed by (length, hash of its ids); a prompt's
prefix hashes are computed once, in one pass, and each length that has entries is checked, longest first;
a hit is confirmed by comparing the ids themselves, so a hash collision can never resume a wrong state.

Entries live in RAM under a byte budget (state + logits + ids), least recently used first out. With a
cache folder, an entry pushed out of RAM is written there as an edgeseq state file (runtime/statefile.py:
versioned, checksummed, tied to the weights) beside its token ids, and all of RAM is written at shutdown,
so a restarted server finds its conversations again. The folder has its own budget (LRU by file time).
State files hold no logits: an entry read back from disk resumes only a prompt longer than itself.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.runtime import statefile
from edgeseq.safe_io import atomic_file

_MOD = (1 << 61) - 1  # the rolling hash's modulus (a Mersenne prime) and base
_BASE = 1_000_003


def prefix_hashes(ids) -> list[int]:
    """h[i] = the hash of ids[:i], for i in 0..len(ids)."""
    h, out = 0, [0]
    for t in ids:
        h = (h * _BASE + int(t) + 1) % _MOD
        out.append(h)
    return out


@dataclass
class Entry:
    ids: np.ndarray  # int32 (n,)
    position: int
    arrays: dict | None  # {input name: (1, *shape) float32}; None while only on disk
    logits: np.ndarray | None  # (vocab,) float32: the logits after ids[-1]; None for entries read from disk
    nbytes: int = 0

    @property
    def key(self) -> str:
        return hashlib.sha256(self.ids.astype("<i4").tobytes()).hexdigest()[:32]


class StateCache:
    def __init__(self, model, ram_bytes: int, cache_dir: str | None = None, disk_bytes: int = 4 << 30):
        self.model = model
        self.ram_bytes = int(ram_bytes)
        self.disk_bytes = int(disk_bytes)
        self.lock = threading.Lock()
        self.ram: OrderedDict[tuple[int, int], Entry] = OrderedDict()  # (length, hash) -> entry, LRU first
        self.disk: dict[tuple[int, int], str] = {}  # (length, hash) -> file stem in the cache folder
        self.lengths: dict[int, int] = {}  # length -> number of entries (RAM or disk) of that length
        self.used = 0
        self.hits = self.misses = self.evictions = self.disk_reads = self.disk_writes = 0
        self.dir = None
        self.expected = {s.input_name: ((1, *s.shape), "float32") for s in model.state_spec}
        if cache_dir:
            # one folder per model (its weights' hash): another model's states are never even read
            self.dir = os.path.join(cache_dir, model.weights_sha256[:16])
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise EdgeseqError(f"--cache-dir {cache_dir}: cannot create the folder ({e.strerror or e})") from None
            self._scan()

    # -- lookup --------------------------------------------------------------------------------------
    def lookup(self, ids: list[int]) -> Entry | None:
        """The entry of the longest prefix of `ids` that can resume it (a state with logits may be the
        whole of `ids`; one without must leave at least one token to feed), with its arrays in RAM."""
        hashes = prefix_hashes(ids)
        arr = np.asarray(ids, np.int32)
        with self.lock:
            for n in sorted((n for n in self.lengths if n <= len(ids)), reverse=True):
                key = (n, hashes[n])
                e = self.ram.get(key)
                if e is not None:
                    if np.array_equal(e.ids, arr[:n]) and (n < len(ids) or e.logits is not None):
                        self.ram.move_to_end(key)
                        self.hits += 1
                        return e
                    continue
                stem = self.disk.get(key)
                if stem is not None and n < len(ids):
                    e = self._read(key, stem, arr[:n])
                    if e is not None:
                        self.hits += 1
                        return e
            self.misses += 1
            return None

    def put(self, ids, arrays: dict, position: int, logits: np.ndarray | None) -> None:
        """Keep the state after `ids` (arrays are the caller's copies: the cache owns them from now on)."""
        if not len(ids):
            return
        arr = np.asarray(ids, np.int32)
        with self.lock:
            self._put((len(arr), prefix_hashes(arr)[-1]), Entry(arr, int(position), arrays, logits))

    def _put(self, key, e: Entry) -> None:
        e.nbytes = sum(a.nbytes for a in e.arrays.values()) + e.ids.nbytes + (e.logits.nbytes if e.logits is not None
                                                                              else 0)
        if e.nbytes > self.ram_bytes:
            return
        old = self.ram.pop(key, None)
        if old is not None:
            self.used -= old.nbytes
        elif key not in self.disk:
            self._count(key[0], +1)
        self.ram[key] = e
        self.used += e.nbytes
        while self.used > self.ram_bytes and self.ram:
            k, out = self.ram.popitem(last=False)
            self.used -= out.nbytes
            self.evictions += 1
            self._spill(k, out)
            if k not in self.disk:
                self._count(k[0], -1)  # gone for good

    @property
    def entries(self) -> int:
        return len(self.ram)

    # -- disk ------------------------------------------------------------------------------------------
    def flush(self) -> int:
        """Write every RAM entry not yet on disk (at shutdown); returns how many were written."""
        if not self.dir:
            return 0
        with self.lock:
            n = 0
            for k, e in list(self.ram.items()):
                if k not in self.disk:
                    n += self._spill(k, e)
            return n

    def _count(self, n: int, d: int) -> None:
        c = self.lengths.get(n, 0) + d
        if c > 0:
            self.lengths[n] = c
        else:
            self.lengths.pop(n, None)

    def _spill(self, k, e: Entry) -> int:
        """Write an entry to the cache folder as a state file and its ids (once)."""
        if not self.dir or e.arrays is None or k in self.disk:
            return 0
        stem = os.path.join(self.dir, e.key)
        try:
            with atomic_file(stem + ".ids") as f:
                f.write(e.ids.astype("<i4").tobytes())
            statefile.save(stem + ".state", e.arrays, self.model.weights_sha256, self.model.family_name, e.position)
        except (OSError, EdgeseqError):  # a full or read-only disk: the entry is simply not kept
            return 0
        self.disk[k] = e.key
        self.disk_writes += 1
        self._trim_disk()
        return 1

    def _read(self, k, stem: str, ids: np.ndarray) -> Entry | None:
        path = os.path.join(self.dir, stem)
        try:
            stored = np.fromfile(path + ".ids", dtype="<i4")
            if not np.array_equal(stored, ids):
                return None
            arrays, position = statefile.load(path + ".state", self.expected, self.model.weights_sha256,
                                              self.model.family_name)
            os.utime(path + ".state")  # the disk's LRU order
        except (OSError, EdgeseqError):  # damaged or gone: forget it
            self._forget_disk(k, stem)
            return None
        self.disk_reads += 1
        e = Entry(ids, position, {n: np.array(a) for n, a in arrays.items()}, None)
        self._put(k, e)  # back in RAM (and still on disk)
        return e

    def _forget_disk(self, k, stem: str) -> None:
        if self.disk.pop(k, None) is not None and k not in self.ram:
            self._count(k[0], -1)
        for ext in (".ids", ".state"):
            try:
                os.remove(os.path.join(self.dir, stem + ext))
            except OSError:
                pass

    def _scan(self) -> None:
        """Index the cache folder: each `<key>.ids` with its `<key>.state` (checked when first read)."""
        for name in os.listdir(self.dir):
            if not name.endswith(".ids"):
                continue
            stem = name[:-4]
            if not os.path.isfile(os.path.join(self.dir, stem + ".state")):
                continue
            try:
                ids = np.fromfile(os.path.join(self.dir, name), dtype="<i4")
            except OSError:
                continue
            e = Entry(ids, 0, None, None)
            if e.key != stem or not len(ids):
                continue
            k = (len(ids), prefix_hashes(ids)[-1])
            if k not in self.disk:
                if k not in self.ram:
                    self._count(k[0], +1)
                self.disk[k] = stem
        self._trim_disk()

    def _trim_disk(self) -> None:
        files = []
        for k, stem in self.disk.items():
            p = os.path.join(self.dir, stem + ".state")
            try:
                st = os.stat(p)
                files.append((st.st_mtime, st.st_size, k, stem))
            except OSError:
                files.append((0, 0, k, stem))
        total = sum(f[1] for f in files)
        for _, size, k, stem in sorted(files, key=lambda f: f[0]):
            if total <= self.disk_bytes:
                break
            total -= size
            self._forget_disk(k, stem)


class ReplyTexts:
    """The text of each prompt + reply the server gave, with the token ids the model saw for it.

    A client sends the next turn as text: the history, the reply among it, then the new words. Tokenized
    afresh, a reply need not come back as the ids it was generated as (a BPE merges across the pieces the
    model chose), so its state, cached under those ids, would never be found again and every turn would
    re-read the reply. Here a prompt that starts with a recorded text takes that text's ids (the ones the
    model saw) and tokenizes only the rest, where the rest starts on a token boundary of the whole text's
    own tokenization (tokenizer.encode_split), so the new words are tokenized as they would be anyway.
    Bounded: `entries` texts, `chars` characters in all, least recently used out first (ids kept as int32
    arrays: 4 bytes a token).
    """

    def __init__(self, entries: int = 512, chars: int = 8 << 20):
        self.max_entries, self.max_chars = entries, chars
        self.texts: OrderedDict[str, np.ndarray] = OrderedDict()
        self.chars = 0
        self.lock = threading.Lock()

    def add(self, text: str, ids: list[int]) -> None:
        if not text or len(text) > self.max_chars:
            return
        with self.lock:
            if self.texts.pop(text, None) is not None:
                self.chars -= len(text)
            self.texts[text] = np.asarray(ids, np.int32)
            self.chars += len(text)
            while len(self.texts) > self.max_entries or self.chars > self.max_chars:
                old, _ = self.texts.popitem(last=False)
                self.chars -= len(old)

    def longest(self, text: str) -> tuple[int, list[int]] | None:
        """(length of the longest recorded text that `text` starts with, its ids), or None."""
        with self.lock:
            best = max((t for t in self.texts if len(t) <= len(text) and text.startswith(t)), key=len, default=None)
            if best is None:
                return None
            self.texts.move_to_end(best)
            return len(best), self.texts[best].tolist()
