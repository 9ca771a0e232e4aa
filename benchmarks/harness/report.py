"""Medians with their spread, the results table, and `compare` (the ratio of two systems' medians).

Rounds: a round of a cell (model, quant, threads) is contended when the canary flagged any of its
measurements; contended rounds are left out of the medians as long as at least `min_clean` clean rounds
remain (else every round counts and the table says so). Errors are left out always.
"""
from __future__ import annotations

import random
import statistics

from harness.proc import MIB

METRICS = {  # key: (column, how to read it from a run, format)
    "decode_tps": ("decode tok/s", lambda r: r.get("decode_tps"), "{:.1f}"),
    "decode_tps_step": ("1/median step", lambda r: r.get("decode_tps_step"), "{:.1f}"),
    "prefill_tps": ("prefill tok/s", lambda r: r.get("prefill_tps"), "{:.0f}"),
    "decode_cpu_tps": ("decode tok/CPU-s", lambda r: r.get("decode_cpu_tps"), "{:.1f}"),
    "prefill_cpu_tps": ("prefill tok/CPU-s", lambda r: r.get("prefill_cpu_tps"), "{:.0f}"),
    "peak": ("peak RSS MiB", lambda r: r.get("peak"), "mib"),
    "rss_256_net": ("RSS@256 − imports MiB", lambda r: r["mem_256"]["rss"] - r["mem_imports"]["rss"]
                    if "mem_256" in r else None, "mib"),
    "rss_imports": ("RSS after imports MiB", lambda r: r.get("mem_imports", {}).get("rss"), "mib"),
    "pss_end": ("PSS at end MiB", lambda r: r.get("mem_end", {}).get("pss"), "mib"),
    "anon_end": ("anon at end MiB", lambda r: r.get("mem_end", {}).get("anon"), "mib"),
    "load_s": ("load s", lambda r: r.get("load_s"), "{:.2f}"),
    "rss_load": ("RSS after load MiB", lambda r: r.get("mem_load", {}).get("rss"), "mib"),
    "rss_256": ("RSS@256 MiB", lambda r: r.get("mem_256", {}).get("rss"), "mib"),
    "state": ("state MiB", lambda r: r.get("state_bytes"), "{:.2f}"),
}
TABLE = ("decode_tps", "decode_tps_step", "prefill_tps", "decode_cpu_tps", "prefill_cpu_tps", "peak", "rss_256_net",
         "load_s")


def fmt(v, how) -> str:
    if v is None:
        return "–"
    return f"{v / MIB:.0f}" if how == "mib" else how.format(v)


def cells(results: dict) -> dict:
    out: dict = {}
    for r in results["runs"]:
        out.setdefault((r["model"], r["quant"], r["threads"]), {}).setdefault(r["system"], []).append(r)
    return out


def rounds_used(by_system: dict, min_clean: int) -> tuple[set, set, bool]:
    """(rounds used, contended rounds, whether contended rounds had to be used)."""
    rounds = {r["round"] for runs in by_system.values() for r in runs}
    bad = {r["round"] for runs in by_system.values() for r in runs if r.get("contended")}
    clean = rounds - bad
    return (clean, bad, False) if len(clean) >= min(min_clean, len(rounds)) and clean else (rounds, bad, bool(bad))


def stats(vals: list) -> dict | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(results: dict, min_clean: int) -> list[dict]:
    rows = []
    for (model, quant, threads), by_sys in cells(results).items():
        used, bad, forced = rounds_used(by_sys, min_clean)
        for system, runs in by_sys.items():
            ok = [r for r in runs if r["round"] in used and "error" not in r]
            row = {"model": model, "quant": quant, "threads": threads, "system": system, "rounds": len(runs),
                   "used": len(ok), "contended_rounds": len(bad), "contended_used": forced,
                   "errors": sum("error" in r for r in runs)}
            for k, (_, get, _) in METRICS.items():
                row[k] = stats([get(r) for r in ok])
            marks = sorted({m for r in ok for m in r.get("at", {})}, key=int)
            row["at"] = {m: {"decode_tps": stats([r["at"][m]["decode_tps"] for r in ok if m in r.get("at", {})]),
                             "rss": stats([r["at"][m]["mem"]["rss"] for r in ok if m in r.get("at", {})])}
                         for m in marks}
            rows.append(row)
    return rows


