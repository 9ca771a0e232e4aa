"""The ten findings of the reliability issue, each kept as a regression input: a tiny valid file (the fuzz
seeds, built deterministically) with one mutation, which must give an EdgeseqError naming the file,
quickly, with nothing left behind. Also: paths inside files stay inside, integrity checks (sampled hash
at load, `edgeseq verify`), GGUF tensor data overlapping, and a malicious pickle refused."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.integrity import verify
from edgeseq.bundle import read_manifest
from edgeseq.errors import EdgeseqError
from fuzz import seeds as seeds_mod
from fuzz import bundles as bd
from fuzz import checkpoints as ck
from fuzz import gguf_files as gf
from fuzz import mutations as mu
from fuzz.mutations import flip, put, truncate


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seeds_mod.build_all(tmp_path_factory.mktemp("seeds"))


def case(seeds, tmp_path, name) -> Path:
    """A copy of a seed in tmp_path/case."""
    src = seeds[name]
    dst = tmp_path / "case" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


def refused(fn, path, *words, seconds: float = 20):
    """fn() raises EdgeseqError naming `path` (and `words`), within `seconds`, leaving no output behind."""
    parent = Path(path).parent
    before = sorted(os.listdir(parent))
    t0 = time.monotonic()
    with pytest.raises(EdgeseqError) as ei:
        fn()
    assert time.monotonic() - t0 < seconds
    msg = str(ei.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert sorted(os.listdir(parent)) == before, "something was left behind"
    return msg


def export_to(src, tmp_path):
    from edgeseq.exporters.export import export

    return lambda: export(str(src), str(tmp_path / "case" / "out"))


def st_edit(path: Path, fn):
    header, body = ck._st_read(path)
    ck._st_write(path, fn(header), body)


# -- 1. GGUF block_count 2**62: inspect, load and export end at once; no temp folders left ------------

def test_gguf_huge_block_count_is_refused_everywhere(seeds, tmp_path):
    g = case(seeds, tmp_path, "gguf")
    gf.gguf_rewrite(g, g, edit_kv=lambda kv, ty: (kv.__setitem__("mamba.block_count", 2 ** 62),
                                                 ty.__setitem__("mamba.block_count", (10,))))
    from edgeseq.gguf_bundle import gguf_to_bundle
    from edgeseq.gguf_names import summary

    refused(lambda: summary(str(g)), g, "block_count", seconds=5)
    refused(lambda: edgeseq.load(str(g)), g, "block_count", seconds=5)
    refused(lambda: gguf_to_bundle(str(g), str(g.parent / "out")), g, "block_count", seconds=5)


def test_temp_folders_of_killed_loads_are_swept(tmp_path):
    from edgeseq.safe_io import temp_dir

    dead = tmp_path / "edgeseq-gguf-999999999-abc"  # no such process
    live = tmp_path / f"edgeseq-gguf-{os.getpid()}-abc"
    dead.mkdir()
    live.mkdir()
    d = temp_dir(str(tmp_path), "edgeseq-gguf-")
    assert not dead.exists() and live.exists() and os.path.isdir(d)


# -- 2. shapes checked against the config (GGUF, safetensors, .pth) ----------------------------------

def test_gguf_tensor_at_half_width(seeds, tmp_path):
    g = case(seeds, tmp_path, "gguf")

    def half(tensors):
        raw, t = tensors["blk.0.ssm_d"]
        import dataclasses
        tensors["blk.0.ssm_d"] = (raw[:len(raw) // 2].copy(), dataclasses.replace(t, shape=(t.shape[0] // 2,)))
    gf.gguf_rewrite(g, g, edit_tensors=half)
    from edgeseq.gguf_bundle import gguf_to_bundle

    refused(lambda: gguf_to_bundle(str(g), str(g.parent / "out")), g)


def test_rwkv5_log_decay_at_half_width(tmp_path):
    """A weight only the fused prefill reads (RWKV-5's log_decay, in an edgeseq-rwkv5 GGUF where it is
    stored as is): the portable step graph never reads it, so it passed the check and the bundle failed
    in ONNX Runtime at load. Now the fused prefill's shapes are inferred too, and the weight is named."""
    from edgeseq.exporters.gguf_writer import export_gguf
    from edgeseq.gguf_bundle import gguf_to_bundle

    g = tmp_path / "case" / "m.gguf"
    g.parent.mkdir()
    export_gguf(str(seeds_mod.FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"), str(g))
    gguf_to_bundle(str(g), str(tmp_path / "whole"))  # the file as written is accepted

    def half(tensors, v="layers.1.att.log_decay"):
        import dataclasses

        raw, t = tensors[v]
        tensors[v] = (raw[:len(raw) // 2].copy(), dataclasses.replace(t, shape=(t.shape[0] // 2,)))
    gf.gguf_rewrite(g, g, edit_tensors=half)
    refused(lambda: gguf_to_bundle(str(g), str(g.parent / "out")), g, "'layers.1.att.log_decay' is (32,)")


def test_safetensors_vector_at_half_width(seeds, tmp_path):
    d = case(seeds, tmp_path, "safetensors")
    f = d / "model.safetensors"
    tensors = seeds_mod.mamba_tensors()
    tensors["backbone.layers.1.norm.weight"] = tensors["backbone.layers.1.norm.weight"][:8].copy()
    from safetensors.numpy import save_file

    save_file(tensors, str(f))
    refused(export_to(d, tmp_path), d)


def test_pth_tensor_at_half_width(seeds, tmp_path):
    import torch

    p = case(seeds, tmp_path, "pth")
    sd = torch.load(str(p), weights_only=True)
    sd["blocks.1.ln1.weight"] = sd["blocks.1.ln1.weight"][:16].clone()
    torch.save(sd, str(p))
    refused(export_to(p, tmp_path), p)


# -- 3. GGUF metadata types --------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, vtype, words", [
    ("mamba.attention.layer_norm_rms_epsilon", "abc", (8,), "expected a number"),
    ("tokenizer.ggml.token_type", ["1", "2"], (9, 8), "expected an array"),
    ("mamba.block_count", "2", (8,), "expected an integer"),
])
def test_gguf_metadata_of_the_wrong_type(seeds, tmp_path, key, value, vtype, words):
    g = case(seeds, tmp_path, "gguf")
    gf.gguf_rewrite(g, g, edit_kv=lambda kv, ty: (kv.__setitem__(key, value), ty.__setitem__(key, vtype)))
    from edgeseq.gguf_file import GGUFFile

    refused(lambda: GGUFFile(str(g)), g, key, words)


def test_gguf_tensor_data_overlapping(seeds, tmp_path):
    g = case(seeds, tmp_path, "gguf")
    fields = [f for f in gf.gguf_fields(g.read_bytes()) if f[2].startswith("offset of")]
    first = struct.unpack_from("<Q", g.read_bytes(), fields[0][0])[0]
    put(g, fields[1][0], "<Q", first)
    from edgeseq.gguf_file import GGUFFile

    refused(lambda: GGUFFile(str(g)), g, "overlap")


# -- 4. the safetensors header -----------------------------------------------------------------------

T0 = "backbone.layers.0.mixer.D"


@pytest.mark.parametrize("what, edit, words", [
    ("no dtype", lambda h: (h[T0].pop("dtype"), h)[1], "no dtype"),
    ("a list", lambda h: [h], "not an object"),
    ("reversed offsets", lambda h: (h[T0].__setitem__("data_offsets", h[T0]["data_offsets"][::-1]), h)[1], "backwards"),
    ("shape vs bytes", lambda h: (h[T0].__setitem__("shape", [h[T0]["shape"][0] + 1]), h)[1], "needs"),
    ("deep nesting", lambda h: mu._Raw("[" * 100_000 + "]" * 100_000), "nested"),
    ("2**62 shape", lambda h: (h[T0].__setitem__("shape", [2 ** 62]), h)[1], "shape"),
])
def test_safetensors_header(seeds, tmp_path, what, edit, words):
    d = case(seeds, tmp_path, "safetensors")
    st_edit(d / "model.safetensors", edit)
    refused(export_to(d, tmp_path), d / "model.safetensors", words)


def test_safetensors_header_length_off_by_one(seeds, tmp_path):
    d = case(seeds, tmp_path, "safetensors")
    f = d / "model.safetensors"
    (n,) = struct.unpack_from("<Q", f.read_bytes())
    put(f, 0, "<Q", n - 1)  # the padding's last space: still valid JSON, but every tensor shifts a byte
    refused(export_to(d, tmp_path), f)


# -- 5. the shard index --------------------------------------------------------------------------------

@pytest.mark.parametrize("what, edit, words", [
    ("weight_map a list", lambda d: {**d, "weight_map": list(d["weight_map"])}, "weight_map"),
    ("a number", lambda d: {**d, "weight_map": {**d["weight_map"], T0: 5}}, "expected a string"),
    ("outside", lambda d: {**d, "weight_map": {**d["weight_map"], T0: "../other/model.safetensors"}}, "outside"),
    ("absolute", lambda d: {**d, "weight_map": {**d["weight_map"], T0: "/etc/passwd"}}, "relative path"),
])
def test_shard_index(seeds, tmp_path, what, edit, words):
    d = case(seeds, tmp_path, "shards")
    (tmp_path / "case" / "other").mkdir()
    shutil.copyfile(d / "model-00001-of-00002.safetensors", tmp_path / "case" / "other" / "model.safetensors")
    ip = d / "model.safetensors.index.json"
    ip.write_text(json.dumps(edit(json.loads(ip.read_text()))))
    refused(export_to(d, tmp_path), ip, words)


# -- 6. rwkv.cpp .bin ------------------------------------------------------------------------------------

def test_rwkvcpp_cut_inside_dims(seeds, tmp_path):
    f = case(seeds, tmp_path, "rwkvcpp")
    pos = ck.rwkvcpp_records(f.read_bytes())[3][0]
    truncate(f, pos + 14)
    refused(export_to(f, tmp_path), f, "truncated")


def test_rwkvcpp_dims_that_overflow(seeds, tmp_path):
    f = case(seeds, tmp_path, "rwkvcpp")
    pos, n_dims, _, _ = next(r for r in ck.rwkvcpp_records(f.read_bytes()) if r[1] == 2)
    put(f, pos, "<i", 4)  # four dims of 65536: 2**64 elements, 0 in int64 arithmetic
    for j in range(4):
        put(f, pos + 12 + 4 * j, "<i", 65536)
    refused(export_to(f, tmp_path), f)


def test_rwkvcpp_head_at_half_width(seeds, tmp_path):
    """head.weight (vocab, C/2): the head's Reshape(-1, C/2) folded two tokens' hidden states into one row,
    which shape inference accepts; the bundle failed in ONNX Runtime at the first prefill."""
    f = case(seeds, tmp_path, "rwkvcpp")
    data = f.read_bytes()
    pos, n_dims, name_len, end = next(r for r in ck.rwkvcpp_records(data)
                                      if data[r[0] + 12 + 4 * r[1]:r[0] + 12 + 4 * r[1] + r[2]] == b"head.weight")
    (c, vocab) = struct.unpack_from("<2i", data, pos + 12)  # ggml order: (C, vocab)
    start = pos + 12 + 4 * n_dims + name_len
    d = bytearray(data[:start + (end - start) // 2] + data[end:])  # the first half of the rows' data
    struct.pack_into("<i", d, pos + 12, c // 2)
    f.write_bytes(bytes(d))
    refused(export_to(f, tmp_path), f, f"the LM head is ({vocab}, {c // 2})")


# -- 7 and 8. manifest field types, and the allocations a manifest asks for ------------------------------

@pytest.mark.parametrize("what, edit, words", [
    ("an input null", lambda m: m["graphs"]["step"]["inputs"].__setitem__(2, None), "inputs[2]"),
    ("weights true", lambda m: m.__setitem__("weights", True), "weights"),
    ("chunk x", lambda m: m["graphs"]["prefill"].__setitem__("chunk", "x"), "chunk"),
    ("no flavour", lambda m: m.pop("flavour"), "flavour"),
    ("vocab 2**62", lambda m: m.__setitem__("vocab_size", 2 ** 62), "vocab_size"),
    ("max_context 2**40", lambda m: (m["state"][1].__setitem__("shape", ["batch", "max_context", 4]),
                                     m.__setitem__("max_context", 2 ** 40)), "max_context"),
    ("a ring too big for memory", lambda m: (m["state"][1].__setitem__("shape", ["batch", "max_context", 4096]),
                                             m.__setitem__("max_context", 2 ** 24)), "GiB"),
    ("a graph outside", lambda m: m["graphs"]["step"].__setitem__("file", "../step.onnx"), "outside"),
    ("state shape vs graph", lambda m: m["state"][0].__setitem__("shape", ["batch", 32]), "the manifest says"),
])
def test_manifest(seeds, tmp_path, what, edit, words):
    b = case(seeds, tmp_path, "bundle")
    m = json.loads((b / "edgeseq.json").read_text())
    edit(m)
    (b / "edgeseq.json").write_text(json.dumps(m))
    use = (lambda: edgeseq.load(str(b)).session()) if what == "state shape vs graph" else (lambda: edgeseq.load(str(b)))
    refused(use, b / "edgeseq.json" if what != "state shape vs graph" else b, words)


def test_inspect_without_flavour_is_one_error_line(seeds, tmp_path):
    b = case(seeds, tmp_path, "bundle")
    m = json.loads((b / "edgeseq.json").read_text())
    m.pop("flavour")
    (b / "edgeseq.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-P", "-m", "edgeseq", "inspect", str(b)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "flavour" in r.stderr, r.stderr


# -- paths and integrity of a bundle ------------------------------------------------------------------------

def _edit_location(step: Path, key: str, value: str) -> None:
    import onnx

    g = onnx.load(str(step), load_external_data=False)
    t = next(t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == key:
            e.value = value
    step.write_bytes(g.SerializeToString())


@pytest.mark.parametrize("key, value, words", [("location", "../weights.bin", "escapes model directory"),
                                               ("location", "/etc/passwd", "ONNX Runtime cannot load"),
                                               ("offset", str(1 << 40), "ONNX Runtime cannot load")])
def test_external_data_stays_inside_the_bundle(seeds, tmp_path, key, value, words):
    """Graphs are parsed at export and by `edgeseq verify`, not at each load (that would import onnx at every
    start): ONNX Runtime refuses such data when it loads the graph, and the engine names the graph."""
    b = case(seeds, tmp_path, "bundle")
    shutil.copyfile(b / "weights.bin", tmp_path / "case" / "weights.bin")
    _edit_location(b / "step.onnx", key, value)
    refused(lambda: every_graph(edgeseq.load(str(b))), b / "step.onnx", words)
    refused(lambda: verify(str(b)), b / "step.onnx")


def every_graph(model) -> None:
    """What an app can run: an ONNX Runtime session for each graph of the bundle."""
    for kind in model.manifest["graphs"]:
        model.engine.session(kind)


def test_flipped_weight_byte_is_found_at_load(seeds, tmp_path):
    b = case(seeds, tmp_path, "bundle")
    flip(b / "weights.bin", 8 * 1000 + 3)
    refused(lambda: edgeseq.load(str(b)), b / "weights.bin", "sampled hash")


def test_sampled_hash_of_a_large_file_reads_64_spans(tmp_path):
    from edgeseq.integrity import sample_sha256

    f = tmp_path / "w.bin"
    f.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    h = sample_sha256(str(f))
    flip(f, 8 * 200)  # inside the first span
    assert sample_sha256(str(f)) != h
    flip(f, 8 * 200)
    flip(f, 8 * 10_000)  # between spans: only the full hash (edgeseq verify) finds it
    assert sample_sha256(str(f)) == h


def test_verify_command(seeds, tmp_path):
    b = case(seeds, tmp_path, "bundle")
    verify = [sys.executable, "-P", "-m", "edgeseq", "verify", str(b)]
    ok = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "sha256 ok" in ok.stdout, ok.stderr
    flip(b / "prefill_all.onnx", 8 * 100)  # a graph no load opens: only the full check finds it
    bad = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "prefill_all.onnx" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


# -- 9. tokenizer files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("what, line, words", [("not UTF-8", b"300 'a\xff' 2", "UTF-8"),
                                               ("a 100 KB literal", b"300 '" + b"a" * 100_000 + b"' 100000", "characters"),
                                               ("code", b"300 __import__('os').system('true') 4", "vocabulary line")])
def test_world_vocabulary(seeds, tmp_path, what, line, words):
    f = case(seeds, tmp_path, "world")
    f.write_bytes(f.read_bytes() + line + b"\n")
    from edgeseq.tokenizer import RwkvWorldTokenizer

    refused(lambda: RwkvWorldTokenizer(str(f)), f, words)


def test_tokenizer_json_whose_normalizer_panics(seeds, tmp_path):
    f = case(seeds, tmp_path, "tokenizer")
    d = json.loads(f.read_text())
    d["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "A" * 100}  # panics in Rust at encode
    f.write_text(json.dumps(d))
    from edgeseq.tokenizer import load_tokenizer

    refused(lambda: load_tokenizer(str(f.parent), {"kind": "hf", "file": f.name}), f, "PanicException")


# -- 10. .pth tensors and state files -----------------------------------------------------------------------

@pytest.mark.parametrize("what", ["stride0", "complex64", "zero-dim"])
def test_pth_tensors(seeds, tmp_path, what):
    import torch

    p = case(seeds, tmp_path, "pth")
    sd = torch.load(str(p), weights_only=True)
    k = "blocks.0.att.receptance.weight"
    sd[k] = {"stride0": torch.zeros(1).expand(2 ** 20, 2 ** 20), "complex64": sd[k].to(torch.complex64),
             "zero-dim": torch.zeros(0, sd[k].shape[1])}[what]
    torch.save(sd, str(p))
    refused(export_to(p, tmp_path), p)


@pytest.mark.parametrize("how", ["raw", "zip"])
def test_malicious_pickle_is_refused(seeds, tmp_path, how):
    p = case(seeds, tmp_path, "pth")
    marker = Path(tempfile.gettempdir()) / "edgeseq-fuzz-pwned"
    marker.unlink(missing_ok=True)
    if how == "raw":
        p.write_bytes(ck.malicious_pickle())
    else:
        ck.torch_zip_with(p, ck.malicious_pickle())
    refused(export_to(p, tmp_path), p)
    assert not marker.exists(), "the pickle ran code"


@pytest.mark.parametrize("field, value", [("position", -5), ("position", 1e300), ("position", 2.5),
                                          ("version", -1), ("version", 0), ("tensors", None)])
def test_state_file_header_with_a_recomputed_checksum(seeds, tmp_path, field, value):
    f = case(seeds, tmp_path, "state")
    header, payload = bd.state_parts(f.read_bytes())
    header[field] = value
    f.write_bytes(bd.state_build(header, payload))
    s = edgeseq.load(str(seeds["bundle"])).session()
    refused(lambda: s.load_state(str(f)), f, field)


@pytest.mark.parametrize("bad", [b"\0\0\xc0\x7f", b"\0\0\x80\xff"], ids=["nan", "-inf"])
def test_state_file_with_nan_is_refused(seeds, tmp_path, bad):
    f = case(seeds, tmp_path, "state")
    header, payload = bd.state_parts(f.read_bytes())
    f.write_bytes(bd.state_build(header, bad + payload[4:]))
    s = edgeseq.load(str(seeds["bundle"])).session()
    msg = refused(lambda: s.load_state(str(f)), f, header["tensors"][0]["name"], "flat index 0")
    assert ("1 NaN and 0 infinite" if bad[-1] == 0x7F else "0 NaN and 1 infinite") in msg, msg


def test_state_with_nan_is_not_saved(seeds, tmp_path):
    """The choice (docs/reliability.md): a non-finite state is refused at save as at load. Why: the
    recurrence carries a NaN into every later token, so nothing could continue from it."""
    m = edgeseq.load(str(seeds["bundle"]))
    s = m.session()
    s.prefill([1, 2, 3])
    f = tmp_path / "s.state"
    s.save_state(str(f))
    good = f.read_bytes()
    arrays = {k: np.array(v) for k, v in s.state().items()}
    name = sorted(arrays)[-1]
    arrays[name].reshape(-1)[3] = np.nan
    s.set_state(arrays, s.position)
    msg = refused(lambda: s.save_state(str(f)), f, name, "not saved", "1 NaN", "flat index 3")
    assert f.read_bytes() == good, "the old file was touched"
    assert np.isnan(s.step(5)).all(), "a NaN in the state did not reach every logit"
    t = m.session()
    t.load_state(str(f))  # the old file still loads
    assert t.position == 3 and "NaN" in msg


def test_state_file_larger_than_the_model_state(seeds, tmp_path):
    f = case(seeds, tmp_path, "state")
    with open(f, "ab") as out:
        out.write(b"\0" * (1 << 25))
    s = edgeseq.load(str(seeds["bundle"])).session()
    refused(lambda: s.load_state(str(f)), f, "larger than this model's state could be")


def test_read_bounded(tmp_path):
    from edgeseq.safe_io import load_json_file, read_bounded

    f = tmp_path / "x.json"
    f.write_bytes(b'{"a": 1}')
    assert read_bounded(str(f), 8, "x") == b'{"a": 1}'
    assert load_json_file(str(f), "config", 8) == {"a": 1}
    refused(lambda: read_bounded(str(f), 7, "config"), f, "config of 8 bytes is larger than the 7 edgeseq reads")
    refused(lambda: load_json_file(str(f), "config", 7), f, "larger than")
    refused(lambda: read_bounded(str(tmp_path / "none"), 7, "config"), tmp_path / "none", "cannot read config")


def test_manifest_with_absurd_nesting(seeds, tmp_path):
    b = case(seeds, tmp_path, "bundle")
    (b / "edgeseq.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: read_manifest(str(b)), b / "edgeseq.json", "nested")


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_a_bias_at_half_width_in_every_layer_is_refused_at_export(tmp_path, fmt):
    """The fused conv takes its bias as it comes and no shape inference checks it: a checkpoint whose
    every conv bias is half as wide as the config needs exported and crashed at the first run. The
    tensor table's shape refuses it, naming the tensor; nothing is written."""
    from safetensors.numpy import load_file, save_file

    from conftest import make_mamba

    ckpt = make_mamba(tmp_path / "ck")
    sd = load_file(str(ckpt / "model.safetensors"))
    for k in [k for k in sd if k.endswith("conv1d.bias")]:
        sd[k] = np.ascontiguousarray(sd[k][: sd[k].shape[0] // 2])
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    r = subprocess.run([sys.executable, "-P", "-m", "edgeseq", "export", str(ckpt), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "conv1d.bias" in r.stderr and "needs (" in r.stderr, r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
