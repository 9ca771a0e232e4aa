"""The registry of model shapes, and the builders that write a random-weight checkpoint of each.

Speed and memory depend on a model's shape, not on its values, so every benchmark model is random
weights at a registered shape. Matrices get noise (randn * scale / sqrt(fan_in)) so that the logits are
not degenerate and greedy decoding does not get stuck on one token. Two sources:

- "hf": a transformers config class and its keyword arguments -> a checkpoint folder
  (save_pretrained, safetensors fp32); for the hf system and every exporter.
- "pth": a BlinkDL RWKV .pth (v4, v5.2, v6, v7 "x070", fp32, keys and shapes as BlinkDL saves them);
  for the rwkv package and every exporter.

A vocabulary other than 256 (byte-level) gets a synthetic byte-level BPE tokenizer.json of exactly that
size beside the checkpoint (the benchmarks feed token ids; a BPE file is what GGUF export and llama.cpp take). `tiny` shapes are the test suite's
(seconds to build and to run); `-small` ones the same families at width 256; the others are released
models' shapes (`note` says which, and where a shape is not exactly a released model's).
"""
from __future__ import annotations

import json
import os
import shutil

M1, H1 = "mamba", "hybrid"                    # Zamba's layer kinds
M2, H2 = "linear_attention", "hybrid"         # Zamba2's


def _hf(cls: str, family: str, tiny: bool = False, note: str = "", **config) -> dict:
    return {"source": "hf", "family": family, "class": cls, "config": config, "tiny": tiny, "note": note}


def _pth(version: str, tiny: bool = False, note: str = "", **spec) -> dict:
    return {"source": "pth", "family": "rwkv" + version[0], "version": version, "config": spec, "tiny": tiny,
            "note": note}


def _v7_lora(c: int) -> dict:
    """BlinkDL's LoRA ranks of RWKV-7 at width c (RWKV-v7 train_temp/src/model.py)."""
    r = lambda f: max(32, int(round(f / 32) * 32))  # noqa: E731
    return {"w": r(1.8 * c ** 0.5), "a": r(1.8 * c ** 0.5), "v": r(1.3 * c ** 0.5), "g": r(0.6 * c ** 0.8)}


