"""A session: one sequence's fixed-size state, stepped token by token.

The state arena is allocated once: two buffers per state tensor (ping and pong). A step feeds the
token and buffer set A, ONNX Runtime writes the new state into set B through IO binding, and the
roles swap. Nothing is allocated per token; the state never changes size.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.runtime import statefile
from edgeseq.runtime.sampling import Sampler, SamplingOptions

IN_PLACE = ("key", "value")  # state kinds bound as input and output of the same buffer


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    stopped_by: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def time_session(session, ids: list[int], decode_tokens: int) -> tuple[float, float]:
    """Seconds to prefill `ids` from a fresh state and to then decode `decode_tokens` greedy tokens, after
    warming both graphs up; any session with prefill/step/reset (ONNX Runtime's, llama.cpp's)."""
    session.prefill(ids[:8])
    session.step(1)
    session.reset()
    t0 = time.perf_counter()
    tok = int(np.argmax(session.prefill(ids)))
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        tok = int(np.argmax(session.step(tok)))
    return t_pre, time.perf_counter() - t0


def encode_prompt(session, text: str) -> list[int]:
    """`text` as token ids for `session`, BOS first at position 0 where the model's tokenizer adds one
    (manifest add_bos). Text that is not valid Unicode (lone surrogates) is a clear error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgeseqError(f"the prompt is not valid UTF-8 text (character {e.start}: {text[e.start]!r})") from None
    ids = session.model.tokenizer.encode(text)
    bos = session.model.manifest.get("bos_token_id")
    if ids and session.position == 0 and session.model.manifest.get("add_bos") and bos is not None and ids[0] != bos:
        ids = [bos] + ids  # the model's tokenizer starts a sequence with BOS (manifest add_bos)
    return ids


