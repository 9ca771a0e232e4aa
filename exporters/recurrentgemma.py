"""The `recurrentgemma` package's PyTorch checkpoints (google-deepmind/recurrentgemma, `torch/`): one
pickled state dict (`2b.pt`, `9b.pt`, …) whose names follow its modules (`embedder.input_embedding`,
`blocks.{i}.recurrent_block.rg_lru.a_gate.w`, `blocks.{i}.mlp_block.ffw_up.w`, …), with no config file:
the family reads the dimensions from the tensors and takes the RecurrentGemma v1 presets (window 2048,
logit soft-cap 30, embeddings scaled by sqrt(width)) for what they do not imply. A `config.json`
beside the file, when present, overrides those (the package's `GriffinConfig` field names or HF's).
"""
from __future__ import annotations

import json
import os

from edgeseq.errors import EdgeseqError
from edgeseq.exporters.checkpoint import SingleFileSource

MARKER = "embedder.input_embedding"
# Gemma's SentencePiece vocabulary: <pad> 0, <eos> 1, <bos> 2
GEMMA_SPECIAL = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}



class GriffinFile(SingleFileSource):
    """A `recurrentgemma` package state dict, offered as a TensorSource."""

    def __init__(self, path: str):
        super().__init__(path)
        if MARKER not in self.tensors:
            raise EdgeseqError(f"{path}: no {MARKER} tensor; not a recurrentgemma package checkpoint")
        self.config = dict(GEMMA_SPECIAL)
        side = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if os.path.isfile(side):
            try:
                with open(side) as f:
                    self.config.update(json.load(f))
            except ValueError as e:
                raise EdgeseqError(f"{side}: not valid JSON ({e})") from None

    @property
    def architecture(self) -> str:
        return "Griffin"