_MAMBA_TINY = dict(vocab_size=256, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
_TIED = dict(tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
_ZAMBA2_12B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=38, mamba_d_state=128, mamba_d_conv=4,
                   mamba_expand=2, n_mamba_heads=64, mamba_ngroups=1, num_attention_heads=32, num_key_value_heads=32,
                   intermediate_size=8192, num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=128,
                   use_mem_rope=True, layers_block_type=[H2 if i % 6 == 5 else M2 for i in range(38)],
                   max_position_embeddings=4096, tie_word_embeddings=True)

SHAPES: dict[str, dict] = {
    # -- tiny: the test suite's shapes, one per family ------------------------------------------------
    "mamba-tiny": _hf("MambaConfig", "mamba", True, **_MAMBA_TINY),
    "mamba2-tiny": _hf("Mamba2Config", "mamba2", True, vocab_size=256, hidden_size=32, state_size=8,
                       num_hidden_layers=2, expand=2, num_heads=8, head_dim=8, n_groups=1, conv_kernel=4,
                       chunk_size=16),
    "rwkv4-tiny": _pth("4", True, n_embd=64, n_layer=2, dim_ffn=224, vocab=256),
    "rwkv5-tiny": _pth("5.2", True, n_embd=64, n_layer=2, head_size=32, dim_ffn=224, vocab=256),
    "rwkv6-tiny": _pth("6", True, n_embd=64, n_layer=2, head_size=32, dim_ffn=224, vocab=256, d_mix=8, d_decay=16),
    "rwkv7-tiny": _pth("7", True, n_embd=64, n_layer=2, head_size=32, dim_ffn=256, vocab=256,
                       lora=dict(w=16, a=16, v=8, g=16)),
    "zamba-tiny": _hf("ZambaConfig", "zamba", True, vocab_size=256, hidden_size=32, mamba_d_state=8, mamba_d_conv=4,
                      mamba_expand=2, n_mamba_heads=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=48, num_hidden_layers=4, use_associative_scan=False,
                      layers_block_type=[M1, H1, M1, H1]),
    "zamba2-tiny": _hf("Zamba2Config", "zamba2", True, vocab_size=256, hidden_size=32, mamba_d_state=8, mamba_d_conv=4,
                       mamba_expand=2, n_mamba_heads=4, mamba_ngroups=1, num_attention_heads=4, intermediate_size=48,
                       adapter_rank=4, chunk_size=16, num_hidden_layers=4, max_position_embeddings=4096,
                       layers_block_type=[M2, H2, M2, H2], num_mem_blocks=1),
    "griffin-tiny": _hf("RecurrentGemmaConfig", "recurrent_gemma", True, vocab_size=256, hidden_size=48,
                        intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                        attention_window_size=8),
    # -- small: every family at width 256, a few layers, 4096-word vocabulary (a millisecond a token:
    #    the graph's arithmetic shows, not only its per-node overhead; for before/after comparisons) -----
    "mamba-small": _hf("MambaConfig", "mamba", vocab_size=4096, hidden_size=256, state_size=16, num_hidden_layers=4,
                       expand=2, conv_kernel=4, **_TIED),
    "mamba2-small": _hf("Mamba2Config", "mamba2", vocab_size=4096, hidden_size=256, state_size=64,
                        num_hidden_layers=4, expand=2, num_heads=16, head_dim=32, n_groups=1, conv_kernel=4, **_TIED),
    "rwkv4-small": _pth("4", n_embd=256, n_layer=4, dim_ffn=1024, vocab=4096),
    "rwkv5-small": _pth("5.2", n_embd=256, n_layer=4, head_size=64, dim_ffn=896, vocab=4096),
    "rwkv6-small": _pth("6", n_embd=256, n_layer=4, head_size=64, dim_ffn=896, vocab=4096, d_mix=16, d_decay=32),
    "rwkv7-small": _pth("7", n_embd=256, n_layer=4, head_size=64, dim_ffn=1024, vocab=4096, lora=_v7_lora(256)),
    "zamba-small": _hf("ZambaConfig", "zamba", vocab_size=4096, hidden_size=256, mamba_d_state=16, mamba_d_conv=4,
                       mamba_expand=2, n_mamba_heads=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=1024, num_hidden_layers=6, use_associative_scan=False,
                       layers_block_type=[M1, M1, H1, M1, M1, H1]),
    "zamba2-small": _hf("Zamba2Config", "zamba2", vocab_size=4096, hidden_size=256, num_hidden_layers=6,
                        mamba_d_state=64, n_mamba_heads=8, num_attention_heads=4, intermediate_size=1024,
                        adapter_rank=16, use_shared_attention_adapter=True, use_mem_rope=True,
                        layers_block_type=[M2, M2, H2, M2, M2, H2], max_position_embeddings=4096),
    "griffin-small": _hf("RecurrentGemmaConfig", "recurrent_gemma", vocab_size=4096, hidden_size=256,
                         intermediate_size=768, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                         lru_width=256, attention_window_size=128),
    # -- released shapes ---------------------------------------------------------------------------------
    "mamba-130m": _hf("MambaConfig", "mamba", hidden_size=768, num_hidden_layers=24, state_size=16, expand=2,
                      conv_kernel=4, vocab_size=50280, **_TIED, note="state-spaces/mamba-130m"),
    "mamba-370m": _hf("MambaConfig", "mamba", hidden_size=1024, num_hidden_layers=48, state_size=16, expand=2,
                      conv_kernel=4, vocab_size=50280, **_TIED, note="state-spaces/mamba-370m"),
    "mamba-790m": _hf("MambaConfig", "mamba", hidden_size=1536, num_hidden_layers=48, state_size=16, expand=2,
                      conv_kernel=4, vocab_size=50280, **_TIED, note="state-spaces/mamba-790m"),
    "mamba-1.4b": _hf("MambaConfig", "mamba", hidden_size=2048, num_hidden_layers=48, state_size=16, expand=2,
                      conv_kernel=4, vocab_size=50280, **_TIED, note="state-spaces/mamba-1.4b"),
    # vocab 50288: llama.cpp's converter pads Mamba-2 vocabularies to a multiple of 16
    "mamba2-130m": _hf("Mamba2Config", "mamba2", hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64,
                       num_heads=24, n_groups=1, expand=2, conv_kernel=4, vocab_size=50288, **_TIED,
                       note="state-spaces/mamba2-130m"),
    "rwkv4-169m": _pth("4", n_embd=768, n_layer=12, dim_ffn=3072, vocab=50277, note="RWKV-4-Pile-169M"),
    "rwkv6-c768": _pth("6", n_embd=768, n_layer=12, head_size=64, dim_ffn=2688, vocab=65536, d_mix=32, d_decay=64,
                       note="RWKV-6 at RWKV-7-0.1B's width and depth (no released RWKV-6 is this small)"),
    "rwkv6-1.6b": _pth("6", n_embd=2048, n_layer=24, head_size=64, dim_ffn=7168, vocab=65536, d_mix=32, d_decay=64,
                       note="RWKV-x060-World-1B6"),
    "rwkv7-0.1b": _pth("7", n_embd=768, n_layer=12, head_size=64, dim_ffn=3072, vocab=65536, lora=_v7_lora(768),
                       note="RWKV-x070-World-0.1B"),
    "rwkv7-0.4b": _pth("7", n_embd=1024, n_layer=24, head_size=64, dim_ffn=4096, vocab=65536, lora=_v7_lora(1024),
                       note="RWKV-x070-World-0.4B"),
    "rwkv7-1.5b": _pth("7", n_embd=2048, n_layer=24, head_size=64, dim_ffn=8192, vocab=65536, lora=_v7_lora(2048),
                       note="RWKV-x070-World-1.5B"),
    "zamba2-1.2b": _hf("Zamba2Config", "zamba2", **_ZAMBA2_12B, note="Zyphra/Zamba2-1.2B (1.2 G parameters, 4.9 GB)"),
    "zamba2-1.2b-d1024": _hf("Zamba2Config", "zamba2", **{
        **_ZAMBA2_12B, "hidden_size": 1024, "n_mamba_heads": 32, "num_attention_heads": 16, "num_key_value_heads": 16,
        "intermediate_size": 4096}, note="Zamba2-1.2B's layer pattern at half the width (334 M parameters)"),
    "griffin-1b": _hf("RecurrentGemmaConfig", "recurrent_gemma", vocab_size=32000, hidden_size=2048,
                      num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=1, lru_width=2560,
                      intermediate_size=2 * 3 * 2048, attention_window_size=1024,
                      note="the Griffin paper's 1B (as recalled) with a 32,000-token vocabulary"),
    "qwen35-0.8b": _hf("Qwen3_5TextConfig", "qwen35", vocab_size=248320, hidden_size=1024, num_hidden_layers=24,
                       intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                       linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                       linear_value_head_dim=128, linear_conv_kernel_dim=4, tie_word_embeddings=True,
                       layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(24)],
                       note="Qwen/Qwen3.5-0.8B's language model (as recalled: d 1024, 24 layers, every 4th full "
                            "attention, 8/2 heads of 256, 16 linear heads of 128)"),
    "lfm2-350m": _hf("Lfm2Config", "lfm2", vocab_size=65536, hidden_size=1024, intermediate_size=6656,
                     num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                     layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)],
                     tie_word_embeddings=True, note="LiquidAI/LFM2-350M (feed-forward 4608 after auto-adjust)"),
    "lfm2-1.2b": _hf("Lfm2Config", "lfm2", vocab_size=65536, hidden_size=2048, intermediate_size=12288,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)],
                     tie_word_embeddings=True, note="LiquidAI/LFM2-1.2B (feed-forward 8192 after auto-adjust)"),
    "falcon-h1-0.5b": _hf("FalconH1Config", "falcon_h1", vocab_size=32784, hidden_size=1024, intermediate_size=2048,
                          num_hidden_layers=36, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                          mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
                          mamba_d_conv=4, mamba_expand=2, tie_word_embeddings=False,
                          note="tiiuae/Falcon-H1-0.5B (transformers' table: 36 layers, d 1024, 8/2 attention heads, "
                               "24 Mamba heads of 64, state 128; vocabulary and MLP width as recalled)"),
    "granite-4.0-h-350m": _hf("GraniteMoeHybridConfig", "granite_hybrid", vocab_size=100352, hidden_size=768,
                              num_hidden_layers=32, num_attention_heads=12, num_key_value_heads=4,
                              num_local_experts=0, shared_intermediate_size=2048, intermediate_size=2048,
                              mamba_n_heads=48, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=128,
                              mamba_d_conv=4, mamba_expand=2, position_embedding_type="nope",
                              layer_types=["attention" if i in (10, 13, 17, 27) else "mamba" for i in range(32)],
                              tie_word_embeddings=True,
                              note="ibm-granite/granite-4.0-h-350m, dense (as recalled: d 768, 32 layers of which 4 "
                                   "attention, 12/4 heads, 48 Mamba heads of 32, state 128, MLP 2048)"),
    "recurrentgemma-2b": _hf("RecurrentGemmaConfig", "recurrent_gemma",
                             note="transformers' RecurrentGemmaConfig defaults: google/recurrentgemma-2b"),
}


