"""The `edgeseq` command line: export, run, chat, inspect, bench, eval, cache.

Every bad input is an `error: …` line naming the option or file, exit status 1, nothing written. Options
take llama.cpp's spellings where they cost nothing (`-m/--model`, `--temp`, `--repeat-penalty`, `--min-p`,
`-c/--ctx-size`, `-n -1` = until an end token, `-f/--prompt-file`), and `run MODEL PROMPT...` Ollama's.
Checks of numbers and paths happen before a model is loaded, so a mistake costs nothing (edgeseq.cli_args).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Optional

import typer

from edgeseq.cli_args import (check_max_tokens, check_sampling, check_positive, on_full_option, peak_rss_mb,
                              read_prompt, resolve_model, export_plan, stop_strings, template_vars)
from edgeseq.errors import EdgeseqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run recurrent language models (Mamba, RWKV, Zamba, RecurrentGemma) with a fixed-size state.")
app.add_typer(__import__("edgeseq.cli_cache", fromlist=["app"]).app, name="cache")
__import__("edgeseq.cli_serve", fromlist=["register"]).register(app)  # edgeseq serve (docs/serve.md)

ENGINE_HELP = "onnxruntime (default) | llama.cpp (GGUF files of mamba, mamba2, rwkv6, rwkv7; needs llama-cpp-python)"
MODEL_HELP = ("bundle folder, .gguf file, or a checkpoint (HF folder, .pth, .bin, .pt) exported once into the cache; "
              "default: $EDGESEQ_MODEL, else the demo model")
MAX_CONTEXT_HELP = "KV ring length in tokens of full-attention models (Zamba, Zamba2); default: the bundle's"
ON_FULL_HELP = "when that ring is full: stop (an error) | slide (attend to the last max-context tokens)"


def _version(value: bool) -> None:
    if value:
        from edgeseq import __version__

        typer.echo(f"edgeseq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Run recurrent language models (Mamba, RWKV, Zamba, RecurrentGemma) with a fixed-size state."""


def _load(path: str, threads, device="cpu", max_context=None, on_full="stop", engine=None, cuda_graph=None):
    import edgeseq

    extra = {"engine": engine} if engine else {}  # GGUF files: onnxruntime (default) or llama.cpp
    if cuda_graph is not None:  # unset: the model's default (on for device cuda where the step graph allows)
        extra["cuda_graph"] = cuda_graph
    return edgeseq.load(path, device=device, threads=threads, max_context=max_context, on_full=on_full, **extra)


# -- options shared by run and chat ---------------------------------------------------------------------
def _model_arg():
    return typer.Argument(None, metavar="MODEL", show_default=False, help=MODEL_HELP)


def _opt(default, *names, metavar, help):
    return typer.Option(default, *names, metavar=metavar, help=help)


# Options that several commands take, declared once: typer reads the option from the Annotated type, the
# default stays in each command's signature (run and chat, bench and eval).
ModelOpt = Annotated[Optional[str], typer.Option("-m", "--model", metavar="MODEL",
                                                 help="the model, as an option (llama.cpp's spelling)")]
Temperature = Annotated[float, typer.Option("--temperature", "--temp", "-t", metavar="T",
                                            help="sampling temperature; 0: greedy")]
TopK = Annotated[int, typer.Option("--top-k", metavar="K", help="keep the K likeliest tokens; 0: off")]
TopP = Annotated[float, typer.Option("--top-p", metavar="P", help="nucleus sampling, 0 < P <= 1; 1: off")]
MinP = Annotated[float, typer.Option("--min-p", metavar="P",
                                     help="drop tokens less likely than P x the likeliest, 0 <= P < 1; 0: off")]
RepeatPenalty = Annotated[float, typer.Option("--repetition-penalty", "--repeat-penalty", metavar="X",
                                              help="repetition penalty (> 0; 1: off)")]
Seed = Annotated[Optional[int], typer.Option("--seed", "-s", metavar="N",
                                             help="random seed; -1 or none: a random one")]
Stop = Annotated[list[str], typer.Option("--stop", metavar="TEXT", help="stop when the text contains TEXT "
                                         "(repeatable; \\n and \\t are escapes)")]
Threads = Annotated[Optional[int], typer.Option("--threads", metavar="N",
                                                help="CPU threads (default: ONNX Runtime's choice)")]
