"""Every bad input a user makes on the command line: the real `edgeseq` command (a subprocess), exit status
1, one `error:` line naming the option or file, nothing written, no traceback. Then the good spellings
that llama.cpp, Ollama and mlx-lm users type (aliases, positional prompts, stdin, format from the name)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BAD_UTF8 = os.fsdecode(b"caf\xe9")  # not UTF-8 on the command line: Python holds it as a lone surrogate


def edgeseq(*args, env=None, input=None, cwd=None):
    e = {**os.environ, "EDGESEQ_MODEL": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeseq", *map(str, args)], capture_output=True, env=e,
                          input=input, cwd=cwd, timeout=120)


# (id, argv with {bundle} {ckpt} {tmp} {gguf} placeholders, env, what the error must name)
CASES = [
    # run / chat / eval / bench: numbers
    ("n-below-minus-1", "run {bundle} -p x -n -2", None, "--max-tokens -2"),
    ("temperature-negative", "run {bundle} -p x --temperature -1", None, "--temperature"),
    ("temp-nan", "run {bundle} -p x --temp nan", None, "--temperature"),
    ("top-p-5", "run {bundle} -p x --top-p 5", None, "--top-p"),
    ("top-k-negative", "run {bundle} -p x --top-k -3", None, "--top-k"),
    ("min-p-1", "run {bundle} -p x --min-p 1", None, "--min-p"),
    ("threads-negative", "run {bundle} -p x --threads -2", None, "--threads"),
    ("repetition-penalty-0", "run {bundle} -p x --repetition-penalty 0", None, "--repetition-penalty"),
    ("repeat-penalty-negative", "run {bundle} -p x --repeat-penalty -1", None, "--repetition-penalty"),
    ("seed-negative", "run {bundle} -p x --seed -5", None, "--seed"),
    ("max-context-0", "run {bundle} -p x -c 0", None, "--max-context"),
    ("on-full-unknown", "run {bundle} -p x --on-full wrap", None, "--on-full"),
    ("top-k-not-a-number", "run {bundle} -p x --top-k many", None, "--top-k"),
    ("chat-temperature", "chat {bundle} --temp -1", None, "--temperature"),
    ("chat-two-models", "chat {bundle} -m {bundle}", None, "give the model once"),
    ("chat-template-kwargs-not-json", "chat {bundle} --chat-template-kwargs nope", None, "--chat-template-kwargs: not JSON"),
    ("chat-template-kwargs-list", "chat {bundle} --chat-template-kwargs [1]", None, "give a JSON object"),
    ("chat-template-kwargs-messages", ["chat", "{bundle}", "--chat-template-kwargs", '{{"messages": []}}'], None,
     "messages is set by the chat"),
    ("bench-prompt-tokens", "bench {bundle} --prompt-tokens -5", None, "--prompt-tokens"),
    ("bench-decode-tokens", "bench {bundle} --decode-tokens 0", None, "--decode-tokens"),
    ("bench-repeat", "bench {bundle} --repeat 0", None, "--repeat"),
    ("eval-max-tokens", "eval {bundle} --text {tmp}/t.txt --max-tokens -1", None, "--max-tokens"),
    ("eval-chunk", "eval {bundle} --text {tmp}/t.txt --chunk 0", None, "--chunk"),
    ("eval-missing-text", "eval {bundle} --text {tmp}/nothing.txt", None, "nothing.txt"),
    # run: prompts and models
    ("prompt-bad-utf8", ["run", "{bundle}", "-p", BAD_UTF8], None, "--prompt: not valid UTF-8"),
    ("positional-bad-utf8", ["run", "{bundle}", BAD_UTF8], None, "PROMPT: not valid UTF-8"),
    ("prompt-file-missing", "run {bundle} -f {tmp}/none.txt", None, "none.txt"),
    ("prompt-file-not-utf8", "run {bundle} -f {tmp}/latin1.txt", None, "latin1.txt"),
    ("prompt-twice", "run {bundle} -p x -f {tmp}/t.txt", None, "one way"),
    ("model-missing", "run {tmp}/nope -p x", None, "nope: no such file"),
    ("env-model-missing", "run -p x", {"EDGESEQ_MODEL": "/nonexistent/model"}, "EDGESEQ_MODEL=/nonexistent"),
    ("engine-on-a-bundle", "run {bundle} -p x --engine llama.cpp", None, "GGUF files only"),
    ("engine-unknown", "run {gguf} -p x --engine vllm", None, "vllm"),
    ("bench-missing", "bench {tmp}/nope", None, "nope"),
    # export and formats
    ("export-missing", "export {tmp}/missing -o {tmp}/out", None, "missing"),
    ("export-exists", "export {ckpt} -o {bundle}", None, "already exists"),
    ("export-format-unknown", "export {ckpt} -o {tmp}/out --format tflite", None, "--format tflite"),
    ("gguf-name-onnx-format", "export {ckpt} -o {tmp}/m.gguf --format onnx", None, "m.gguf"),
    ("gguf-quant-for-onnx", "export {ckpt} -o {tmp}/out --quant q4_0", None, "GGUF type"),
    ("onnx-quant-for-gguf", "export {ckpt} -o {tmp}/m.gguf --quant int4", None, "ONNX type"),
    ("quant-unknown", "export {ckpt} -o {tmp}/out --quant int3", None, "--quant int3: not available for onnx"),
    ("compute-gguf", "export {ckpt} -o {tmp}/m.gguf --compute f16", None, "half compute is for ONNX bundles"),
    ("compute-mobile", "export {ckpt} -o {tmp}/out --mobile --compute bf16", None, "not --mobile bundles"),
    ("compute-with-int8", "export {ckpt} -o {tmp}/out --quant int8 --compute f16", None, "does not combine with"),
    ("compute-unknown", "export {ckpt} -o {tmp}/out --compute f8", None, "--compute f8: choose one of"),
    ("quant-llama-cpp-unsupported", "export {ckpt} -o {tmp}/m.gguf --quant Q4_K_S", None, "Q4_K_S"),
    ("block-size-gguf", "export {ckpt} -o {tmp}/m.gguf --quant q4_0 --block-size 64", None, "--block-size"),
    ("block-size-mobile", "export {ckpt} -o {tmp}/out --quant int8 --mobile --block-size 64", None, "--block-size"),
    ("block-size-f32", "export {ckpt} -o {tmp}/out --block-size 64", None, "--block-size"),
    ("block-size-odd", "export {ckpt} -o {tmp}/out --quant int4 --block-size 48", None, "--block-size 48"),
    ("mobile-gguf", "export {ckpt} -o {tmp}/m.gguf --mobile", None, "--mobile"),
    ("gguf-to-bundle-quant", "export {gguf} -o {tmp}/out --quant int8", None, "f32 bundle"),
    ("out-under-a-file", "export {ckpt} -o {tmp}/afile/out", None, "is a file"),
    ("out-in-proc", "export {ckpt} -o /proc/edgeseq-out", None, "/proc/edgeseq-out"),
    ("tokenizer-missing", "export {ckpt} -o {tmp}/out --tokenizer {tmp}/tok.json", None, "tok.json"),
    ("chat-template-missing", "export {ckpt} -o {tmp}/out --chat-template {tmp}/t.jinja", None, "t.jinja"),
    # the cache
    ("cache-rm-unknown", "cache rm nothing-here", {"EDGESEQ_CACHE": "{tmp}/cache"}, "nothing-here: not in the cache"),
    ("cache-rm-nothing", "cache rm", {"EDGESEQ_CACHE": "{tmp}/cache"}, "--all"),
    ("cache-max-size-bad", "cache --max-size lots", {"EDGESEQ_CACHE": "{tmp}/cache"}, "not a size"),
]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def places(byte_mamba, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "t.txt").write_text("some text to score " * 3)
    (tmp / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp / "afile").write_text("a file, not a folder")
    from edgeseq.exporters.gguf_writer import export_gguf

    gguf = tmp / "small.gguf"
    export_gguf(str(byte_mamba.ckpt), str(gguf), quant="q8_0")
    return {"bundle": byte_mamba.bundle(), "ckpt": byte_mamba.ckpt, "tmp": tmp, "gguf": gguf}


def _argv(spec, places) -> list[str]:
    parts = spec.split() if isinstance(spec, str) else spec
    return [p.format(**places) if "{" in p else p for p in parts]


# Each case is the real command (edgeseq.cli.main, as the console script calls it) in its own forked
# process with its own argv, environment, working folder and stdout/stderr: one interpreter start for the
# whole table instead of ~0.5 s per case.
DRIVER = r"""
import json, os, sys
import edgeseq.cli, edgeseq.cli_args, edgeseq.gguf_file, edgeseq.exporters.cache, numpy  # imported once
import edgeseq.runtime.model, edgeseq.exporters.export, edgeseq.cache, jinja2  # (what some cases reach)
out = []
for argv, env, cwd, log, stdin in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        os.environ.update(env)
        fd = os.open(stdin or os.devnull, os.O_RDONLY); os.dup2(fd, 0)
        for n, name in ((1, log + ".out"), (2, log + ".err")):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC); os.dup2(fd, n)
        sys.argv = ["edgeseq", *argv]
        code = 0
        try:
            edgeseq.cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback; traceback.print_exc(); code = 99
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    out.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(out))
"""


# commands that must work, run by the same driver (their outputs go under {tmp}/good)
GOOD = [
    ("words", "run {bundle} Hello there -n 6 --temp 0 --no-echo", None),
    ("model-option-and-file", "run -m {bundle} -f {tmp}/good/p.txt -n 6 --temp 0 --no-echo", None),
    ("stdin", "run {bundle} -p - -n 6 --temp 0 --no-echo", "{tmp}/good/p.txt"),
    ("until-end-json", "run {bundle} -p Hi -n -1 --temp 0 --stop e --repeat-penalty 1.1 --min-p 0.05 -s 3 --json",
     None),
    ("bench-json", "bench {gguf} -p 8 -n 4 --repeat 2 --json --threads 1", None),
    ("export-gguf-by-name", "export {ckpt} -o {tmp}/good/m.gguf --quant Q4_K_M", None),
    ("help", "-h", None), ("version", "--version", None), ("run-help", "run -h", None),
    ("export-help", "export --help", None), ("chat-help", "chat -h", None), ("cache-help", "cache -h", None),
]


def _run_all(places, logs, cases):
    jobs = [[_argv(c[1], places), {"EDGESEQ_MODEL": "", **{k: v.format(**places) for k, v in (c[2] or {}).items()}},
             str(places["tmp"]), str(logs / c[0]), c[3].format(**places) if c[3] else None]
            for c in cases]  # c: (id, argv, env, a file for stdin or None)
    r = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs).encode("utf-8", "surrogateescape"),
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    return {c[0]: subprocess.CompletedProcess(j[0], code, (logs / f"{c[0]}.out").read_bytes(),
                                              (logs / f"{c[0]}.err").read_bytes())
            for c, j, code in zip(cases, jobs, json.loads(r.stdout))}


@pytest.fixture(scope="module")
def results(places, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cli_error_logs")
    before = (_listing(places["tmp"]), _listing(places["bundle"]))
    runs = _run_all(places, logs, [(*c[:3], None) for c in CASES])
    assert (_listing(places["tmp"]), _listing(places["bundle"])) == before, "a failed command wrote something"
    assert not os.path.exists("/proc/edgeseq-out")
    return runs


@pytest.fixture(scope="module")
def good(places, results, tmp_path_factory):
    (places["tmp"] / "good").mkdir()
    (places["tmp"] / "good" / "p.txt").write_text("Hello there\n")
    logs = tmp_path_factory.mktemp("cli_good_logs")
    runs = _run_all(places, logs, [(c[0], c[1], None, c[2]) for c in GOOD])  # c[2]: a file for stdin
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr.decode())
    return runs


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(results, case):
    r = results[case[0]]
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, (r.returncode, err)
    assert "Traceback" not in err and "error: " in err, err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and case[3] in line[0], err
    assert r.stdout == b""


# -- what works ---------------------------------------------------------------------------------------------
def test_the_real_commands_start():
    """`python -m edgeseq` and the console script, as separate programs (the table above forks main())."""
    r = edgeseq("--version")
    assert r.returncode == 0 and b"edgeseq 0." in r.stdout
    script = os.path.join(os.path.dirname(sys.executable), "edgeseq")
    if os.path.exists(script):
        r = subprocess.run([script, "-h"], capture_output=True, timeout=60)
        assert r.returncode == 0 and b"Commands" in r.stdout
    r = edgeseq()
    assert r.returncode == 0 and b"Commands" in r.stdout


def test_help_texts(good):
    for name in ("help", "run-help", "export-help", "chat-help", "cache-help"):
        out = good[name].stdout.decode()
        assert "<bool>" not in out and "list[str]" not in out and "Usage: edgeseq" in out, name
    assert b"edgeseq 0." in good["version"].stdout
    text = good["export-help"].stdout.decode()
    assert ".pth" in text and ".gguf" in text


def test_prompt_spellings_agree(good):
    """Ollama's positional words, -m with -f FILE, and -p - (stdin) give the same greedy text."""
    outs = [good[n].stdout for n in ("words", "model-option-and-file", "stdin")]
    assert len(set(outs)) == 1 and outs[0].strip()


def test_until_end_token_json_and_aliases(good):
    out = json.loads(good["until-end-json"].stdout)
    # a random byte model has no end token: -n -1 runs until the stop string
    assert out["stopped_by"] in ("stop_string", "end_token") and out["prompt"] == "Hi"
    assert set(out) >= {"text", "prompt_tps", "decode_tps", "peak_rss_mb"}


def test_format_follows_the_name_and_llama_cpp_quant_names(good, places):
    g = places["tmp"] / "good" / "m.gguf"
    assert g.is_file() and g.read_bytes()[:4] == b"GGUF"
    assert b"q4_k" in good["export-gguf-by-name"].stderr  # the translation is said


def test_bench_json_and_gguf_label(good):
    out = json.loads(good["bench-json"].stdout)
    assert out["prefill_tps"]["min"] <= out["prefill_tps"]["median"] <= out["prefill_tps"]["max"]
    assert "GGUF" in out["quant"] and "int8" not in out["quant"].split("(")[0]
