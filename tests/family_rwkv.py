"""RWKV-4 to RWKV-7 cases of the conformance suite: rwkv.cpp's tiny fixtures (judged by rwkv.cpp's expected
logits, the `rwkv` package's model on their weights, or a float64 numpy RWKV-5 checked against those),
random BlinkDL .pth files with the `rwkv` package's logits (in a subprocess, see rwkv_builders.py), and
transformers' RwkvForCausalLM in float64. tests/families.py registers CASES; tests/test_rwkv*.py hold what
is special to each version."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from conftest import Exported, add_noise, write_tokenizer
from families import B, F, FamilyCase, checks, not_degenerate

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
PROMPT = [34, 105, 110]  # the bytes of '"in', which rwkv.cpp's own test feeds before comparing logits

RWKV4_CPP = FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin"
RWKV5_CPP = FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"
RWKV7_CPP = FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin"
RWKV5_TEXT = list(b'"In the beginning the Universe was created. This has made a lot of people very angry.')

RWKV6_CONFIGS = {  # random BlinkDL .pth files: name: (version, config)
    "h32-L3": ("6.0", dict(C=64, L=3, H=2, F=224, D_MIX=8, D_DECAY=16)),
    "h64-L1": ("6.0", dict(C=128, L=1, H=2, F=448, D_MIX=16, D_DECAY=32)),
    "h32-L5": ("6.0", dict(C=96, L=5, H=3, F=320, D_MIX=8, D_DECAY=8)),
    "h64-L5": ("6.0", dict(C=192, L=5, H=3, F=256, D_MIX=4, D_DECAY=16)),
}
RWKV7_CONFIGS = {  # random BlinkDL .pth files: name: (version, config)
    "h32-L1": ("7", dict(C=64, L=1, H=2, F=256, D_W=16, D_A=16, D_V=8, D_G=16)),
    "h64-L3": ("7", dict(C=128, L=3, H=2, F=320, D_W=32, D_A=16, D_V=16, D_G=32)),
    "h32-L5": ("7", dict(C=96, L=5, H=3, F=384, D_W=8, D_A=8, D_V=8, D_G=8)),
    "h64-L5": ("7", dict(C=192, L=5, H=3, F=256, D_W=16, D_A=32, D_V=8, D_G=24)),
}


def _rwkv4_cpp(d: Path) -> Exported:
    """rwkv.cpp's RWKV-4 fixture against the `rwkv` package's model on its weights (the converter's
    transforms undone), 64 random tokens."""
    from rwkv_builders import tol

    from edgeseq.exporters.rwkvcpp import RwkvCppFile

    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv import model as rwkv_model
    f = RwkvCppFile(str(RWKV4_CPP))
    sd = {}
    for k in f.keys():
        a = f.get(k)
        if k.endswith("att.time_decay"):
            a = np.log(-a)  # rwkv.cpp stored -exp(time_decay)
        if ".time_mix" in k:
            a = a.reshape(1, 1, -1)
        sd[k] = torch.tensor(a)
    torch.save(sd, d / "m.pth")
    model = rwkv_model.RWKV(model=str(d / "m"), strategy="cpu fp32", verbose=False)
    def reference(ids):
        logits, state = [], None
        for t in ids:
            out, state = model.forward([t], state)
            logits.append(out.numpy().copy())
        return np.stack(logits)

    ids = np.random.default_rng(0).integers(0, 256, 64).tolist()
    ref = reference(ids)
    c = Exported(RWKV4_CPP, d, ids, ref, tol=tol(ref))
    c.reference = reference
    return c


def make_hf_rwkv4(tmp_path_factory):
    """A tiny random RwkvForCausalLM with a 301-token tokenizer, its ids and float64 logits: (folder, ids,
    ref); the checkpoint is folder / "hf"."""
    from transformers import RwkvConfig, RwkvForCausalLM

    d = tmp_path_factory.mktemp("hf-rwkv4")
    torch.manual_seed(0)
    cfg = RwkvConfig(vocab_size=301, hidden_size=32, attention_hidden_size=48, intermediate_size=80,
                     num_hidden_layers=3, rescale_every=0, tie_word_embeddings=False)
    model = add_noise(RwkvForCausalLM(cfg).eval(), seed=1)
    with torch.no_grad():  # time_decay/time_first start at tidy values; make every channel differ
        for blk in model.rwkv.blocks:
            blk.attention.time_decay.add_(torch.randn_like(blk.attention.time_decay))
            blk.attention.time_first.add_(torch.randn_like(blk.attention.time_first) * 0.5)
    model.save_pretrained(d / "hf")
    write_tokenizer(d / "hf" / "tokenizer.json", 301)
    ids = np.random.default_rng(3).integers(0, 301, 64).tolist()
    with torch.no_grad():
        ref = model.double()(torch.tensor([ids]), use_cache=False).logits[0].numpy()
    return d, ids, ref


def _rwkv4_hf(d: Path) -> Exported:
    class Here:
        def mktemp(self, name):
            return d

    folder, ids, ref = make_hf_rwkv4(Here())
    not_degenerate(ref)
    return Exported(folder / "hf", folder, ids, ref)


def numpy_rwkv5(ids):
    """float64 numpy RWKV v5.2 from rwkv.cpp's fixture tensors: (logits at every position, final state).
    test_rwkv5 checks it against rwkv.cpp's expected logits, so it can judge longer texts."""
    from edgeseq.exporters.rwkvcpp import RwkvCppFile
    from edgeseq.kernels.wkv5 import wkv5_ref

    C, L, H, N = RWKV5_SHAPE
    f = RwkvCppFile(str(RWKV5_CPP))

    def g(name):
        return f.get(name).astype(np.float64)

    def ln(x, p, eps=1e-5):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * g(p + ".weight") + g(p + ".bias")

    def sig(x):
        return 1 / (1 + np.exp(-x))

    shift_att, wkv, shift_ffn = np.zeros((L, C)), np.zeros((L, 1, H, N, N)), np.zeros((L, C))
    out = []
    for tok in ids:
        x = ln(g("emb.weight")[tok], "blocks.0.ln0")
        for i in range(L):
            p = f"blocks.{i}."
            xx = ln(x, p + "ln1")
            sx, shift_att[i] = shift_att[i].copy(), xx
            r, k, v, gate = (g(f"{p}att.{w}.weight") @ (sx + (xx - sx) * g(f"{p}att.time_mix_{m}"))
                             for m, w in (("r", "receptance"), ("k", "key"), ("v", "value"), ("g", "gate")))
            # time_decay as rwkv.cpp stores it is already w = exp(-exp(decay))
            y, wkv[i] = wkv5_ref(*(z.reshape(1, 1, H, N) for z in (r, k, v)), wkv[i],
                                 g(p + "att.time_faaaa"), g(p + "att.time_decay"))
            y = y.reshape(H, N)
            y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)  # rwkv.cpp's eps
            y = y.reshape(C) * g(p + "att.ln_x.weight") + g(p + "att.ln_x.bias")
            x = x + g(p + "att.output.weight") @ (y * gate * sig(gate))
            xx = ln(x, p + "ln2")
            sx, shift_ffn[i] = shift_ffn[i].copy(), xx
            kk = np.maximum(g(p + "ffn.key.weight") @ (sx + (xx - sx) * g(p + "ffn.time_mix_k")), 0) ** 2
            rr = sig(g(p + "ffn.receptance.weight") @ (sx + (xx - sx) * g(p + "ffn.time_mix_r")))
            x = x + rr * (g(p + "ffn.value.weight") @ kk)
        out.append(g("head.weight") @ ln(x, "ln_out"))
    state = {}
    for i in range(L):
        state[f"past_key_values.{i}.shift_att"] = shift_att[i][None]
        state[f"past_key_values.{i}.wkv"] = wkv[i]
        state[f"past_key_values.{i}.shift_ffn"] = shift_ffn[i][None]
    return np.stack(out), state