Device = Annotated[str, typer.Option("--device", metavar="DEV", help="cpu | cuda (with onnxruntime-gpu)")]
MaxContext = Annotated[Optional[int], typer.Option("--max-context", "--ctx-size", "-c", metavar="N",
                                                   help=MAX_CONTEXT_HELP)]
OnFull = Annotated[str, typer.Option("--on-full", metavar="WHAT", help=ON_FULL_HELP)]
Engine = Annotated[Optional[str], typer.Option("--engine", metavar="ENGINE", help=ENGINE_HELP)]


def _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, threads, max_context) -> dict:
    """run's and chat's generation options, checked before a model loads: Session.generate's arguments."""
    check_max_tokens(max_tokens)
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed, threads=threads, max_context=max_context)
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=None if seed in (None, -1) else seed)


@app.command(context_settings={"allow_extra_args": True})
def run(
    ctx: typer.Context,
    model: Optional[str] = _model_arg(),
    model_opt: ModelOpt = None,
    prompt: Optional[str] = _opt(None, "--prompt", "-p", metavar="TEXT", help="the prompt; '-' reads it from stdin"),
    prompt_file: Optional[str] = _opt(None, "--prompt-file", "-f", metavar="FILE",
                                      help="read the prompt from a UTF-8 file ('-': stdin)"),
    max_tokens: int = _opt(128, "--max-tokens", "-n", "--n-predict", metavar="N",
                           help="tokens to generate; -1: until an end token (or Ctrl-C)"),
    temperature: Temperature = 0.8,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepeatPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = [],
    echo: Optional[bool] = typer.Option(None, "--echo/--no-echo", show_default=False,
                                        help="print the prompt before the reply (default: for -p and PROMPT, not "
                                             "for a file or stdin)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (text, stop reason, speeds) at "
                                  "the end instead of streaming"),
    threads: Threads = None,
    device: Device = "cpu",
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="with --device cuda: "
                                              "decode through the step graph under ONNX Runtime CUDA graphs (the "
                                              "default there for models without attention; docs/cuda.md)"),
    max_context: MaxContext = None,
    on_full: OnFull = "stop",
    engine: Engine = None,
):
    """Generate a continuation of a prompt, streamed; ends with prompt/decode tokens/s and peak memory.

    edgeseq run [MODEL] [PROMPT]... | -m MODEL -p TEXT | -f FILE | -p - (stdin). With no prompt, a model with
    a BOS token starts from it and the demo model from "And God said"."""
    words = list(ctx.args)  # the words after MODEL: the prompt, as Ollama takes it
    if model_opt is not None:  # -m MODEL: every positional word is the prompt
        words = ([model] if model is not None else []) + words
        model = model_opt
    text, source = read_prompt(prompt, prompt_file, words)
    sampling = _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, threads,
                         max_context)
    on_full = on_full_option(on_full)
    stops = stop_strings(stop)
    path, is_demo = resolve_model(model)
    if text is None:
        text = "And God said" if is_demo else ""
        source = "default"
    m = _load(path, threads, device, max_context, on_full, engine, cuda_graph)
    s = m.session()
    from edgeseq.runtime.session import encode_prompt

    ids = encode_prompt(s, text)
    if not ids and m.manifest.get("bos_token_id") is None:
        raise EdgeseqError(f"{path}: no prompt given and the model has no BOS token to start from; give one with "
                           f"-p TEXT, -f FILE or as words after MODEL")
    if echo is None:
        echo = source in ("inline", "default")
    bar = _progress_bar(len(ids), m)
    t0 = time.perf_counter()
    out = []
    interrupted = False
    try:
        if echo and not json_out:
            typer.echo(text, nl=False)
        for piece in s.generate(ids, **sampling, stop=stops, progress=bar.update if bar else None):
            if bar:
                bar.close()
                bar = None
            if json_out:
                out.append(piece)
            else:
                typer.echo(piece, nl=False)
    except KeyboardInterrupt:  # Ctrl-C: keep what was written, report, exit 130 (as llama.cpp does)
        interrupted = True
    finally:
        if bar:
            bar.close()
    st = s.stats
    if json_out:
        typer.echo(json.dumps({"model": path, "prompt": text if echo else None, "text": "".join(out),
                               "stopped_by": "interrupted" if interrupted else st.stopped_by,
                               "prompt_tokens": st.prompt_tokens, "prompt_tps": round(st.prompt_tps, 2),
                               "decode_tokens": st.decode_tokens, "decode_tps": round(st.decode_tps, 2),
                               "seconds": round(time.perf_counter() - t0, 3),
                               "peak_rss_mb": round(peak_rss_mb())}, ensure_ascii=False))
    else:
        typer.echo("")
        typer.echo(f"[prompt {st.prompt_tokens} tok, {st.prompt_tps:.1f} tok/s | decode {st.decode_tokens} tok, "
                   f"{st.decode_tps:.1f} tok/s | peak RSS {peak_rss_mb():.0f} MB"
                   + (" | interrupted]" if interrupted else "]"), err=True)
    if interrupted:
        raise typer.Exit(130)


