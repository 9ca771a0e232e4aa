"""The readers under fuzz: for each, its seed, its mutations and what reading means (`run`). The targets
live by format: checkpoints.py, gguf_files.py, bundles.py, texts.py (and chat templates in chat.py).

    safetensors  a model folder with model.safetensors: `edgeseq export` (config, header, tensors, shapes)
    shards       a sharded safetensors folder: the index's weight_map, then as above
    rwkvcpp      an rwkv.cpp .bin: export
    gguf         a GGUF file: `inspect` (summary), then its bundle built, loaded and run for 2 tokens
    bundle       a bundle folder: edgeseq.load, an ONNX Runtime session per graph, 2 tokens
    state        a state file: Session.load_state on the seed bundle's model
    world        an RWKV World vocabulary: parsed, then a sample encoded and decoded
    tokenizer    a tokenizer.json: loaded, then a sample encoded and decoded
    pth          a BlinkDL .pth: export (torch.load weights_only)
    chat         a chat template and messages: rendered through safe_io.render_untrusted
    chat-as-is   the same through chat_template's Template (what chat and serve call)
"""
from __future__ import annotations

import random

from fuzz.bundles import _run_bundle, _run_state, bundle_mutations, state_mutations
from fuzz.chat import _run_chat, _run_chat_as_is, chat_mutations
from fuzz.checkpoints import _run_export, pth_mutations, rwkvcpp_mutations, shard_mutations, st_mutations
from fuzz.gguf_files import _run_gguf, gguf_mutations
from fuzz.mutations import Mutation
from fuzz.texts import _run_tokenizer, _run_world, tokenizer_mutations, world_mutations


class Reader:
    def __init__(self, name, seed, mutations, run, file=lambda c: c, folder=False):
        self.name, self.seed, self._mutations, self.run, self.file, self.folder = name, seed, mutations, run, file, folder

    def mutations(self, seeds: dict, rng: random.Random, n: int) -> list[Mutation]:
        return self._mutations(self.file, self.file(seeds[self.seed]), rng, n)


READERS = {
    "safetensors": Reader("safetensors", "safetensors", st_mutations, _run_export,
                          file=lambda c: c / "model.safetensors", folder=True),
    "shards": Reader("shards", "shards", shard_mutations, _run_export, folder=True),
    "rwkvcpp": Reader("rwkvcpp", "rwkvcpp", rwkvcpp_mutations, _run_export),
    "gguf": Reader("gguf", "gguf", gguf_mutations, _run_gguf),
    "bundle": Reader("bundle", "bundle", bundle_mutations, _run_bundle, folder=True),
    "state": Reader("state", "state", state_mutations, _run_state),
    "world": Reader("world", "world", world_mutations, _run_world),
    "tokenizer": Reader("tokenizer", "tokenizer", tokenizer_mutations, _run_tokenizer),
    "pth": Reader("pth", "pth", pth_mutations, _run_export),
    "chat": Reader("chat", "chat", chat_mutations, _run_chat),
    "chat-as-is": Reader("chat-as-is", "chat", chat_mutations, _run_chat_as_is),
}
