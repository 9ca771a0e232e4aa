"""What every family provides, and the graph assembly they share.

A family turns (config, canonical weights) into graphs. Graph kinds:

    step         input_ids (b, 1)  + state -> logits (b, vocab)    + state   static shapes, no loops
    prefill      input_ids (b, t)  + state -> logits (b, vocab)    + state   logits of the last token
    prefill_all  input_ids (b, t)  + state -> logits (b, t, vocab) + state   every position (eval)

State tensors are named after ONNX Runtime GenAI's recurrent naming: `past_key_values.{layer}.{kind}`
in, `present.{layer}.{kind}` out.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator, Protocol

import numpy as np
from onnx import TensorProto

from edgeseq.errors import EdgeseqError
from edgeseq.graph import GraphBuilder, WeightInfo
from edgeseq.tensor_table import Entry, Table
from edgeseq.state import StateTensor  # noqa: F401  (families declare their state with it)

GRAPH_KINDS = ("step", "prefill", "prefill_all")


class TensorSource(Protocol):
    """What a checkpoint reader offers a family's `convert` (see edgeseq.exporters.checkpoint)."""

    path: str
    config: dict
    stored_by: str | None  # the tool that wrote a one-file checkpoint ("blinkdl", "rwkv.cpp"); None for a directory

    def keys(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...  # float tensors come back as float32


def cfg_get(cfg: dict, names: tuple[str, ...], default: Any = dataclasses.MISSING, where: str = "config.json"):
    """The first of several accepted spellings of a config key; a clear error when none is present."""
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    if default is dataclasses.MISSING:
        raise EdgeseqError(f"{where}: missing key; expected one of {', '.join(names)}")
    return default


class Family:
    """Base of every family. Subclasses set the class attributes and implement the four hooks."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    Config: ClassVar[type]
    # tokens per prefill call the runtime feeds: activations (and ONNX Runtime's arena) grow with it
    prefill_chunk: ClassVar[int] = 256
    # families with attention: every graph takes `position` (int64 (batch,), each row's absolute position
    # of the call's first token; (1,) gives every row the same one); `body` finds it as state["position"]
    uses_position: ClassVar[bool] = False
    # symbolic dims of the state spec and their defaults, resolved when a session is created:
    # {"max_context": 4096} for a full-attention KV ring (the manifest records the default)
    symbolic_dims: ClassVar[dict[str, int]] = {}
    # RWKV state-tuning files (rwkv_common.read_time_state): how they keep each head's matrix
    # ("value_key" or "key_value"); None where the family has no such files
    time_state_layout: ClassVar[str | None] = None
    # the llama.cpp architecture it is written as (edgeseq.gguf_names.ArchMap), None: `edgeseq-<family>`
    gguf: ClassVar[Any] = None

    def __init__(self, config):
        self.config = config

    # -- hooks -------------------------------------------------------------------------------
    @classmethod
    def read_config(cls, src: TensorSource):
        """Resolve every alias of the checkpoint's config (and shapes it implies) into `Config`."""
        raise NotImplementedError

    def state_spec(self) -> list[StateTensor]:
        raise NotImplementedError

    def tensors(self) -> list[Entry]:
        """The family's tensor table (edgeseq.tensor_table): every canonical weight, where each checkpoint
        layout keeps it, and its llama.cpp GGUF tensor."""
        raise NotImplementedError

    def source(self, src: TensorSource) -> TensorSource:
        """The checkpoint as the table reads it: a renamed view for layouts that differ from the table's
        only in names (tensor_table.Renamed)."""
        return src

    def layout(self, src: TensorSource) -> tuple[str | None, str]:
        """(the checkpoint layout `src` is in, its tensor-name prefix): the table's column to read. By
        default the tool that wrote a one-file checkpoint (`stored_by`), None for a model directory."""
        return src.stored_by, ""

    def convert(self, src: TensorSource) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (canonical name, array) for every weight the graphs use, one at a time."""
        src = self.source(src)
        layout, prefix = self.layout(src)
        return self.table().convert(src, layout, prefix)

    def body(self, b: GraphBuilder, ids: str, state: dict[str, str], tokens: int | None, fused: bool):
        """Embedding and layers: returns (hidden (b, t, d) before the final norm, {output name: value})."""
        raise NotImplementedError

    def head(self, b: GraphBuilder, hidden: str) -> str:
        """Final norm and LM head: (b, t, d) -> (b, t, vocab)."""
        raise NotImplementedError

    def quant_policy(self, name: str, shape: tuple[int, int]) -> str | None:
        """How an int4/int8 export keeps one matrix the graphs multiply with (shape (out, in)): None
        follows the recipe, "int8" keeps it at 8 bits under int4, "f32" leaves it unquantized. Only
        matrices read by MatMul, a transposed-head Gemm or the embedding Gather are ever quantized
        (edgeseq.quant.onnx_quant); families override this for the ones too small or too sensitive."""
        return None

    def quant_block(self, bits: int, block: int) -> int:
        """The block an int4/int8 export quantizes this family's `bits`-bit matrices in, given the
        recipe's (`--block-size`). At accuracy level 4 ONNX Runtime also rounds the activations to int8 in
        blocks of this size, so a smaller block lowers both errors; families override this where measured."""
        return block

    # -- shared ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def config_json(self) -> dict:
        return dataclasses.asdict(self.config)

    @classmethod
    def from_json(cls, d: dict) -> "Family":
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        return cls(cls.Config(**{k: v for k, v in d.items() if k in fields}))

    def table(self) -> Table:
        return Table(self.tensors(), self.config.n_layer)

    def state_bytes(self) -> int:
        return sum(s.resolve(self.symbolic_dims).nbytes for s in self.state_spec())

    def build_graph(self, kind: str, weights: dict[str, WeightInfo], fused: bool, weights_file="weights.bin"):
        """Assemble one graph kind around the family's body and head."""
        if kind not in GRAPH_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}")
        b = GraphBuilder(weights, weights_file, name=f"{self.name}_{kind}")
        tokens = 1 if kind == "step" else None
        f32 = TensorProto.FLOAT
        ids = b.input("input_ids", TensorProto.INT64, ["batch", tokens if tokens else "sequence"])
        state_in = {}
        if self.uses_position:
            state_in["position"] = b.input("position", TensorProto.INT64, ["batch"])
        for s in self.state_spec():
            state_in[s.input_name] = b.input(s.input_name, f32, ["batch", *s.shape])
        hidden, state_out = self.body(b, ids, state_in, tokens, fused)
        v = self.vocab_size
        if kind == "prefill_all":
            logits = self.head(b, hidden)
            b.output(logits, "logits", f32, ["batch", "sequence", v])
        else:
            last = hidden.gather([-1], axis=1) if tokens != 1 else hidden  # (b, 1, d)
            logits = self.head(b, last).reshape(-1, v)
            b.output(logits, "logits", f32, ["batch", v])
        for s in self.state_spec():
            b.output(state_out[s.output_name], s.output_name, f32, ["batch", *s.shape])
        return b
