"""RWKV-5 from BlinkDL `.pth` files (v5.2, v5.1, v5.0): random checkpoints in BlinkDL's layout (raw
time_decay, (1, 1, C) mixes) of several shapes (head size 32 and 64, 1, 3 and 5 layers, different widths
and ffn sizes), both flavours, against the `rwkv` package's fp32 model at every position of a 64-token
sequence, through steps, logits_all and prefill-then-steps; state save/load/fork round trips; a bf16
v5.2 file against the package on the bf16-rounded weights."""
from __future__ import annotations

import numpy as np
import pytest

import edgeseq
from edgeseq.exporters.export import export
from rwkv_builders import (FLAVOURS, VOCAB, build_cases, check_matches_package, check_save_load_fork,
                           check_state_shapes, max_diff, package_logits, step_all, tol, v5_state_dict)

import torch

CONFIGS = {  # name: (version, config)
    "5.2-h64-L3": ("5.2", dict(C=128, L=3, H=2, F=448)),  # head size 64, as released v5.2 models use
    "5.2-h32-L1": ("5.2", dict(C=64, L=1, H=2, F=160)),
    "5.2-h32-L5": ("5.2", dict(C=96, L=5, H=3, F=320)),
    "5.2-h64-L5": ("5.2", dict(C=192, L=5, H=3, F=256)),
    "5.1-h64-L3": ("5.1", dict(C=128, L=3, H=2, F=448)),
    "5.0-h32-L3": ("5.0", dict(C=64, L=3, H=2, F=224)),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return build_cases(CONFIGS, tmp_path_factory.mktemp("rwkv5-pth"), v7=False)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, cases):
    return cases[request.param]


@FLAVOURS
def test_matches_rwkv_package_at_every_position(case, portable):
    version, c = CONFIGS[case.name]
    H, N = c["H"], c["C"] // c["H"]
    cfg = case.model(portable).manifest["config"]
    assert case.model(portable).manifest["family"] == "rwkv5"
    assert (cfg["version"], cfg["n_head"], cfg["head_size"], cfg["gate"]) == (version, H, N, version != "5.0")
    assert (cfg["n_layer"], cfg["n_embd"], cfg["dim_ffn"]) == (c["L"], c["C"], c["F"])
    assert cfg["ln_x_eps"] == pytest.approx(64e-5)  # the package's (and BlinkDL's) group-norm eps
    check_matches_package(case, portable)
    check_state_shapes(case, H, N, c["L"], c["C"])


def test_save_load_fork_round_trip(cases, tmp_path):
    check_save_load_fork(cases["5.2-h32-L5"], tmp_path)


def test_bf16_pth(tmp_path):
    """A bf16 v5.2 file: the package's fp32 model of the bf16-rounded weights (saved as f32, since the
    package keeps a bf16 embedding in bf16)."""
    sd32 = v5_state_dict("5.2", seed=1)
    sd = {k: v.to(torch.bfloat16) for k, v in sd32.items()}
    pth = tmp_path / "RWKV-5-bf16.pth"
    torch.save(sd, pth)
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / "rounded.pth")
    torch.save(sd32, tmp_path / "f32.pth")
    ids = np.random.default_rng(1).integers(0, VOCAB, 48).tolist()
    (ref,), (unrounded,) = package_logits([{"base": str(tmp_path / n), "version": "5.2", "seqs": [ids]}
                                           for n in ("rounded", "f32")], v7=False)
    assert max_diff(ref, unrounded) > 1e-3  # bf16 rounding did change the model
    for portable in (False, True):
        m = edgeseq.load(export(str(pth), str(tmp_path / f"b{int(portable)}"), portable=portable))
        s = m.session()
        assert max_diff(step_all(s, ids), ref) < tol(ref)
        s.reset()
        assert max_diff(s.logits_all(ids), ref) < tol(ref)
