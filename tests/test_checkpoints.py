"""Checkpoint layouts and dtypes the exporter reads, `--quant f16`, and bad inputs: each a clear
EdgeseqError naming the path and the problem, with nothing left behind."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import edgeseq
from conftest import (
    SEQ_LEN,
    TOL,
    hf_logits64,
    load_hf,
    make_mamba,
    make_mamba2,
    max_diff,
    random_ids,
    step_all,
    write_tokenizer,
)
from edgeseq import EdgeseqError, UnsupportedError
from edgeseq.exporters.export import export

BUILDERS = {
    "mamba": lambda p, **kw: make_mamba(p, seed=21, hidden_size=32, state_size=8, time_step_rank=4, **kw),
    "mamba2": lambda p, **kw: make_mamba2(p, seed=22, hidden_size=32, num_heads=4, head_dim=16, n_groups=2,
                                          state_size=8, **kw),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def base(request, tmp_path_factory):
    """(family, HF checkpoint dir, ids, float64 reference logits) built once per family."""
    d = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    ck = BUILDERS[request.param](d / "hf")
    ids = random_ids(256, SEQ_LEN, seed=3)
    return request.param, ck, ids, hf_logits64(ck, ids)


def check_bundle(bundle, ids, ref, tol=TOL):
    """logits_all and token-by-token steps of a bundle against reference logits."""
    m = edgeseq.load(bundle)
    assert max_diff(m.session().logits_all(ids), ref) < tol
    assert max_diff(step_all(m.session(), ids[:16]), ref[:16]) < tol
    return m


def st_dtypes(path) -> set[str]:
    """The dtypes a safetensors file declares in its header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


# -- layouts and dtypes --------------------------------------------------------------------------

def test_sharded_safetensors(base, tmp_path):
    family, ck, ids, ref = base
    model = load_hf(ck)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    out = export(str(tmp_path / "sharded"), str(tmp_path / "bundle"))
    m = check_bundle(out, ids, ref)
    assert m.manifest["source"]["bytes"] == sum(os.path.getsize(tmp_path / "sharded" / s) for s in shards)


