"""Every family's tensor table (edgeseq.tensor_table), on a real tiny checkpoint of each family: conversion
yields each canonical weight once; for the families llama.cpp knows, canonical -> GGUF -> canonical gives
every weight back (each row's codec and its inverse), the GGUF names are unique and are exactly the
table's, and the matrices that move into MatMulNBits unchanged are the GGUF tensor or its transpose.
The GGUF names and layouts themselves are proven against llama.cpp in test_gguf_llamacpp.py."""
from __future__ import annotations

import numpy as np
import pytest

import make_golden
from edgeseq.exporters.checkpoint import open_checkpoint
from edgeseq.exporters.export import read_family
from edgeseq.gguf_names import BY_FAMILY

# one f32 case per family and layout of the golden exports
CASES = [name for name, c in make_golden.CASES.items() if not c.portable and c.quant == "f32"]
GGUF_CASES = [name for name in CASES if make_golden.CASES[name].family in BY_FAMILY]  # llama.cpp knows them


class _Gguf:
    """The part of edgeseq.gguf_file.GGUFFile that a table reads."""

    path = "written.gguf"

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def array(self, name: str) -> np.ndarray:
        return self.tensors[name]


def _convert(name: str, tmp_path_factory):
    case = make_golden.CASES[name]
    ckpt = case.build(tmp_path_factory.mktemp(case.name))
    src = open_checkpoint(str(ckpt))
    fam = read_family(src, str(ckpt))
    return fam, list(fam.convert(src))


@pytest.fixture(scope="module", params=CASES, ids=lambda n: n)
def converted(request, tmp_path_factory):
    return _convert(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=GGUF_CASES, ids=lambda n: n)
def gguf_case(request, tmp_path_factory):
    fam, items = _convert(request.param, tmp_path_factory)
    # the table's GGUF column, whether or not this config fits llama.cpp's architecture (arch_for)
    return fam, type(fam).gguf, items


def test_conversion_yields_each_canonical_weight_once(converted):
    fam, items = converted
    names = [n for n, _ in items]
    assert len(names) == len(set(names))
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for _, a in items), names


def test_gguf_round_trip_gives_every_weight_back(gguf_case):
    fam, amap, items = gguf_case
    table = fam.table()
    written = list(amap.to_gguf(fam, iter(items)))
    names = [n for n, _ in written]
    assert len(names) == len(set(names))
    assert set(names) <= table.gguf_names()  # optional rows (biases) only where the checkpoint has them
    back = dict(amap.from_gguf(fam, _Gguf(dict(written))))
    ours = dict(items)
    assert set(back) == set(ours)
    for name, a in ours.items():
        b = back[name]
        assert b.shape == a.shape, name
        if ".ffn.time_mix_" in name:  # stored as 1 - x (llama.cpp's lerp): one float32 rounding each way
            np.testing.assert_allclose(b, a, rtol=0, atol=1.2e-7, err_msg=name)
        else:
            assert np.array_equal(b, a), name


def test_matrices_are_the_gguf_tensor_or_its_transpose(gguf_case):
    fam, amap, items = gguf_case
    written = dict(amap.to_gguf(fam, iter(items)))
    ours = dict(items)
    matrices = amap.matrices(fam)
    assert any(transposed for _, transposed in matrices.values())  # the Linear weights, at least
    for name, (gguf, transposed) in matrices.items():
        if name not in ours:  # a tied head
            continue
        g = written[gguf]
        assert np.array_equal(g.T if transposed else g, ours[name]), name


def test_a_weight_without_a_llamacpp_tensor_is_refused(gguf_case):
    fam, amap, items = gguf_case
    from edgeseq.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="layers.0.extra has no llama.cpp tensor"):
        list(amap.to_gguf(fam, iter([("layers.0.extra", np.zeros(3, np.float32))])))


def test_a_stored_shape_that_does_not_fit_names_the_tensor():
    from edgeseq.errors import EdgeseqError
    from edgeseq.tensor_table import Row, Table, reshape

    class Src:
        path = "model.safetensors"

        def has(self, name):
            return True

        def get(self, name):
            return np.zeros(6, np.float32)

    table = Table([Row("layers.{i}.w", "blocks.{i}.w", reshape(4))], n_layer=2)
    with pytest.raises(EdgeseqError, match=r"model.safetensors: blocks.0.w \(6,\) does not fit .*layers.0.w"):
        list(table.convert(Src()))