def _progress_bar(n: int, model):
    """A prefill bar on stderr for prompts long enough to take a while (and only on a terminal)."""
    if n < 4 * int(getattr(model, "prefill_chunk", 256)) or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=n, unit="tok", desc="prompt", leave=False, file=sys.stderr)


@app.command()
def chat(
    model: Optional[str] = _model_arg(),
    model_opt: ModelOpt = None,
    system: Optional[str] = _opt(None, "--system", "-sys", metavar="TEXT",
                                 help="system prompt: the template's system turn; without a template, text fed "
                                      "before the first turn"),
    chat_template: Optional[str] = _opt(None, "--chat-template", metavar="FILE|NAME",
                                        help="a Jinja chat template file, or a named one (see docs/cli.md); "
                                             "default: the model's own"),
    chat_template_kwargs: Optional[str] = _opt(None, "--chat-template-kwargs", metavar="JSON",
                                               help="the template's own variables, e.g. "
                                                    "'{\"enable_thinking\": true}'"),
    max_tokens: int = _opt(256, "--max-tokens", "-n", "--n-predict", metavar="N",
                           help="most tokens per reply; -1: until an end token (Ctrl-C stops a reply)"),
    temperature: Temperature = 0.8,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepeatPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = [],
    show_think: bool = typer.Option(True, "--think/--hide-think", help="show a reasoning model's <think> "
                                    "section (dimmed on a terminal) or hide it"),
    threads: Threads = None,
    device: Device = "cpu",
    max_context: MaxContext = None,
    on_full: OnFull = "stop",
    engine: Engine = None,
):
    """Chat interactively; the state carries over, so each turn processes only its new tokens.

    Type /help for the commands (/reset, /save FILE, /load FILE, /bye). End a line with \\ to continue
    it, or wrap several lines in \"\"\" ... \"\"\". Ctrl-C stops a reply; Ctrl-C at an empty prompt or
    Ctrl-D ends the chat."""
    if model_opt is not None:
        if model is not None:
            raise EdgeseqError(f"give the model once: {model!r} and -m {model_opt!r}")
        model = model_opt
    sampling = _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, threads,
                         max_context)
    on_full = on_full_option(on_full)
    stops = stop_strings(stop)
    variables = template_vars(chat_template_kwargs)
    path, _ = resolve_model(model)
    from edgeseq.cli_chat import repl

    template = None
    if chat_template is not None:
        from edgeseq.chat_template import load_template_option

        template = load_template_option(chat_template)
    m = _load(path, threads, device, max_context, on_full, engine)
    repl(m, system=system, template=template, show_think=show_think, stop=stops, sampling=sampling,
         template_vars=variables)


@app.command()
def inspect(model: str = typer.Argument(..., metavar="MODEL", help="bundle folder or .gguf file")):
    """Family, config, state spec, quantization and sizes of a bundle (or a GGUF file's summary)."""
    from edgeseq.bundle import read_manifest
    from edgeseq.gguf_file import is_gguf

    if not os.path.exists(model):
        raise EdgeseqError(f"{model}: no such file or folder")
    if os.path.isfile(model) and is_gguf(model):
        from edgeseq.gguf_names import summary

        typer.echo(summary(model))
        return
    m = read_manifest(model)
    typer.echo(f"bundle      {model}  (format {m['format_version']}, edgeseq {m['edgeseq_version']})")
    typer.echo(f"family      {m['family']}  ({m['architecture']})")
    typer.echo(f"flavour     {m['flavour']}   quant {_quant_label(m)}")
    typer.echo(f"weights     {m['weights']['bytes'] / 1e6:.2f} MB  sha256 {m['weights']['sha256'][:16]}…")
    typer.echo(f"vocab       {m['vocab_size']}  tokenizer {m['tokenizer']['kind']}  eos {m.get('eos_token_id')}")
    from edgeseq.chat_template import describe

    typer.echo(f"chat        {describe(m.get('chat_template'))}")
    typer.echo("config      " + ", ".join(f"{k}={v}" for k, v in m["config"].items()))
    typer.echo("graphs      " + ", ".join(f"{k} ({g['file']})" for k, g in m["graphs"].items()))
    typer.echo(f"state       {m['state_bytes_per_sequence'] / 1024:.1f} KiB per sequence, {len(m['state'])} tensors:")
    for s in m["state"]:
        typer.echo(f"  {s['name']:<40} {str(s['shape']):<26} {s['dtype']}  {s['doc']}")


