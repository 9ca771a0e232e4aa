"""x86-64 side of `make pi-check` (tests/pi/pi-check.sh): build what the emulated aarch64 system runs, and
judge what it sends back. Runs with the x86 venv (.venv/bin/python -P), which has torch for the tiny
random checkpoints; nothing here runs inside the emulator.

    pi_host.py logits-prep WORK      tiny random checkpoint per family -> f32/int8/int4 bundles, x86 logits
    pi_host.py mem-prep WORK         mamba-130m- and RWKV-7 0.1B-shaped int8/int4 bundles (random weights at
                                     real shapes), the demo RWKV-7 int8 bundle; peak RSS of each on x86
    pi_host.py report WORK CPU...    logits table (aarch64 vs x86), memory table; exit 1 when a check fails

WORK is shared with the guest (bind-mounted at /pi/work there). Every bundle is exported here, on x86,
and loaded there: the comparison isolates what ONNX Runtime's aarch64 build computes differently.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import pi_common as C  # noqa: E402

MIB = 2 ** 20
F32_TOL = 1e-4  # the suite's tolerance for f32 logits (tests/conftest.py TOL)


def source_digest() -> str:
    """What the exported bundles depend on: the exporter, quantizer, graph kernels and package sources.
    Cached bundles are rebuilt when it changes."""
    h = hashlib.sha256()
    for d in ("edgeseq", "exporters", "quant", "kernels"):
        for p in sorted((ROOT / d).rglob("*.py")):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# -- logits -----------------------------------------------------------------------------------------------

def _tests_on_path():
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("PYTHONSAFEPATH", "1")


def make_checkpoint(family: str, d: Path) -> Path:
    """One tiny random checkpoint per family, built with the test suite's own builders."""
    _tests_on_path()
    fixtures = ROOT / ".." / "shared" / "fixtures" / "rwkv-cpp-tiny"
    if family.startswith("rwkv"):  # rwkv.cpp's tiny trained models, FP32 (shared fixtures)
        name = {"rwkv4": "tiny-rwkv-4v0-660K-FP32.bin", "rwkv5": "tiny-rwkv-5v2-730K-FP32.bin",
                "rwkv6": "tiny-rwkv-6v0-1m-FP32.bin", "rwkv7": "tiny-rwkv-7v0-834K-FP32.bin"}[family]
        return fixtures / name
    import conftest
    if family == "mamba":
        return conftest.make_mamba(d / "hf", seed=11, hidden_size=64, num_hidden_layers=2, time_step_rank=4)
    if family == "mamba2":
        return conftest.make_mamba2(d / "hf", seed=11, hidden_size=64, num_heads=16)
    if family == "zamba":
        import test_zamba
        return test_zamba.make_zamba(d / "hf", seed=5, **test_zamba.CONFIGS["2heads"])
    if family == "zamba2":
        import test_zamba2
        return test_zamba2.make_zamba2(d / "hf", seed=7, **test_zamba2.CONFIGS["2blocks-gqa-dtmin"])
    if family == "recurrent_gemma":
        import test_recurrent_gemma as rg
        return rg.make_recurrent_gemma(d / "hf", seed=3, **rg.CONFIGS["mqa"])
    raise ValueError(family)


def logits_prep(work: Path) -> None:
    from edgeseq.exporters.export import export

    root = work / "logits"
    digest = source_digest()
    stamp = root / "digest"
    if not (stamp.is_file() and stamp.read_text() == digest):
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    for family in C.FAMILIES:
        fd = root / family
        ckpt = make_checkpoint(family, fd) if not (fd / "hf").exists() or family.startswith("rwkv") else fd / "hf"
        for quant in C.QUANTS:
            b = fd / quant
            if not (b / "edgeseq.json").is_file():
                export(str(ckpt), str(b), quant=quant, force=True)
        C.log(f"x86 logits: {family}")
        for quant in C.QUANTS:
            np.savez(fd / f"{quant}.x86.npz", **C.run_logits(fd / quant))
    stamp.write_text(digest)


# -- memory -----------------------------------------------------------------------------------------------

