"""The command line's checks, made before any model is loaded: numbers, prompts, paths, formats and quant
names. Each bad value is an EdgeseqError naming the option (or file) and what it accepts."""
from __future__ import annotations

import json

import math
import os
import resource
import sys

from edgeseq.errors import EdgeseqError

DEFAULT_MODEL_ENV = "EDGESEQ_MODEL"
ONNX_QUANTS = ("f32", "f16", "bf16", "int8", "int4", "w8a8")
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
QUANT_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16",
                 # llama.cpp's file-type names: edgeseq's K recipes are its _M mixes (ftype 15, 17)
                 "q4_k_m": "q4_k", "q5_k_m": "q5_k"}
LLAMA_CPP_ONLY = ("q4_k_s", "q5_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q2_k", "q2_k_s", "iq4_nl", "iq4_xs", "tq1_0",
                  "tq2_0")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# -- numbers ---------------------------------------------------------------------------------------------
def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise EdgeseqError(f"{name} {value}: must be at least 1")


def check_max_tokens(n: int) -> None:
    if n < -1:
        raise EdgeseqError(f"--max-tokens {n}: give a number of tokens, or -1 (until an end token)")


def check_sampling(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=None,
                   threads=None, max_context=None) -> None:
    """The sampling and run options that are given (None: not checked)."""
    def finite(name, v):
        if not math.isfinite(v):
            raise EdgeseqError(f"{name} {v}: must be a finite number")

    if temperature is not None:
        finite("--temperature", temperature)
        if temperature < 0:
            raise EdgeseqError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if top_k is not None and top_k < 0:
        raise EdgeseqError(f"--top-k {top_k}: must be 0 (off) or a positive number of tokens")
    if top_p is not None and not 0 < top_p <= 1:
        raise EdgeseqError(f"--top-p {top_p}: must be in (0, 1] (1: off)")
    if min_p is not None and not 0 <= min_p < 1:
        raise EdgeseqError(f"--min-p {min_p}: must be in [0, 1) (0: off)")
    if repetition_penalty is not None:
        finite("--repetition-penalty", repetition_penalty)
        if repetition_penalty <= 0:
            raise EdgeseqError(f"--repetition-penalty {repetition_penalty}: must be more than 0 (1: off)")
    if seed is not None and not -1 <= seed < 2 ** 63:
        raise EdgeseqError(f"--seed {seed}: must be 0 or more (-1: a random seed)")
    if threads is not None and threads < 1:
        raise EdgeseqError(f"--threads {threads}: must be at least 1 (leave it out for ONNX Runtime's choice)")
    if max_context is not None and max_context < 1:
        raise EdgeseqError(f"--max-context {max_context}: must be a positive number of tokens")


def on_full_option(value: str) -> str:
    v = value.lower()
    if v not in ("stop", "slide"):
        raise EdgeseqError(f"--on-full {value}: choose stop or slide")
    return v


def stop_strings(stop: list[str]) -> list[str]:
    out = []
    for x in stop:
        check_text(x, "--stop")
        out.append(x.replace("\\n", "\n").replace("\\t", "\t"))  # let --stop "\n\n" mean newlines
    return [x for x in out if x]