def vocab_of(shape: dict) -> int:
    c = shape["config"]
    if shape["source"] == "pth":
        return c["vocab"]
    return c.get("vocab_size", 256000)  # RecurrentGemmaConfig's default


# ---------------------------------------------------------------------------------------------------
# builders (run in a child: they need torch, and transformers for "hf")
# ---------------------------------------------------------------------------------------------------
def write_bpe(path: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json of exactly vocab_size tokens: the 256 byte symbols, then merges of
    every pair of them, then of those pairs with a symbol (ids are fed, never text; the vocabulary only has
    to be a valid BPE of the right size for GGUF export and llama.cpp)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges, grown = [], list(alphabet)
    while len(vocab) < vocab_size:
        for left in list(grown):
            for c in alphabet:
                if len(vocab) == vocab_size:
                    break
                if left + c not in vocab:
                    vocab[left + c] = len(vocab)
                    merges.append((left, c))
            if len(vocab) == vocab_size:
                break
        grown = [t for t in vocab if len(t) == len(grown[0]) + 1]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)


def add_noise(model, seed: int = 0):
    """randn * scale / sqrt(fan_in) on every parameter of two or more dimensions (the test suite's
    recipe): scale 1.5, but 0.15 for Mamba's dt_proj (fan-in = dt rank), 0.3 for RecurrentGemma's conv
    taps and 0.5 for its RG-LRU gates (the full recipe saturates them); A_log is left as initialized."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim < 2 or name.endswith("A_log"):
                continue
            scale = (0.15 if name.endswith("dt_proj.weight") else 0.3 if "conv_1d" in name
                     else 0.5 if "gate_weight" in name else 1.5)
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale / p.shape[-1] ** 0.5)
    return model


def _build_hf(shape: dict, out: str, seed: int) -> int:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, shape["class"])(**shape["config"])
    model = add_noise(transformers.AutoModelForCausalLM.from_config(cfg).eval(), seed)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def pth_state_dict(version: str, c: dict, seed: int = 0) -> dict:
    """A BlinkDL RWKV state dict (fp32) of random weights: v4, v5.2, v6 or v7 (x070), at the widths of c
    (n_embd, n_layer, dim_ffn, vocab, head_size; v6: d_mix, d_decay; v7: lora ranks w, a, v, g)."""
    import torch

    C, L, F, V = c["n_embd"], c["n_layer"], c["dim_ffn"], c["vocab"]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def mat(rows, cols, scale=1.5):  # Linear weight (out, in)
        return randn(rows, cols, scale=scale / cols ** 0.5)

    def vec(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def ln(name):
        sd[name + ".weight"] = 1.0 + randn(C, scale=0.1)
        sd[name + ".bias"] = randn(C, scale=0.1)

    sd = {"emb.weight": randn(V, C)}
    ln("blocks.0.ln0")
    H = C // c.get("head_size", C)
    N = C // H
    for i in range(L):
        b, a = f"blocks.{i}.", f"blocks.{i}.att."
        ln(b + "ln1")
        ln(b + "ln2")
        if version == "4":
            sd[a + "time_decay"] = vec(C, lo=-3.0, hi=1.0)
            sd[a + "time_first"] = randn(C, scale=0.5)
            for m in "kvr":
                sd[a + f"time_mix_{m}"] = vec(1, 1, C)
            for m in ("key", "value", "receptance", "output"):
                sd[a + f"{m}.weight"] = mat(C, C)
        elif version == "5.2":
            for m in "kvrg":
                sd[a + f"time_mix_{m}"] = vec(1, 1, C)
            # the weights go before time_decay: the package tells v5.2 from v5.1 by key order
            for m in ("receptance", "key", "value", "output", "gate"):
                sd[a + f"{m}.weight"] = mat(C, C)
            ln(a + "ln_x")
            sd[a + "time_decay"] = vec(H, N, lo=-5.0, hi=2.5)
            sd[a + "time_faaaa"] = randn(H, N, scale=0.5)
        elif version == "6":
            dm, dd = c["d_mix"], c["d_decay"]
            for m in "xwkvrg":
                sd[a + f"time_maa_{m}"] = vec(1, 1, C)
            sd[a + "time_maa_w1"] = randn(C, 5 * dm, scale=0.1)
            sd[a + "time_maa_w2"] = randn(5, dm, C, scale=0.1)
            sd[a + "time_decay"] = vec(1, 1, C, lo=-4.0, hi=1.0)
            sd[a + "time_decay_w1"] = randn(C, dd, scale=0.1)
            sd[a + "time_decay_w2"] = randn(dd, C, scale=0.2)
            sd[a + "time_faaaa"] = randn(H, N, scale=0.5)
            for m in ("receptance", "key", "value", "gate", "output"):
                sd[a + f"{m}.weight"] = mat(C, C, 1.0)
            ln(a + "ln_x")
        else:  # 7
            r = c["lora"]

            def lora(cin, cout, scale=1.5):  # BlinkDL keeps x070 LoRA matrices as (in, out)
                return randn(cin, cout, scale=scale / cin ** 0.5)

            for m in "rwkvag":
                sd[a + f"x_{m}"] = vec(1, 1, C)
            sd[a + "w0"], sd[a + "w1"], sd[a + "w2"] = vec(1, 1, C, lo=-4.0, hi=1.0), lora(C, r["w"]), lora(r["w"], C, .5)
            sd[a + "a0"], sd[a + "a1"], sd[a + "a2"] = vec(1, 1, C, lo=-1.0, hi=1.0), lora(C, r["a"]), lora(r["a"], C, .5)
            sd[a + "v0"], sd[a + "v1"], sd[a + "v2"] = vec(1, 1, C, hi=2.0), lora(C, r["v"]), lora(r["v"], C, .5)
            sd[a + "g1"], sd[a + "g2"] = lora(C, r["g"]), lora(r["g"], C)
            sd[a + "k_k"], sd[a + "k_a"] = vec(1, 1, C, lo=0.7, hi=1.0), vec(1, 1, C, lo=0.8, hi=1.2)
            sd[a + "r_k"] = randn(H, N, scale=0.3)
            for m in ("receptance", "key", "value", "output"):
                sd[a + f"{m}.weight"] = mat(C, C)
            ln(a + "ln_x")
        f = b + "ffn."
        if version == "7":
            sd[f + "x_k"] = vec(1, 1, C)
        else:
            mix = "time_maa_" if version == "6" else "time_mix_"
            sd[f + mix + "k"], sd[f + mix + "r"] = vec(1, 1, C), vec(1, 1, C)
            sd[f + "receptance.weight"] = mat(C, C)
        sd[f + "key.weight"] = mat(F, C)
        sd[f + "value.weight"] = mat(C, F, 1.0)
    ln("ln_out")
    sd["head.weight"] = mat(V, C)
    return {k: v.contiguous() for k, v in sd.items()}


def build(name: str, root: str, seed: int = 0) -> dict:
    """Write the checkpoint of SHAPES[name] under root/name/ckpt (once: kept while the shape is the same)."""
    shape = SHAPES[name]
    d = os.path.join(root, name, "ckpt")
    stamp = os.path.join(d, "built.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            done = json.load(f)
        if done.get("shape") == shape and done.get("seed") == seed:
            return done
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    if shape["source"] == "hf":
        params = _build_hf(shape, d, seed)
        ckpt = d
    else:
        import torch

        sd = pth_state_dict(shape["version"], shape["config"], seed)
        ckpt = os.path.join(d, "model.pth")
        torch.save(sd, ckpt)
        params = sum(v.numel() for v in sd.values())
    vocab = vocab_of(shape)
    tok = None
    if vocab != 256:
        tok = os.path.join(d, "tokenizer.json")
        write_bpe(tok, vocab)
    done = {"name": name, "shape": shape, "seed": seed, "family": shape["family"], "source": shape["source"],
            "checkpoint": ckpt, "tokenizer": tok, "vocab": vocab, "params": params}
    with open(stamp, "w") as f:
        json.dump(done, f, indent=1)
    return done


def build_task(p: dict) -> dict:
    return build(p["model"], p["root"], p.get("seed", 0))