def test_pytorch_model_bin(base, tmp_path):
    """A pickled state dict (transformers 5 always writes safetensors, so torch.save it ourselves)."""
    family, ck, ids, ref = base
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(ck / "config.json", d / "config.json")
    torch.save(load_hf(ck).state_dict(), d / "pytorch_model.bin")
    check_bundle(export(str(d), str(tmp_path / "bundle")), ids, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_checkpoint(base, tmp_path, dtype):
    """Weights stored in f16/bf16 are widened exactly, so the bundle matches HF's float64 run of the
    same (rounded) weights as tightly as an f32 checkpoint does."""
    family, ck, ids, _ = base
    load_hf(ck).to(dtype).save_pretrained(tmp_path / "half")
    assert st_dtypes(tmp_path / "half" / "model.safetensors") == {"F16" if dtype == torch.float16 else "BF16"}
    rounded = load_hf(tmp_path / "half")
    assert next(rounded.parameters()).dtype == dtype
    ref = hf_logits64(rounded, ids)
    check_bundle(export(str(tmp_path / "half"), str(tmp_path / "bundle")), ids, ref)


def test_quant_f16_close_to_f32(base, tmp_path):
    family, ck, ids, ref = base
    f32 = export(str(ck), str(tmp_path / "f32"))
    f16 = export(str(ck), str(tmp_path / "f16"), quant="fp16")  # the alias of f16
    m32, m16 = edgeseq.load(f32), edgeseq.load(f16)
    assert m16.manifest["quant"]["recipe"] == "f16"
    assert m16.weights_bytes < 0.7 * m32.weights_bytes
    a, b = m32.session().logits_all(ids), m16.session().logits_all(ids)
    assert 0 < max_diff(a, b) < 2e-2  # rounded weights change the logits, a little
    assert max_diff(step_all(m16.session(), ids[:16]), b[:16]) < TOL
    assert max_diff(b, ref) < 2e-2


def test_successful_export_leaves_only_the_bundle(base, tmp_path):
    family, ck, ids, ref = base
    parent = tmp_path / "out"
    parent.mkdir()
    export(str(ck), str(parent / "bundle"), portable=True)
    assert os.listdir(parent) == ["bundle"]
    manifest = json.loads((parent / "bundle" / "edgeseq.json").read_text())
    assert manifest["family"] == family and manifest["flavour"] == "portable"
    assert sorted(os.listdir(parent / "bundle")) == sorted(
        ["edgeseq.json", "weights.bin", "step.onnx", "prefill.onnx", "prefill_all.onnx"])


# -- bad inputs ----------------------------------------------------------------------------------

@pytest.fixture
def good(base, tmp_path) -> Path:
    """A private copy of the family's good checkpoint, to damage."""
    return Path(shutil.copytree(base[1], tmp_path / "ckpt"))


def export_fails(ckpt, out, *words, error=EdgeseqError, **kw) -> str:
    """Export must raise `error` naming every word, create no output and leave the parent as it was."""
    out = Path(out)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    before = sorted(os.listdir(parent))
    existed = out.exists()
    with pytest.raises(error) as ei:
        export(str(ckpt), str(out), **kw)
    msg = str(ei.value)
    for w in words:
        assert str(w) in msg, f"{w!r} not in {msg!r}"
    assert out.exists() == existed
    assert sorted(os.listdir(parent)) == before, "export left something behind"
    return msg


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    export_fails(missing, tmp_path / "out" / "bundle", missing, "no such file")


def test_folder_without_config(good, tmp_path):
    (good / "config.json").unlink()
    export_fails(good, tmp_path / "out" / "bundle", good, "config.json")


def test_config_without_architectures(good, tmp_path):
    cfg = json.loads((good / "config.json").read_text())
    del cfg["architectures"]
    (good / "config.json").write_text(json.dumps(cfg))
    export_fails(good, tmp_path / "out" / "bundle", good / "config.json", "architectures")


def test_unknown_architecture(good, tmp_path):
    cfg = json.loads((good / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (good / "config.json").write_text(json.dumps(cfg))
    msg = export_fails(good, tmp_path / "out" / "bundle", "LlamaForCausalLM", "not supported",
                       error=UnsupportedError)
    for arch in ("MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM"):
        assert arch in msg  # the error lists what is supported


def test_truncated_safetensors(good, tmp_path):
    f = good / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    export_fails(good, tmp_path / "out" / "bundle", f, "truncated")


def test_damaged_safetensors_header(good, tmp_path):
    f = good / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"  # the JSON header no longer parses
    f.write_bytes(bytes(data))
    export_fails(good, tmp_path / "out" / "bundle", f, "damaged")


def test_truncated_shard(base, tmp_path):
    d = tmp_path / "sharded"
    load_hf(base[1]).save_pretrained(d, max_shard_size="20KB")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    export_fails(d, tmp_path / "out" / "bundle", shard, "truncated")


def test_missing_shard(base, tmp_path):
    d = tmp_path / "sharded"
    load_hf(base[1]).save_pretrained(d, max_shard_size="20KB")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    export_fails(d, tmp_path / "out" / "bundle", "model.safetensors.index.json", shard.name, "missing")


def test_truncated_pytorch_bin(base, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(base[1] / "config.json", d / "config.json")
    torch.save(load_hf(base[1]).state_dict(), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    export_fails(d, tmp_path / "out" / "bundle", d / "pytorch_model.bin", "cannot read")


def test_missing_tensor_fails_midway_and_cleans_up(good, tmp_path):
    """A tensor the family needs is absent: the export fails while writing weights (after its temp
    directory exists) and must remove that directory."""
    from safetensors.numpy import load_file, save_file

    f = good / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["backbone.norm_f.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    export_fails(good, tmp_path / "out" / "bundle", "backbone.norm_f.weight", good)


def test_output_already_exists_is_left_untouched(good, tmp_path):
    out = tmp_path / "out" / "bundle"
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    stat = (out / "precious.txt").stat()
    export_fails(good, out, out, "already exists")
    assert os.listdir(out) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert (out / "precious.txt").stat().st_mtime_ns == stat.st_mtime_ns


def test_vocab_over_256_needs_a_tokenizer(tmp_path):
    ck = make_mamba(tmp_path / "ckpt", seed=5, vocab_size=301)
    assert not (ck / "tokenizer.json").exists()
    export_fails(ck, tmp_path / "out" / "bundle", ck, "tokenizer")
    export_fails(ck, tmp_path / "out" / "bundle", tmp_path / "nope.json", "tokenizer",
                 tokenizer=str(tmp_path / "nope.json"))
    # given one, the export goes through and the bundle carries it
    tok = write_tokenizer(tmp_path / "tok.json", 301)
    export(str(ck), str(tmp_path / "out" / "bundle"), tokenizer=str(tok))
    m = edgeseq.load(tmp_path / "out" / "bundle")
    assert m.manifest["tokenizer"] == {"kind": "hf", "file": "tokenizer.json"}
    assert m.tokenizer.decode(m.tokenizer.encode("To be, or not")) == "To be, or not"


def test_unknown_quant(good, tmp_path):
    export_fails(good, tmp_path / "out" / "bundle", "q4_0", "f32", "f16", quant="q4_0")