RWKV5_SHAPE = (64, 12, 8, 8)  # the fixture's width, layers, heads, head size


def _rwkv5_cpp(d: Path) -> Exported:
    """rwkv.cpp's RWKV-5 fixture against the numpy model on a longer text; rwkv.cpp's tolerance (1e-3)."""
    ref, state = numpy_rwkv5(RWKV5_TEXT)
    c = Exported(RWKV5_CPP, d, RWKV5_TEXT, ref, tol=1e-3)
    c.ref_state = state
    c.reference = lambda ids: numpy_rwkv5(ids)[0]
    return c


def _rwkv6_group(d: Path) -> dict:
    from rwkv_builders import build_cases

    return {f"rwkv6/{k}": v for k, v in build_cases(RWKV6_CONFIGS, d, v7=False).items()}


def rwkv7_fixture_as_pth(path: Path) -> Path:
    """The rwkv.cpp fixture's weights as the BlinkDL .pth the package reads (rwkv.cpp's layout undone)."""
    from edgeseq.exporters.rwkvcpp import RwkvCppFile

    f, sd = RwkvCppFile(str(RWKV7_CPP)), {}
    for k in f.keys():
        a = f.get(k)
        if k.endswith("att.x_rwkvag"):  # rwkv.cpp fused x_r, x_w, x_k, x_v, x_a, x_g
            for j, m in enumerate("rwkvag"):
                sd[k[:-len("x_rwkvag")] + "x_" + m] = torch.tensor(a[j].reshape(1, 1, -1))
            continue
        if any(k.endswith(f"att.{m}{n}") for m in "wavg" for n in "12"):
            a = a.T  # rwkv.cpp stored the LoRA matrices transposed
        sd[k] = torch.tensor(np.ascontiguousarray(a))
    torch.save(sd, path)
    return path


