"""The scheduler: one worker thread that owns the model and runs every request's tokens.

Requests wait in a bounded queue (full: the server answers 429). A request is admitted when its `n` rows
fit in `--parallel`; its prompt is then prefilled from the longest cached prefix (cache.py), at most one
prefill slice's worth of tokens per turn of the loop (many short prompts in one turn, a long one over
several), so rows already decoding keep going while a long prompt is read. At each turn boundary of the
prompt and at its end the state is cached; the prompt's state is then copied into `n` rows (the forks of
`n > 1`). Every turn of the loop also steps all decoding rows at once (rows.py), each with its own
sampler, stop strings and text stream; a row that ends (end token, stop string, max_tokens, a full KV
ring, --timeout seconds since the request came) caches its state under prompt + reply and leaves; a
cancelled request (the client went away) leaves at the next turn. Nothing here raises into the loop: a
request that fails gets an error event and its rows are freed.

Events go to each request's `emit` (thread-safe): ("text", choice, piece), ("done", choice, finish_reason),
("end", usage), ("error", status, message).
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.runtime.sampling import Sampler, SamplingOptions
from edgeseq.serve.rows import BatchRows, SingleRows, per_row_positions


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass
class Request:
    ids: list[int]
    emit: object  # callable(event)
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    ends: set[int] = field(default_factory=set)
    boundaries: list[int] = field(default_factory=list)  # token counts where an earlier message ends
    text: str | None = None  # the prompt as text (None: token ids): its text + a reply's is recorded
    cancelled: bool = False
    checked: float = 0.0  # the HTTP side's: when it last asked whether the client is still there
    # set by the scheduler
    cached: int = 0
    completion_tokens: int = 0
    open_rows: int = 0
    t_submit: float = 0.0
    t_first: float = 0.0
    deadline: float = float("inf")  # perf_counter time: past it the request waits no more and its rows end


class Row:
    """One choice of a request: its sampler, the tokens it produced, the text not yet sent."""

    def __init__(self, sched, req: Request, index: int, logits: np.ndarray, position: int):
        self.req, self.index = req, index
        seed = None if req.seed is None else req.seed + index  # n > 1 with a seed: each choice its own
        self.sampler = Sampler(SamplingOptions(req.temperature, req.top_k, req.top_p, req.repetition_penalty,
                                               seed, req.min_p))
        self.history = list(req.ids)
        self.tokens: list[int] = []
        self.stream = sched.model.tokenizer.stream()
        self.hold = max((len(s) for s in req.stops), default=1) - 1
        self.pending = ""
        self.sent: list[str] = []  # the reply's text as the client got it
        self.logits = logits
        self.position = position
        self.next = -1
        self.finish: str | None = None
        self.by_stop_string = False

    def choose(self) -> bool:
        """Sample the next token; False when the row ends here (max_tokens, the request's time, an end token)."""
        if len(self.tokens) >= self.req.max_tokens or time.perf_counter() > self.req.deadline:
            self.finish = "length"
            return False
        nxt = self.sampler(self.logits, self.history)
        if nxt in self.req.ends:
            self.finish = "stop"
            return False
        self.history.append(nxt)
        self.next = nxt
        return True

    def fed(self, logits) -> None:
        """The chosen token went through the graph: its text, and the stop strings."""
        self.logits = logits
        self.tokens.append(self.next)
        self.position += 1
        self.pending += self.stream.push(self.next)
        stops = self.req.stops
        cut = min((self.pending.find(s) for s in stops if s in self.pending), default=-1)
        if cut >= 0:
            self.pending = self.pending[:cut]
            self.finish, self.by_stop_string = "stop", True
        elif len(self.pending) > self.hold:
            self._send(self.pending[:len(self.pending) - self.hold])
            self.pending = self.pending[len(self.pending) - self.hold:]

    def close(self) -> None:
        if not self.by_stop_string:
            self.pending += self.stream.flush()
        if self.pending:
            self._send(self.pending)
        self.pending = ""

    def _send(self, text: str) -> None:
        self.sent.append(text)
        if text and not self.req.cancelled:
            self.req.emit(("text", self.index, text))


class Scheduler:
    def __init__(self, model, cache, parallel: int, queue_size: int, metrics, timeout: float = 600.0,
                 replies=None):
        self.model = model
        self.replies = replies  # cache.ReplyTexts, or None
        self.timeout = timeout
        self.cache = cache
        self.parallel = parallel
        self.queue_size = queue_size
        self.metrics = metrics
        self.rows = BatchRows(model, parallel) if per_row_positions(model) else SingleRows(model, parallel)
        self.pre = model.session() if self.rows.batched else None  # prefills for the batched arena
        self.chunk = self.pre.prefill_chunk if self.pre else model.prefill_chunk
        self.waiting: deque[Request] = deque()
        self.joining: deque = deque()  # (request, its prefill generator)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="edgeseq-serve", daemon=True)

    # -- the server's side ----------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.stopping:
                raise Draining()
            if len(self.waiting) >= self.queue_size:
                raise QueueFull()
            req.t_submit = time.perf_counter()
            req.deadline = req.t_submit + self.timeout
            self.waiting.append(req)
            self.cond.notify()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is running, then end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def busy_rows(self) -> int:
        joining = list(self.joining)  # one C-level copy under the GIL: /metrics reads it from another thread
        return len(self.rows) + sum(r.n for r, _ in joining)

    # -- the worker -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                now = time.perf_counter()
                for r in [r for r in self.waiting if r.cancelled or now > r.deadline]:
                    self.waiting.remove(r)
                    if not r.cancelled:
                        r.emit(("error", 503, f"timed out after {self.timeout:g} s waiting for a free row "
                                              f"(--timeout)"))
                while self.waiting and self.busy_rows + self.waiting[0].n <= self.parallel:
                    req = self.waiting.popleft()
                    self.metrics.observe("queue_wait", time.perf_counter() - req.t_submit)
                    self.joining.append((req, self._prefill(req)))
                if not self.joining and not len(self.rows):
                    if self.stopping and not self.waiting:
                        return
                    self.cond.wait(0.5)
                    continue
            try:
                self._turn()
            except Exception:  # a bug, not bad input: fail what is in flight, keep serving
                traceback.print_exc()
                self._fail_all("internal error in the scheduler")

    def _turn(self) -> None:
        """Prefill slices of joining requests, up to one slice's worth of tokens (so many short prompts
        join in one turn, a long one takes several), then one decode step of every row."""
        self._drop_cancelled()
        budget = self.chunk
        while self.joining and budget > 0:
            req, gen = self.joining[0]
            t0 = time.perf_counter()
            try:
                budget -= next(gen)
            except StopIteration:
                self.joining.popleft()
                req.t_first = time.perf_counter()
                self.metrics.observe("ttft", req.t_first - req.t_submit)
                budget -= 1  # a prompt resumed whole from the cache still costs a turn's bookkeeping
            except EdgeseqError as e:  # context full, a token the model lacks: the request's fault
                self.joining.popleft()
                req.emit(("error", 400, str(e)))
            finally:
                self.metrics.observe("prefill", time.perf_counter() - t0)
        if len(self.rows):
            self._decode()

    def _prefill(self, req: Request):
        """A generator: prefills req's prompt one slice per next(), then adds its rows."""
        single = not self.rows.batched
        sess = self.rows.session() if single else self.pre
        adopted = False
        try:
            e = self.cache.lookup(req.ids)
            if e is not None:
                sess.set_state(e.arrays, e.position, e.logits)
                start, logits = len(e.ids), e.logits
            else:
                sess.reset()
                start, logits = 0, None
            req.cached = start
            self.metrics.add("prompt_tokens", len(req.ids))
            self.metrics.add("cached_tokens", start)
            self.metrics.add("cache_hits" if start else "cache_misses", 1)
            pos = start
            for b in sorted({b for b in req.boundaries if start < b < len(req.ids)}) + [len(req.ids)]:
                while pos < b:
                    n = min(self.chunk, b - pos)
                    logits = sess.prefill(req.ids[pos:pos + n])
                    pos += n
                    yield n
                if b > start:
                    self.cache.put(req.ids[:b], sess.state(), sess.position, logits.copy())
            state = sess.state() if self.rows.batched or req.n > 1 else None
            req.open_rows = req.n
            for i in range(req.n):
                row = Row(self, req, i, logits.copy(), sess.position)
                if single and i == 0:
                    self.rows.add(row, None, sess.position, logits, session=sess)
                    adopted = True
                else:
                    self.rows.add(row, state, sess.position, logits)
        finally:
            if single and not adopted:
                self.rows.release(sess)

    def _decode(self) -> None:
        for r in list(self.rows.owners):
            if not r.choose():
                self._finish(r)
        if not len(self.rows):
            return
        owners = list(self.rows.owners)
        t0 = time.perf_counter()
        out = self.rows.step([r.next for r in owners])
        self.metrics.observe("decode_step", time.perf_counter() - t0)
        self.metrics.add("generated_tokens", len(owners))
        for r, logits in zip(owners, out):
            if logits is None:  # a full KV ring
                r.finish = "length"
                self._finish(r)
                continue
            r.fed(logits)
            if r.finish:
                self._finish(r)

    def _finish(self, r: Row) -> None:
        req = r.req
        r.close()
        if r.tokens:  # the state after prompt + reply: where the next turn of this conversation starts
            ids = req.ids + r.tokens
            self.cache.put(ids, self.rows.state(r), r.position, np.array(r.logits, np.float32))
            if self.replies is not None and req.text is not None and not r.by_stop_string:
                # a reply cut at a stop string is not the text of its tokens: nothing to record
                self.replies.add(req.text + "".join(r.sent), ids)
        self.rows.remove(r)
        req.completion_tokens += len(r.tokens)
        if req.cancelled:
            return
        req.emit(("done", r.index, r.finish))
        req.open_rows -= 1
        if req.open_rows == 0:
            self.metrics.add("requests_done", 1)
            req.emit(("end", {"prompt_tokens": len(req.ids), "completion_tokens": req.completion_tokens,
                              "cached_tokens": req.cached}))

    def _drop_cancelled(self) -> None:
        for item in [j for j in self.joining if j[0].cancelled]:
            self.joining.remove(item)
            item[1].close()  # its finally gives the session back
            self.metrics.add("cancelled", 1)
        gone = [r for r in self.rows.owners if r.req.cancelled]
        for r in gone:
            self.rows.remove(r)
        if gone:
            self.metrics.add("cancelled", len({id(r.req) for r in gone}))

    def _fail_all(self, message: str) -> None:
        reqs = {id(r): r for r, _ in self.joining}
        reqs.update({id(r.req): r.req for r in self.rows.owners})
        for req, gen in list(self.joining):
            gen.close()
        self.joining.clear()
        for r in list(self.rows.owners):
            self.rows.remove(r)
        for req in reqs.values():
            req.emit(("error", 500, message))
