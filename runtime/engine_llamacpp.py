"""llama.cpp as an engine (llama-cpp-python, the `llamacpp` extra) for the GGUF architectures it knows.

    model = edgeseq.load("x.gguf", engine="llama.cpp")   # or `edgeseq run x.gguf --engine llama.cpp`
    s = model.session(); s.prefill(ids); s.step(tok); s.save_state("a.state"); t = s.fork()

Sessions have the ONNX Runtime session's API (step, prefill, generate, state save/load, fork, reset).
One llama.cpp context serves every session of a model: it holds one sequence (seq 0) at a time, and a
session whose state is not the context's swaps it in through llama_state_seq_set_data (the recurrent
state is small and fixed: ~20 KB per sequence at mamba-130m's width). Tokens go through
llama_batch_get_one and llama_decode; the logits of the last token come from llama_get_logits_ith. The
text side (tokenizer, sampling, streaming, stop strings, the GGUF's chat template) is edgeseq's, shared
with the ONNX engine, so `edgeseq chat x.gguf --engine llama.cpp` feeds the text the ONNX path feeds.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.runtime import statefile
from edgeseq.runtime.session import Session, Stats

FAMILY_TAG = "llama.cpp"  # state files of this engine hold llama.cpp's sequence bytes, not edgeseq's tensors


def _import():
    try:
        import llama_cpp
    except ImportError:
        raise EdgeseqError("--engine llama.cpp needs llama-cpp-python: pip install 'edgeseq[llamacpp]'") from None
    return llama_cpp


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp; `session()` gives sessions with the edgeseq Session API."""

    engine_name = "llama.cpp"

    def __init__(self, path: str, threads: int | None = None, batch: int = 512, meta=None):
        from edgeseq.chat_template import gguf_template
        from edgeseq.gguf_file import GGUFFile
        from edgeseq.gguf_names import LLAMA_ARCHS

        lc = self.lc = _import()
        self.path = path
        with GGUFFile(path) as g:  # a clear error for damaged files before llama.cpp sees them
            arch = g.architecture
            ftype = g.get("general.file_type", -1)
            if arch not in LLAMA_ARCHS:
                raise EdgeseqError(f"{path}: architecture {arch!r} does not run in llama.cpp (it runs "
                                   f"{', '.join(sorted(LLAMA_ARCHS))}); use edgeseq's engine")
            # the GGUF's own tokenizer.chat_template, rendered by edgeseq's renderer as the ONNX path does
            # (none: plain continuation, also as there; --chat-template overrides it in Chat)
            template = gguf_template(g, g.get("tokenizer.ggml.tokens", None, list))
        self.family_name = arch
        self.meta = meta  # the edgeseq Model of the same file (tokenizer, stop tokens), when given
        n = int(threads) if threads else max(1, os.cpu_count() or 1)
        try:
            self.llm = lc.Llama(path, n_ctx=0, n_batch=batch, n_ubatch=batch, n_threads=n, n_threads_batch=n,
                                verbose=False)
        except ValueError as e:
            raise EdgeseqError(f"{path}: llama.cpp cannot load this file ({e})") from None
        self.ctx = self.llm._ctx.ctx
        self.n_batch = batch
        self.vocab_size = int(self.llm.n_vocab())
        self.tokenizer = meta.tokenizer if meta is not None else None
        self.stop_token_ids = list(meta.stop_token_ids) if meta is not None else []
        file_type = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 15: "q4_k_m",
                     17: "q5_k_m", 18: "q6_k", 32: "bf16"}.get(ftype, f"file_type {ftype}")
        base = meta.manifest if meta is not None else {}
        self.manifest = {**base, "chat_template": base.get("chat_template") or template,
                         "quant": {"recipe": file_type}, "flavour": "llama.cpp"}
        self.weights_bytes = os.path.getsize(path)
        self._owner = None  # the session whose state is in the context's seq 0
        self._sha = None

    @property
    def weights_sha256(self) -> str:
        """The GGUF file's sha256: state files are tied to it (computed on first use)."""
        if self._sha is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            self._sha = h.hexdigest()
        return self._sha

    @property
    def state_bytes(self) -> int:
        return int(self.lc.llama_state_seq_get_size(self.ctx, 0))

    def session(self) -> "LlamaCppSession":
        return LlamaCppSession(self)

    # -- the context ----------------------------------------------------------------------------
    def _clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def _get(self) -> bytes:
        n = self.lc.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        got = self.lc.llama_state_seq_get_data(self.ctx, buf, n, 0)
        if got != n:
            raise EdgeseqError(f"llama.cpp returned {got} of {n} state bytes")
        return bytes(buf)

    def _set(self, data: bytes) -> None:
        self._clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self.lc.llama_state_seq_set_data(self.ctx, buf, len(data), 0) != len(data):
            raise EdgeseqError("llama.cpp refused the state (from another model or a damaged file?)")

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        """Feed tokens after what seq 0 holds; returns the last token's logits."""
        lc = self.lc
        for a in range(0, ids.size, self.n_batch):
            chunk = ids[a:a + self.n_batch]
            arr = (lc.llama_token * chunk.size)(*chunk.tolist())
            rc = lc.llama_decode(self.ctx, lc.llama_batch_get_one(arr, chunk.size))
            if rc != 0:
                raise EdgeseqError(f"llama.cpp's llama_decode failed (code {rc})")
        ptr = lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()


