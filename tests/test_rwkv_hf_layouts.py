"""RWKV-6 and RWKV-7 from Hugging Face directories: the RWKV organisation's `Rwkv6ForCausalLM` layout
and flash-linear-attention's (fla-hub) `RWKV7ForCausalLM` layout.

Neither model class is importable here (the v6 one is remote code; fla's needs triton and a GPU), so
the numbers are proven the other way round: a random BlinkDL checkpoint is scored by the `rwkv`
package's reference model, the same weights are written in the HF layout (names and shapes as those
classes declare them: fla 0.6.0's `RWKV7ForCausalLM.state_dict()`, the RWKV org's modeling_rwkv6.py), and
edgeseq's bundle of the HF directory must give the package's logits at every position. The tensor names
are checked against fla's class itself where fla is importable.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import edgeseq
from edgeseq.errors import EdgeseqError
from edgeseq.exporters.export import export
from rwkv_builders import RwkvCase, attach_references

# head size 64: fla's group-norm eps is head_dim·norm_eps, BlinkDL's (and the package's) a fixed 64e-5; they
# agree at 64, the size every released RWKV-7 uses
V7 = dict(C=128, L=3, H=2, F=256, D_W=16, D_A=16, D_V=8, D_G=16)
V6 = dict(C=64, L=3, H=2, F=224, D_MIX=8, D_DECAY=16)


def _np(sd) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float32) for k, v in sd.items()}


def fla_layout(sd: dict[str, np.ndarray], H: int, tied=False, no_bias=False, fused_mixes=False) -> dict:
    """BlinkDL x070 tensors under fla's names: LoRA `lora.0` (rank, C), `lora.2` (out, rank) + bias."""
    out = {"model.embeddings.weight": sd["emb.weight"], "model.norm.weight": sd["ln_out.weight"],
           "model.norm.bias": sd["ln_out.bias"]}
    if not tied:
        out["lm_head.weight"] = sd["head.weight"]
    i = 0
    while f"blocks.{i}.ln1.weight" in sd:
        b, f = f"blocks.{i}.", f"model.layers.{i}."
        names = [("ln1", "attn_norm"), ("ln2", "ffn_norm"), ("att.ln_x", "attn.g_norm")]
        if i == 0:
            names.append(("ln0", "pre_norm"))
        for ours, theirs in names:
            out[f"{f}{theirs}.weight"] = sd[f"{b}{ours}.weight"]
            out[f"{f}{theirs}.bias"] = sd[f"{b}{ours}.bias"]
        if fused_mixes:
            out[f"{f}attn.x_x"] = np.concatenate([sd[f"{b}att.x_{m}"].reshape(1, -1) for m in "rwkvag"])
        else:
            for m in "rwkvag":
                out[f"{f}attn.x_{m}"] = sd[f"{b}att.x_{m}"]  # (1, 1, C) in both
        out[f"{f}attn.k_k"] = sd[f"{b}att.k_k"].reshape(-1)
        out[f"{f}attn.k_a"] = sd[f"{b}att.k_a"].reshape(-1)
        out[f"{f}attn.r_k"] = sd[f"{b}att.r_k"].reshape(H, -1)
        for ours, theirs in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
            out[f"{f}attn.{theirs}.weight"] = sd[f"{b}att.{ours}.weight"]
        for m in "wavg":
            if f"{b}att.{m}1" not in sd:
                continue  # layer 0 has no v LoRA
            out[f"{f}attn.{m}_lora.lora.0.weight"] = np.ascontiguousarray(sd[f"{b}att.{m}1"].T)
            out[f"{f}attn.{m}_lora.lora.2.weight"] = np.ascontiguousarray(sd[f"{b}att.{m}2"].T)
            if m != "g":
                out[f"{f}attn.{m}_lora.lora.2.bias"] = sd[f"{b}att.{m}0"].reshape(-1)
        out[f"{f}ffn.x_k"] = sd[f"{b}ffn.x_k"].reshape(-1)
        out[f"{f}ffn.key.weight"] = sd[f"{b}ffn.key.weight"]
        out[f"{f}ffn.value.weight"] = sd[f"{b}ffn.value.weight"]
        i += 1
    if no_bias:
        out = {k: v for k, v in out.items() if not (k.endswith(".bias") and "norm" in k)}
    return out


def fla_config(C: int, H: int, L: int, F: int, vocab: int, tied=False, no_bias=False) -> dict:
    return {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "hidden_size": C, "head_dim": C // H,
            "num_heads": H, "num_hidden_layers": L, "intermediate_size": F, "vocab_size": vocab,
            "norm_eps": 1e-5, "norm_bias": not no_bias, "norm_first": True, "hidden_act": "sqrelu",
            "tie_word_embeddings": tied, "value_dim": [C] * L, "attn": None, "fuse_norm": True}


def write_dir(path: Path, tensors: dict, config: dict) -> Path:
    path.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("hf_layouts")
    v7 = RwkvCase("fla", "7", V7, d / "v7")
    v7b = RwkvCase("fla-variant", "7", V7, d / "v7b", seed=3)
    # the variant: zero LayerNorm biases (fla's norm_bias = false) and a head tied to the embedding
    sd = torch.load(v7b.pth, weights_only=True)
    for k in sd:
        if k.endswith(".bias") and (".ln" in k or k.startswith("ln_out")):
            sd[k] = torch.zeros_like(sd[k])
    sd["head.weight"] = sd["emb.weight"].clone()
    torch.save(sd, v7b.pth)
    attach_references([v7, v7b], v7=True)
    v6 = RwkvCase("hf6", "6.0", V6, d / "v6")
    attach_references([v6], v7=False)
    return {"v7": v7, "v7b": v7b, "v6": v6, "dir": d}


