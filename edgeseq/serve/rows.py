"""Rows: the sequences the server decodes, each one row of the graphs' batch axis.

BatchRows (families without attention: Mamba, Mamba-2, RWKV) keeps one arena of `capacity` rows per state
tensor, twice (ping and pong, as a Session does), allocated once. Active rows are packed at the front:
a step runs the decode graph on rows 0..k-1 with input_ids (k, 1) and writes their new state into the
other half; a row that leaves is replaced by the last one (one row copied), so the batch stays dense.
ONNX Runtime reads and writes the numpy arenas in place (OrtValues over slices of them), one IO binding
per (k, parity) made once.

The attention families (Zamba, Zamba2, RecurrentGemma) batch the same way where their graphs take one
`position` per row (int64 (batch,): bundles exported since per-row positions): BatchRows keeps each
row's position beside its state and feeds them with the step. A full-attention row whose KV ring is
full (Zamba at max_context) gets None from the step and keeps the state it had before it.

SingleRows (bundles of those families exported before, whose graphs take one `position` for the whole
batch): each row is its own Session (a pool of `capacity`, made on first use) and a step runs them one
after another.
"""
from __future__ import annotations

import numpy as np

from edgeseq.errors import EdgeseqError


def per_row_positions(model) -> bool:
    """True when the model's rows can share a decode call: no attention, or one position per row."""
    if not model.uses_position:
        return True
    sess = model.engine.session(model.engine.decode_graph)
    return next(i.shape for i in sess.get_inputs() if i.name == "position") != [1]


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
        self.positions = np.zeros((capacity,), np.int64) if model.uses_position else None
        # a full-attention ring holds max_context tokens: a row there stops (unless the model slides)
        self.room = model.max_context if model.max_context and model.on_full != "slide" else None
        self.owners: list = []  # row i -> its owner
        self._full: set = set()  # ids of owners the last step did not advance (their ring was full)
        self._io: dict = {}

    def __len__(self) -> int:
        return len(self.owners)

    def add(self, owner, arrays: dict, position: int, logits) -> None:
        i = len(self.owners)
        for name, buf in self.bufs[self.cur].items():
            buf[i] = arrays[name][0]
        if self.positions is not None:
            self.positions[i] = position
        self.owners.append(owner)

    def remove(self, owner) -> None:
        i, last = self.owners.index(owner), len(self.owners) - 1
        if i != last:
            for buf in self.bufs[self.cur].values():
                buf[i] = buf[last]
            if self.positions is not None:
                self.positions[i] = self.positions[last]
            self.owners[i] = self.owners[last]
        self.owners.pop()
        self._full.discard(id(owner))

    def state(self, owner) -> dict:
        i = self.owners.index(owner)
        # a row the last step found full kept its state in the other half (the step wrote a wrapped one)
        bufs = self.bufs[1 - self.cur] if id(owner) in self._full else self.bufs[self.cur]
        return {name: buf[i:i + 1].copy() for name, buf in bufs.items()}

    def step(self, tokens: list[int]) -> np.ndarray | list:
        """Feed tokens[i] to row i; returns the logits (k, vocab), a view valid until the next step, or,
        where a row's KV ring was full, a list with None for that row."""
        k = len(self.owners)
        self._full = set()
        self.ids[:k, 0] = tokens
        io, keep = self._binding(k, self.cur)
        io.bind_ortvalue_input("input_ids", keep[0])
        self.sess.run_with_iobinding(io)
        self.cur ^= 1
        if self.positions is None:
            return self.logits[:k]
        full = np.flatnonzero(self.positions[:k] + 1 > self.room) if self.room else ()
        self.positions[:k] += 1
        if not len(full):
            return self.logits[:k]
        self._full = {id(self.owners[i]) for i in full}
        self.positions[full] -= 1
        return [None if id(o) in self._full else self.logits[i] for i, o in enumerate(self.owners)]

    def _binding(self, k: int, cur: int):
        key = (k, cur)
        if key not in self._io:
            ov = self.ort.OrtValue.ortvalue_from_numpy
            io = self.sess.io_binding()
            keep = [ov(self.ids[:k]), ov(self.logits[:k])]  # the OrtValues must outlive the binding
            io.bind_ortvalue_output("logits", keep[1])
            if self.positions is not None:
                keep.append(ov(self.positions[:k]))
                io.bind_ortvalue_input("position", keep[-1])
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