def _quant_label(manifest: dict) -> str:
    """The recipe; for a bundle made from a GGUF, the GGUF's tensor types and what they run as."""
    q = manifest["quant"]
    if q.get("gguf_types"):
        return f"GGUF {'/'.join(q['gguf_types'])} (runs as {q['recipe']})"
    if q.get("compute"):
        return f"{q['recipe']} (computes in {q['compute']})"
    return q["recipe"]


@app.command()
def bench(
    model: str = typer.Argument(..., metavar="MODEL", help="bundle folder or .gguf file"),
    threads: Threads = None,
    prompt_tokens: int = _opt(512, "--prompt-tokens", "-p", metavar="N", help="prompt length to prefill"),
    decode_tokens: int = _opt(128, "--decode-tokens", "-n", metavar="N", help="tokens to decode"),
    repeat: int = _opt(3, "--repeat", "-r", metavar="N", help="timed runs; the median is reported, with min-max"),
    json_out: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
    device: Device = "cpu",
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="with --device cuda: "
                                              "decode through the step graph under ONNX Runtime CUDA graphs (the "
                                              "default there for models without attention; docs/cuda.md)"),
    max_context: MaxContext = None,
    on_full: OnFull = "stop",
    engine: Engine = None,
):
    """Prefill and decode tokens/s (median of --repeat runs), state bytes and peak RSS."""
    import numpy as np

    for name, v in (("--prompt-tokens", prompt_tokens), ("--decode-tokens", decode_tokens), ("--repeat", repeat)):
        check_positive(name, v)
    check_sampling(threads=threads, max_context=max_context)
    on_full = on_full_option(on_full)
    path, _ = resolve_model(model, default=False)
    m = _load(path, threads, device, max_context, on_full, engine, cuda_graph)
    ids = np.random.default_rng(0).integers(0, m.vocab_size, prompt_tokens).tolist()
    from edgeseq.runtime.session import time_session

    s = m.session()
    runs = [time_session(s, ids, decode_tokens) for _ in range(repeat)]
    pre = sorted(prompt_tokens / a for a, _ in runs)
    dec = sorted(decode_tokens / b for _, b in runs)
    manifest = getattr(m, "manifest", {})
    quant = _quant_label(manifest) if "quant" in manifest else "GGUF (llama.cpp engine)"
    r = {"model": path, "family": m.family_name, "quant": quant, "flavour": manifest.get("flavour"),
         "engine": engine or "onnxruntime", "threads": threads, "repeat": repeat,
         "prompt_tokens": prompt_tokens, "prefill_tps": _spread(pre), "decode_tokens": decode_tokens,
         "decode_tps": _spread(dec), "state_bytes": m.state_bytes, "weights_mb": round(m.weights_bytes / 1e6, 2),
         "peak_rss_mb": round(peak_rss_mb())}
    if json_out:
        typer.echo(json.dumps(r))
        return
    typer.echo(f"model       {path} ({r['family']}, {quant}, {r['flavour'] or r['engine']})")
    typer.echo(f"threads     {threads or 'default'}")
    for key, what, n in (("prefill_tps", "prefill", prompt_tokens), ("decode_tps", "decode", decode_tokens)):
        x = r[key]
        typer.echo(f"{what:<11} {x['median']:.1f} tok/s ({n} tokens; median of {repeat}, {x['min']:.1f}-"
                   f"{x['max']:.1f})")
    typer.echo(f"state       {m.state_bytes} bytes per sequence")
    typer.echo(f"weights     {m.weights_bytes / 1e6:.1f} MB")
    typer.echo(f"peak RSS    {r['peak_rss_mb']} MB")


def _spread(xs: list[float]) -> dict:
    mid = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    return {"median": round(mid, 2), "min": round(xs[0], 2), "max": round(xs[-1], 2)}