# -- prompts -----------------------------------------------------------------------------------------------
def template_vars(text: str | None) -> dict:
    """--chat-template-kwargs JSON (llama.cpp's spelling): the template's own variables, e.g.
    '{"enable_thinking": true}' for Qwen3.5, passed to the template as transformers passes them."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise EdgeseqError(f"--chat-template-kwargs: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise EdgeseqError(f"--chat-template-kwargs: give a JSON object, e.g. '{{\"enable_thinking\": true}}'")
    taken = sorted(set(value) & {"messages", "add_generation_prompt"})
    if taken:
        raise EdgeseqError(f"--chat-template-kwargs: {', '.join(taken)} is set by the chat itself")
    return value


def check_text(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise EdgeseqError(f"{what}: not valid UTF-8 text (at character {e.start})") from None
    return text


def _decode(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeseqError(f"{what}: not UTF-8 text (byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text  # one final newline dropped, as llama.cpp's -f does


def read_prompt(prompt: str | None, prompt_file: str | None, words: list[str]) -> tuple[str | None, str]:
    """(text, source) from -p TEXT, -p -, -f FILE, -f - or the words after MODEL; (None, "none") if none."""
    given = [n for n, v in (("-p/--prompt", prompt), ("-f/--prompt-file", prompt_file), ("PROMPT", words or None))
             if v is not None]
    if len(given) > 1:
        raise EdgeseqError(f"give the prompt one way, not {' and '.join(given)}")
    if prompt == "-" or prompt_file == "-":
        return _decode(sys.stdin.buffer.read(), "stdin"), "stdin"
    if prompt_file is not None:
        if not os.path.isfile(prompt_file):
            raise EdgeseqError(f"--prompt-file {prompt_file}: no such file")
        try:
            with open(prompt_file, "rb") as f:
                return _decode(f.read(), f"--prompt-file {prompt_file}"), "file"
        except OSError as e:
            raise EdgeseqError(f"--prompt-file {prompt_file}: cannot read ({e.strerror})") from None
    if prompt is not None:
        return check_text(prompt, "--prompt"), "inline"
    if words:
        return check_text(" ".join(words), "PROMPT"), "inline"
    return None, "none"


# -- models ---------------------------------------------------------------------------------------------------
def resolve_model(model: str | None, default: bool = True) -> tuple[str, bool]:
    """(path to load, is the demo). MODEL, else $EDGESEQ_MODEL, else the demo exported into the cache. A
    checkpoint (an HF folder, a .pth ...) is exported once into the cache (edgeseq.exporters.cache)."""
    source = None
    if not model:
        env = os.environ.get(DEFAULT_MODEL_ENV)
        if env:
            model, source = env, f"{DEFAULT_MODEL_ENV}={env}"
    if not model:
        if not default:
            raise EdgeseqError("give a MODEL (a bundle folder or a .gguf file)")
        from edgeseq.exporters.demo import cache_dir, demo_bundle

        print(f"no MODEL given: using the demo model (byte-level RWKV-7 trained on the King James Bible; bundle "
              f"cached under {cache_dir()})", file=sys.stderr)
        return demo_bundle(), True
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise EdgeseqError(f"{source or path}: no such file or folder")
    from edgeseq.exporters.cache import needs_export, cached_checkpoint

    if needs_export(path):
        return cached_checkpoint(path), False
    return path, False


# -- export --------------------------------------------------------------------------------------------------
def parse_quant(name: str, fmt: str) -> tuple[str, str | None]:
    """(edgeseq's quant name, a note when a llama.cpp name was translated) for format `fmt`."""
    raw = name.strip().lower()
    q = QUANT_ALIASES.get(raw, raw)
    note = f"--quant {name}: edgeseq's {q} (llama.cpp's {name.upper()} mix)" if raw in ("q4_k_m", "q5_k_m") else None
    if raw in LLAMA_CPP_ONLY:
        raise EdgeseqError(f"--quant {name}: a llama.cpp type edgeseq does not write; for GGUF choose one of "
                           f"{', '.join(GGUF_QUANTS)} (Q4_K_M and Q5_K_M are q4_k and q5_k)")
    allowed, other, other_name = ((ONNX_QUANTS, GGUF_QUANTS, "GGUF") if fmt == "onnx" else
                                  (GGUF_QUANTS, ONNX_QUANTS, "ONNX"))
    if q in allowed:
        return q, note
    if q in other:
        how = ("write a GGUF: -o NAME.gguf (or --format gguf)" if fmt == "onnx" else
               "write an ONNX bundle: -o a folder name (or --format onnx)")
        raise EdgeseqError(f"--quant {name} is a {other_name} type: {how}; an {fmt.upper()} "
                           f"{'bundle' if fmt == 'onnx' else 'file'} takes {', '.join(allowed)}")
    raise EdgeseqError(f"--quant {name}: not available for {fmt} (choose one of {', '.join(allowed)}"
                       + ("; llama.cpp's Q4_K_M, Q5_K_M, Q8_0 ... in any case)" if fmt == "gguf" else ")"))


def check_out(out: str, force: bool, what: str = "-o") -> None:
    """OUT may be created: not there (or --force), and its nearest existing folder is a writable folder."""
    if os.path.lexists(out) and not force:
        raise EdgeseqError(f"{out} already exists (--force replaces it)")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EdgeseqError(f"{what} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeseqError(f"{what} {out}: cannot write in {parent}")


def export_plan(checkpoint: str, out: str, quant: str, fmt: str | None, block_size: int | None, mobile: bool,
                initial_state: str | None, tokenizer: str | None, force: bool, compute: str = "f32") -> dict:
    """Check an export's options against each other and the file system; the format and quant to use."""
    from edgeseq.gguf_file import is_gguf

    if not os.path.exists(checkpoint):
        raise EdgeseqError(f"{checkpoint}: no such file or folder")
    suffix_gguf = out.lower().endswith(".gguf")
    if fmt is None:
        fmt = "gguf" if suffix_gguf else "onnx"
    fmt = fmt.lower()
    if fmt not in ("onnx", "gguf"):
        raise EdgeseqError(f"--format {fmt}: choose onnx or gguf")
    if fmt == "onnx" and suffix_gguf:
        raise EdgeseqError(f"-o {out} names a .gguf file, but --format onnx writes a bundle folder: drop --format, "
                           f"or give the bundle another name")
    if mobile and fmt == "gguf":
        raise EdgeseqError("--mobile writes an ONNX bundle, not a GGUF file")
    for name, path in (("--tokenizer", tokenizer), ("--initial-state", initial_state)):
        if path is not None and not os.path.isfile(path):
            raise EdgeseqError(f"{name} {path}: no such file")
    q, note = parse_quant(quant, fmt)
    from edgeseq.quant import parse_compute

    if compute.lower() not in ("f32", "fp32", "float32") and (fmt == "gguf" or mobile):
        raise EdgeseqError(f"--compute {compute}: half compute is for ONNX bundles run on a GPU, not "
                           f"{'GGUF files' if fmt == 'gguf' else '--mobile bundles'}")
    compute, q = parse_compute(compute, q)
    if mobile and q == "bf16":
        raise EdgeseqError("--mobile takes --quant f32, f16 or int8 (bf16 weights are for GPUs)")
    if block_size is not None:
        if fmt == "gguf":
            raise EdgeseqError("--block-size applies to int8/int4 ONNX bundles; a GGUF's blocks are fixed by its "
                               "types (Q4_0: 32 weights, Q4_K: 256)")
        if mobile:
            raise EdgeseqError("--block-size is not used by --mobile exports (they keep the default of 32)")
        if q not in ("int8", "int4"):
            raise EdgeseqError(f"--block-size applies to --quant int8 or int4, not {q}")
        if not 16 <= block_size <= 256 or block_size & (block_size - 1):
            raise EdgeseqError(f"--block-size {block_size}: a power of two from 16 to 256")
    if fmt == "onnx" and os.path.isfile(checkpoint) and is_gguf(checkpoint):
        if q != "f32" or mobile or initial_state or tokenizer or compute != "f32":
            raise EdgeseqError(f"{checkpoint}: a GGUF becomes an f32 bundle with the GGUF's own tokenizer "
                               f"(--quant, --compute, --mobile, --initial-state and --tokenizer do not apply)")
    check_out(out, force)
    return {"format": fmt, "quant": q, "note": note, "compute": compute}
