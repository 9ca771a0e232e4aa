"""Shared builders for the RWKV tests: random checkpoints in BlinkDL's `.pth` layout (v5.0/5.1/5.2, v6.0,
v7 "x070") of any width, head size, layer count and ffn size, and the `rwkv` package's fp32 reference
logits for them, one token at a time (RWKV_JIT_ON=0, CPU).

The package picks its RWKV-7 code at import time (RWKV_V7_ON=1 swaps `RWKV` for the x070 class, which
reads nothing else), so the reference always runs in a subprocess: one per call, for every model of
the call, so a test module pays the torch import once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.exporters.export import export

VOCAB = 256
SEQ = 64  # tokens of every reference sequence
FORK_AT, FORK_LEN = 20, 12  # the fork continuation: ids[:FORK_AT] + FORK_LEN other tokens
FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


def tol(ref) -> float:
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def step_all(session, ids) -> np.ndarray:
    return np.stack([session.step(int(t)) for t in ids])


# ---------------------------------------------------------------------------------------------
# random BlinkDL state dicts (float32 torch tensors)
# ---------------------------------------------------------------------------------------------

def v5_state_dict(version: str = "5.2", C: int = 128, L: int = 3, H: int = 2, F: int = 448, seed: int = 0,
                  vocab: int = VOCAB) -> dict:
    """RWKV-5 as BlinkDL's training code saves it (noisy enough that the logits vary): v5.2 has
    time_decay/time_faaaa per (head, channel); v5.1 one decay and one `time_first` (the bonus's log) per
    head; v5.0 is v5.1 without the gate."""
    import torch

    N = C // H
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

    sd = {"emb.weight": randn(vocab, C)}
    for i in range(L):
        p = f"blocks.{i}."
        if i == 0:
            ln(sd, p + "ln0")
        ln(sd, p + "ln1")
        ln(sd, p + "ln2")
        a = p + "att."
        for m in ("k", "v", "r") + (("g",) if version != "5.0" else ()):
            sd[a + f"time_mix_{m}"] = uniform(0, 1, 1, 1, C)
        # the weights go before time_decay: the package tells v5.2 from v5.1 by the time_decay it meets
        # after `gate.weight` and `ln_x`, in the file's key order, so a one-layer file in BlinkDL's own
        # order (time_decay first) reads as v5.1 there
        for m in ("receptance", "key", "value", "output") + (("gate",) if version != "5.0" else ()):
            sd[a + f"{m}.weight"] = mat(C, C)
        ln(sd, a + "ln_x")
        if version == "5.2":
            decay = uniform(-5, 2.5, H, N)
            decay[0, :2] = 5.0  # w = exp(-exp(5)) underflows to 0 in float32
            sd[a + "time_decay"] = decay
            sd[a + "time_faaaa"] = randn(H, N, scale=0.5)
        else:
            sd[a + "time_decay"] = uniform(-5, 1, H)
            sd[a + "time_first"] = randn(H, scale=0.5)
        f = p + "ffn."
        sd[f + "time_mix_k"] = uniform(0, 1, 1, 1, C)
        sd[f + "time_mix_r"] = uniform(0, 1, 1, 1, C)
        sd[f + "key.weight"] = mat(F, C)
        sd[f + "receptance.weight"] = mat(C, C)
        sd[f + "value.weight"] = mat(C, F)
    ln(sd, "ln_out")
    sd["head.weight"] = mat(vocab, C)
    return sd


def v6_state_dict(C: int = 64, L: int = 3, H: int = 2, F: int = 224, D_MIX: int = 8, D_DECAY: int = 16,
                  seed: int = 0, vocab: int = VOCAB) -> dict:
    """RWKV-6 (v6.0) in BlinkDL's layout: token-shift LoRA time_maa_w1 (C, 5·D_MIX) / w2 (5, D_MIX, C),
    decay LoRA time_decay_w1 (C, D_DECAY) / w2 (D_DECAY, C), time_faaaa (H, N)."""
    import torch

    N = C // H
    rng = np.random.default_rng(seed)

    def rnd(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def vec(lo=0.0, hi=1.0):
        return rng.uniform(lo, hi, (1, 1, C)).astype(np.float32)

    sd = {"emb.weight": rnd(vocab, C), "blocks.0.ln0.weight": 1 + rnd(C, scale=0.1),
          "blocks.0.ln0.bias": rnd(C, scale=0.1)}
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"] = 1 + rnd(C, scale=0.1)
            sd[f"{p}{ln}.bias"] = rnd(C, scale=0.1)
        for m in "xwkvrg":
            sd[f"{p}att.time_maa_{m}"] = vec()
        sd[p + "att.time_maa_w1"] = rnd(C, 5 * D_MIX, scale=0.1)
        sd[p + "att.time_maa_w2"] = rnd(5, D_MIX, C, scale=0.1)
        sd[p + "att.time_decay"] = vec(-4.0, 1.0)
        sd[p + "att.time_decay_w1"] = rnd(C, D_DECAY, scale=0.1)
        sd[p + "att.time_decay_w2"] = rnd(D_DECAY, C, scale=0.2)
        sd[p + "att.time_faaaa"] = rnd(H, N, scale=0.5)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[f"{p}att.{m}.weight"] = rnd(C, C, scale=C ** -0.5)
        sd[p + "att.ln_x.weight"] = 1 + rnd(C, scale=0.1)
        sd[p + "att.ln_x.bias"] = rnd(C, scale=0.1)
        sd[p + "ffn.time_maa_k"] = vec()
        sd[p + "ffn.time_maa_r"] = vec()
        sd[p + "ffn.key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[p + "ffn.value.weight"] = rnd(C, F, scale=F ** -0.5)
        sd[p + "ffn.receptance.weight"] = rnd(C, C, scale=C ** -0.5)
    sd["ln_out.weight"] = 1 + rnd(C, scale=0.1)
    sd["ln_out.bias"] = rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=2 * C ** -0.5)
    return {k: torch.tensor(v) for k, v in sd.items()}


def v7_state_dict(C: int = 64, L: int = 3, H: int = 2, F: int = 256, D_W: int = 16, D_A: int = 16, D_V: int = 8,
                  D_G: int = 16, seed: int = 0, vocab: int = VOCAB) -> dict:
    """RWKV-7 (x070) in BlinkDL's layout: separate x_r … x_g (1, 1, C), LoRA matrices (in, out), r_k (H, N),
    no value-residual gate (v0, v1, v2) in layer 0."""
    import torch

    N = C // H
    rng = np.random.default_rng(seed)

    def rnd(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def vec(lo=0.0, hi=1.0):
        return rng.uniform(lo, hi, (1, 1, C)).astype(np.float32)

    sd = {"emb.weight": rnd(vocab, C), "blocks.0.ln0.weight": 1 + rnd(C, scale=0.1),
          "blocks.0.ln0.bias": rnd(C, scale=0.1)}
    for i in range(L):
        p, a = f"blocks.{i}.", f"blocks.{i}.att."
        for ln in ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"] = 1 + rnd(C, scale=0.1)
            sd[f"{p}{ln}.bias"] = rnd(C, scale=0.1)
        for m in "rwkvag":
            sd[a + "x_" + m] = vec()
        sd[a + "w0"], sd[a + "w1"], sd[a + "w2"] = vec(-3.0, 3.0), rnd(C, D_W, scale=0.3), rnd(D_W, C, scale=0.3)
        sd[a + "a0"], sd[a + "a1"], sd[a + "a2"] = vec(-1.0, 1.0), rnd(C, D_A, scale=0.3), rnd(D_A, C, scale=0.3)
        if i > 0:
            sd[a + "v0"], sd[a + "v1"], sd[a + "v2"] = vec(-1.0, 1.0), rnd(C, D_V, scale=0.3), rnd(D_V, C, scale=0.3)
        sd[a + "g1"], sd[a + "g2"] = rnd(C, D_G, scale=C ** -0.5), rnd(D_G, C, scale=D_G ** -0.5)
        sd[a + "k_k"], sd[a + "k_a"], sd[a + "r_k"] = vec(0.5, 1.5), vec(), rnd(H, N, scale=0.5)
        for m in ("receptance", "key", "value", "output"):
            sd[f"{a}{m}.weight"] = rnd(C, C, scale=C ** -0.5)
        sd[a + "ln_x.weight"] = 1 + rnd(C, scale=0.1)
        sd[a + "ln_x.bias"] = rnd(C, scale=0.1)
        sd[p + "ffn.x_k"] = vec()
        sd[p + "ffn.key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[p + "ffn.value.weight"] = rnd(C, F, scale=F ** -0.5)
    sd["ln_out.weight"] = 1 + rnd(C, scale=0.1)
    sd["ln_out.bias"] = rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=2 * C ** -0.5)
    return {k: torch.tensor(v) for k, v in sd.items()}


def state_dict(version: str, **cfg) -> dict:
    if version.startswith("5"):
        return v5_state_dict(version, **cfg)
    return {"6.0": v6_state_dict, "7": v7_state_dict}[version](**cfg)


# ---------------------------------------------------------------------------------------------
# the rwkv package's reference
# ---------------------------------------------------------------------------------------------

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
    if sys.argv[1] == "7":
        os.environ["RWKV_V7_ON"] = "1"
    else:
        os.environ.pop("RWKV_V7_ON", None)
    import numpy as np, torch
    torch.set_num_threads(1)
    from rwkv.model import RWKV
    for job in json.loads(sys.argv[2]):
        base = job["base"]
        kw = {} if sys.argv[1] == "7" else {"verbose": False}
        model = RWKV(model=base, strategy="cpu fp32", **kw)
        if job["version"] != "7":
            assert float(model.version) == float(job["version"]), (base, model.version)
        for j, ids in enumerate(job["seqs"]):
            out, state = [], None
            for t in ids:
                o, state = model.forward([t], state)
                out.append(o.float().numpy().copy())
            np.save(f"{base}-{j}.npy", np.stack(out))
        o, _ = model.forward(job["seqs"][0], None)  # the package's own sequence path, for its last token
        np.save(f"{base}-seq.npy", o.float().numpy())
""")