class _Counted:
    """`model` whose sessions call `advance(n)` for the n tokens each scoring call consumes (eval's bar
    with --max-tokens: tokens scored out of N); everything else is the model's own."""

    def __init__(self, model, advance):
        self._model, self._advance = model, advance

    def __getattr__(self, name):
        return getattr(self._model, name)

    def session(self):
        s, advance = self._model.session(), self._advance
        if hasattr(s, "logits_all"):  # the prefill_all graph, a chunk at a time
            inner = s.logits_all

            def logits_all(ids):
                out = inner(ids)
                advance(len(ids))
                return out
            s.logits_all = logits_all
        else:  # engines scored token by token through step() (llama.cpp)
            inner_step = s.step

            def step(token_id):
                out = inner_step(token_id)
                advance(1)
                return out
            s.step = step
        return s


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., metavar="MODEL", help="bundle folder or .gguf file"),
    text: str = _opt(..., "--text", metavar="FILE", help="UTF-8 text file, streamed in constant memory (a "
                     "full-attention model stops at --max-context unless --on-full slide)"),
    max_tokens: int = _opt(0, "--max-tokens", "-n", metavar="N", help="score at most N tokens (0: the whole text)"),
    chunk: int = _opt(256, "--chunk", metavar="N", help="tokens per prefill call; the state carries between chunks"),
    threads: Threads = None,
    max_context: MaxContext = None,
    on_full: OnFull = "stop",
    json_out: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
):
    """Perplexity and bits per byte of a text, streamed through the state chunk by chunk."""
    from edgeseq.quant.evaluate import evaluate_text

    if max_tokens < 0:
        raise EdgeseqError(f"--max-tokens {max_tokens}: give 0 (the whole text) or a positive number of tokens")
    check_positive("--chunk", chunk)
    check_sampling(threads=threads, max_context=max_context)
    on_full = on_full_option(on_full)
    if not os.path.isfile(text):
        raise EdgeseqError(f"--text {text}: no such file")
    path, _ = resolve_model(model, default=False)
    m = _load(path, threads, max_context=max_context, on_full=on_full)
    if max_tokens:  # the bar counts the tokens scored, of N (the file's bytes would overstate the work)
        from tqdm import tqdm

        with tqdm(total=max_tokens, unit="tok", desc="eval", leave=False, disable=None) as bar:
            r = evaluate_text(_Counted(m, bar.update), text, chunk=chunk, max_tokens=max_tokens)
    else:  # the whole file: evaluate_text's bar counts its bytes
        r = evaluate_text(m, text, chunk=chunk, progress=True)
    if json_out:
        typer.echo(json.dumps(r))
        return
    typer.echo(f"tokens {r['tokens']}  bytes {r['bytes']}  nll/token {r['nll_per_token']:.4f}  "
               f"perplexity {r['ppl']:.3f}  bits/byte {r['bpb']:.4f}")


