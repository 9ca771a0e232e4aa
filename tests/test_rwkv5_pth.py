"""RWKV-5 from BlinkDL `.pth` files (v5.2, v5.1, v5.0): small random checkpoints in BlinkDL's layout
(raw time_decay, (1, 1, C) mixes), both flavours, against the `rwkv` package's fp32 model at every
position of a 48-token sequence, through steps, logits_all and prefill-then-steps; a bf16 v5.2 file
against the package on the bf16-rounded weights."""
from __future__ import annotations

import os

import numpy as np
import pytest

import edgeseq
from edgeseq.exporters.export import export

torch = pytest.importorskip("torch")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

VOCAB, C, L, H = 256, 128, 3, 2  # head size 64, as released v5.2 models use
N, F = C // H, 448
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
VERSIONS = ["5.2", "5.1", "5.0"]


def blinkdl_state_dict(version: str, seed: int = 0) -> dict:
    """A random RWKV-5 state dict as BlinkDL's training code saves it (float32, noisy enough that the
    logits vary): v5.2 has time_decay/time_faaaa per (head, channel); v5.1 one decay and one
    `time_first` (the bonus's log) per head; v5.0 is v5.1 without the gate."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def mat(out, inp):
        return randn(out, inp, scale=1.5 / inp ** 0.5)

    def ln(sd, name, n=C):
        sd[name + ".weight"] = 1 + randn(n, scale=0.2)
        sd[name + ".bias"] = randn(n, scale=0.1)

    sd = {"emb.weight": randn(VOCAB, C)}
    for i in range(L):
        p = f"blocks.{i}."
        if i == 0:
            ln(sd, p + "ln0")
        ln(sd, p + "ln1")
        ln(sd, p + "ln2")
        a = p + "att."
        for m in ("k", "v", "r") + (("g",) if version != "5.0" else ()):
            sd[a + f"time_mix_{m}"] = uniform(0, 1, 1, 1, C)
        if version == "5.2":
            decay = uniform(-5, 2.5, H, N)
            decay[0, :2] = 5.0  # w = exp(-exp(5)) underflows to 0 in float32
            sd[a + "time_decay"] = decay
            sd[a + "time_faaaa"] = randn(H, N, scale=0.5)
        else:
            sd[a + "time_decay"] = uniform(-5, 1, H)
            sd[a + "time_first"] = randn(H, scale=0.5)
        for m in ("receptance", "key", "value", "output") + (("gate",) if version != "5.0" else ()):
            sd[a + f"{m}.weight"] = mat(C, C)
        ln(sd, a + "ln_x")
        f = p + "ffn."
        sd[f + "time_mix_k"] = uniform(0, 1, 1, 1, C)
        sd[f + "time_mix_r"] = uniform(0, 1, 1, 1, C)
        sd[f + "key.weight"] = mat(F, C)
        sd[f + "receptance.weight"] = mat(C, C)
        sd[f + "value.weight"] = mat(C, F)
    ln(sd, "ln_out")
    sd["head.weight"] = mat(VOCAB, C)
    return sd


def package_logits(sd: dict, path, ids) -> np.ndarray:
    """The rwkv package's fp32 model on `sd` (saved as float32), one token at a time."""
    rwkv_model = pytest.importorskip("rwkv.model")
    torch.save({k: v.float() for k, v in sd.items()}, path)
    model = rwkv_model.RWKV(model=str(path)[:-4], strategy="cpu fp32", verbose=False)
    out, state = [], None
    for t in ids:
        o, state = model.forward([t], state)
        out.append(o.float().numpy().copy())
    return np.stack(out), model.version


@pytest.fixture(scope="module", params=VERSIONS)
def case(request, tmp_path_factory):
    version = request.param
    d = tmp_path_factory.mktemp("rwkv5-pth-" + version.replace(".", ""))
    sd = blinkdl_state_dict(version)
    pth = d / f"RWKV-5-{version}-tiny.pth"
    torch.save(sd, pth)
    ids = np.random.default_rng(0).integers(0, VOCAB, 48).tolist()
    ref, pkg_version = package_logits(sd, d / "ref.pth", ids)
    assert float(pkg_version) == float(version)  # the package read it as the version meant
    assert ref.std() > 0.5 and len(set(ref.argmax(-1).tolist())) > 8  # not degenerate
    bundles = {p: export(str(pth), str(d / f"b{int(p)}"), portable=p) for p in (False, True)}
    return version, ids, ref, bundles


def close(got, ref):
    return np.abs(got - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


@FLAVOURS
def test_matches_rwkv_package_at_every_position(case, portable):
    version, ids, ref, bundles = case
    m = edgeseq.load(bundles[portable])
    cfg = m.manifest["config"]
    assert m.manifest["family"] == "rwkv5"
    assert (cfg["version"], cfg["n_head"], cfg["head_size"], cfg["gate"]) == (version, H, N, version != "5.0")
    assert cfg["ln_x_eps"] == pytest.approx(64e-5)  # the package's (and BlinkDL's) group-norm eps
    s = m.session()
    got = np.stack([s.step(t) for t in ids])
    assert close(got, ref), np.abs(got - ref).max()
    s.reset()
    assert close(s.logits_all(ids), ref)
    for t in (1, 17, 30):
        s.reset()
        assert close(s.prefill(ids[:t]), ref[t - 1])
        assert close(np.stack([s.step(x) for x in ids[t:]]), ref[t:])
    assert {k: v.shape for k, v in s.state().items()} == {
        **{f"past_key_values.{i}.shift_att": (1, C) for i in range(L)},
        **{f"past_key_values.{i}.wkv": (1, H, N, N) for i in range(L)},
        **{f"past_key_values.{i}.shift_ffn": (1, C) for i in range(L)}}


def test_bf16_pth(tmp_path):
    """A bf16 v5.2 file: the package's fp32 model of the bf16-rounded weights (saved as f32, since the
    package keeps a bf16 embedding in bf16)."""
    sd = {k: v.to(torch.bfloat16) for k, v in blinkdl_state_dict("5.2", seed=1).items()}
    pth = tmp_path / "RWKV-5-bf16.pth"
    torch.save(sd, pth)
    ids = np.random.default_rng(1).integers(0, VOCAB, 48).tolist()
    ref, _ = package_logits(sd, tmp_path / "rounded.pth", ids)
    unrounded, _ = package_logits(blinkdl_state_dict("5.2", seed=1), tmp_path / "f32.pth", ids)
    assert np.abs(ref - unrounded).max() > 1e-3  # bf16 rounding did change the model
    for portable in (False, True):
        m = edgeseq.load(export(str(pth), str(tmp_path / f"b{int(portable)}"), portable=portable))
        s = m.session()
        assert close(np.stack([s.step(t) for t in ids]), ref)
        s.reset()
        assert close(s.logits_all(ids), ref)