class Session:
    def __init__(self, model, prefill_chunk: int | None = None):
        """prefill_chunk: the longest slice of a prompt fed to the prefill graph at once (default: the
        bundle's, the family's choice; activations and ONNX Runtime's arena grow with it)."""
        ort = model.engine.ort
        self.model = model
        self.prefill_chunk = int(prefill_chunk or model.prefill_chunk)
        self.spec = model.state_spec
        self.position = 0
        self.stats = Stats()
        dev = model.engine.device
        # the arena: [ping, pong], each a list of OrtValues in spec order. An attention ring (key/value)
        # is one buffer in both: the graphs write a ring's new slots in place (kernels/attention.py),
        # so a ring is neither copied per token nor held twice
        ping = [ort.OrtValue.ortvalue_from_shape_and_type((1, *s.shape), np.float32, dev, 0) for s in self.spec]
        self._bufs = [ping, [ov if s.kind in IN_PLACE else
                             ort.OrtValue.ortvalue_from_shape_and_type((1, *s.shape), np.float32, dev, 0)
                             for s, ov in zip(self.spec, ping)]]
        self._logits = np.zeros((1, model.vocab_size), np.float32)
        self._logits_ov = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._ids = np.zeros((1, 1), np.int64)
        self._ids_ov = ort.OrtValue.ortvalue_from_numpy(self._ids)
        # attention families: the absolute position of the call's first token, fed on every run
        self._pos = np.zeros(1, np.int64)
        self._pos_ov = ort.OrtValue.ortvalue_from_numpy(self._pos) if model.uses_position else None
        self._cur = 0
        self._step = model.engine.session(model.engine.decode_graph)
        self._bindings = [self._bind(self._step, c, self._ids_ov) for c in (0, 1)]
        self._fixed = model.engine.fixed_io
        if self._fixed:
            self._bind_fixed(ort, dev)
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the model's initial state (position 0)."""
        init = self.model.initial_state()
        for ov, s in zip(self._bufs[0], self.spec):
            ov.update_inplace(init[s.input_name])
        self._cur = 0
        self.position = 0
        self._has_logits = False  # no token fed yet: generate("") starts from BOS

    def state(self) -> dict[str, np.ndarray]:
        """A copy of the current state, by input name."""
        return {s.input_name: ov.numpy().copy() for s, ov in zip(self.spec, self._bufs[self._cur])}

    def set_state(self, arrays: dict[str, np.ndarray], position: int = 0, logits: np.ndarray | None = None) -> None:
        """Replace the state. `logits` (the logits after the state's last token) let generate("") continue
        from it; without them a continuation needs some text (state files do not hold logits)."""
        for ov, s in zip(self._bufs[self._cur], self.spec):
            ov.update_inplace(np.ascontiguousarray(arrays[s.input_name], dtype=np.float32))
        self.position = position
        self._has_logits = logits is not None
        if logits is not None:
            self._logits[0] = np.asarray(logits, np.float32).reshape(-1)

    def last_logits(self) -> np.ndarray | None:
        """The logits after the last token fed, or None (a fresh, reset, loaded or set state)."""
        return self._logits[0].copy() if self._has_logits else None

    def save_state(self, path: str) -> None:
        statefile.save(path, self.state(), self.model.weights_sha256, self.model.family_name, self.position)

    def load_state(self, path: str) -> None:
        expected = {s.input_name: ((1, *s.shape), "float32") for s in self.spec}
        arrays, pos = statefile.load(path, expected, self.model.weights_sha256, self.model.family_name)
        self.set_state(arrays, pos)

    def fork(self) -> "Session":
        """A new session starting from a copy of this one's state."""
        t = Session(self.model)
        t.set_state(self.state(), self.position, self.last_logits())
        return t

    # -- compute -------------------------------------------------------------------------------
    def _bind(self, sess, cur: int, ids_ov):
        io = sess.io_binding()
        io.bind_ortvalue_input("input_ids", ids_ov)
        if self._pos_ov is not None:
            io.bind_ortvalue_input("position", self._pos_ov)
        for s, src, dst in zip(self.spec, self._bufs[cur], self._bufs[1 - cur]):
            io.bind_ortvalue_input(s.input_name, src)
            io.bind_ortvalue_output(s.output_name, dst)
        return io

    def _bind_fixed(self, ort, dev) -> None:
        """CUDA graphs replay fixed addresses: the token id and the logits get buffers on the device, and
        each parity's binding (ping->pong, pong->ping) is made once and never re-bound. Each parity is
        its own captured graph (run option gpu_graph_id), numbered per session so that two sessions of
        one model never replay each other's buffers."""
        if "position" in [i.name for i in self._step.get_inputs()]:
            raise EdgeseqError("fixed_io / cuda_graph: graphs with a position input are not supported yet")
        self._ids_dev = ort.OrtValue.ortvalue_from_shape_and_type((1, 1), np.int64, dev, 0)
        self._logits_dev = ort.OrtValue.ortvalue_from_shape_and_type((1, self.model.vocab_size), np.float32, dev, 0)
        self._bindings = [self._bind(self._step, c, self._ids_dev) for c in (0, 1)]
        self._run_options = []
        for io, graph_id in zip(self._bindings, self.model.engine.new_graph_ids(2)):
            io.bind_ortvalue_output("logits", self._logits_dev)
            ro = ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options.append(ro)

    def _step_fixed(self, token_id: int) -> np.ndarray:
        self._ids[0, 0] = token_id
        self._ids_dev.update_inplace(self._ids)
        io = self._bindings[self._cur]
        self._step.run_with_iobinding(io, self._run_options[self._cur])
        io.synchronize_outputs()
        self._cur ^= 1
        self.position += 1
        self._logits[0] = self._logits_dev.numpy()[0]
        self._has_logits = True
        return self._logits[0].copy()

    def step(self, token_id: int) -> np.ndarray:
        """Feed one token; returns the next token's logits (float32 [vocab])."""
        self._check_token(token_id)
        self._check_room(1)
        if self._fixed:
            return self._step_fixed(token_id)
        self._ids[0, 0] = token_id
        io = self._bindings[self._cur]
        # re-bound each step: an input on another device than the graph's is copied at bind time
        io.bind_ortvalue_input("input_ids", self._ids_ov)
        if self._pos_ov is not None:
            self._pos[0] = self.position
            io.bind_ortvalue_input("position", self._pos_ov)
        io.bind_ortvalue_output("logits", self._logits_ov)
        self._step.run_with_iobinding(io)
        self._cur ^= 1
        self.position += 1
        self._has_logits = True
        return self._logits[0].copy()

    def prefill(self, token_ids, progress=None) -> np.ndarray:
        """Feed tokens from the current state; returns the logits after the last one. Text is encoded
        with the model's tokenizer (BOS first at position 0 where the model wants it). `progress(n)`, if
        given, is called after each slice of n tokens fed."""
        ids = np.asarray(self._token_ids(token_ids), dtype=np.int64)
        if ids.size == 0:
            raise EdgeseqError("prefill needs at least one token")
        for t in (int(ids.min()), int(ids.max())):
            self._check_token(t)
        self._check_room(int(ids.size))
        if ids.size == 1 or "prefill" not in self.model.manifest["graphs"]:  # mobile bundles: step graph only
            for t in ids[:-1]:
                self.step(int(t))
            out = self.step(int(ids[-1]))
            if progress:
                progress(int(ids.size))
            return out
        ort = self.model.engine.ort
        sess = self.model.engine.session("prefill")
        step = self.prefill_chunk
        for a in range(0, ids.size, step):
            chunk = ids[a:a + step]
            if chunk.size == 1:
                self.step(int(chunk[0]))
                if progress:
                    progress(1)
                continue
            self._pos[0] = self.position
            io = self._bind(sess, self._cur, ort.OrtValue.ortvalue_from_numpy(chunk.reshape(1, -1)))
            io.bind_ortvalue_output("logits", self._logits_ov)
            # the arena shrinks once, after the prompt's last chunk (each chunk's activations fit the last's)
            last = a + step >= ids.size
            sess.run_with_iobinding(io, self.model.engine.prefill_run_options() if last else None)
            self._cur ^= 1
            self.position += int(chunk.size)
            self._has_logits = True
            if progress:
                progress(int(chunk.size))
        return self._logits[0].copy()

    def logits_all(self, token_ids) -> np.ndarray:
        """Feed tokens and return the logits at every position (float32 [t, vocab]), for evaluation."""
        ids = np.asarray(self._token_ids(token_ids), dtype=np.int64).reshape(1, -1)
        if ids.size == 0:
            raise EdgeseqError("logits_all needs at least one token")
        for t in (int(ids.min()), int(ids.max())):
            self._check_token(t)
        self._check_room(ids.shape[1])
        if "prefill_all" not in self.model.manifest["graphs"]:  # mobile bundles: step graph only
            return np.stack([self.step(int(t)) for t in ids[0]])
        sess = self.model.engine.session("prefill_all")
        feeds = {"input_ids": ids}
        if self._pos_ov is not None:
            feeds["position"] = np.array([self.position], np.int64)
        feeds.update({s.input_name: ov.numpy() for s, ov in zip(self.spec, self._bufs[self._cur])})
        outs = sess.run(None, feeds, self.model.engine.prefill_run_options())
        self.set_state({s.input_name: o for s, o in zip(self.spec, outs[1:])}, self.position + ids.shape[1],
                       outs[0][0][-1])
        return outs[0][0]

    def _check_room(self, n: int) -> None:
        """A full-attention KV ring holds max_context tokens: past that, stop unless asked to slide."""
        mc = self.model.max_context
        if mc and self.position + n > mc and self.model.on_full != "slide":
            raise EdgeseqError(f"context full: {mc} tokens (at position {self.position}, {n} more asked); "
                               f"use --max-context or --on-full slide")

    def _token_ids(self, tokens) -> list[int]:
        """Token ids from ids or text; a clear error for anything else (never int()'s ValueError)."""
        if isinstance(tokens, str):
            return encode_prompt(self, tokens)
        try:
            ids = [int(t) for t in tokens]
        except (TypeError, ValueError):
            raise EdgeseqError(f"expected token ids (ints) or text, not {type(tokens).__name__} "
                               f"{str(tokens)[:40]!r}") from None
        return ids

    def _check_token(self, t: int) -> None:
        if not 0 <= t < self.model.vocab_size:
            raise EdgeseqError(f"token id {t} is outside the vocabulary (0..{self.model.vocab_size - 1})")

    # -- text ----------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, stop_token_ids: list[int] | None = None, min_p: float = 0.0,
                 progress=None) -> Iterator[str]:
        """Continue from the current state with `prompt`, yielding text pieces as they complete.

        Stops at max_tokens, at an end token (the manifest's stop tokens plus `stop_token_ids`), or when
        the text produced contains a `stop` string (the stop string itself is not yielded). The state
        then includes every token sampled except an end token. `self.stats` holds the timings. max_tokens
        None or negative: until an end token or stop string. `progress` goes to prefill."""
        tok = self.model.tokenizer
        ids = encode_prompt(self, prompt) if isinstance(prompt, str) else self._token_ids(prompt)
        if not ids:
            bos = self.model.manifest.get("bos_token_id")
            if self.position == 0:  # a fresh sequence: start from BOS, the only place BOS belongs
                if bos is None:
                    raise EdgeseqError("empty prompt and the model has no BOS token to start from")
                ids = [bos]
            elif not self._has_logits:  # never BOS mid-sequence, never stale logits
                raise EdgeseqError("empty prompt: this state was loaded or set without the logits of its last "
                                   "token, so there is nothing to continue from; give some text")
        sampler = Sampler(SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed, min_p))
        ends = set(self.model.stop_token_ids) | set(stop_token_ids or [])
        stops = [s for s in (stop or []) if s]
        hold = max((len(s) for s in stops), default=1) - 1
        st = self.stats = Stats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        # no ids: continue from the logits after the last token fed
        logits = self.prefill(ids, progress) if ids else self._logits[0].copy()
        st.prompt_seconds = time.perf_counter() - t0
        history = list(ids)
        stream = tok.stream()
        t0 = time.perf_counter()
        st.stopped_by = "max_tokens"
        try:
            yield from self._decode(logits, sampler, history, ends, stops, hold, stream, st, max_tokens)
        finally:  # also when the caller stops early (closes this generator): the timings stay right
            st.decode_seconds = time.perf_counter() - t0

    def _decode(self, logits, sampler, history, ends, stops, hold, stream, st, max_tokens) -> Iterator[str]:
        pending = ""
        for _ in range(max_tokens if max_tokens is not None and max_tokens >= 0 else sys.maxsize):
            nxt = sampler(logits, history)
            if nxt in ends:
                st.stopped_by = "end_token"
                break
            history.append(nxt)
            logits = self.step(nxt)
            st.decode_tokens += 1
            pending += stream.push(nxt)
            cut = min((pending.find(s) for s in stops if s in pending), default=-1)
            if cut >= 0:
                st.extra["stop"] = next(s for s in stops if pending.find(s) == cut)  # the one that matched
                pending = pending[:cut]
                st.stopped_by = "stop_string"
                break
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
        if st.stopped_by != "stop_string":
            pending += stream.flush()
        if pending:
            yield pending