def package_logits(jobs: list[dict], v7: bool) -> list[list[np.ndarray]]:
    """jobs: [{"base": path without .pth, "version": "5.2" | "6.0" | "7", "seqs": [ids, ...]}]; for each,
    the package's logits of each sequence one token at a time, (t, vocab) float32. Also checks the
    package's sequence forward against its own steps, so the reference is self-consistent."""
    import torch  # noqa: F401  (a test extra: missing means a broken install, not a skip)
    import rwkv  # noqa: F401  (a test extra: missing means a broken install, not a skip)
    env = {k: v for k, v in os.environ.items() if k != "RWKV_V7_ON"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, "7" if v7 else "5", json.dumps(jobs)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = []
    for job in jobs:
        refs = [np.load(f"{job['base']}-{j}.npy") for j in range(len(job["seqs"]))]
        seq_last = np.load(f"{job['base']}-seq.npy")
        assert max_diff(seq_last, refs[0][-1]) < tol(refs[0]), job["base"]
        out.append(refs)
    return out


class RwkvCase:
    """One random BlinkDL checkpoint, the package's logits for a 64-token sequence and for a fork of it
    (ids[:FORK_AT] + other tokens), and its bundles exported on demand (cached per flavour)."""

    def __init__(self, name: str, version: str, cfg: dict, workdir: Path, seed: int = 0, pth: Path | None = None):
        import torch

        self.name, self.version, self.cfg, self.workdir = name, version, cfg, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pth = pth or self.workdir / f"RWKV-{version}-{name}.pth"
        if pth is None:
            torch.save(state_dict(version, seed=seed, **cfg), self.pth)
        rng = np.random.default_rng(seed + 100)
        self.ids = rng.integers(0, VOCAB, SEQ).tolist()
        self.other = rng.integers(0, VOCAB, FORK_LEN).tolist()
        self.ref = self.fork_ref = None
        self._bundles: dict = {}
        self._models: dict = {}

    @property
    def ckpt(self) -> Path:
        return self.pth

    @property
    def tol(self) -> float:
        return tol(self.ref)

    def tol_for(self, ref) -> float:
        return tol(ref)

    def job(self) -> dict:
        return {"base": str(self.pth)[:-4], "version": self.version,
                "seqs": [self.ids, self.ids[:FORK_AT] + self.other]}

    def bundle(self, portable: bool) -> Path:
        if portable not in self._bundles:
            self._bundles[portable] = Path(export(str(self.pth), str(self.workdir / f"b{int(portable)}"),
                                                  portable=portable))
        return self._bundles[portable]

    def model(self, portable: bool):
        if portable not in self._models:
            self._models[portable] = edgeseq.load(self.bundle(portable))
        return self._models[portable]


def build_cases(specs: dict, tmp_dir: Path, v7: bool) -> dict:
    """specs: {name: (version, cfg)}; every case's reference in one package subprocess."""
    cases = {name: RwkvCase(name, version, cfg, Path(tmp_dir) / name) for name, (version, cfg) in specs.items()}
    attach_references(list(cases.values()), v7)
    return cases


def attach_references(cases: list, v7: bool) -> None:
    for case, (ref, fork_ref) in zip(cases, package_logits([c.job() for c in cases], v7)):
        assert ref.shape == (SEQ, VOCAB) and ref.std() > 0.5, case.name  # not degenerate
        assert len(set(ref.argmax(-1).tolist())) > 8, case.name
        assert max_diff(fork_ref[:FORK_AT], ref[:FORK_AT]) == 0.0
        assert max_diff(fork_ref[FORK_AT:], ref[FORK_AT:FORK_AT + FORK_LEN]) > 0.1  # the branches differ
        case.ref, case.fork_ref = ref, fork_ref[FORK_AT:]


# ---------------------------------------------------------------------------------------------
# checks shared by the version files
# ---------------------------------------------------------------------------------------------

def check_matches_package(case: RwkvCase, portable: bool, prefixes=(1, 17, 40)):
    """Steps, logits_all, and prefill-then-steps, at every position, against the package; prefill
    then steps also equals steps alone."""
    ref, ids = case.ref, case.ids
    s = case.model(portable).session()
    steps = step_all(s, ids)
    assert max_diff(steps, ref) < tol(ref), (case.name, max_diff(steps, ref))
    s.reset()
    every = s.logits_all(ids)
    assert max_diff(every, ref) < tol(ref), (case.name, max_diff(every, ref))
    assert s.position == SEQ
    for t in prefixes:
        s.reset()
        last = s.prefill(ids[:t])
        assert s.position == t
        assert max_diff(last, ref[t - 1]) < tol(ref) and max_diff(last, steps[t - 1]) < tol(ref), (case.name, t)
        tail = step_all(s, ids[t:])
        assert max_diff(tail, ref[t:]) < tol(ref) and max_diff(tail, steps[t:]) < tol(ref), (case.name, t)


def check_state_shapes(case: RwkvCase, H: int, N: int, L: int, C: int):
    s = case.model(False).session()
    assert {k: v.shape for k, v in s.state().items()} == {
        **{f"past_key_values.{i}.shift_att": (1, C) for i in range(L)},
        **{f"past_key_values.{i}.wkv": (1, H, N, N) for i in range(L)},
        **{f"past_key_values.{i}.shift_ffn": (1, C) for i in range(L)}}


def check_save_load_fork(case: RwkvCase, tmp_path: Path):
    """save_state after a prefix, load into a fresh session (of the same and of the other flavour),
    continue: identical logits (same flavour), the package's (both); fork: two interleaved continuations,
    each the package's."""
    ids, ref = case.ids, case.ref
    m = case.model(False)
    s = m.session()
    s.prefill(ids[:FORK_AT])
    path = tmp_path / "chat.state"
    s.save_state(str(path))
    saved = s.state()
    cont = step_all(s, ids[FORK_AT:FORK_AT + FORK_LEN])
    assert max_diff(cont, ref[FORK_AT:FORK_AT + FORK_LEN]) < tol(ref)

    t = m.session()
    t.prefill(ids[40:50])  # some other history, to be replaced
    t.load_state(str(path))
    assert t.position == FORK_AT
    assert saved.keys() == t.state().keys() and all(np.array_equal(saved[k], t.state()[k]) for k in saved)
    assert np.array_equal(step_all(t, ids[FORK_AT:FORK_AT + FORK_LEN]), cont)  # identical, not just close

    p = case.model(True).session()  # the state layout is shared by the flavours
    p.load_state(str(path))
    assert max_diff(step_all(p, ids[FORK_AT:FORK_AT + FORK_LEN]), ref[FORK_AT:FORK_AT + FORK_LEN]) < tol(ref)

    s = m.session()
    s.prefill(ids[:FORK_AT])
    f = s.fork()
    assert f.position == FORK_AT
    a, b = [], []
    for x, y in zip(ids[FORK_AT:FORK_AT + FORK_LEN], case.other):  # interleaved: neither may disturb the other
        a.append(s.step(x))
        b.append(f.step(y))
    assert max_diff(np.stack(a), ref[FORK_AT:FORK_AT + FORK_LEN]) < tol(ref)
    assert max_diff(np.stack(b), case.fork_ref) < tol(case.fork_ref)
