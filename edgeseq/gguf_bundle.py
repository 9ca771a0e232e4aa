"""A GGUF file as an ONNX bundle: what `edgeseq.load("x.gguf")` runs and `edgeseq export x.gguf --format
onnx` writes. Core code (no exporters, no torch), so the runtime can build a GGUF's graphs itself.

    GGUF -> gguf_file (checked reader) -> gguf_names.family_of (family, config, canonical weights)
         -> weights.bin + step/prefill/prefill_all graphs + edgeseq.json, tokenizer from the GGUF keys

Weights: F32 tensors are copied; F16 tensors stay F16 where the canonical layout is a pure rename (the
graphs widen them once at load, as in an f16 bundle); every quantized type (Q8_0, Q4_0, K-quants, ...)
is dequantized to F32 here, so a quantized GGUF costs its F32 size in the bundle and in memory (the
MatMulNBits repack of Q4_0/Q8_0 blocks comes with edgeseq.quant's GGUF support).
"""
from __future__ import annotations

import codecs
import json
import os
import shutil
import tempfile

import numpy as np

from edgeseq import __version__
from edgeseq.bundle import sha256_file, write_manifest
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families.base import GRAPH_KINDS
from edgeseq.gguf_file import GGUFFile
from edgeseq.gguf_names import family_of
from edgeseq.graph import WeightStore, save_model
from edgeseq.tokenizer import RwkvWorldTokenizer

TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 3, 4, 5


def _unescape_rwkv(tok: str) -> bytes:
    """llama.cpp's rwkv vocabulary keeps tokens as Python bytes reprs without b'' (\\xNN, \\n, \\\\ ...)."""
    return codecs.escape_decode(tok.encode("utf-8", "surrogateescape"))[0]


def _tokenizer(g: GGUFFile, tmp: str) -> tuple[dict, dict]:
    """Write the bundle's tokenizer from the GGUF keys; returns (manifest tokenizer spec, special ids)."""
    model = g.get("tokenizer.ggml.model", None, str)
    special = {"bos_token_id": g.get("tokenizer.ggml.bos_token_id"), "eos_token_id": g.get("tokenizer.ggml.eos_token_id")}
    stops = [t for t in (special["eos_token_id"], g.get("tokenizer.ggml.eot_token_id")) if t is not None]
    special["stop_token_ids"] = list(dict.fromkeys(int(t) for t in stops))
    tokens = g.get("tokenizer.ggml.tokens", [], list)
    types = g.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise EdgeseqError(f"{g.path}: {len(tokens)} tokens but {len(types)} token types")
    if model is None:
        raise UnsupportedError(f"{g.path}: no tokenizer.ggml.model; edgeseq needs the vocabulary to run text")
    if model == "rwkv":
        real = {i: _unescape_rwkv(t) for i, t in enumerate(tokens) if types[i] not in (TOKEN_UNUSED, TOKEN_CONTROL)}
        if all(real.get(i) == bytes([i]) for i in range(256)) and len(real) == 256:
            return {"kind": "bytes"}, special  # edgeseq's byte-level export
        with open(os.path.join(tmp, RwkvWorldTokenizer.FILE), "w", encoding="utf-8") as f:
            for i, b in sorted(real.items()):
                try:
                    lit = repr(b.decode("utf-8"))
                except UnicodeDecodeError:
                    lit = repr(b)
                f.write(f"{i} {lit} {len(b)}\n")
        RwkvWorldTokenizer(os.path.join(tmp, RwkvWorldTokenizer.FILE))  # parses back, or a clear error
        return {"kind": "rwkv_world", "file": RwkvWorldTokenizer.FILE}, special
    if model == "gpt2":
        merges = g.get("tokenizer.ggml.merges", [], list)
        vocab, added = {}, []
        for i, t in enumerate(tokens):
            if types[i] == TOKEN_UNUSED:
                continue
            vocab.setdefault(t, i)
            if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": types[i] != TOKEN_CONTROL, "special": types[i] == TOKEN_CONTROL})
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
              "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
              "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                        "vocab": vocab, "merges": _merges(merges, vocab)}}
        path = os.path.join(tmp, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own exception type
            raise EdgeseqError(f"{g.path}: its gpt2 vocabulary does not make a valid tokenizer ({e})") from None
        return {"kind": "hf", "file": "tokenizer.json"}, special
    raise UnsupportedError(f"{g.path}: tokenizer model {model!r} is not supported yet by edgeseq's GGUF reader "
                           f"(gpt2 and rwkv are)")


def _merges(merges: list[str], vocab: dict) -> list[str]:
    """The merges tokenizers can use: both parts and the result in the vocabulary (a truncated vocabulary,
    as llama.cpp's converter writes for small test models, keeps merges of tokens it no longer has)."""
    out = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) == 2 and parts[0] in vocab and parts[1] in vocab and parts[0] + parts[1] in vocab:
            out.append(m)
    return out


def gguf_to_bundle(path: str, out: str, portable: bool = False, force: bool = False) -> str:
    """Write the GGUF file `path` as the bundle directory `out` (temporary sibling, then renamed)."""
    if os.path.exists(out) and not force:
        raise EdgeseqError(f"{out}: already exists (choose another output or pass --force)")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    with GGUFFile(path) as g:
        fam, weights = family_of(g)
        tmp = tempfile.mkdtemp(prefix=".edgeseq-gguf-", dir=parent)
        try:
            store = WeightStore(os.path.join(tmp, "weights.bin"))
            for name, array in weights():
                store.add(name, np.ascontiguousarray(array, dtype=np.float32))
            weights_hash = store.close()
            tok_spec, special = _tokenizer(g, tmp)
            types = sorted({t.type_name for t in g.tensors.values()})
            arch = g.architecture
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        flavour = "portable" if portable else "fused"
        meta = {"edgeseq.version": __version__, "edgeseq.family": fam.name, "edgeseq.quant": "f32",
                "edgeseq.flavour": flavour, "edgeseq.weights_sha256": weights_hash}
        graphs = {}
        for kind in GRAPH_KINDS:
            b = fam.build_graph(kind, store.table, fused=not portable)
            fname = f"{kind}.onnx"
            save_model(b.to_model({**meta, "edgeseq.graph": kind}), os.path.join(tmp, fname))
            graphs[kind] = {"file": fname, "tokens": 1 if kind == "step" else None,
                            "inputs": ["input_ids"] + [s.input_name for s in fam.state_spec()],
                            "outputs": ["logits"] + [s.output_name for s in fam.state_spec()],
                            "logits": "all" if kind == "prefill_all" else "last"}
            if kind != "step":
                graphs[kind]["chunk"] = fam.prefill_chunk
        files = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f != "weights.bin"}
        write_manifest(tmp, {
            "edgeseq_version": __version__, "family": fam.name, "architecture": arch,
            "config": fam.config_json(), "vocab_size": fam.vocab_size, "flavour": flavour,
            "quant": {"recipe": "f32", "source_types": types},
            "state": [s.to_json() for s in fam.state_spec()], "state_bytes_per_sequence": fam.state_bytes(),
            "graphs": graphs, "weights": {"file": "weights.bin", "bytes": store.nbytes, "sha256": weights_hash},
            "tokenizer": tok_spec, "chat_template": None, "initial_state": None, **special, "files": files,
            "source": {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "format": "gguf"},
        })
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
