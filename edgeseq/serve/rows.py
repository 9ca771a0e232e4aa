"""Rows: the sequences the server decodes, each one row of the graphs' batch axis.

BatchRows (families without attention: Mamba, Mamba-2, RWKV) keeps one arena of `capacity` rows per state
tensor, twice (ping and pong, as a Session does), allocated once. Active rows are packed at the front:
a step runs the decode graph on rows 0..k-1 with input_ids (k, 1) and writes their new state into the
other half; a row that leaves is replaced by the last one (one row copied), so the batch stays dense.
ONNX Runtime reads and writes the numpy arenas in place (OrtValues over slices of them), one IO binding
per (k, parity) made once.

SingleRows (Zamba, Zamba2, RecurrentGemma): their graphs take one `position` for the whole batch, so
rows at different positions cannot share a call. Each row is its own Session (a pool of `capacity`,
made on first use) and a step runs them one after another. docs/serve.md says what batching them needs.
"""
from __future__ import annotations

import numpy as np

from edgeseq.errors import EdgeseqError


class BatchRows:
    batched = True

    def __init__(self, model, capacity: int):
        self.model = model
        self.capacity = capacity
        self.ort = model.engine.ort
        self.sess = model.engine.session(model.engine.decode_graph)
        self.spec = model.state_spec
        self.bufs = [{s.input_name: np.zeros((capacity, *s.shape), np.float32) for s in self.spec} for _ in (0, 1)]
        self.cur = 0
        self.logits = np.zeros((capacity, model.vocab_size), np.float32)
        self.ids = np.zeros((capacity, 1), np.int64)
        self.owners: list = []  # row i -> its owner
        self._io: dict = {}

    def __len__(self) -> int:
        return len(self.owners)

    def add(self, owner, arrays: dict, position: int, logits) -> None:
        i = len(self.owners)
        for name, buf in self.bufs[self.cur].items():
            buf[i] = arrays[name][0]
        self.owners.append(owner)

    def remove(self, owner) -> None:
        i, last = self.owners.index(owner), len(self.owners) - 1
        if i != last:
            for buf in self.bufs[self.cur].values():
                buf[i] = buf[last]
            self.owners[i] = self.owners[last]
        self.owners.pop()

    def state(self, owner) -> dict:
        i = self.owners.index(owner)
        return {name: buf[i:i + 1].copy() for name, buf in self.bufs[self.cur].items()}

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens[i] to row i; returns the logits (k, vocab), a view valid until the next step."""
        k = len(self.owners)
        self.ids[:k, 0] = tokens
        io, keep = self._binding(k, self.cur)
        io.bind_ortvalue_input("input_ids", keep[0])
        self.sess.run_with_iobinding(io)
        self.cur ^= 1
        return self.logits[:k]

    def _binding(self, k: int, cur: int):
        key = (k, cur)
        if key not in self._io:
            ov = self.ort.OrtValue.ortvalue_from_numpy
            io = self.sess.io_binding()
            keep = [ov(self.ids[:k]), ov(self.logits[:k])]  # the OrtValues must outlive the binding
            io.bind_ortvalue_output("logits", keep[1])
            for s in self.spec:
                src, dst = ov(self.bufs[cur][s.input_name][:k]), ov(self.bufs[1 - cur][s.input_name][:k])
                io.bind_ortvalue_input(s.input_name, src)
                io.bind_ortvalue_output(s.output_name, dst)
                keep += [src, dst]
            self._io[key] = (io, keep)
        return self._io[key]


class SingleRows:
    batched = False

    def __init__(self, model, capacity: int):
        self.model = model
        self.capacity = capacity
        self.free: list = []
        self.made = 0
        self.owners: list = []
        self.sessions: dict = {}  # id(owner) -> Session

    def __len__(self) -> int:
        return len(self.owners)

    def session(self):
        """A free session from the pool (the caller gives it back with add() or release())."""
        if self.free:
            return self.free.pop()
        self.made += 1
        return self.model.session()

    def release(self, session) -> None:
        self.free.append(session)

    def add(self, owner, arrays: dict | None, position: int, logits, session=None) -> None:
        s = session or self.session()
        if arrays is not None:
            s.set_state(arrays, position, logits)
        self.owners.append(owner)
        self.sessions[id(owner)] = s

    def remove(self, owner) -> None:
        self.owners.remove(owner)
        self.free.append(self.sessions.pop(id(owner)))

    def state(self, owner) -> dict:
        return self.sessions[id(owner)].state()

    def position(self, owner) -> int:
        return self.sessions[id(owner)].position

    def step(self, tokens: list[int]) -> list:
        """Feed tokens[i] to row i; a row whose KV ring is full (Zamba at max_context) gets None."""
        out = []
        for o, t in zip(self.owners, tokens):
            try:
                out.append(self.sessions[id(o)].step(t))
            except EdgeseqError:  # context full: that row ends ("length"), the others go on
                out.append(None)
        return out
