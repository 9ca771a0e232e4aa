"""Export streams tensors, to an ONNX bundle and to a GGUF file: its peak memory stays well under the
checkpoint plus the output."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
make_demo_model = load_script(ROOT / "examples" / "make_demo_model.py")  # numpy + safetensors only

CHILD = r"""
import sys
from edgeseq.exporters.export import export
from edgeseq.exporters.gguf_writer import export_gguf


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


if len(sys.argv) > 3:  # a small export first: what stays loaded after it (modules) is not the export's
    export_gguf(sys.argv[3], sys.argv[3] + ".gguf")
before = status("VmRSS")  # python, numpy, onnx and edgeseq imported; nothing read yet
(export_gguf if sys.argv[2].endswith(".gguf") else export)(sys.argv[1], sys.argv[2])
print(before, status("VmHWM"))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("big") / "ckpt"
    make_demo_model.main(str(ckpt), d=512, layers=12, heads=8, head_dim=128, d_state=64)
    return ckpt


def _peak(ckpt, out, *warm_up) -> tuple[int, int]:
    """(resident bytes before the export, peak resident bytes) of a child process exporting `ckpt`."""
    r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), *map(str, warm_up)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, peak = (int(x) for x in r.stdout.split()[-2:])
    return before, peak


def test_export_peak_memory_is_a_fraction_of_the_checkpoint(tmp_path, big_checkpoint):
    ckpt, out = big_checkpoint, tmp_path / "bundle"
    before, peak = _peak(ckpt, out)
    ckpt_bytes = os.path.getsize(ckpt / "model.safetensors")
    assert ckpt_bytes > 60e6 and os.path.getsize(out / "weights.bin") > 60e6  # big enough to show if held
    # holding the checkpoint would add 80 MB, and the output as much again; streaming adds about the
    # largest tensor twice (read, transposed: 9 MB here)
    assert peak - before < 0.25 * ckpt_bytes, (peak - before, ckpt_bytes)


def test_gguf_export_peak_memory_is_a_fraction_of_the_checkpoint(tmp_path, big_checkpoint):
    """The GGUF writer streams as well (through a spool file beside the output), where it once held
    every converted tensor until the end (measured: +80 MB here). The modules it loads on
    first use and the shape check's graph (about 12 MB, whatever the model's size) are counted before,
    by a small export in the same process first."""
    ckpt, out = big_checkpoint, tmp_path / "m.gguf"
    make_demo_model.main(str(tmp_path / "small"), d=64, layers=2, heads=2, head_dim=64, d_state=16)
    before, peak = _peak(ckpt, out, tmp_path / "small")
    ckpt_bytes = os.path.getsize(ckpt / "model.safetensors")
    assert os.path.getsize(out) > 60e6
    assert peak - before < 0.25 * ckpt_bytes, (peak - before, ckpt_bytes)
