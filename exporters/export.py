"""The export pipeline: checkpoint -> family -> weights.bin + graphs -> bundle directory.

Everything is written into a temporary sibling directory and renamed into place at the end, so a
failed export leaves nothing behind. Tensors stream one at a time from the checkpoint through the
family's `convert` generator into `weights.bin`.
"""
from __future__ import annotations

import json
import os
import shutil

from edgeseq import __version__, integrity, safe_io
from edgeseq.bundle import sha256_file, write_graphs, write_manifest
from edgeseq.errors import EdgeseqError
from edgeseq.families import family_for_architecture
from edgeseq.graph import WeightStore
from edgeseq.exporters.checkpoint import open_checkpoint
from edgeseq.quant import parse_compute, parse_quant, quantize_tensor
from edgeseq.weight_check import check_weights
from edgeseq.tokenizer import RwkvWorldTokenizer, find_rwkv_vocab, sentencepiece_to_tokenizer_json


WORLD = {"kind": "rwkv_world", "file": RwkvWorldTokenizer.FILE}
HF = {"kind": "hf", "file": "tokenizer.json"}
# RWKV World models' chat format; "\n\n" (token 261) ends a turn
WORLD_CHAT = {"system": "System: {system}\n\n", "turn": "User: {user}\n\nAssistant:{assistant}\n\n",
              "stop": ["\n\n"], "stop_token_ids": [RwkvWorldTokenizer.END_OF_TURN]}


def _tokenizer_source(ckpt, tokenizer: str | None, family) -> tuple[dict, str | None]:
    """Where the bundle's tokenizer comes from: --tokenizer (a tokenizer.json or the RWKV World
    vocabulary), the checkpoint's tokenizer.json, the World vocabulary for RWKV models of 65,536
    tokens (beside the checkpoint or from the `rwkv` package), or bytes for byte-level models."""
    vocab = family.vocab_size
    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise EdgeseqError(f"{tokenizer}: no such tokenizer file")
        if os.path.basename(tokenizer).endswith(".txt"):
            RwkvWorldTokenizer(tokenizer)  # parse now: a bad file is an error before anything is written
            return WORLD, tokenizer
        return HF, tokenizer  # a tokenizer.json, or a SentencePiece .model converted to one when written
    folder = ckpt.path if os.path.isdir(ckpt.path) else os.path.dirname(os.path.abspath(ckpt.path))
    local = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(local):
        return HF, local
    spm = os.path.join(folder, "tokenizer.model")  # SentencePiece: converted to tokenizer.json when written
    if os.path.isfile(spm):
        return HF, spm
    if family.name.startswith("rwkv") and vocab == 65536:
        world = find_rwkv_vocab(ckpt.path)
        if world:
            return WORLD, world
    if vocab <= 256:
        return {"kind": "bytes"}, None
    raise EdgeseqError(f"{ckpt.path}: no tokenizer.json beside the checkpoint and the vocabulary ({vocab}) is not "
                       f"byte-level; pass --tokenizer PATH/tokenizer.json (or the RWKV World vocabulary, "
                       f"{RwkvWorldTokenizer.FILE})")


def _special_tokens(ckpt) -> dict:
    cfg = dict(ckpt.config)
    gen = os.path.join(ckpt.path, "generation_config.json")
    if os.path.isfile(gen):
        try:
            with open(gen) as f:
                cfg = {**cfg, **{k: v for k, v in json.load(f).items() if v is not None}}
        except ValueError:
            pass  # a damaged generation_config only loses its defaults
    eos = cfg.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    bos = cfg.get("bos_token_id")
    return {"bos_token_id": bos, "eos_token_id": eos_list[0] if eos_list else None,
            "stop_token_ids": eos_list, "add_bos": bos is not None and _adds_bos(ckpt.path, bos)}


def _adds_bos(path: str, bos: int) -> bool:
    """Whether the model's own tokenizer starts a sequence with BOS (Gemma, Mistral/Llama SentencePiece
    models do; GPT-NeoX's and RWKV's do not): `add_bos_token` in tokenizer_config.json, else a BOS in the
    post-processor template of tokenizer.json. The runtime then prepends BOS to a prompt at position 0."""
    if not os.path.isdir(path):
        return False
    conf = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(conf):
        try:
            with open(conf) as f:
                value = json.load(f).get("add_bos_token")
            if isinstance(value, bool):
                return value
        except ValueError:
            pass
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        try:
            with open(tj) as f:
                post = json.load(f).get("post_processor") or {}
        except ValueError:
            return False
        procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for proc in procs:
            if proc.get("type") == "TemplateProcessing":
                first = (proc.get("single") or [{}])[0]
                special = first.get("SpecialToken", {}).get("id")
                ids = (proc.get("special_tokens", {}).get(special) or {}).get("ids", []) if special else []
                return bos in ids
    return False


