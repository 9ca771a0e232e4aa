"""The `edgeseq` command line: export, run, chat, inspect, bench, eval."""
from __future__ import annotations

import os
import resource
import sys
import time
from typing import Optional

import typer

from edgeseq.errors import EdgeseqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run recurrent language models (Mamba, RWKV, ...) with a fixed-size state.")

DEFAULT_MODEL_ENV = "EDGESEQ_MODEL"


def _version(value: bool) -> None:
    if value:
        from edgeseq import __version__

        typer.echo(f"edgeseq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Run recurrent language models (Mamba, RWKV, ...) with a fixed-size state."""


def _default_model(model: Optional[str]) -> str:
    if model:
        return model
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return env
    # the shipped demo (byte-level RWKV-7 trained on the KJV Bible), exported once into the cache folder
    from edgeseq.exporters.demo import cache_dir, demo_bundle

    typer.echo(f"no MODEL given: using the demo model (byte-level RWKV-7 trained on the King James Bible; "
               f"bundle cached under {cache_dir()})", err=True)
    return demo_bundle()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _load(model: Optional[str], threads: Optional[int], device: str = "cpu", max_context: Optional[int] = None,
          on_full: str = "stop", engine: Optional[str] = None, cuda_graph: bool = False):
    import edgeseq

    extra = {"engine": engine} if engine else {}  # GGUF files: onnxruntime (default) or llama.cpp
    if cuda_graph:
        extra["cuda_graph"] = True
    return edgeseq.load(_default_model(model), device=device, threads=threads, max_context=max_context,
                        on_full=on_full, **extra)


ENGINE_HELP = "onnxruntime (default) | llama.cpp (GGUF files of mamba, mamba2, rwkv6, rwkv7; needs llama-cpp-python)"


MAX_CONTEXT_HELP = "KV ring length of full-attention models (Zamba); default: the bundle's"
ON_FULL_HELP = "when that ring is full: stop (error) | slide (attend to the last max-context tokens)"


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="model directory (HF or state-spaces layout)"),
    out: str = typer.Option(..., "-o", "--out", help="bundle directory to create"),
    quant: str = typer.Option("f32", "--quant", "-q", help="f32 | f16 | int8 | int4 (onnx); f32 | f16 | bf16 | "
                              "q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k | q5_k | q6_k (gguf)"),
    block_size: int = typer.Option(32, "--block-size", help="int8/int4: weights per quantization block (16-256)"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (a bundle directory) | gguf (one file; CHECKPOINT may "
                            "also be a .gguf to turn into a bundle)"),
    portable: bool = typer.Option(False, "--portable", help="standard ONNX ops only (no com.microsoft fused ops)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer.json to bundle"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    initial_state: Optional[str] = typer.Option(None, "--initial-state",
                                                help="RWKV state-tuning file: the bundle's initial state"),
    mobile: bool = typer.Option(False, "--mobile", help="ONNX Runtime Mobile: the portable step graph, batch 1, "
                                "as step.ort with required_operators.config (docs/devices.md)"),
):
    """Export a checkpoint to an ONNX bundle or a GGUF file."""
    if fmt not in ("onnx", "gguf"):
        raise EdgeseqError(f"--format {fmt}: choose onnx or gguf")
    from edgeseq.exporters.export import export as do_export
    from edgeseq.gguf_file import is_gguf

    t0 = time.perf_counter()
    if fmt == "gguf":
        from edgeseq.exporters.gguf_writer import export_gguf

        info = export_gguf(checkpoint, out, quant=quant, tokenizer=tokenizer, force=force, progress=False)
        why = f" (edgeseq's own architecture: {info['generic_because']})" if info["generic_because"] else ""
        typer.echo(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB, {info['architecture']}{why}; tensors "
                   + ", ".join(f"{n} {k}" for k, n in sorted(info["types"].items())) + f") in "
                   f"{time.perf_counter() - t0:.1f} s")
        return
    if os.path.isfile(checkpoint) and is_gguf(checkpoint):
        from edgeseq.gguf_bundle import gguf_to_bundle

        if quant not in ("f32", "fp32") or mobile or initial_state or tokenizer:
            raise EdgeseqError(f"{checkpoint}: a GGUF becomes an f32 bundle with the GGUF's own tokenizer "
                               f"(--quant, --mobile, --initial-state and --tokenizer do not apply)")
        gguf_to_bundle(checkpoint, out, portable=portable, force=force)
    elif mobile:
        from edgeseq.exporters.mobile import export_mobile

        export_mobile(checkpoint, out, quant=quant, tokenizer=tokenizer, force=force, progress=True,
                      initial_state=initial_state)
    else:
        do_export(checkpoint, out, quant=quant, portable=portable, tokenizer=tokenizer, force=force, progress=True,
                  initial_state=initial_state, block_size=block_size)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    typer.echo(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; peak RSS "
               f"{_peak_rss_mb():.0f} MB")


@app.command()
def run(
    model: Optional[str] = typer.Argument(None, help="bundle directory (default: the demo model)"),
    prompt: str = typer.Option("", "--prompt", "-p"),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    device: str = typer.Option("cpu", "--device"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --device cuda: decode through the step "
                                    "graph under ONNX Runtime CUDA graphs (docs/devices.md)"),
    max_context: Optional[int] = typer.Option(None, "--max-context", help=MAX_CONTEXT_HELP),
    on_full: str = typer.Option("stop", "--on-full", help=ON_FULL_HELP),
    engine: Optional[str] = typer.Option(None, "--engine", help=ENGINE_HELP),
):
    """Generate a continuation of --prompt, streamed."""
    m = _load(model, threads, device, max_context, on_full, engine, cuda_graph)
    s = m.session()
    typer.echo(prompt, nl=False)
    stops = [x.replace("\\n", "\n").replace("\\t", "\t") for x in stop]  # let --stop "\n\n" mean newlines
    for piece in s.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop=stops):
        typer.echo(piece, nl=False)
    st = s.stats
    typer.echo("")
    typer.echo(f"[prompt {st.prompt_tokens} tok, {st.prompt_tps:.1f} tok/s | decode {st.decode_tokens} tok, "
               f"{st.decode_tps:.1f} tok/s | peak RSS {_peak_rss_mb():.0f} MB]", err=True)


