"""RWKV decode speed, prefill speed and memory: edgeseq vs the `rwkv` package (BlinkDL's reference), fp32, CPU.

    python benchmarks/bench_rwkv.py /tmp/edgeseq-bench-rwkv --rounds 3 --json /tmp/edgeseq-bench-rwkv/results.json

Models (random weights with noise at the real shapes, written as BlinkDL .pth files, fp32):

    rwkv7-0.1b   RWKV-7 (x070) like RWKV-x070-World-0.1B: C 768, 12 layers, head size 64, dim_ffn 3072,
                 vocabulary 65,536 (edgeseq picks the World vocabulary from the `rwkv` package), LoRA ranks
                 as the 0.1B model (BlinkDL's formulas at C 768): w 64, a 64, v 32, g 128
    rwkv4-169m   RWKV-4 like RWKV-4-Pile-169M: C 768, 12 layers, dim_ffn 3072, vocabulary 50,277 (a trivial
                 WordLevel tokenizer.json of that size is written beside the .pth)

Systems:
    edgeseq   edgeseq.load(bundle-fused, threads=2) (export of the .pth, fused flavour, f32)
    rwkv      rwkv.model.RWKV(model, strategy="cpu fp32"), torch.set_num_threads(2), RWKV_JIT_ON=0,
              RWKV_CUDA_ON=0 (RWKV_V7_ON=1 for RWKV-7, whose code is TorchScript whatever RWKV_JIT_ON says);
              prefill = forward(list of 512 tokens), decode = forward([token], state)

The measuring is benchmarks/bench_decode.py's, imported: one fresh subprocess per measurement (its
`worker`: warm-up 512-token prefill, timed 512-token prefill, 16-token prompt, 16 warm-up steps, 128 timed
greedy steps, VmHWM, PSS), systems interleaved round by round (order rotating), medians, foreign load
measured per run (a run above 15 % is redone once and, if still loaded, left out of the medians), and
once per model `edgeseq-long`: 4096 greedy steps with VmRSS after 256, 1024, 2048 and 4096 tokens.

edgeseq is pinned like bench_decode.py does it: HEAD is snapshotted (git archive) under
/tmp/edgeseq-bench-src and the bundles are exported with that snapshot (--no-pin: the working tree).
Before measuring, `--check` (on by default) compares the two systems' logits over 16 stepped tokens
and a 64-token prefill, so the benchmark is known to run the same model in both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_decode as bd  # noqa: E402  (worker, foreign load, VmHWM/PSS, medians)

MODELS = {
    "rwkv7-0.1b": dict(version=7, n_embd=768, n_layer=12, head_size=64, dim_ffn=3072, vocab=65536,
                       lora=dict(w=64, a=64, v=32, g=128)),
    "rwkv4-169m": dict(version=4, n_embd=768, n_layer=12, dim_ffn=3072, vocab=50277),
}
SYSTEMS = ["edgeseq", "rwkv"]
MIB = 2 ** 20


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def rwkv_env(version: int) -> dict:
    env = {"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}
    if version == 7:
        env["RWKV_V7_ON"] = "1"
    return env


def model_spec(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "spec.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def make_pth(name: str, out: str, seed: int = 0) -> str:
    """A BlinkDL .pth (fp32) of random weights at the shape MODELS[name], keys and shapes as BlinkDL saves
    them. Matrices get randn * scale / sqrt(fan_in); vectors sit in their trained ranges (decays, mixes)."""
    import torch

    s = MODELS[name]
    C, L, F, V = s["n_embd"], s["n_layer"], s["dim_ffn"], s["vocab"]
    g = torch.Generator().manual_seed(seed)

    def mat(rows, cols, scale=1.5):  # (out, in) for Linear weights, fan_in = cols
        return torch.randn(rows, cols, generator=g) * (scale / cols ** 0.5)

    def lora(cin, cout, scale=1.5):  # (in, out) as BlinkDL keeps x070 LoRA matrices, fan_in = cin
        return torch.randn(cin, cout, generator=g) * (scale / cin ** 0.5)

    def vec(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def ln(prefix, sd):
        sd[prefix + ".weight"] = 1.0 + 0.1 * torch.randn(C, generator=g)
        sd[prefix + ".bias"] = 0.1 * torch.randn(C, generator=g)

    sd = {"emb.weight": torch.randn(V, C, generator=g)}
    ln("blocks.0.ln0", sd)
    for i in range(L):
        b = f"blocks.{i}."
        ln(b + "ln1", sd)
        ln(b + "ln2", sd)
        if s["version"] == 7:
            H, N, r = C // s["head_size"], s["head_size"], s["lora"]
            for m in "rwkvag":
                sd[b + f"att.x_{m}"] = vec(1, 1, C)
            sd[b + "att.w0"] = vec(1, 1, C, lo=-4.0, hi=1.0)
            sd[b + "att.w1"], sd[b + "att.w2"] = lora(C, r["w"]), lora(r["w"], C, 0.5)
            sd[b + "att.a0"] = vec(1, 1, C, lo=-1.0, hi=1.0)
            sd[b + "att.a1"], sd[b + "att.a2"] = lora(C, r["a"]), lora(r["a"], C, 0.5)
            sd[b + "att.v0"] = vec(1, 1, C, lo=0.0, hi=2.0)  # layer 0 has them too (unused), as released
            sd[b + "att.v1"], sd[b + "att.v2"] = lora(C, r["v"]), lora(r["v"], C, 0.5)
            sd[b + "att.g1"], sd[b + "att.g2"] = lora(C, r["g"]), lora(r["g"], C)
            sd[b + "att.k_k"] = vec(1, 1, C, lo=0.7, hi=1.0)
            sd[b + "att.k_a"] = vec(1, 1, C, lo=0.8, hi=1.2)
            sd[b + "att.r_k"] = 0.3 * torch.randn(H, N, generator=g)
            for m in ("receptance", "key", "value", "output"):
                sd[b + f"att.{m}.weight"] = mat(C, C)
            ln(b + "att.ln_x", sd)
            sd[b + "ffn.x_k"] = vec(1, 1, C)
            sd[b + "ffn.key.weight"] = mat(F, C)
            sd[b + "ffn.value.weight"] = mat(C, F, 1.0)
        else:
            sd[b + "att.time_decay"] = vec(C, lo=-3.0, hi=1.0)  # raw: the model uses -exp(time_decay)
            sd[b + "att.time_first"] = 0.5 * torch.randn(C, generator=g)
            for m in "kvr":
                sd[b + f"att.time_mix_{m}"] = vec(1, 1, C)
            for m in ("key", "value", "receptance", "output"):
                sd[b + f"att.{m}.weight"] = mat(C, C)
            for m in "kr":
                sd[b + f"ffn.time_mix_{m}"] = vec(1, 1, C)
            sd[b + "ffn.key.weight"] = mat(F, C)
            sd[b + "ffn.receptance.weight"] = mat(C, C)
            sd[b + "ffn.value.weight"] = mat(C, F, 1.0)
    ln("ln_out", sd)
    sd["head.weight"] = mat(V, C)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.pth")
    torch.save({k: v.contiguous() for k, v in sd.items()}, path)
    if V != 65536:  # not the World vocabulary: edgeseq needs a tokenizer.json beside the .pth
        write_wordlevel(os.path.join(out, "tokenizer.json"), V)
    with open(os.path.join(out, "spec.json"), "w") as f:
        json.dump({**s, "name": name, "params": sum(v.numel() for v in sd.values())}, f, indent=1)
    return path


def write_wordlevel(path: str, vocab_size: int) -> None:
    """A trivial WordLevel tokenizer.json of exactly vocab_size tokens (the benchmark feeds ids, no text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tok.get_vocab_size() == vocab_size
    tok.save(path)


def export_bundle(model_dir: str) -> None:
    """Runs in a subprocess under the pinned PYTHONPATH, so the snapshot exports the bundle."""
    import edgeseq
    from edgeseq.exporters.export import export

    t0 = time.perf_counter()
    export(os.path.join(model_dir, "model.pth"), os.path.join(model_dir, "bundle-fused"), quant="f32",
           portable=False, tokenizer=None, force=True)
    m = edgeseq.load(os.path.join(model_dir, "bundle-fused"))
    print(f"exported {model_dir} with {edgeseq.__file__} in {time.perf_counter() - t0:.1f} s: family "
          f"{m.manifest['family']}, tokenizer {m.manifest['tokenizer']['kind']}, weights "
          f"{m.weights_bytes / MIB:.1f} MiB, state {m.state_bytes / 1024:.0f} KiB", flush=True)


# ---------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------
class RwkvPkgRunner:
    """BlinkDL's `rwkv` package, strategy 'cpu fp32'. Prefill is one forward over the token list (the
    package's sequence mode), decode one forward([token]) per token, state carried by the caller."""

    def __init__(self, model_dir: str):
        import torch
        from rwkv.model import RWKV

        torch.set_num_threads(bd.THREADS)
        torch.set_grad_enabled(False)
        quiet = {} if model_spec(model_dir)["version"] == 7 else {"verbose": False}  # RWKV_x070 has no verbose
        self.model = RWKV(model=os.path.join(model_dir, "model"), strategy="cpu fp32", **quiet)
        self.state = None

    def reset(self):
        self.state = None

    def prefill(self, ids) -> int:
        out, self.state = self.model.forward(list(ids), self.state)
        return int(out.argmax())

    def step(self, tok: int) -> int:
        out, self.state = self.model.forward([tok], self.state)
        return int(out.argmax())


def make_runner(system: str, model_dir: str):
    if system == "edgeseq":
        return bd.EdgeseqRunner(model_dir, "fused", False)
    if system == "rwkv":
        return RwkvPkgRunner(model_dir)
    raise SystemExit(f"unknown system {system}")


def worker(system: str, model_dir: str) -> dict:
    if system == "rwkv":  # bd.worker imports the edgeseq libraries itself; import these before its baseline
        os.environ.update(rwkv_env(model_spec(model_dir)["version"]))
        import torch  # noqa: F401
        import rwkv.model  # noqa: F401
    bd.make_runner = make_runner  # bd.worker looks the runner up in its module
    return bd.worker(system, model_dir)


def check(model_dir: str) -> dict:
    """Both systems on the same tokens: 16 stepped one by one, then a 64-token prefill from scratch."""
    import numpy as np

    os.environ.update(rwkv_env(model_spec(model_dir)["version"]))
    import edgeseq

    ids = bd.prompt_ids(64, 7)
    pkg = RwkvPkgRunner(model_dir).model
    s = edgeseq.load(os.path.join(model_dir, "bundle-fused"), threads=bd.THREADS).session()
    state, diff, scale, argmax_same = None, 0.0, 0.0, 0
    for t in ids[:16]:
        ref, state = pkg.forward([t], state)
        ref = ref.float().numpy()
        got = s.step(t)
        diff, scale = max(diff, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
        argmax_same += int(got.argmax() == ref.argmax())
    ref_p = pkg.forward(ids, None)[0].float().numpy()
    s.reset()
    got_p = s.prefill(ids)
    return {"step_max_abs_diff": diff, "logit_scale": scale, "step_argmax_agree": f"{argmax_same}/16",
            "prefill64_max_abs_diff": float(np.abs(got_p - ref_p).max()), "logit_std": float(ref_p.std())}


# ---------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------
PINNED: dict = {}


def snapshot() -> dict:
    """HEAD laid out as the installed package (bench_decode.snapshot_head; bench_decode.pin also runs
    make_models.py for the Mamba models, so it is not called here)."""
    pkg, commit = bd.snapshot_head()
    PINNED.update(PYTHONPATH=pkg, EDGESEQ_BENCH_COMMIT=commit[:12])
    return {"commit": commit[:12], "pythonpath": pkg}


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(bd.THREADS), MKL_NUM_THREADS=str(bd.THREADS),
                TOKENIZERS_PARALLELISM="false", **PINNED)


def run_child(args: list[str], timeout: int = 900) -> dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                       env=child_env(), timeout=timeout, cwd="/tmp")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{args} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def run_worker(system: str, model_dir: str) -> dict:
    waited = bd.wait_quiet()
    return {**run_child(["--worker", system, model_dir]), "waited_for_quiet_s": waited}


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    head = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "edgeseq_commit": head, "python": platform.python_version(),
            "onnxruntime": version("onnxruntime"), "torch": version("torch"), "rwkv": version("rwkv"),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def spread(runs, key, phase):
    v = [r[key] for r in bd.clean(runs, phase)]
    return min(v), max(v)


