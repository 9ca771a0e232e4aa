"""The state spec: every family declares its recurrent state as named tensors (no onnx import here,
so the runtime can read a manifest's spec without the graph-building machinery)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edgeseq.errors import EdgeseqError


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the recurrent state. `shape` excludes the leading batch axis."""

    layer: int
    kind: str  # conv_state | recurrent_state | shift_att | wkv | ... | key | value
    shape: tuple[int, ...]
    doc: str
    dtype: str = "float32"
    init: float = 0.0

    @property
    def input_name(self) -> str:
        return f"past_key_values.{self.layer}.{self.kind}"

    @property
    def output_name(self) -> str:
        return f"present.{self.layer}.{self.kind}"

    def resolve(self, dims: dict[str, int]) -> "StateTensor":
        """This tensor with its symbolic dims (a string such as "max_context": a full-attention KV ring
        whose length a session chooses) replaced by sizes."""
        if all(isinstance(d, int) for d in self.shape):
            return self
        missing = [d for d in self.shape if isinstance(d, str) and d not in dims]
        if missing:
            raise EdgeseqError(f"state tensor {self.input_name}: no size given for dim {missing[0]!r}")
        return replace(self, shape=tuple(int(dims[d]) if isinstance(d, str) else d for d in self.shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"name": self.input_name, "output": self.output_name, "layer": self.layer, "kind": self.kind,
                "shape": ["batch", *self.shape], "dtype": self.dtype, "init": self.init, "doc": self.doc}

    @classmethod
    def from_json(cls, d: dict) -> "StateTensor":
        return cls(layer=d["layer"], kind=d["kind"], shape=tuple(d["shape"][1:]), doc=d.get("doc", ""),
                   dtype=d.get("dtype", "float32"), init=float(d.get("init", 0.0)))
