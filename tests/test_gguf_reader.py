"""The hardened GGUF reader: damaged files (bad magic, absurd counts and lengths, offsets past the end,
unknown types, truncation, flipped bytes) give EdgeseqError naming the file, never another exception, a
crash or a huge allocation; a good file reads back what the gguf package wrote."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from edgeseq.errors import EdgeseqError
from edgeseq.gguf_file import GGUFFile


def _write(path, arrays=None):
    import gguf

    w = gguf.GGUFWriter(str(path), "edgeseq-test")
    w.add_uint32("edgeseq-test.count", 7)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "\u00e9"])
    w.add_array("edgeseq-test.ints", [1, 2, 3])
    for n, a in (arrays or {}).items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((4, 32)).astype(np.float32),
              "b": rng.standard_normal(16).astype(np.float16)}
    return _write(tmp_path / "good.gguf", arrays), arrays


def test_reads_what_gguf_package_wrote(good):
    path, arrays = good
    with GGUFFile(path) as g:
        assert g.version == 3 and g.architecture == "edgeseq-test"
        assert g.kv["edgeseq-test.count"] == 7 and g.kv["tokenizer.ggml.tokens"] == ["a", "bc", "\u00e9"]
        assert g.kv["edgeseq-test.ints"].tolist() == [1, 2, 3]
        assert g.tensors["a.weight"].shape == (4, 32) and g.tensors["b"].type_name == "F16"
        np.testing.assert_array_equal(g.array("a.weight"), arrays["a.weight"])
        np.testing.assert_array_equal(g.array("b"), arrays["b"].astype(np.float32))


def _header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("data, message", [
    (b"GGML" + bytes(40), "not a GGUF file"),
    (_header(version=99) + bytes(16), "version 99"),
    (_header(n_tensors=1 << 60) + bytes(16), "absurd counts"),
    (_header(n_kv=1) + struct.pack("<Q", 1 << 62) + bytes(16), "declares"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<I", 99) + bytes(16), "value type 99"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<IIQ", 9, 4, 1 << 61) + bytes(8), "more than the file"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<IIQ", 9, 8, 1 << 40) + bytes(8), "more than the file"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<IIQ", 9, 9, 1) + bytes(8), "nested"),
    (_header(n_tensors=1) + _s(b"t") + struct.pack("<IQIQ", 1, 32, 77, 0) + bytes(32), "ggml type 77"),
    (_header(n_tensors=1) + _s(b"t") + struct.pack("<IQIQ", 9, 32, 0, 0) + bytes(32), "dimensions"),
    (_header(n_tensors=1) + _s(b"t") + struct.pack("<IQIQ", 1, 1 << 50, 0, 0) + bytes(32), "absurd shape"),
    (_header(n_tensors=1) + _s(b"t") + struct.pack("<IQIQ", 1, 32, 0, 1 << 40) + bytes(32), "truncated"),
    (_header(n_tensors=1) + _s(b"t") + struct.pack("<IQIQ", 1, 33, 8, 0) + bytes(64), "block"),
    (_header(n_tensors=1) + _s(b"t") + struct.pack("<IQIQ", 1, 8, 0, 3) + bytes(64), "aligned"),
    (_header(n_tensors=2) + (_s(b"t") + struct.pack("<IQIQ", 1, 8, 0, 0)) * 2 + bytes(64), "twice"),
    (b"GGUF\x03", "not a GGUF file"),
])
def test_damaged_headers(tmp_path, data, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(EdgeseqError, match=message) as e:
        GGUFFile(p)
    assert str(p) in str(e.value)


def test_truncations_and_flipped_bytes(good):
    """Every truncation of the header region and 300 random byte flips: a clean error or a file that
    reads (a flip inside tensor data is undetectable by design), never another exception."""
    path, _ = good
    data = path.read_bytes()
    with GGUFFile(path) as g:
        header_end = g.data_start
    bad = path.parent / "cut.gguf"
    for n in list(range(0, header_end + 1)) + [len(data) - 1]:
        bad.write_bytes(data[:n])
        with pytest.raises(EdgeseqError):
            GGUFFile(bad)
    rng = np.random.default_rng(1)
    errors = 0
    for _ in range(300):
        b = bytearray(data)
        for i in rng.integers(0, header_end, 3):
            b[i] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            with GGUFFile(bad) as g:
                for n in g.tensors:
                    g.array(n)
        except EdgeseqError:
            errors += 1
    assert errors > 50  # most flips in the header are caught (the rest hit string bytes or padding)


def _open_files_under(folder) -> list[str]:
    """This process's open file descriptors that point into `folder` (deleted files included)."""
    import os

    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, gone by now
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.parametrize("where", ["converting", "repacking"])
def test_a_failed_conversion_leaves_no_file_open(tmp_path, monkeypatch, where):
    """GGUF -> bundle fails half-way, in the f32 pass or while Q8_0 blocks are repacked: the error is
    raised with every file it wrote closed (checked while the exception, and so its frames, is alive)
    and the temporary folder gone."""
    from conftest import make_mamba
    from edgeseq import gguf_bundle
    from edgeseq.exporters.gguf_writer import export_gguf
    from edgeseq.quant import gguf_quants

    src = tmp_path / "src"
    src.mkdir()
    g = src / "m.gguf"
    export_gguf(str(make_mamba(src / "hf", hidden_size=64)), str(g), quant="q8_0")
    if where == "converting":
        family_of = gguf_bundle.family_of

        def failing_family_of(gf):
            fam, weights, matrices = family_of(gf)

            def some_weights(*src):
                for i, item in enumerate(weights(*src)):
                    if i == 3:
                        raise ValueError("cannot reshape")
                    yield item
            return fam, some_weights, matrices
        monkeypatch.setattr(gguf_bundle, "family_of", failing_family_of)
        expected = EdgeseqError
    else:
        def failing_repack(*args):
            raise MemoryError("repacking")
        monkeypatch.setattr(gguf_quants, "repack_for_matmulnbits", failing_repack)
        expected = MemoryError
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(expected) as failed:
        gguf_bundle.gguf_to_bundle(str(g), str(out / "b"))
    # (the GGUF's own memory map stays open while arrays viewing it live in the traceback: read-only)
    assert failed.value is not None and _open_files_under(out) == []
    assert list(out.iterdir()) == []


def test_kept_blocks_read_as_float32_when_no_matmul_takes_them(tmp_path, monkeypatch):
    """The Q8_0 matrices are not dequantized in the first pass (their blocks go to MatMulNBits); when the
    plan keeps none of them, each is read as float32 after all, and weights.bin holds the very bytes the
    portable conversion (which dequantizes everything in one pass) writes."""
    from conftest import make_mamba
    from edgeseq import gguf_bundle
    from edgeseq.exporters.gguf_writer import export_gguf

    g = tmp_path / "m.gguf"
    export_gguf(str(make_mamba(tmp_path / "hf", hidden_size=64)), str(g), quant="q8_0")
    plans = []
    monkeypatch.setattr(gguf_bundle, "_repack_plan", lambda *a: plans.append(a[3]) or {})
    gguf_bundle.gguf_to_bundle(str(g), str(tmp_path / "fused"))
    gguf_bundle.gguf_to_bundle(str(g), str(tmp_path / "portable"), portable=True)
    assert len(plans) == 1 and len(plans[0]) >= 4  # the in/x/dt/out projections of each layer were kept
    read = [(tmp_path / b / "weights.bin").read_bytes() for b in ("fused", "portable")]
    assert read[0] == read[1]
