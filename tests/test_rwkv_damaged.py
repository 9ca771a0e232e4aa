"""Damaged RWKV checkpoints: a BlinkDL .pth with a tensor removed (early, where the config is read, and
late, midway through writing the weights), a truncated .pth, and rwkv.cpp files cut short. Each export
raises EdgeseqError naming the file (and the missing tensor) and writes no output directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeseq import EdgeseqError
from edgeseq.exporters.export import export
from rwkv_builders import state_dict

import torch
FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
SMALL = {"5.2": dict(C=64, L=3, H=2, F=128), "6.0": dict(C=64, L=3, H=2, F=128),
         "7": dict(C=64, L=3, H=2, F=128)}


def export_fails(ckpt, out: Path, *words) -> str:
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    before = sorted(os.listdir(parent))
    with pytest.raises(EdgeseqError) as ei:
        export(str(ckpt), str(out))
    msg = str(ei.value)
    for w in words:
        assert str(w) in msg, f"{w!r} not in {msg!r}"
    assert not out.exists()
    assert sorted(os.listdir(parent)) == before, "export left something behind"
    return msg


@pytest.mark.parametrize("version, tensor", [
    ("5.2", "blocks.2.ffn.value.weight"), ("5.2", "ln_out.weight"),
    ("5.2", "blocks.1.att.time_faaaa"),
    ("6.0", "blocks.2.att.time_decay_w2"), ("6.0", "head.weight"),
    ("7", "blocks.2.att.a1"), ("7", "blocks.1.att.v0"), ("7", "blocks.0.ln0.bias"),
])
def test_pth_with_a_tensor_removed(tmp_path, version, tensor):
    sd = state_dict(version, **SMALL[version])
    del sd[tensor]
    pth = tmp_path / "m.pth"
    torch.save(sd, pth)
    export_fails(pth, tmp_path / "out" / "bundle", tensor)


@pytest.mark.parametrize("version", list(SMALL))
def test_truncated_pth(tmp_path, version):
    pth = tmp_path / "m.pth"
    torch.save(state_dict(version, **SMALL[version]), pth)
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) * 2 // 3])
    export_fails(pth, tmp_path / "out" / "bundle", pth)


@pytest.mark.parametrize("tag", ["4v0", "5v2", "7v0"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_rwkv_cpp_file_cut_short(tmp_path, tag, keep):
    (src,) = FIXTURES.glob(f"tiny-rwkv-{tag}-*-FP32.bin")
    data = src.read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[: int(len(data) * keep)])
    export_fails(bad, tmp_path / "out" / "bundle", bad, "truncated")