def table(results: dict) -> str:
    cfg = results["config"]
    out = []
    by_cell: dict = {}
    for row in results["summary"]:
        by_cell.setdefault((row["model"], row["quant"], row["threads"]), []).append(row)
    for (model, quant, threads), rows in by_cell.items():
        fam = results["models"].get(model, {}).get("family", "?")
        r0 = rows[0]
        note = (f"{r0['contended_rounds']} of {r0['rounds']} rounds contended"
                + (", too few clean rounds: all used" if r0["contended_used"] else ", left out" if r0["contended_rounds"]
                   else ""))
        out.append(f"### {model} ({fam}), {quant}, {threads} thread{'s' * (threads > 1)}: medians [min–max] "
                   f"of {r0['rounds']} interleaved rounds; {note}")
        out.append("")
        marks = sorted({m for r in rows for m in r["at"]}, key=int)
        head = [METRICS[k][0].replace("prefill", f"prefill {cfg['prefill']}", 1) for k in TABLE]
        head += [f"decode at {m} | RSS at {m} MiB" for m in marks]
        out.append("| system | " + " | ".join(head) + " | runs used |")
        out.append("|---|" + "---|" * (len(TABLE) + 2 * len(marks) + 1))
        for r in rows:
            cols = []
            for k in TABLE:
                s, how = r[k], METRICS[k][2]
                if s is None:
                    cols.append("–")
                elif k in ("decode_tps", "prefill_tps", "decode_tps_step", "decode_cpu_tps", "prefill_cpu_tps"):
                    cols.append(f"{fmt(s['median'], how)} [{fmt(s['min'], how)}–{fmt(s['max'], how)}]")
                else:
                    cols.append(fmt(s["median"], how))
            for m in marks:
                a = r["at"].get(m, {})
                cols.append(fmt((a.get("decode_tps") or {}).get("median"), "{:.1f}"))
                cols.append(fmt((a.get("rss") or {}).get("median"), "mib"))
            err = f", {r['errors']} failed" if r["errors"] else ""
            out.append(f"| {r['system']} | " + " | ".join(cols) + f" | {r['used']}/{r['rounds']}{err} |")
        out.append("")
    for s in results.get("skipped", []):
        out.append(f"- skipped {s['system']} on {s['model']} {s['quant']}: {s['reason']}")
    for e in results.get("errors", []):
        out.append(f"- FAILED {e['system']} on {e['model']} {e['quant']} ({e['stage']}): {e['error'][-300:]}")
    return "\n".join(out)


