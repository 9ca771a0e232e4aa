"""A loaded model: manifest, family, tokenizer and engine; sessions come from `model.session()`."""
from __future__ import annotations

import os

import numpy as np

from edgeseq.bundle import read_manifest
from edgeseq.errors import EdgeseqError
from edgeseq.state import StateTensor
from edgeseq.runtime.engine_ort import OrtEngine
from edgeseq.runtime.session import Session
from edgeseq.tokenizer import load_tokenizer


class Model:
    def __init__(self, path: str, device: str = "cpu", threads: int | None = None, low_memory: bool = False,
                 max_context: int | None = None, on_full: str = "stop", cuda_graph: bool | None = None,
                 fixed_io: bool = False):
        self.path = path
        self.manifest = m = read_manifest(path)
        self.family_name = m["family"]
        self._family = None
        self._tuned = None  # a bundle's tuned initial state (RWKV state tuning), read on first use
        # full-attention families (Zamba, Zamba2) keep a KV ring of max_context tokens, allocated once per
        # session; when a session fills it: stop with an error, or (on_full="slide") let the ring wrap, so
        # attention then sees the last max_context tokens (numbers then differ from the full model).
        # Models without such a ring ignore both options: their state is fixed anyway.
        if on_full not in ("stop", "slide"):
            raise EdgeseqError(f"on_full must be 'stop' or 'slide', not {on_full!r}")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
            raise EdgeseqError(f"max_context must be a positive number of tokens, not {max_context!r}")
        self.max_context = (max_context or int(m["max_context"])) if "max_context" in m else None
        self.on_full = on_full
        dims = {"max_context": self.max_context} if self.max_context else {}
        self.state_spec = [StateTensor.from_json(s).resolve(dims) for s in m["state"]]
        # attention families take the absolute position of each call's first token as an input
        self.uses_position = "position" in m["graphs"].get("prefill", m["graphs"]["step"]).get("inputs", [])
        self.vocab_size = int(m["vocab_size"])
        self.weights_sha256 = m["weights"]["sha256"]
        # prompt slice per prefill call: activations grow with it, speed saturates (the family's choice)
        self.prefill_chunk = int(m["graphs"].get("prefill", {}).get("chunk") or 256)  # mobile: step graph only
        self.stop_token_ids = [int(t) for t in m.get("stop_token_ids") or []]
        self.tokenizer = load_tokenizer(path, m["tokenizer"])
        if cuda_graph is None:  # CUDA graphs by default on the GPU, where the step graph allows them (no position
            # input: the attention families' per-call position is not captured yet); cuda_graph=False turns them off
            cuda_graph = device == "cuda" and not self.uses_position and "step" in m["graphs"]
        if fixed_io and not cuda_graph and self.uses_position:
            raise EdgeseqError(f"{path}: fixed_io: graphs with a position input ({self.family_name}) are not "
                               f"supported yet")
        self.engine = OrtEngine(path, m, device, threads, low_memory, cuda_graph, fixed_io)

    @property
    def family(self):
        """The family object (config and graph building); imported on first use, since running a
        bundle needs only the manifest."""
        if self._family is None:
            from edgeseq.families import family_by_name

            where = os.path.join(self.path, "edgeseq.json")
            self._family = family_by_name(self.family_name, where).from_json(self.manifest["config"])
        return self._family

    def initial_state(self) -> dict[str, np.ndarray]:
        """Each tensor's declared initial value, or the bundle's tuned initial state where it has one."""
        init = {s.input_name: np.full((1, *s.shape), s.init, np.float32) for s in self.state_spec}
        spec = self.manifest.get("initial_state")
        if spec:
            if self._tuned is None:
                from safetensors.numpy import load_file

                path = os.path.join(self.path, spec["file"])
                try:
                    self._tuned = load_file(path)
                except Exception as e:  # safetensors raises its own error types for damaged files
                    raise EdgeseqError(f"{path}: cannot read the bundle's initial state ({e})") from None
                for name, a in self._tuned.items():
                    if name not in init or a.shape != init[name].shape:
                        raise EdgeseqError(f"{path}: {name} {a.shape} does not match the state spec")
            init.update(self._tuned)
        return init

    @property
    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.state_spec)

    @property
    def weights_bytes(self) -> int:
        return int(self.manifest["weights"]["bytes"])

    def session(self, prefill_chunk: int | None = None) -> Session:
        return Session(self, prefill_chunk)

    def __repr__(self) -> str:
        return f"<edgeseq.Model {self.family_name} {self.path}>"


def load(path, device: str = "cpu", threads: int | None = None, **options) -> Model:
    """options: low_memory, max_context (KV ring length of full-attention models; default the
    manifest's), on_full ("stop" or "slide", when a full-attention session reaches max_context),
    cuda_graph (device "cuda": decode under CUDA graphs; the default there for graphs without a position
    input, False turns it off), fixed_io (decode through the step graph with
    every input and output bound once to fixed buffers, as cuda_graph does, without capturing: on the
    CPU too; see edgeseq.runtime.engine_ort)."""
    path = os.fspath(path)
    engine = options.pop("engine", None)
    from edgeseq.gguf_file import is_gguf

    if path.endswith(".gguf") or os.path.isfile(path) and is_gguf(path):
        from edgeseq.runtime.gguf_model import engine_name, load_gguf

        if engine_name(engine) == "onnxruntime" and options.pop("cache", True) and os.path.isfile(path):
            return _cached_gguf(path, device, threads, **options)
        return load_gguf(path, device=device, threads=threads, engine=engine, **options)
    if engine not in (None, "ort", "onnxruntime"):
        raise EdgeseqError(f"{path}: engine {engine!r} runs GGUF files only; bundles run in ONNX Runtime")
    return Model(path, device=device, threads=threads, **options)


def _cached_gguf(path: str, device: str, threads: int | None, **options) -> Model:
    """A GGUF for ONNX Runtime: converted to a bundle once, kept in the cache folder keyed by the file's
    identity (edgeseq.cache) and reused by every later load; `cache=False` converts into a temporary
    folder removed at exit instead (edgeseq.runtime.gguf_model)."""
    from edgeseq.cache import cached_bundle, file_identity
    from edgeseq.gguf_bundle import gguf_to_bundle

    conv = {"portable": bool(options.pop("portable", False)), "accuracy_level": int(options.pop("accuracy_level", 4)),
            "requant8": bool(options.pop("requant8", True))}
    d, made = cached_bundle("gguf", path, [file_identity(path), conv], lambda out: gguf_to_bundle(path, out, **conv))
    m = Model(d, device=device, threads=threads, **options)
    m.source, m.converted_now = path, made
    return m