def mem_prep(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_table as mt
    from edgeseq.exporters.export import export

    root = work / "memory"
    digest = source_digest()
    stamp = root / "digest"
    if not (stamp.is_file() and stamp.read_text() == digest):
        for p in root.glob("*/bundle-*"):
            shutil.rmtree(p)
        for p in root.glob("demo-*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for name in C.MEM_MODELS:
        d = root / name
        d.mkdir(exist_ok=True)
        ckpt, tok = mt.checkpoint(name, str(d))
        for q in ("int8", "int4"):
            b = d / f"bundle-{q}"
            if not (b / "edgeseq.json").is_file():
                C.log(f"export {name} {q}")
                export(ckpt, str(b), quant=q, tokenizer=tok, force=True)
            bundles[f"{name} {q}"] = b
    b = root / "demo-rwkv7-int8"  # what `make demo` exports, exported here too (its bytes are compared)
    if not (b / "edgeseq.json").is_file():
        export(str(ROOT / "edgeseq" / "demo" / "rwkv7"), str(b), quant="int8", force=True)
    bundles["demo rwkv7 int8"] = b
    g = root / "demo-rwkv7-q8_0.gguf"
    if not g.is_file():
        subprocess.run([sys.executable, "-P", "-m", "edgeseq.cli", "export", str(ROOT / "edgeseq" / "demo" / "rwkv7"),
                        "-o", str(g), "--format", "gguf", "--quant", "q8_0"], check=True, capture_output=True)
    bundles["demo rwkv7 q8_0 GGUF"] = g
    stamp.write_text(digest)
    rows = {}
    for label, b in bundles.items():
        C.log(f"x86 peak RSS: {label}")
        r = C.fresh(str(b), str(root / f"{label.replace(' ', '_')}.x86.npz"))
        rows[label] = {**r, "bundle": str(b.relative_to(work)),
                       "bundle_bytes": b.stat().st_size if b.is_file() else sum(f.stat().st_size for f in b.iterdir())}
    (root / "x86.json").write_text(json.dumps(rows, indent=1))


# -- report -----------------------------------------------------------------------------------------------

def logits_table(work: Path, cpus: list[str]) -> tuple[list[str], list[str], dict]:
    """Markdown rows and failures. Per family and quant: max |logit difference| of the aarch64 run from the
    x86 run over every position (steps, prefill_all, prefill's last), relative to the largest |logit|; for
    int8/int4 the quantization's own error (the int bundle against the f32 bundle's x86 logits) on x86 and
    on each aarch64 CPU, for scale; and how often the greedy choice agrees with x86's."""
    keys = ("steps", "prefill_all", "prefill_last")
    lines, failures, data = [], [], {}
    head = "| family | quant | " + " | ".join(f"{c} vs x86: max abs (rel)" for c in cpus) + \
           " | int error vs f32: x86 / " + " / ".join(cpus) + " | greedy agrees " + " / ".join(cpus) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    diff = lambda a, b: max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in keys)  # noqa: E731
    for family in C.FAMILIES:
        fd = work / "logits" / family
        f32 = dict(np.load(fd / "f32.x86.npz"))
        for quant in C.QUANTS:
            x86 = dict(np.load(fd / f"{quant}.x86.npz"))
            scale = max(float(np.abs(x86[k]).max()) for k in keys)
            cells, agree, qerr = [], [], [diff(x86, f32)]
            for cpu in cpus:
                p = fd / f"{quant}.arm-{cpu}.npz"
                if not p.is_file():
                    cells.append("missing")
                    failures.append(f"logits {family} {quant} {cpu}: no aarch64 result")
                    continue
                arm = dict(np.load(p))
                d = diff(arm, x86)
                am = float(np.mean(arm["steps"].argmax(-1) == x86["steps"].argmax(-1)))
                qerr.append(diff(arm, f32))
                data[f"{family} {quant} {cpu}"] = {"max_abs": d, "scale": scale, "argmax_agree": am,
                                                   "int_error_vs_f32": qerr[-1], "x86_int_error_vs_f32": qerr[0]}
                cells.append(f"{d:.1e} ({d / scale:.0e})")
                agree.append(f"{am * 100:.0f} %")
                if quant == "f32" and d > F32_TOL:
                    failures.append(f"logits {family} f32 {cpu}: max abs {d:.2e} > {F32_TOL}")
                if not all(np.isfinite(arm[k]).all() for k in keys):
                    failures.append(f"logits {family} {quant} {cpu}: non-finite")
            q = "–" if quant == "f32" else " / ".join(f"{e:.2f}" for e in qerr)
            lines.append(f"| {family} | {quant} | " + " | ".join(cells) + f" | {q} | {' / '.join(agree)} |")
    return lines, failures, data


def real_shape_logits(work: Path) -> list[str]:
    """The real-shape bundles of the memory part: the logits after the 64-token prompt, aarch64 against x86, and
    whether the 8 greedy tokens after it are the same (once one differs, the steps are fed other tokens)."""
    lines = ["| bundle | after the prompt: aarch64 vs x86, max abs | largest abs logit | 8 greedy tokens equal |",
             "|---|---|---|---|"]
    for p in sorted((work / "memory").glob("*.x86.npz")):
        label = p.name[:-len(".x86.npz")]
        for a in sorted((work / "memory").glob(f"{label}.arm-*.npz")):
            x, y = dict(np.load(p)), dict(np.load(a))
            d = float(np.abs(x["prefill_last"].astype(np.float64) - y["prefill_last"]).max())
            s = float(np.abs(x["prefill_last"]).max())
            same = bool((x["steps"].argmax(-1) == y["steps"].argmax(-1)).all())
            cpu = a.name[len(label) + len(".arm-"):-len(".npz")]
            lines.append(f"| {label.replace('_', ' ')} ({cpu}) | {d:.2e} | {s:.1f} | {'yes' if same else 'no'} |")
    return lines


def memory_table(work: Path) -> tuple[list[str], list[str]]:
    x86 = json.loads((work / "memory" / "x86.json").read_text())
    p = work / "memory" / "arm.json"
    arm = json.loads(p.read_text()) if p.is_file() else {}
    failures = [f"memory {k}: no aarch64 result" for k in x86 if k not in arm]
    lines = ["| model | bundle | x86-64 peak RSS | aarch64 (emulated) VmHWM | of which qemu at end | "
             "aarch64 peak, qemu's share taken off | runtime alone (aarch64) |",
             "|---|---|---|---|---|---|---|"]
    for k, x in x86.items():
        a = arm.get(k)
        m = lambda v: f"{v / MIB:.0f} MiB"  # noqa: E731
        if a is None:
            lines.append(f"| {k} | {m(x['bundle_bytes'])} | {m(x['peak'])} | failed | | | |")
            continue
        lines.append(f"| {k} | {m(x['bundle_bytes'])} | {m(x['peak'])} | {m(a['peak'])} | {m(a['emulator'])} | "
                     f"{m(a['peak'] - a['emulator'])} | {m(a['base'] - a['emulator_base'])} |")
    # `make demo` inside exported the same demo: its files must be the x86 export's, byte for byte
    guest_demo = Path(os.environ.get("PI_ROOTFS", "/nonexistent")) / "src" / "edgeseq" / "demo-model"
    pairs = [(work / "memory" / "demo-rwkv7-int8" / f, guest_demo / "rwkv7-int8" / f)
             for f in ("weights.bin", "step.onnx", "prefill.onnx", "prefill_all.onnx")]
    pairs.append((work / "memory" / "demo-rwkv7-q8_0.gguf", guest_demo / "rwkv7-q8_0.gguf"))
    same = [a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() for a, b in pairs]
    lines += ["", f"`make demo`'s exports inside (int8 bundle's weights and graphs, the Q8_0 GGUF) equal the x86 "
                  f"exports byte for byte: {'yes' if all(same) else 'NO'}"]
    if not all(same):
        failures.append("the demo exported on aarch64 differs from the x86 export: "
                        + ", ".join(str(b) for (a, b), ok in zip(pairs, same) if not ok))
    return lines, failures


def tests_compare(work: Path) -> int:
    """The guest's pytest outcomes against x86's for the same tests (junit XML of both runs). A test that
    passes on x86 must pass inside; one that fails on x86 too is reported, not counted against Arm."""
    import xml.etree.ElementTree as ET

    def outcomes(path: Path) -> dict:
        res = {}
        for tc in ET.parse(path).getroot().iter("testcase"):
            key = f"{tc.get('classname')}::{tc.get('name')}"
            kids = {c.tag: c for c in tc}
            if "failure" in kids or "error" in kids:
                c = kids.get("failure", kids.get("error"))
                res[key] = ("failed", (c.get("message") or "")[:160])
            elif "skipped" in kids:
                res[key] = ("skipped", (kids["skipped"].get("message") or "")[:160])
            else:
                res[key] = ("passed", "")
        return res

    xp, ap = work / "refs" / "x86.xml", work / "tests-arm.xml"
    if not ap.is_file():
        print("the guest's pytest wrote no report (see tests-arm.log)\nFAIL: no result inside")
        return 1
    x86, arm = outcomes(xp), outcomes(ap)
    count = lambda d, o: sum(1 for v in d.values() if v[0] == o)  # noqa: E731
    bad = [k for k, v in x86.items() if v[0] == "passed" and arm.get(k, ("missing",))[0] not in ("passed", "skipped")]
    for k in bad:
        print(f"FAIL inside, passes on x86: {k}: {arm.get(k, ('missing', ''))}")
    for k, v in arm.items():
        if v[0] == "skipped":
            print(f"skipped inside: {k}: {v[1]}")
    for k, v in x86.items():
        if v[0] == "failed":
            print(f"fails on x86 too (not an Arm difference): {k}: {v[1]} | inside: {arm.get(k, ('missing',))[0]}")
    print(f"{count(arm, 'passed')} passed, {count(arm, 'failed')} failed, {count(arm, 'skipped')} skipped inside; "
          f"x86: {count(x86, 'passed')} passed, {count(x86, 'failed')} failed, {count(x86, 'skipped')} skipped; "
          f"{len(bad)} pass on x86 but not inside")
    return 1 if bad else 0


def pins(freeze: Path, constraints: Path) -> int:
    """Every package pip reports in the guest is at constraints.txt's version (names as PEP 503 compares them)."""
    import re

    norm = lambda line: re.sub(r"[-_.]+", "-", line.strip().lower())  # noqa: E731
    want = {norm(l) for l in constraints.read_text().splitlines() if l.strip() and not l.startswith("#")}
    have = [norm(l) for l in freeze.read_text().splitlines() if l.strip() and not l.startswith(("#", "-e"))]
    off = [h for h in have if h not in want and not h.startswith("edgeseq")]
    for h in off:
        print(f"FAIL installed in the guest, not at constraints.txt's version: {h}")
    if any(h.startswith("torch==") for h in have):
        print("FAIL torch is installed in the guest")
        return 1
    print(f"{len(have)} packages in the guest, all at constraints.txt's versions" if not off else "")
    return 1 if off else 0


def report(work: Path, cpus: list[str], parts: list[str]) -> int:
    lt, lf, data = logits_table(work, cpus) if "logits" in parts else ([], [], {})
    mt, mf = memory_table(work) if "memory" in parts else ([], [])
    if "memory" in parts:
        mt += ["", "Logits of the real-shape bundles (prompt of 64, then 8 greedy steps):", "", *real_shape_logits(work)]
    (work / "logits.json").write_text(json.dumps(data, indent=1))
    text = "\n".join(["## logits: aarch64 (emulated) against x86-64, same bundles, same tokens", "", *lt, "",
                      "## peak RSS", "", *mt, ""])
    (work / "report.md").write_text(text)
    print(text)
    for f in lf + mf:
        print("FAIL", f)
    return 1 if lf + mf else 0


def main() -> None:
    cmd, work = sys.argv[1], Path(sys.argv[2])
    if cmd == "logits-prep":
        logits_prep(work)
    elif cmd == "mem-prep":
        mem_prep(work)
    elif cmd == "pins":
        sys.exit(pins(work / "guest-freeze.txt", ROOT / "constraints.txt"))
    elif cmd == "tests":
        sys.exit(tests_compare(work))
    elif cmd == "report":
        rest = sys.argv[3:]
        i = rest.index("--parts") if "--parts" in rest else len(rest)
        sys.exit(report(work, rest[:i], rest[i + 1:] or ["logits", "memory"]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