def memory_table(results: dict) -> str:
    """What memory_table.py printed: per model, quant and system, what a device must hold (medians)."""
    out = ["| model | quant | system | artifact MiB | state MiB | RSS after imports | after load | peak RSS | "
           "RSS@256 | anon at end | PSS at end | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        art = results["artifacts"].get(r["model"], {}).get(r["quant"], {}).get(r["system"], {})

        def med(k, how="mib"):
            return fmt(r[k]["median"], how) if r.get(k) else "–"

        state = f"{r['state']['median'] / MIB:.2f}" if r.get("state") else "–"
        size = f"{art['bytes'] / MIB:.1f}" if "bytes" in art else "–"
        out.append(f"| {r['model']} | {r['quant']} | {r['system']} | {size} | {state} | {med('rss_imports')} | "
                   f"{med('rss_load')} | {med('peak')} | {med('rss_256')} | {med('anon_end')} | {med('pss_end')} | "
                   f"{med('decode_tps', '{:.1f}')} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------
COMPARED = ("decode_tps", "prefill_tps", "decode_cpu_tps", "prefill_cpu_tps", "peak")


def _boot(a: list, b: list, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 90 % bootstrap interval of median(b) / median(a) (runs of different files are not paired)."""
    rng = random.Random(seed)
    rs = sorted(statistics.median(rng.choices(b, k=len(b))) / statistics.median(rng.choices(a, k=len(a)))
                for _ in range(n))
    return rs[int(0.05 * n)], rs[int(0.95 * n) - 1]


def compare(a: dict, b: dict, pairs: list[tuple[str, str]], min_clean: int, speed_tol: float = 0.05,
            rss_tol: float = 0.02, models=None) -> tuple[str, list[dict]]:
    """Per cell and pair (system in a -> system in b): median(b) / median(a) of decode and prefill tok/s
    and peak RSS. Spread: within one file, the min–max of the per-round ratios (the two systems ran
    side by side in each round); across two files, a 90 % bootstrap interval."""
    same = a is b
    ca, cb = cells(a), cells(b)
    lines = ["| model | family | quant | threads | before → after | decode | prefill | decode per CPU-s | "
             "prefill per CPU-s | peak RSS | rounds used (contended) | within: wall, CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for cell in ca:
        if cell not in cb or (models and cell[0] not in models):
            continue
        for sa, sb in pairs:
            ra, rb = ca[cell].get(sa), cb[cell].get(sb)
            if not ra or not rb:
                continue
            if same:
                used, bad, _ = rounds_used({sa: ra, sb: rb}, min_clean)
                ua, ub = used, used
                nbad = len(bad)
            else:
                ua, bada, _ = rounds_used(ca[cell], min_clean)
                ub, badb, _ = rounds_used(cb[cell], min_clean)
                nbad = len(bada) + len(badb)
            ra = [r for r in ra if r["round"] in ua and "error" not in r]
            rb = [r for r in rb if r["round"] in ub and "error" not in r]
            if not ra or not rb:
                continue
            row = {"model": cell[0], "quant": cell[1], "threads": cell[2], "before": sa, "after": sb,
                   "rounds": (len(ra), len(rb)), "contended_rounds": nbad}
            cols, ok = [], {"wall": True, "cpu": True}
            for k in COMPARED:
                get = METRICS[k][1]
                va, vb = [get(r) for r in ra], [get(r) for r in rb]
                if None in va or None in vb:
                    cols.append("–")
                    ok["cpu" if "cpu" in k else "wall"] = None
                    continue
                ratio = statistics.median(vb) / statistics.median(va)
                if same:
                    by_round = {r["round"]: get(r) for r in ra}
                    per = [get(r) / by_round[r["round"]] for r in rb if r["round"] in by_round]
                    lo, hi = min(per), max(per)
                else:
                    lo, hi = _boot(va, vb)
                tol = rss_tol if k == "peak" else speed_tol
                for kind in ("wall", "cpu"):
                    if (k == "peak" or ("cpu" in k) == (kind == "cpu")) and ok[kind] is not None:
                        ok[kind] = ok[kind] and abs(ratio - 1) <= tol
                row[k] = {"ratio": ratio, "lo": lo, "hi": hi}
                cols.append(f"{ratio:.3f}× [{lo:.2f}–{hi:.2f}]")
            row["within"] = ok
            rows.append(row)
            fam = a["models"].get(cell[0], {}).get("family", "?")
            word = {True: "yes", False: "NO", None: "–"}
            lines.append(f"| {cell[0]} | {fam} | {cell[1]} | {cell[2]} | {sa} → {sb} | " + " | ".join(cols)
                         + f" | {len(ra)}/{len(rb)} ({nbad}) | {word[ok['wall']]}, {word[ok['cpu']]} |")
    head = (f"Ratios after / before of medians; spread: {'min–max of the per-round ratios' if same else '90 % bootstrap'}"
            f"; within: decode and prefill within ±{speed_tol:.0%} and peak RSS within ±{rss_tol:.0%}, by tokens per "
            "second (wall) and by tokens per CPU-second (CPU: less moved by a busy machine; see canary.py).")
    return head + "\n\n" + "\n".join(lines), rows


def default_pairs(a: dict, b: dict) -> list[tuple[str, str]]:
    """One file: each `X@LABEL` system against `X`. Two files: every system present in both."""
    la = {r["system"] for r in a["runs"]}
    lb = {r["system"] for r in b["runs"]}
    if a is b:
        return sorted((s, s.split("@")[0]) for s in la if "@" in s and s.split("@")[0] in la)
    return sorted((s, s) for s in la & lb)