def _rwkv7_group(d: Path) -> dict:
    """The random configs and the fixture's weights as a .pth, with the `rwkv` package's x070 logits for
    each (one subprocess: the package picks its RWKV-7 code at import time, from RWKV_V7_ON); the rwkv.cpp
    file itself is judged by the package's logits of its .pth twin."""
    from rwkv_builders import RwkvCase, attach_references, tol

    out = {f"rwkv7/{name}": RwkvCase(name, version, cfg, d / name) for name, (version, cfg) in RWKV7_CONFIGS.items()}
    (d / "fixture").mkdir()
    pth = RwkvCase("fixture", "7", {}, d / "fixture", pth=rwkv7_fixture_as_pth(d / "fixture" / "m.pth"))
    out["rwkv7/fixture-pth"] = pth
    attach_references(list(out.values()), v7=True)
    cpp = Exported(RWKV7_CPP, d / "rwkv.cpp", pth.ids, pth.ref, tol=tol(pth.ref))
    (d / "rwkv.cpp").mkdir()
    cpp.other, cpp.fork_ref = pth.other, pth.fork_ref
    out["rwkv7/rwkv.cpp"] = cpp
    return out


def rwkv_state(L: int, C: int, H: int = 0, N: int = 0, att: int = 0) -> Callable:
    """RWKV's state per layer: the time-mix token shift (C), WKV-4's running sums aa, bb, pp (att), or
    RWKV-5/6/7's matrix state (H, N, N), the channel-mix token shift (C)."""
    def want(_built) -> dict:
        out = {}
        for i in range(L):
            out[f"past_key_values.{i}.shift_att"] = (1, C)
            if att:
                for k in ("aa", "bb", "pp"):
                    out[f"past_key_values.{i}.{k}"] = (1, att)
            else:
                out[f"past_key_values.{i}.wkv"] = (1, H, N, N)
            out[f"past_key_values.{i}.shift_ffn"] = (1, C)
        return out
    return want