def _saved_length(path: str) -> int:
    """The byte length of the llama.cpp state in a state file, from its header (statefile's format)."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(len(statefile.MAGIC) + 4)
            (n,) = struct.unpack_from("<I", head, len(statefile.MAGIC))
            tensors = json.loads(f.read(min(n, 1 << 20)))["tensors"]
        return int(tensors[0]["shape"][0]) if tensors and tensors[0]["name"] == "llama_cpp.seq0" else -1
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, RecursionError):
        return -1  # statefile.load then names the problem


class LlamaCppSession:
    def __init__(self, model: LlamaCppModel):
        self.model = model
        self.position = 0
        self.stats = Stats()
        self._state: bytes | None = None  # this session's state while another one holds the context
        self._logits = np.zeros((1, model.vocab_size), np.float32)  # (1, vocab), as Session keeps them
        self.reset()

    # -- state -----------------------------------------------------------------------------------
    def _acquire(self) -> None:
        m = self.model
        if m._owner is self:
            return
        if m._owner is not None:
            m._owner._state = m._get()
        if self._state is None:
            m._clear()
        else:
            m._set(self._state)
        m._owner = self

    def reset(self) -> None:
        if self.model._owner is self:
            self.model._owner = None
        self._state = None
        self.position = 0
        self._has_logits = False  # generate("") after a reset starts from BOS, after load_state needs text

    def state_bytes_copy(self) -> bytes:
        if self.model._owner is self:
            return self.model._get()
        if self._state is None:  # never run: the empty state, as llama.cpp writes it
            self._acquire()
            return self.model._get()
        return self._state

    def save_state(self, path: str) -> None:
        data = np.frombuffer(self.state_bytes_copy(), np.uint8)
        statefile.save(path, {"llama_cpp.seq0": data}, self.model.weights_sha256, FAMILY_TAG, self.position)

    def load_state(self, path: str) -> None:
        n = _saved_length(path)  # llama.cpp's sequence bytes vary (an empty sequence writes fewer)
        arrays, pos = statefile.load(path, {"llama_cpp.seq0": ((n,), "uint8")}, self.model.weights_sha256,
                                     FAMILY_TAG)
        self._acquire()
        self.model._set(arrays["llama_cpp.seq0"].tobytes())
        self.position = pos
        self._has_logits = False

    def fork(self) -> "LlamaCppSession":
        t = LlamaCppSession(self.model)
        t._state, t.position = self.state_bytes_copy(), self.position
        t._logits[:], t._has_logits = self._logits, self._has_logits
        return t

    # -- compute ---------------------------------------------------------------------------------
    def _check(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.model.vocab_size):
            raise EdgeseqError(f"token id outside the vocabulary (0..{self.model.vocab_size - 1})")

    def step(self, token_id: int) -> np.ndarray:
        return self.prefill([token_id])

    def prefill(self, token_ids, progress=None) -> np.ndarray:
        ids = np.asarray(self._token_ids(token_ids), dtype=np.int32)
        if ids.size == 0:
            raise EdgeseqError("prefill needs at least one token")
        self._check(ids)
        self._acquire()
        self._logits[0] = self.model._decode(ids)
        self.position += int(ids.size)
        self._has_logits = True
        if progress:
            progress(int(ids.size))
        return self._logits[0].copy()

    # the text side is edgeseq's own, the same code as the ONNX Runtime session's
    generate = Session.generate
    _decode = Session._decode
    _token_ids = Session._token_ids