def export(checkpoint: str, out: str, quant: str = "f32", portable: bool = False, tokenizer: str | None = None,
           chat_template: dict | None = None, force: bool = False, progress: bool = False,
           initial_state: str | None = None, block_size: int = 32, accuracy_level: int = 4,
           compute: str = "f32") -> str:
    """Export `checkpoint` (a model directory) to the bundle directory `out`. Returns `out`.

    compute f16/bf16: matrices stored in that type and graphs that compute in it outside the recurrences
    (state and logits stay float32; `quant/half.py`), for GPUs.

    int8/int4: block-wise weights (`block_size` along each row) for MatMulNBits with `accuracy_level`
    (4: int8 activations on CPU), GatherBlockQuantized for the embedding; DequantizeLinear if portable."""
    compute, quant = parse_compute(compute, parse_quant(quant, "onnx"))
    if os.path.exists(out) and not force:
        raise EdgeseqError(f"{out}: already exists (choose another output or pass --force)")
    ckpt = open_checkpoint(checkpoint)
    family = read_family(ckpt, checkpoint)
    init_arrays = None
    if initial_state:
        if not os.path.isfile(initial_state):
            raise EdgeseqError(f"{initial_state}: no such state file")
        from edgeseq.exporters.checkpoint import TorchFile
        from edgeseq.families.rwkv_common import read_time_state

        init_arrays = read_time_state(family, TorchFile(initial_state))
    tok_spec, tok_file = _tokenizer_source(ckpt, tokenizer, family)
    if chat_template is None and tok_spec["kind"] == "rwkv_world":
        chat_template = WORLD_CHAT

    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = safe_io.temp_dir(parent, ".edgeseq-export-")
    try:
        store = WeightStore(os.path.join(tmp, "weights.bin"))
        items = family.convert(ckpt)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="weights", unit="tensor", leave=False, disable=None)
        with safe_io.converting(checkpoint):
            for name, array in items:
                store.add(name, quantize_tensor(name, array, quant))
        weights_hash = store.close()
        check_weights(family, store.table, checkpoint)
        table, qspecs = store.table, {}
        if quant in ("int8", "int4", "w8a8"):
            from edgeseq.quant import onnx_quant

            store, table, qspecs = onnx_quant.quantize_bundle_weights(store, family, quant, block_size, portable)
            weights_hash = store.sha256

        flavour = "portable" if portable else "fused"
        meta = {"edgeseq.version": __version__, "edgeseq.family": family.name, "edgeseq.quant": quant,
                "edgeseq.flavour": flavour, "edgeseq.weights_sha256": weights_hash}
        graphs = write_graphs(family, table, tmp, meta, portable, qspecs, accuracy_level, compute)
        if tok_file and tok_file.endswith(".model"):
            with open(os.path.join(tmp, tok_spec["file"]), "w", encoding="utf-8") as f:
                f.write(sentencepiece_to_tokenizer_json(tok_file))
        elif tok_file:
            shutil.copyfile(tok_file, os.path.join(tmp, tok_spec["file"]))
        init_spec = None
        if init_arrays:
            from safetensors.numpy import save_file

            save_file(init_arrays, os.path.join(tmp, "initial_state.safetensors"))
            init_spec = {"file": "initial_state.safetensors", "tensors": sorted(init_arrays),
                         "source": os.path.basename(initial_state)}
        files = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f != "weights.bin"}
        write_manifest(tmp, {
            "edgeseq_version": __version__,
            "family": family.name,
            "architecture": ckpt.architecture,
            "config": family.config_json(),
            "vocab_size": family.vocab_size,
            "flavour": flavour,
            "quant": {"recipe": quant, **(onnx_quant.recipe_json(quant, block_size, accuracy_level, portable, qspecs)
                                          if qspecs else {}),
                      **({"compute": {"f16": "float16", "bf16": "bfloat16"}[compute]} if compute != "f32" else {})},
            "state": [s.to_json() for s in family.state_spec()],
            "state_bytes_per_sequence": family.state_bytes(),
            **family.symbolic_dims,  # e.g. max_context: the default length of a full-attention KV ring
            "graphs": graphs,
            "weights": {"file": "weights.bin", "bytes": store.nbytes, "sha256": weights_hash,
                        **integrity.sample_entry(os.path.join(tmp, "weights.bin"))},
            "tokenizer": tok_spec,
            "chat_template": chat_template,
            "initial_state": init_spec,
            **_special_tokens(ckpt),
            "files": files,
            "source": {"path": os.path.abspath(checkpoint), "bytes": ckpt.weights_bytes()},
        })
        integrity.verify_bundle(tmp, full=True)  # what was written reads back as the manifest says
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is as readable as any new folder
        safe_io.fsync_tree(tmp)
        safe_io.replace_dir(tmp, out)  # the old bundle or the new one, whenever the process is killed
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk: a clear error, and the temporary folder is gone
            raise safe_io.disk_error(e, out) from None
        raise
    return out


def read_family(ckpt, checkpoint: str):
    """The family and its config from a checkpoint; the config's reading is the first use of untrusted
    fields (config.json, the tensor table), so anything that does not fit is an error naming the file."""
    where = f"{checkpoint}/config.json" if os.path.isdir(checkpoint) else checkpoint
    fam_cls = family_for_architecture(ckpt.architecture, where)
    try:
        config = fam_cls.read_config(ckpt)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise EdgeseqError(f"{where}: does not describe a {fam_cls.name} model ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
    safe_io.check_config(config, where, max_layers=len(ckpt.keys()))
    safe_io.check_layers(config, ckpt.keys(), where)
    return fam_cls(config)