def report(results: dict) -> str:
    info = results["machine"]
    L = [f"edgeseq {info['edgeseq_commit']}. Machine: {info['nproc']} CPUs, {info['cpu']}; {bd.THREADS} threads; "
         f"python {info['python']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}, rwkv {info['rwkv']}; "
         f"{info['date']}", ""]
    for model, by_sys in results["runs"].items():
        L.append(f"### {model} (fp32, medians of {results['rounds']} interleaved rounds; [min-max])")
        L.append("")
        chk = results.get("check", {}).get(model)
        if chk:
            L.append(f"Agreement: stepped logits max |diff| {chk['step_max_abs_diff']:.2e} (logits up to "
                     f"{chk['logit_scale']:.1f}, argmax {chk['step_argmax_agree']}), 64-token prefill "
                     f"{chk['prefill64_max_abs_diff']:.2e}.")
            L.append("")
        L.append("| system | decode tok/s | 1/median step | prefill 512 tok/s | peak RSS MiB | PSS at end MiB | "
                 "RSS after imports MiB | load s | distinct tokens | foreign load decode, prefill (median) | "
                 "quiet runs decode, prefill |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for system, runs in by_sys.items():
            if not runs:
                continue
            cd, cp = bd.clean(runs, "decode"), bd.clean(runs, "prefill")
            d, dm, p = (spread(runs, "decode_tps", "decode"), spread(runs, "decode_tps_median_step", "decode"),
                        spread(runs, "prefill_tps", "prefill"))
            L.append(f"| {system} | {bd.med(runs, 'decode_tps'):.1f} [{d[0]:.1f}-{d[1]:.1f}] | "
                     f"{bd.med(runs, 'decode_tps_median_step'):.1f} [{dm[0]:.1f}-{dm[1]:.1f}] | "
                     f"{bd.med(runs, 'prefill_tps'):.0f} [{p[0]:.0f}-{p[1]:.0f}] | {bd.med(runs, 'VmHWM') / MIB:.0f} | "
                     f"{bd.med(runs, 'Pss') / MIB:.0f} | {bd.med(runs, 'rss_after_imports') / MIB:.0f} | "
                     f"{bd.med(runs, 'load_s'):.2f} | {statistics.median(r['distinct_tokens'] for r in runs):.0f} | "
                     f"{100 * statistics.median(r['decode_foreign_load'] for r in runs):.0f} %, "
                     f"{100 * statistics.median(r['prefill_foreign_load'] for r in runs):.0f} % | "
                     f"{len(cd)}/{len(runs)}, {len(cp)}/{len(runs)} |")
        es, pk = by_sys.get("edgeseq"), by_sys.get("rwkv")
        if es and pk:
            L.append("")
            L.append(f"edgeseq / rwkv: decode {bd.med(es, 'decode_tps') / bd.med(pk, 'decode_tps'):.2f}x "
                     f"(1/median step {bd.med(es, 'decode_tps_median_step') / bd.med(pk, 'decode_tps_median_step'):.2f}x), "
                     f"prefill {bd.med(es, 'prefill_tps') / bd.med(pk, 'prefill_tps'):.2f}x, "
                     f"peak RSS {bd.med(es, 'VmHWM') / bd.med(pk, 'VmHWM'):.2f}x, PSS {bd.med(es, 'Pss') / bd.med(pk, 'Pss'):.2f}x")
        lr = results["long"].get(model)
        if lr:
            m = lr["marks"]
            a, z = m[str(bd.LONG_MARKS[0])], m[str(bd.LONG_MARKS[-1])]
            wb = lr["weights_bytes"]
            L.append("")
            L.append(f"edgeseq over {bd.LONG_MARKS[-1]} greedy steps ({lr['decode_tps']:.1f} tok/s, foreign load "
                     f"{100 * lr['decode_foreign_load']:.0f} %): VmRSS "
                     + ", ".join(f"{k}: {m[str(k)]['VmRSS'] / MIB:.1f}" for k in bd.LONG_MARKS)
                     + f" MiB; 4096 vs 256 {100 * (z['VmRSS'] - a['VmRSS']) / a['VmRSS']:+.2f} % (anonymous "
                     f"{(z['RssAnon'] - a['RssAnon']) / MIB:+.1f} MiB, file {(z['RssFile'] - a['RssFile']) / MIB:+.1f} MiB); "
                     f"PSS 256: {a['Pss'] / MIB:.1f}, 4096: {z['Pss'] / MIB:.1f} MiB; weights {wb / MIB:.1f} MiB, "
                     f"state {lr['state_bytes'] / 1024:.0f} KiB; RSS@4096 / weights {z['VmRSS'] / wb:.2f}x")
        L.append("")
    return "\n".join(L)


def merge(paths: list[str], allow_commits: bool = False) -> dict:
    """bench_decode.merge, which refuses runs of different commits unless allow_commits, plus the checks."""
    files = []
    for p in paths:
        with open(p) as f:
            files.append(json.load(f))
    commits = sorted({f["machine"]["edgeseq_commit"] for f in files})
    if len(commits) > 1 and not allow_commits:
        raise SystemExit(f"refusing to pool results of different edgeseq commits: {commits} (see --allow-commits)")
    for f in files:
        f["machine"]["edgeseq_commit"] = " + ".join(commits)
    tmp = [p + ".merge-tmp" for p in paths]
    try:
        for f, t in zip(files, tmp):
            with open(t, "w") as out:
                json.dump(f, out)
        merged = bd.merge(tmp)
    finally:
        for t in tmp:
            os.remove(t)
    merged["merged_from"] = paths
    merged["check"] = {}
    for f in files:
        merged["check"].update(f.get("check", {}))
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/edgeseq-bench-rwkv")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--systems", nargs="*", default=SYSTEMS, choices=SYSTEMS)
    ap.add_argument("--no-long", action="store_true", help="skip edgeseq's 4096-token memory run")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the logits agreement check")
    ap.add_argument("--retries", type=int, default=1, help="redo a run taken under foreign load this often")
    ap.add_argument("--budget-min", type=float, default=15.0, help="start no new round after this many minutes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--force", action="store_true", help="rewrite the .pth files")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no measuring: pool the runs of earlier --json files (same edgeseq commit) into one report "
                         "(the last file's long run and agreement check per model)")
    ap.add_argument("--allow-commits", action="store_true",
                    help="with --merge: pool runs of different edgeseq commits (check first that the diff between "
                         "them leaves the RWKV-4/7 code path alone); the report names every commit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--export", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check-one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.root)), flush=True)
        return
    if args.export:
        export_bundle(args.root)
        print("RESULT {}", flush=True)
        return
    if args.check_one:
        print("RESULT " + json.dumps(check(args.root)), flush=True)
        return
    if args.merge:
        merged = merge(args.merge, args.allow_commits)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(merged, f, indent=1)
        print(report(merged))
        return

    info = machine()
    if args.pin:
        info["pinned"] = snapshot()
        info["edgeseq_commit"] = info["pinned"]["commit"] + " (pinned snapshot of HEAD)"
    results = {"rounds": args.rounds, "machine": info, "runs": {m: {s: [] for s in args.systems} for m in args.models},
               "long": {}, "check": {}}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    for model in args.models:
        d = os.path.join(args.root, model)
        if args.force or not os.path.isfile(os.path.join(d, "model.pth")):
            t0 = time.perf_counter()
            make_pth(model, d)
            log(f"{model}: wrote {d}/model.pth in {time.perf_counter() - t0:.1f} s")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), d, "--export"], capture_output=True, text=True,
                           env=child_env(), cwd="/tmp")
        if p.returncode:
            raise SystemExit(f"export of {d} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        log(p.stdout.splitlines()[0])
        if args.check:
            results["check"][model] = c = run_child([d, "--check-one"])
            log(f"{model}: agreement {c}")
    save()

    t_start = time.perf_counter()
    deadline = t_start + 60 * args.budget_min

    def measure(system, model):
        r = prev = None
        for attempt in range(1 + args.retries):
            r = run_worker(system, os.path.join(args.root, model))
            r["attempt"] = attempt
            if attempt:
                results.setdefault("discarded", []).append(prev)
            loaded = r.get("decode_foreign_load", 0) > bd.QUIET or r.get("prefill_foreign_load", 0) > bd.QUIET
            if not loaded or time.perf_counter() > deadline:
                break
            prev = r
        return r

    if not args.no_long and "edgeseq" in args.systems:
        for model in args.models:
            r = measure("edgeseq-long", model)
            r["marks"] = {str(k): v for k, v in r["marks"].items()}
            results["long"][model] = r
            log(f"long {model}: " + ", ".join(f"{k}: {v['VmRSS'] / MIB:.1f} MiB" for k, v in r["marks"].items())
                + f"  {r['decode_tps']:.1f} tok/s  foreign {100 * r['decode_foreign_load']:.0f}%")
            save()
    done = 0
    for rnd in range(args.rounds):
        if rnd and time.perf_counter() > deadline:
            log(f"time budget ({args.budget_min} min) spent: stopping after {rnd} rounds")
            break
        k = rnd % len(args.systems)
        order = args.systems[k:] + args.systems[:k]
        for model in args.models:
            for system in order:
                r = measure(system, model)
                results["runs"][model][system].append(r)
                log(f"round {rnd + 1} {model:11s} {system:8s} decode {r['decode_tps']:6.1f} "
                    f"({r['decode_tps_median_step']:6.1f}) tok/s  prefill {r['prefill_tps']:7.1f} tok/s  peak RSS "
                    f"{r['VmHWM'] / MIB:5.0f} MiB  PSS {r['Pss'] / MIB:5.0f}  load {r['load_s']:.1f} s  foreign "
                    f"{100 * r['decode_foreign_load']:3.0f}%/{100 * r['prefill_foreign_load']:3.0f}%  "
                    f"distinct {r['distinct_tokens']}")
                save()
        done = rnd + 1
    results["rounds"] = done
    results["total_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    save()
    print(report(results))


if __name__ == "__main__":
    main()