@app.command()
def export(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="HF or state-spaces model folder, BlinkDL "
                                     ".pth, rwkv.cpp .bin, recurrentgemma .pt, or a .gguf (to make a bundle of)"),
    out: str = _opt(..., "-o", "--out", metavar="OUT", help="the bundle folder to create, or a .gguf file"),
    quant: str = _opt("f32", "--quant", "-q", metavar="Q", help="f32 | f16 | bf16 | int8 | int4 | w8a8 (onnx); f32 | f16 | bf16 | "
                      "q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k | q5_k | q6_k (gguf); llama.cpp's names too "
                      "(Q4_K_M, Q5_K_M, Q8_0, any case)"),
    block_size: Optional[int] = _opt(None, "--block-size", metavar="N",
                                     help="int8/int4 ONNX bundles: weights per quantization block (16-256; "
                                          "default 32)"),
    fmt: Optional[str] = _opt(None, "--format", metavar="FMT", help="onnx (a bundle folder) | gguf (one file); "
                              "default: gguf when OUT ends in .gguf, else onnx"),
    portable: bool = typer.Option(False, "--portable", help="standard ONNX ops only (no com.microsoft fused ops)"),
    tokenizer: Optional[str] = _opt(None, "--tokenizer", metavar="FILE", help="tokenizer.json to bundle"),
    chat_template: Optional[str] = _opt(None, "--chat-template", metavar="FILE|NAME",
                                        help="the chat template to carry (default: the checkpoint's own)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    initial_state: Optional[str] = _opt(None, "--initial-state", metavar="FILE",
                                        help="RWKV state-tuning file: the bundle's initial state"),
    mobile: bool = typer.Option(False, "--mobile", help="ONNX Runtime Mobile: the portable step graph, batch 1, "
                                "as step.ort with required_operators.config (docs/devices.md)"),
    compute: str = _opt("f32", "--compute", metavar="DTYPE", help="f32 | f16 | bf16: what the graphs compute in; "
                        "f16/bf16 store the matrices in that type and keep the recurrences and the state in f32 "
                        "(for CUDA; docs/cuda.md)"),
):
    """Export a checkpoint to an ONNX bundle or a GGUF file (the format follows OUT's name)."""
    from edgeseq.gguf_file import is_gguf

    plan = export_plan(checkpoint, out, quant, fmt, block_size, mobile=mobile, initial_state=initial_state,
                       tokenizer=tokenizer, force=force, compute=compute)
    fmt, quant = plan["format"], plan["quant"]
    if plan.get("note"):
        typer.echo(plan["note"], err=True)
    template = None
    if chat_template is not None:
        from edgeseq.chat_template import load_template_option

        template = load_template_option(chat_template)
    t0 = time.perf_counter()
    try:
        if fmt == "gguf":
            from edgeseq.exporters.gguf_writer import export_gguf

            info = export_gguf(checkpoint, out, quant=quant, tokenizer=tokenizer, force=force, progress=False,
                               chat_template=template)
            why = f" (edgeseq's own architecture: {info['generic_because']})" if info["generic_because"] else ""
            typer.echo(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB, {info['architecture']}{why}; tensors "
                       + ", ".join(f"{n} {k}" for k, n in sorted(info["types"].items())) + f") in "
                       f"{time.perf_counter() - t0:.1f} s")
            return
        if os.path.isfile(checkpoint) and is_gguf(checkpoint):
            from edgeseq.gguf_bundle import gguf_to_bundle

            gguf_to_bundle(checkpoint, out, portable=portable, force=force, chat_template=template)
        else:
            from edgeseq.chat_template import checkpoint_template

            template = template or checkpoint_template(checkpoint)
            extra = {"chat_template": template} if template else {}
            if mobile:
                from edgeseq.exporters.mobile import export_mobile

                export_mobile(checkpoint, out, quant=quant, tokenizer=tokenizer, force=force, progress=True,
                              initial_state=initial_state, **extra)
            else:
                from edgeseq.exporters.export import export as do_export

                do_export(checkpoint, out, quant=quant, portable=portable, tokenizer=tokenizer, force=force,
                          progress=True, initial_state=initial_state, block_size=block_size or 32,
                          compute=plan["compute"], **extra)
    except OSError as e:  # a folder that cannot hold the output (/proc, a full disk): named, nothing left
        raise EdgeseqError(f"{out}: cannot write ({e.strerror or e})") from None
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    typer.echo(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; peak RSS "
               f"{peak_rss_mb():.0f} MB")


@app.command()
def verify(model: str = typer.Argument(..., metavar="MODEL", help="bundle folder or .gguf file")):
    """Check a model against its manifest: every file's size and full sha256, graphs' external data."""
    from edgeseq.integrity import verify as verify_model

    typer.echo(verify_model(model))


def main() -> None:
    try:  # typer >= 0.2x carries its own click; older ones use click itself
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx

    try:
        code = app(prog_name="edgeseq", standalone_mode=False)
    except EdgeseqError as e:
        _fail(str(e))
    except cx.NoArgsIsHelpError as e:  # bare `edgeseq` / `edgeseq cache`: the help, status 0
        typer.echo(e.ctx.get_help() if e.ctx else "")
        sys.exit(0)
    except cx.UsageError as e:  # a mistyped option or value: one line, and where to look
        cmd = e.ctx.command_path if e.ctx else "edgeseq"
        _fail(f"{e.format_message()} (see {cmd} -h)")
    except cx.ClickException as e:
        _fail(e.format_message())
    except (KeyboardInterrupt, typer.Abort, getattr(cx, "Abort", typer.Abort)):
        typer.echo("", err=True)
        sys.exit(130)
    except RuntimeError as e:  # ONNX Runtime refusing a graph or its inputs at run time: one line, no traceback
        _fail(f"the model failed to run: {str(e).strip().splitlines()[-1][:400]}")
    except BrokenPipeError:  # `edgeseq run ... | head`: stop quietly
        sys.stderr.close()
        sys.exit(0)
    except OSError as e:  # a safety net: a file problem is still a line naming the file, not a traceback
        _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
