"""A GGUF file as an ONNX bundle: what `edgeseq.load("x.gguf")` runs and `edgeseq export x.gguf --format
onnx` writes. Core code (no exporters, no torch), so the runtime can build a GGUF's graphs itself.

    GGUF -> gguf_file (checked reader) -> gguf_names.family_of (family, config, canonical weights)
         -> weights.bin + step/prefill/prefill_all graphs + edgeseq.json, tokenizer from the GGUF keys

Weights: Q4_0 and Q8_0 matrices (those the graphs multiply with, whose GGUF layout has the blocks along
the input axis) keep their blocks: repacked for MatMulNBits / GatherBlockQuantized, never widened to
f32. Matrices of the other block types (K-quants, e.g. the Q6_K head of a llama.cpp "Q4_0" file, and
Q4_1/Q5_0/Q5_1), which MatMulNBits cannot read as stored, are dequantized and re-quantized to 8 bits in
blocks of 32 (0.47 % rms against the stored values; `requant8=False` keeps them f32). Everything else
becomes f32: vectors, F16/BF16 tensors, the generic architecture's (K, N) matrices (their blocks run
along N), all of it in the portable flavour.
"""
from __future__ import annotations

import codecs
import json
import os
import shutil
from contextlib import closing

import numpy as np

from edgeseq import __version__
from edgeseq.bundle import sha256_file, write_graphs, write_manifest
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families.base import GRAPH_KINDS
from edgeseq.gguf_file import GGUFFile
from edgeseq.gguf_names import family_of
from edgeseq.graph import WeightInfo, WeightStore
from edgeseq import safe_io
from edgeseq.integrity import sample_entry
from edgeseq.weight_check import check_weights
from edgeseq.tokenizer import RwkvWorldTokenizer

TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 3, 4, 5

# -- byte-level BPE pre-tokenizers: llama.cpp's `tokenizer.ggml.pre` names and the tokenizer.json splits --
# The Split regexes the released tokenizer.json files run before their ByteLevel step (use_regex off), as
# the models publish them: Llama-3's (also cl100k's: DBRX, Granite-4.0; LFM2, Falcon-H1), Qwen2's (single
# digits: Qwen2/2.5/3, Qwen3-Next), Qwen3.5's (letters with their combining marks) and Mistral's Tekken.
# The exporter recognises a tokenizer by these (gguf_writer._pre_name); this reader rebuilds them.
SPLIT_REGEX = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# llama.cpp's pre names (llama-vocab.cpp) by the split they run and whether BPE skips the merges for a
# pre-token that is itself a token (its `ignore_merges`, tokenizer.json's model.ignore_merges); names
# not listed run GPT-2's regex inside the ByteLevel step ("gpt-2", "mpt", "olmo", "default", ...)
PRE_SPLITS = {
    **{n: ("llama3", True) for n in ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral",
                                      "midm-2.0", "lfm2")},
    "dbrx": ("llama3", False), "smaug-bpe": ("llama3", False),
    "qwen2": ("qwen2", False), "deepseek-r1-qwen": ("qwen2", False), "qwen35": ("qwen35", False),
    "tekken": ("tekken", True),
}
# the names llama.cpp adds a BOS for where tokenizer.ggml.add_bos_token is absent
PRE_ADDS_BOS = tuple(n for n, (split, ignore_merges) in PRE_SPLITS.items() if ignore_merges)
# Qwen's tokenizers NFC-normalise first (llama.cpp does not: text already in NFC tokenizes alike)
PRE_NFC = ("qwen2", "deepseek-r1-qwen", "qwen35")


