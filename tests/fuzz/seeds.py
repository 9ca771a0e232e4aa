"""Tiny valid inputs for every reader, built deterministically into a folder (a few MB in all)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from fuzz.chat import chat_file

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
RWKV_CPP = FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"

# a 2-layer byte-level Mamba (d 16, inner 32, state 4, conv 4, dt rank 1): every reader's seed derives from it
D, DI, N, K, R, L, V = 16, 32, 4, 4, 1, 2, 256


def mamba_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    t = {"backbone.embeddings.weight": f(V, D), "backbone.norm_f.weight": 1 + f(D)}
    for i in range(L):
        p = f"backbone.layers.{i}."
        t[p + "norm.weight"] = 1 + f(D)
        t[p + "mixer.A_log"] = np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), (DI, 1)))
        t[p + "mixer.D"] = np.ones(DI, np.float32)
        t[p + "mixer.conv1d.weight"] = f(DI, 1, K)
        t[p + "mixer.conv1d.bias"] = f(DI)
        t[p + "mixer.in_proj.weight"] = f(2 * DI, D)
        t[p + "mixer.x_proj.weight"] = f(R + 2 * N, DI)
        t[p + "mixer.dt_proj.weight"] = f(DI, R)
        t[p + "mixer.dt_proj.bias"] = f(DI) - 2
        t[p + "mixer.out_proj.weight"] = f(D, DI)
    return t


CONFIG = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": V, "hidden_size": D,
          "state_size": N, "num_hidden_layers": L, "conv_kernel": K, "expand": 2, "time_step_rank": R,
          "intermediate_size": DI, "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True}


def safetensors_dir(dst: Path) -> Path:
    from safetensors.numpy import save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(CONFIG))
    save_file(mamba_tensors(), str(dst / "model.safetensors"))
    return dst


def sharded_dir(dst: Path) -> Path:
    from safetensors.numpy import save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(CONFIG))
    t = mamba_tensors()
    names = sorted(t)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    wm = {}
    for fname, ns in parts.items():
        save_file({n: t[n] for n in ns}, str(dst / fname))
        wm.update({n: fname for n in ns})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dst


def rwkvcpp_file(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RWKV_CPP, dst)
    return dst


def bundle_dir(dst: Path, work: Path) -> Path:
    from edgeseq.exporters.export import export

    export(str(safetensors_dir(work / "mamba-st")), str(dst))
    return dst


def gguf_file(dst: Path, work: Path) -> Path:
    from edgeseq.exporters.gguf_writer import export_gguf

    export_gguf(str(safetensors_dir(work / "mamba-st")), str(dst))
    return dst


def state_file(dst: Path, bundle: Path) -> Path:
    import edgeseq

    dst.parent.mkdir(parents=True, exist_ok=True)
    s = edgeseq.load(str(bundle)).session()
    s.prefill([1, 2, 3])
    s.save_state(str(dst))
    return dst


def world_vocab(dst: Path) -> Path:
    """An RWKV World vocabulary in its format (`id literal length`): the 256 bytes and a few words."""
    lines = []
    for i in range(256):
        b = bytes([i])
        try:
            lit = repr(b.decode("utf-8"))
        except UnicodeDecodeError:
            lit = repr(b)
        lines.append(f"{i + 1} {lit} 1")
    for j, w in enumerate(["the", " and", "é", "\n\n", "✓"], 257):
        lines.append(f"{j} {w!r} {len(w.encode())}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def tokenizer_json(dst: Path) -> Path:
    """A small byte-level BPE tokenizer.json with a normalizer, a pre-tokenizer and a decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("t", "h"), ("th", "e"), ("a", "n"), ("an", "d")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst))
    return dst


def pth_file(dst: Path) -> Path:
    """A tiny BlinkDL RWKV-7 .pth (C 32, 2 layers), saved by torch.save."""
    import torch
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from rwkv_builders import state_dict
    finally:
        sys.path.pop(0)
    sd = state_dict("7", C=32, L=2, H=1, F=64)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in sd.items()},
               str(dst))
    return dst


def build_all(work: Path) -> dict[str, Path]:
    """Every seed, built once into `work` (reused when present)."""
    work = Path(work)
    done = work / ".done"
    seeds = {"safetensors": work / "safetensors", "shards": work / "shards", "rwkvcpp": work / "rwkvcpp" / "m.bin",
             "gguf": work / "gguf" / "m.gguf", "bundle": work / "bundle", "state": work / "state" / "s.state",
             "world": work / "tok" / "rwkv_vocab_v20230424.txt", "tokenizer": work / "tok" / "tokenizer.json",
             "pth": work / "pth" / "m.pth", "chat": work / "chat" / "chat.json"}
    if done.exists():
        if not seeds["chat"].exists():  # (seed folders built before chat templates were fuzzed)
            chat_file(seeds["chat"])
        return seeds
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    safetensors_dir(seeds["safetensors"])
    sharded_dir(seeds["shards"])
    rwkvcpp_file(seeds["rwkvcpp"])
    bundle_dir(seeds["bundle"], work / "src")
    gguf_file(seeds["gguf"], work / "src")
    state_file(seeds["state"], seeds["bundle"])
    world_vocab(seeds["world"])
    tokenizer_json(seeds["tokenizer"])
    pth_file(seeds["pth"])
    chat_file(seeds["chat"])
    done.write_text("ok")
    os.sync()
    return seeds