@app.command()
def chat(
    model: Optional[str] = typer.Argument(None, help="bundle directory (default: the demo model)"),
    system: str = typer.Option("", "--system", help="system prompt (models with a chat template)"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    device: str = typer.Option("cpu", "--device"),
    max_context: Optional[int] = typer.Option(None, "--max-context", help=MAX_CONTEXT_HELP),
    on_full: str = typer.Option("stop", "--on-full", help=ON_FULL_HELP),
):
    """Chat interactively; the state carries over, so each turn processes only its new tokens.

    Commands: /reset, /save FILE, /load FILE, /quit. A model without a chat template continues the
    text you type (plain continuation)."""
    from edgeseq.runtime.chat import Chat

    c = Chat(_load(model, threads, device, max_context, on_full), system=system, max_tokens=max_tokens, temperature=temperature,
             top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    interactive = sys.stdin.isatty()
    typer.echo(c.banner(), err=True)
    while True:
        if interactive:
            typer.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        try:
            for piece in c.handle(line):
                typer.echo(piece, nl=False)
        except EdgeseqError as e:
            typer.echo(f"error: {e}", err=True)
        if c.done:
            break
        typer.echo("")


@app.command()
def inspect(model: str = typer.Argument(..., help="bundle directory")):
    """Family, config, state spec, quantization and sizes of a bundle (or a GGUF file's summary)."""
    from edgeseq.bundle import read_manifest
    from edgeseq.gguf_file import is_gguf

    if os.path.isfile(model) and is_gguf(model):
        from edgeseq.gguf_names import summary

        typer.echo(summary(model))
        return
    m = read_manifest(model)
    typer.echo(f"bundle      {model}  (format {m['format_version']}, edgeseq {m['edgeseq_version']})")
    typer.echo(f"family      {m['family']}  ({m['architecture']})")
    typer.echo(f"flavour     {m['flavour']}   quant {m['quant']['recipe']}")
    typer.echo(f"weights     {m['weights']['bytes'] / 1e6:.2f} MB  sha256 {m['weights']['sha256'][:16]}…")
    typer.echo(f"vocab       {m['vocab_size']}  tokenizer {m['tokenizer']['kind']}  eos {m.get('eos_token_id')}")
    typer.echo("config      " + ", ".join(f"{k}={v}" for k, v in m["config"].items()))
    typer.echo("graphs      " + ", ".join(f"{k} ({g['file']})" for k, g in m["graphs"].items()))
    typer.echo(f"state       {m['state_bytes_per_sequence'] / 1024:.1f} KiB per sequence, {len(m['state'])} tensors:")
    for s in m["state"]:
        typer.echo(f"  {s['name']:<40} {str(s['shape']):<26} {s['dtype']}  {s['doc']}")


@app.command()
def bench(
    model: str = typer.Argument(..., help="bundle directory"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens"),
    decode_tokens: int = typer.Option(128, "--decode-tokens"),
    device: str = typer.Option("cpu", "--device"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --device cuda: decode through the step "
                                    "graph under ONNX Runtime CUDA graphs (docs/devices.md)"),
    max_context: Optional[int] = typer.Option(None, "--max-context", help=MAX_CONTEXT_HELP),
    on_full: str = typer.Option("stop", "--on-full", help=ON_FULL_HELP),
    engine: Optional[str] = typer.Option(None, "--engine", help=ENGINE_HELP),
):
    """Decode and prefill tokens/s, state bytes and peak RSS."""
    import numpy as np

    m = _load(model, threads, device, max_context, on_full, engine, cuda_graph)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.vocab_size, prompt_tokens).tolist()
    from edgeseq.runtime.session import time_session

    t_pre, t_dec = time_session(m.session(), ids, decode_tokens)
    typer.echo(f"model       {model} ({m.family_name}, {m.manifest['quant']['recipe']}, {m.manifest['flavour']})")
    typer.echo(f"threads     {threads or 'default'}")
    typer.echo(f"prefill     {prompt_tokens / t_pre:.1f} tok/s ({prompt_tokens} tokens)")
    typer.echo(f"decode      {decode_tokens / t_dec:.1f} tok/s ({decode_tokens} tokens)")
    typer.echo(f"state       {m.state_bytes} bytes per sequence")
    typer.echo(f"weights     {m.weights_bytes / 1e6:.1f} MB")
    typer.echo(f"peak RSS    {_peak_rss_mb():.0f} MB")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="bundle directory or .gguf file"),
    text: str = typer.Option(..., "--text", help="UTF-8 text file (any length: streamed in constant memory)"),
    max_tokens: int = typer.Option(0, "--max-tokens", help="score at most this many tokens (0: the whole text)"),
    chunk: int = typer.Option(256, "--chunk", help="tokens per prefill call; the state carries between chunks"),
    threads: Optional[int] = typer.Option(None, "--threads"),
):
    """Perplexity and bits per byte of a text, streamed through the state chunk by chunk."""
    from edgeseq.quant.evaluate import evaluate_text

    r = evaluate_text(_load(model, threads), text, chunk=chunk, max_tokens=max_tokens or None, progress=True)
    typer.echo(f"tokens {r['tokens']}  bytes {r['bytes']}  nll/token {r['nll_per_token']:.4f}  "
               f"perplexity {r['ppl']:.3f}  bits/byte {r['bpb']:.4f}")


def main() -> None:
    try:
        app()
    except EdgeseqError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