def hf_pre_tokenizer(pre: str | None) -> tuple[dict | None, dict, bool]:
    """(normalizer, pre_tokenizer, ignore_merges) of a tokenizer.json for llama.cpp's pre name `pre`."""
    if pre not in PRE_SPLITS:
        return None, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, False
    split, ignore_merges = PRE_SPLITS[pre]
    steps = [{"type": "Split", "pattern": {"Regex": SPLIT_REGEX[split]}, "behavior": "Isolated", "invert": False},
             {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
    return ({"type": "NFC"} if pre in PRE_NFC else None), {"type": "Sequence", "pretokenizers": steps}, ignore_merges


def _unescape_rwkv(tok: str) -> bytes:
    """llama.cpp's rwkv vocabulary keeps tokens as Python bytes reprs without b'' (\\xNN, \\n, \\\\ ...)."""
    return codecs.escape_decode(tok.encode("utf-8", "surrogateescape"))[0]


def _tokenizer(g: GGUFFile, tmp: str) -> tuple[dict, dict]:
    """Write the bundle's tokenizer from the GGUF keys; returns (manifest tokenizer spec, special ids)."""
    model = g.get("tokenizer.ggml.model", None, str)
    special = {"bos_token_id": g.get("tokenizer.ggml.bos_token_id"), "eos_token_id": g.get("tokenizer.ggml.eos_token_id")}
    stops = [t for t in (special["eos_token_id"], g.get("tokenizer.ggml.eot_token_id")) if t is not None]
    special["stop_token_ids"] = list(dict.fromkeys(int(t) for t in stops))
    add_bos = g.get("tokenizer.ggml.add_bos_token")  # llama.cpp starts each text with BOS where true
    if add_bos is None:  # what llama.cpp does where the file does not say: SentencePiece, Llama-3's, Tekken's
        add_bos = model == "llama" or (model == "gpt2" and g.get("tokenizer.ggml.pre", None, str) in PRE_ADDS_BOS)
    special["add_bos"] = bool(add_bos) and special["bos_token_id"] is not None
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
        normalizer, pre_tokenizer, ignore_merges = hf_pre_tokenizer(g.get("tokenizer.ggml.pre", None, str))
        tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
              "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": byte_level,
              "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                        "ignore_merges": ignore_merges, "vocab": vocab, "merges": _merges(merges, vocab)}}
        path = os.path.join(tmp, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own exception type
            raise EdgeseqError(f"{g.path}: its gpt2 vocabulary does not make a valid tokenizer ({e})") from None
        return {"kind": "hf", "file": "tokenizer.json"}, special
    if model == "llama":
        return _sentencepiece(g, tokens, types, tmp), special
    raise UnsupportedError(f"{g.path}: tokenizer model {model!r} is not supported yet by edgeseq's GGUF reader "
                           f"(gpt2, llama and rwkv are)")


def _sentencepiece(g: GGUFFile, tokens: list, types: list, tmp: str) -> dict:
    """llama-model keys (SentencePiece pieces, scores, types) back into a SentencePiece model, then the
    bundle's tokenizer.json as for a checkpoint's tokenizer.model. What the GGUF does not record is
    llama.cpp's: BPE by piece score, a dummy-prefix space (tokenizer.ggml.add_space_prefix, default
    true), spaces as U+2581, no whitespace collapsing, byte fallback when byte pieces exist."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm
    except ImportError:
        raise EdgeseqError(f"{g.path}: its SentencePiece vocabulary needs the sentencepiece package "
                           f"(pip install sentencepiece)") from None
    from edgeseq.tokenizer import sentencepiece_to_tokenizer_json

    scores = g.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise EdgeseqError(f"{g.path}: a llama vocabulary needs one tokenizer.ggml.scores entry per token")
    m = spm.ModelProto()
    P = spm.ModelProto.SentencePiece
    kind = {1: P.NORMAL, 2: P.UNKNOWN, 3: P.CONTROL, 4: P.USER_DEFINED, 5: P.UNUSED, 6: P.BYTE}
    for t, sc, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, float(sc), kind.get(ty, P.NORMAL)
    unk = next((i for i, ty in enumerate(types) if ty == 2), 0)
    m.trainer_spec.model_type = spm.TrainerSpec.BPE
    m.trainer_spec.unk_id = unk
    m.trainer_spec.unk_piece = tokens[unk]
    m.trainer_spec.byte_fallback = 6 in types
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    model_path = os.path.join(tmp, ".tokenizer.model")
    with open(model_path, "wb") as f:
        f.write(m.SerializeToString())
    try:
        tj = sentencepiece_to_tokenizer_json(model_path)
    except ImportError as e:
        raise EdgeseqError(f"{g.path}: turning its SentencePiece vocabulary into a tokenizer.json needs {e.name} "
                           f"(the BPE merges are derived with transformers)") from None
    finally:
        os.remove(model_path)
    with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tj)
    return {"kind": "hf", "file": "tokenizer.json"}


def _merges(merges: list[str], vocab: dict) -> list[str]:
    """The merges tokenizers can use: both parts and the result in the vocabulary (a truncated vocabulary,
    as llama.cpp's converter writes for small test models, keeps merges of tokens it no longer has)."""
    out = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) == 2 and parts[0] in vocab and parts[1] in vocab and parts[0] + parts[1] in vocab:
            out.append(m)
    return out


# other block types are re-quantized to 8 bits for MatMulNBits (blocks of 32) unless requant8=False
_REQUANT = ("Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _bits_kept(t, requant8: bool) -> int | None:
    """MatMulNBits' bits for GGUF matrix `t` (N, K): 4 or 8 for Q4_0 / Q8_0 blocks as they are, 8 for the
    other block types (K-quants, Q4_1, Q5_x: MatMulNBits has no layout for them) re-quantized in blocks of
    32 (`requant8`): measured, 0.47 % rms against the stored weights, which moves a Q6_K matrix's error
    against the original f32 from 1.77 % to 1.82 % (Q4_K: 7.18 % to 7.19 %), and holds it in ~1.1 bytes a
    weight instead of f32's 4. None: the matrix is read as float32."""
    if t is None or len(t.shape) != 2:
        return None
    if t.type_name in ("Q4_0", "Q8_0"):
        return 4 if t.type_name == "Q4_0" else 8
    if requant8 and t.type_name in _REQUANT and t.shape[1] % 32 == 0:
        return 8
    return None


def _repack_plan(g: GGUFFile, fam, store_table, kept: dict) -> dict:
    """{canonical weight: QuantSpec} for the matrices of `kept` ({name: (GGUF tensor, transposed)}, their
    blocks kept) that the graphs use only through MatMul (transposed), a transposed-head Gemm or the
    embedding Gather, whose GGUF tensor is the weight as (N, K)."""
    from edgeseq.quant.onnx_quant import QuantSpec, collect_usage

    uses = collect_usage([fam.build_graph(kind, store_table, fused=True) for kind in GRAPH_KINDS])
    specs = {}
    for name, (src, transposed) in kept.items():
        u = uses.get(name)
        if u is None:
            continue
        if (transposed and u == {"matmul"}) or (not transposed and u <= {"gemm_t", "gather"}):
            t = g.tensors[src]
            n, k = t.shape
            specs[name] = QuantSpec(name, _bits_kept(t, True), 32, n, k, transposed, tuple(sorted(u)))
    return specs


class _Deferred:
    """GGUF file `g` whose `array` gives the tensors named in `names` as zero-strided placeholders of their
    shape: the matrices whose blocks move into MatMulNBits are not dequantized (and written as float32)
    only to be thrown away; the few the graphs use otherwise are read for real afterwards."""

    def __init__(self, g: GGUFFile, names: set):
        self._g, self._names = g, names

    def array(self, name: str) -> np.ndarray:
        if name in self._names:
            return np.broadcast_to(np.float32(0), self._g.tensors[name].shape)
        return self._g.array(name)

    def __getattr__(self, attr):
        return getattr(self._g, attr)


def gguf_to_bundle(path: str, out: str, portable: bool = False, force: bool = False,
                   accuracy_level: int = 4, requant8: bool = True, chat_template=None) -> str:
    """Write the GGUF file `path` as the bundle directory `out` (temporary sibling, then renamed).

    Q4_0 and Q8_0 matrices keep their blocks: the integers and scales move into MatMulNBits'
    layout (edgeseq.quant.gguf_quants.repack_for_matmulnbits) without passing through float; the
    graphs are rewritten as an int4/int8 export's are (edgeseq.quant.onnx_quant.rewrite)."""
    if os.path.exists(out) and not force:
        raise EdgeseqError(f"{out}: already exists (choose another output or pass --force)")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = safe_io.temp_dir(parent, ".edgeseq-gguf-")
    try:
        with GGUFFile(path) as g:
            fam, weights, matrices = family_of(g)
            # the matrices that may keep their blocks (the portable flavour's QDQ layout differs: none)
            kept = {} if portable else {n: m for n, m in matrices.items()
                                        if _bits_kept(g.tensors.get(m[0]), requant8)}
            wpath = os.path.join(tmp, "weights.bin")
            order, deferred = [], {}
            # the files are closed whatever is raised (a file left open would keep the temporary folder's
            # space until the process ends, and warns); a store's close() may be called twice
            with safe_io.converting(path), closing(WeightStore(wpath)) as store:
                for name, array in weights(_Deferred(g, {src for src, _ in kept.values()})):
                    order.append(name)
                    if name in kept:  # a placeholder: its shape only, for the checks and the plan
                        deferred[name] = WeightInfo(name, "float32", tuple(array.shape), -1, 4 * array.size)
                    else:
                        store.add(name, np.ascontiguousarray(array, dtype=np.float32))
                weights_hash = store.close()
            table = {**store.table, **deferred}
            check_weights(fam, table, path)  # shapes against the config (docs/reliability.md)
            specs = _repack_plan(g, fam, table, kept) if kept else {}
            if deferred:
                from edgeseq.quant.gguf_quants import repack_for_matmulnbits
                from edgeseq.quant.onnx_quant import build_table, quantize_blocks

                old = table
                # plain reads, not a memory map: mapped pages would count in this process's resident set
                # until the end (the whole f32 file), read pages are freed with each array
                with open(wpath, "rb") as src, closing(WeightStore(wpath + ".q")) as store:
                    for name in order:
                        info = old[name]
                        if name in specs:
                            gname = matrices[name][0]
                            t = g.tensors[gname]
                            if t.type_name in ("Q4_0", "Q8_0"):  # the blocks as they are
                                parts = repack_for_matmulnbits(g.raw(gname), t.type_name, t.shape)
                            else:  # dequantized (N, K), re-quantized to 8 bits by min-max: a shrunk
                                # range's search gave the same error (0.468 % rms, a Q6_K embedding) in 6x the time
                                q, scales, zp = quantize_blocks(g.array(gname), 8, 32, shrink=(1.0,))
                                parts = (q, scales.reshape(-1), zp.reshape(-1))
                            for suffix, a in zip((".q", ".scales", ".zp"), parts):
                                store.add(name + suffix, np.ascontiguousarray(a))
                        elif name in deferred:  # kept blocks the graphs use otherwise: float32 after all
                            gname, transposed = matrices[name]
                            a = g.array(gname)
                            store.add(name, np.ascontiguousarray(a.T if transposed else a))
                        else:
                            src.seek(info.offset)
                            store.add(name, np.fromfile(src, dtype=info.dtype, count=info.nbytes // np.dtype(
                                info.dtype).itemsize).reshape(info.shape))
                    weights_hash = store.close()
                os.replace(wpath + ".q", wpath)
                table = build_table(store, old, specs)
            tok_spec, special = _tokenizer(g, tmp)
            if chat_template is None:  # the GGUF's own tokenizer.chat_template, carried verbatim
                from edgeseq.chat_template import gguf_template

                chat_template = gguf_template(g, g.get("tokenizer.ggml.tokens", None, list))
            types = sorted({t.type_name for t in g.tensors.values()})
            arch = g.architecture
        flavour = "portable" if portable else "fused"
        bits = {s.bits for s in specs.values()}
        recipe = "f32" if not bits else ("int4" if 4 in bits else "int8")
        meta = {"edgeseq.version": __version__, "edgeseq.family": fam.name, "edgeseq.quant": recipe,
                "edgeseq.flavour": flavour, "edgeseq.weights_sha256": weights_hash}
        graphs = write_graphs(fam, table, tmp, meta, portable, specs, accuracy_level)
        quant = {"recipe": recipe, "gguf_types": types}
        if specs:
            from edgeseq.quant.onnx_quant import recipe_json

            quant.update(recipe_json(recipe, 32, accuracy_level, portable, specs))
        files = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f != "weights.bin"}
        write_manifest(tmp, {
            "edgeseq_version": __version__, "family": fam.name, "architecture": arch,
            "config": fam.config_json(), "vocab_size": fam.vocab_size, "flavour": flavour, "quant": quant,
            "state": [s.to_json() for s in fam.state_spec()], "state_bytes_per_sequence": fam.state_bytes(),
            **fam.symbolic_dims, "graphs": graphs,
            "weights": {"file": "weights.bin", "bytes": store.nbytes, "sha256": weights_hash,
                        **sample_entry(os.path.join(tmp, "weights.bin"))},
            "tokenizer": tok_spec, "chat_template": chat_template or None, "initial_state": None, **special, "files": files,
            "source": {"path": os.path.abspath(path), "bytes": os.path.getsize(path)},
        })
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        safe_io.replace_dir(tmp, out)  # the old bundle or the new one, whenever the process is killed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