STANDARD = {"step": None, "prefill": None, "prefill_all": None}  # fused graphs of standard ops only
WKV4_INIT = {"pp": -1e30}  # the reference's initial running maximum

CASES = [
    FamilyCase("rwkv4/rwkv.cpp", "rwkv4", _rwkv4_cpp,
               checks(expected=B, step=B, prefill_all=B, prefill_then_steps=B, state_spec=F, state_constant=F,
                      chunked=F, plain_ort=F, save_load_fork=F, flavour_ops=True, gguf=True),
               state=rwkv_state(4, 128, att=128), init=WKV4_INIT, prefill_at=(30,),
               fused_ops=STANDARD, expected=(PROMPT, FIXTURES / "expected-logits-4v0-660K.bin")),
    FamilyCase("rwkv4/hf", "rwkv4", _rwkv4_hf, checks(step=B, prefill_all=B, state_spec=F),
               state=rwkv_state(3, 32, att=48), init=WKV4_INIT, tokenizer="hf"),
    FamilyCase("rwkv5/rwkv.cpp", "rwkv5", _rwkv5_cpp,
               checks(expected=B, step=B, prefill_all=B, prefill_then_steps=B, chunked=B, plain_ort=B, state_spec=B,
                      state_constant=B, flavour_ops=True, save_load_fork=F, gguf=True),
               state=rwkv_state(12, 64, 8, 8), prefill_at=(1, 2, 17), prefill_chunk=7,
               fused_ops={"step": None, "prefill": {"LinearAttention": True},
                          "prefill_all": {"LinearAttention": True}},
               portable_ops={"prefill": {"Scan": True}, "prefill_all": {"Scan": True}},
               expected=(PROMPT, FIXTURES / "expected-logits-5v2-730K.bin")),
]

CASES += [FamilyCase(
    f"rwkv6/{name}", "rwkv6", None,
    checks(step=B, prefill_all=B, prefill_then_steps=B, state_spec=F, chunked=first and B, plain_ort=first and B,
           state_constant=first and F, flavour_ops=first, gguf=first, save_load_fork=(name == "h64-L5") and F),
    group=_rwkv6_group, state=rwkv_state(cfg["L"], cfg["C"], cfg["H"], cfg["C"] // cfg["H"]),
    prefill_at=(1, 17, 40), fork_at=20,
    fused_ops={"step": {"LinearAttention": False}, "prefill": {"LinearAttention": True, "Scan": False}},
    portable_ops={"prefill": {"LinearAttention": False, "Scan": True}})
    for first, (name, (_, cfg)) in zip((True, False, False, False), RWKV6_CONFIGS.items())]

CASES += [
    FamilyCase("rwkv7/rwkv.cpp", "rwkv7", None,
               checks(expected=B, step=B, prefill_all=B, prefill_then_steps=B, chunked=B, state_spec=F,
                      state_constant=F, plain_ort=F, flavour_ops=True, gguf=True),
               group=_rwkv7_group, state=rwkv_state(12, 64, 1, 64), prefill_at=(30,), fork_at=20,
               # no fused op fits WKV-7: the flavours build the same graphs
               fused_ops=STANDARD, expected=(PROMPT, FIXTURES / "expected-logits-7v0-834K.bin")),
    # the same weights from the BlinkDL .pth the reference loaded: separate x_r … x_g, LoRA as (in, out)
    FamilyCase("rwkv7/fixture-pth", "rwkv7", None, checks(step=B, prefill_all=B), group=_rwkv7_group),
    *(FamilyCase(f"rwkv7/{name}", "rwkv7", None,
                 checks(step=B, prefill_all=B, prefill_then_steps=B, state_spec=F,
                        save_load_fork=(name == "h64-L3") and F),
                 group=_rwkv7_group, state=rwkv_state(cfg["L"], cfg["C"], cfg["H"], cfg["C"] // cfg["H"]),
                 prefill_at=(1, 17, 40), fork_at=20)
      for name, (_, cfg) in RWKV7_CONFIGS.items()),
]