def _check(bundle: str, case) -> None:
    ref = case.ref
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    s = edgeseq.load(bundle).session()
    steps = np.stack([s.step(t) for t in case.ids])
    assert np.abs(steps - ref).max() < tol
    s.reset()
    assert np.abs(s.logits_all(case.ids) - ref).max() < tol


@pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
def test_fla_rwkv7_matches_rwkv_package(cases, portable):
    import torch

    c = cases["v7"]
    sd = _np(torch.load(c.pth, weights_only=True))
    cfg = V7
    hf = write_dir(cases["dir"] / f"fla{int(portable)}", fla_layout(sd, cfg["H"]),
                   fla_config(cfg["C"], cfg["H"], cfg["L"], cfg["F"], sd["emb.weight"].shape[0]))
    bundle = export(str(hf), str(cases["dir"] / f"fla-b{int(portable)}"), portable=portable)
    m = edgeseq.load(bundle)
    assert m.manifest["family"] == "rwkv7" and m.manifest["config"]["gn_eps"] == pytest.approx(cfg["C"] // cfg["H"] * 1e-5)
    _check(bundle, c)


def test_fla_rwkv7_without_norm_bias_tied_and_fused_mixes(cases):
    """fla's `norm_bias: false` (no LayerNorm biases), `tie_word_embeddings`, and the older `attn.x_x`."""
    import torch

    c = cases["v7b"]
    sd = _np(torch.load(c.pth, weights_only=True))
    cfg = V7
    hf = write_dir(cases["dir"] / "fla-variant", fla_layout(sd, cfg["H"], tied=True, no_bias=True, fused_mixes=True),
                   fla_config(cfg["C"], cfg["H"], cfg["L"], cfg["F"], sd["emb.weight"].shape[0], tied=True,
                              no_bias=True))
    _check(export(str(hf), str(cases["dir"] / "fla-variant-b")), c)


def test_fla_rwkv7_refuses_what_it_does_not_implement(cases, tmp_path):
    import torch

    c = cases["v7"]
    sd = _np(torch.load(c.pth, weights_only=True))
    cfg = V7
    tensors = fla_layout(sd, cfg["H"])
    for key, value, words in (("hidden_act", "relu", "hidden_act"), ("norm_first", False, "norm_first"),
                              ("value_dim", [2 * cfg["C"]] * cfg["L"], "value_dim")):
        conf = fla_config(cfg["C"], cfg["H"], cfg["L"], cfg["F"], sd["emb.weight"].shape[0])
        conf[key] = value
        hf = write_dir(tmp_path / key, tensors, conf)
        with pytest.raises(EdgeseqError, match=words):
            export(str(hf), str(tmp_path / f"{key}-b"))
        assert not (tmp_path / f"{key}-b").exists()
    # a damaged directory names the missing tensor
    broken = dict(tensors)
    del broken["model.layers.1.attn.a_lora.lora.2.weight"]
    hf = write_dir(tmp_path / "broken", broken, fla_config(cfg["C"], cfg["H"], cfg["L"], cfg["F"], 256))
    with pytest.raises(EdgeseqError, match="a_lora"):
        export(str(hf), str(tmp_path / "broken-b"))


def test_fla_names_are_fla_class_names():
    """Where flash-linear-attention is importable, its own class's state dict has exactly our names."""
    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention (needs triton) is not installed")
    cfg = fla_models.RWKV7Config(hidden_size=64, num_hidden_layers=2, head_dim=32, vocab_size=256,
                                 decay_low_rank_dim=16, gate_low_rank_dim=16, a_low_rank_dim=16, v_low_rank_dim=8,
                                 intermediate_size=256)
    theirs = {k: tuple(v.shape) for k, v in fla_models.RWKV7ForCausalLM(cfg).state_dict().items()}
    from rwkv_builders import v7_state_dict

    ours = fla_layout(_np(v7_state_dict(C=64, L=2, H=2, F=256, D_W=16, D_A=16, D_V=8, D_G=16, vocab=256)), 2)
    assert {k: v.shape for k, v in ours.items()} == theirs


def hf6_layout(sd: dict[str, np.ndarray]) -> dict:
    """BlinkDL v6 tensors under the RWKV org's Rwkv6ForCausalLM names (modeling_rwkv6.py)."""
    out = {}
    for k, v in sd.items():
        n = k.replace("emb.", "rwkv.embeddings.").replace("ln_out.", "rwkv.ln_out.")
        n = n.replace("blocks.", "rwkv.blocks.").replace(".ln0.", ".pre_ln.").replace(".att.", ".attention.")
        n = n.replace(".ffn.", ".feed_forward.")
        out[n] = v
    return out


@pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
def test_hf_rwkv6_matches_rwkv_package(cases, portable):
    import torch

    c = cases["v6"]
    sd = _np(torch.load(c.pth, weights_only=True))
    tensors = hf6_layout(sd)
    assert "rwkv.blocks.0.attention.time_maa_w1" in tensors and "rwkv.blocks.0.feed_forward.time_maa_k" in tensors
    C, L = V6["C"], V6["L"]
    conf = {"architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "hidden_size": C, "num_hidden_layers": L,
            "head_size": C // V6["H"], "head_size_divisor": 8, "attention_hidden_size": C,
            "intermediate_size": V6["F"], "layer_norm_epsilon": 1e-5, "vocab_size": sd["emb.weight"].shape[0]}
    hf = write_dir(cases["dir"] / f"hf6-{int(portable)}", tensors, conf)
    bundle = export(str(hf), str(cases["dir"] / f"hf6-b{int(portable)}"), portable=portable)
    assert edgeseq.load(bundle).manifest["family"] == "rwkv6"
    _check(bundle, c)
