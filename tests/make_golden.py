"""Write the golden exports of tests/data/golden/: one tiny bundle per family and layout, exported by the
code of the day, with a state file and the logits it gave, so that tests/test_golden_exports.py can prove
that bundles and state files exported before a change still load and give the same logits after it, and
that a new export keeps the names of every graph's weights, inputs and outputs (issue 14).

    .venv/bin/python -P tests/make_golden.py                 # every case not recorded yet
    .venv/bin/python -P tests/make_golden.py --force mamba    # rewrite a recorded case (on purpose only)

Not a test (pytest does not collect it); the test imports its cases and drivers. Each case's checkpoint
comes from the builders the family tests use (conftest.py, rwkv_builders.py, the family test files),
seeded, so the test can rebuild it bit for bit. Per case, tests/data/golden/<case>/ holds:

    bundle/        the bundle as exported (edgeseq.json, *.onnx, weights.bin)
    prompt.state   session.save_state after prefill(IDS[:PROMPT])
    expected.json  per graph: its weight initializers (sorted), inputs and outputs; the logits (float32,
                   written as the shortest decimal that reads back to the same float32) of IDS through
                   the session (steps, prefill then steps, logits_all), through the step graph driven by
                   plain onnxruntime, and of the step after load_state(prompt.state)

Record only new cases (a new family or layout); rewrite a recorded one only on purpose: the point of
the files is that the code of before wrote them. Recorded from commit 25078f8 (before issue 14's
refactor), each case's logits bit-identical over two runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # run as a script with -P: the builders live beside this file
    sys.path.insert(0, str(TESTS))

GOLDEN = TESTS / "data" / "golden"
IDS = [5, 42, 0, 63, 17, 31, 8, 50]  # fed to every case; all below the smallest vocab (64)
PROMPT = 5  # prefill(IDS[:PROMPT]), then steps; the state file is saved at this position
VOCAB = 64  # byte-level tokenizer (bytes below 64 only): small embeddings and logits
MAX_CONTEXT = 12  # the KV ring of Zamba / Zamba2 sessions (the manifest's default, 4096, would make MB state files)


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    build: Callable[[Path], Path]  # (empty work folder) -> checkpoint path; deterministic
    portable: bool = False
    quant: str = "f32"
    load: dict = field(default_factory=dict)  # edgeseq.load options

    def export_kwargs(self) -> dict:
        return {"portable": self.portable, "quant": self.quant}


# -- builders: the family tests' own, small shapes ------------------------------------------------

def _mamba(d: Path) -> Path:
    from conftest import make_mamba

    return make_mamba(d / "hf", seed=21, vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                      expand=2, conv_kernel=4, time_step_rank=2)


def _falcon_mamba(d: Path) -> Path:
    from conftest import make_falcon_mamba

    return make_falcon_mamba(d / "hf", seed=22, vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                             expand=2, conv_kernel=3, time_step_rank=2, tie_word_embeddings=False)


def _mamba2(d: Path) -> Path:
    from conftest import make_mamba2

    return make_mamba2(d / "hf", seed=23, vocab_size=VOCAB, hidden_size=16, expand=2, num_heads=4, head_dim=8,
                       n_groups=2, state_size=8, conv_kernel=4, num_hidden_layers=2, chunk_size=16)


def _rwkv4(d: Path) -> Path:
    """test_rwkv4's Hugging Face RwkvForCausalLM (vocab 301 with its BPE tokenizer.json): the fixture's
    own function, given a folder factory."""
    import test_rwkv4

    class Factory:
        def mktemp(self, name):
            p = d / name
            p.mkdir(parents=True)
            return p

    folder, _ids, _ref = test_rwkv4.hf_case.__wrapped__(Factory())
    return folder / "hf"


def _rwkv(version: str, cfg: dict, seed: int):
    def build(d: Path) -> Path:
        from rwkv_builders import RwkvCase

        return RwkvCase(f"golden-{seed}", version, {**cfg, "vocab": VOCAB}, d, seed=seed).pth

    return build


def _zamba(d: Path) -> Path:
    import test_zamba

    return test_zamba.make_zamba(d / "hf", seed=24, **{**test_zamba.CONFIGS["2heads"], "vocab_size": VOCAB,
                                                       "hidden_size": 16, "intermediate_size": 32})


def _zamba2(d: Path) -> Path:
    import test_zamba2

    return test_zamba2.make_zamba2(d / "hf", seed=25, **{**test_zamba2.CONFIGS["1block-adapters-rope"],
                                                         "vocab_size": VOCAB, "hidden_size": 16,
                                                         "intermediate_size": 32})


def _recurrent_gemma(d: Path) -> Path:
    import test_recurrent_gemma

    return test_recurrent_gemma.make_recurrent_gemma(d / "hf", seed=26, **{
        **test_recurrent_gemma.CONFIGS["gqa-cap4"], "vocab_size": VOCAB, "hidden_size": 16, "lru_width": 16,
        "intermediate_size": 32, "attention_window_size": 4})  # a window of 4: IDS wrap the ring


def _qwen35(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_qwen35)
    import family_qwen35

    return family_qwen35.make_qwen35(d / "hf", seed=27, **{**family_qwen35.CONFIGS["3to1-gva2-untied"],
                                                           "vocab_size": VOCAB, "hidden_size": 16,
                                                           "intermediate_size": 32})


def _lfm2(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_lfm2)
    import family_lfm2

    return family_lfm2.make_lfm2(d / "hf", seed=28, **{**family_lfm2.CONFIGS["gqa2-tied"], "vocab_size": VOCAB,
                                                       "hidden_size": 16, "intermediate_size": 48})


def _lfm2_moe(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_lfm2)
    import family_lfm2

    return family_lfm2.make_lfm2(d / "hf", seed=29, **{**family_lfm2.MOE_CONFIGS["moe-top2-of-4"],
                                                       "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32})


def _lfm3(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_lfm3)
    import family_lfm3

    return family_lfm3.make_lfm3(d / "hf", seed=30, **{**family_lfm3.CONFIGS["swa7-gqa2-tied"], "vocab_size": VOCAB,
                                                       "hidden_size": 16, "head_dim": 8, "intermediate_size": 32,
                                                       "sliding_window": 3})


def _jamba(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_jamba)
    import family_jamba

    cfg = {k: v for k, v in family_jamba.CONFIGS["moe-top2-of-4-tied"].items() if k != "seed"}
    return family_jamba.make_jamba(d / "hf", seed=34, **{**cfg, "vocab_size": VOCAB, "hidden_size": 16,
                                                         "intermediate_size": 32})


def _granite_hybrid(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_granite_hybrid)
    import family_granite_hybrid

    kind, cfg = family_granite_hybrid.CONFIGS["moe-top2-of-4-untied"]
    cfg = {k: v for k, v in cfg.items() if k != "seed"}
    return family_granite_hybrid.make_granite(d / "hf", kind, seed=35, **{
        **cfg, "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 8, "shared_intermediate_size": 24,
        "mamba_n_heads": 4, "mamba_d_head": 8})


def _nemotron_h(pattern: str, seed: int):
    def build(d: Path) -> Path:
        import families  # noqa: F401  (first: it imports family_nemotron_h)
        import family_nemotron_h

        cfg = {k: v for k, v in family_nemotron_h.CONFIGS["ME*EME-moe-untied"].items() if k != "seed"}
        return family_nemotron_h.make_nemotron_h(d / "hf", seed=seed, **{
            **cfg, "hybrid_override_pattern": pattern, "vocab_size": VOCAB, "hidden_size": 16,
            "intermediate_size": 32, "mamba_num_heads": 4})
    return build


def _falcon_h1(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_falcon_h1)
    import family_falcon_h1

    cfg = {k: v for k, v in family_falcon_h1.CONFIGS["mup-gqa-groups2"].items() if k != "seed"}
    return family_falcon_h1.make_falcon_h1(d / "hf", seed=37, **{
        **cfg, "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8})


def _qwen35_moe(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_qwen35_moe)
    import family_qwen35_moe

    return family_qwen35_moe.make_qwen35_moe(d / "hf", seed=40, **{
        **family_qwen35_moe.CONFIGS["top2-of-4-tied"], "vocab_size": VOCAB, "hidden_size": 16})


def _qwen3_next(d: Path) -> Path:
    import families  # noqa: F401  (first: it imports family_qwen35_moe)
    import family_qwen35_moe

    return family_qwen35_moe.make_qwen3_next(d / "hf", seed=41, **{
        **family_qwen35_moe.NEXT_CONFIGS["top2-of-6-untied-dense1"], "vocab_size": VOCAB, "hidden_size": 16,
        "intermediate_size": 32})


_RWKV5 = _rwkv("5.2", dict(C=16, L=2, H=2, F=32), seed=31)
_RWKV6 = _rwkv("6.0", dict(C=16, L=2, H=2, F=32, D_MIX=4, D_DECAY=4), seed=32)
_RWKV7 = _rwkv("7", dict(C=16, L=2, H=2, F=32, D_W=4, D_A=4, D_V=4, D_G=4), seed=33)
_RING = {"max_context": MAX_CONTEXT}

CASES = {c.name: c for c in [
    Case("mamba", "mamba", _mamba),
    Case("falcon-mamba", "mamba", _falcon_mamba),
    Case("mamba2", "mamba2", _mamba2),
    Case("mamba2-portable", "mamba2", _mamba2, portable=True),
    Case("mamba2-int4", "mamba2", _mamba2, quant="int4"),
    Case("rwkv4", "rwkv4", _rwkv4),
    Case("rwkv5", "rwkv5", _RWKV5),
    Case("rwkv6", "rwkv6", _RWKV6),
    Case("rwkv6-portable", "rwkv6", _RWKV6, portable=True),
    Case("rwkv6-int4", "rwkv6", _RWKV6, quant="int4"),
    Case("rwkv7", "rwkv7", _RWKV7),
    Case("zamba", "zamba", _zamba, load=_RING),
    Case("zamba2", "zamba2", _zamba2, load=_RING),
    Case("recurrent_gemma", "recurrent_gemma", _recurrent_gemma),
    Case("recurrent_gemma-portable", "recurrent_gemma", _recurrent_gemma, portable=True),
    Case("recurrent_gemma-int4", "recurrent_gemma", _recurrent_gemma, quant="int4"),
    Case("qwen35", "qwen35", _qwen35, load=_RING),
    Case("lfm2", "lfm2", _lfm2, load=_RING),
    Case("lfm2_moe", "lfm2_moe", _lfm2_moe, load=_RING),
    Case("lfm3", "lfm3", _lfm3, load=_RING),  # sliding rings of 3 (IDS wrap them), a full ring of 12
    Case("jamba", "jamba", _jamba, load=_RING),  # Mamba-1 with dt/B/C norms, attention and experts on layers 1, 3
    # Granite-4.0-H: Mamba-2, RoPE attention on layer 1, softmax top-2-of-4 experts beside a shared MLP, multipliers
    Case("granite_hybrid", "granite_hybrid", _granite_hybrid, load=_RING),
    # Nemotron-H: Mamba-2, attention without RoPE, squared-ReLU MLP; with sigmoid experts beside a shared
    # expert in place of the MLP (the family nemotron_h_moe)
    Case("nemotron_h", "nemotron_h", _nemotron_h("M*-M", 36), load=_RING),
    Case("nemotron_h_moe", "nemotron_h_moe", _nemotron_h("ME*E", 38), load=_RING),
    # Falcon-H1: attention (RoPE, GQA) and Mamba-2 (2 groups) in every layer, every μP multiplier folded in
    Case("falcon_h1", "falcon_h1", _falcon_h1, load=_RING),
    # Qwen3.5-MoE: Qwen3.5's layers with softmax top-2-of-4 experts beside a gated shared expert
    Case("qwen35_moe", "qwen35_moe", _qwen35_moe, load=_RING),
    # Qwen3-Next: fused in_proj_qkvz / in_proj_ba, top-2-of-6 experts, layer 1 a dense MLP
    Case("qwen3_next", "qwen3_next", _qwen3_next, load=_RING),
]}


# -- what a bundle is and gives ------------------------------------------------------------------

def graph_names(bundle: Path) -> dict:
    """Per graph kind: the initializers stored in weights.bin (sorted), the inputs and the outputs (in
    order). Inline constants (`const_<n>`, numbered by a counter in build order) are not part of the
    contract: nothing outside a graph refers to them, and a rewrite of the graph code renumbers them."""
    import onnx

    manifest = json.loads((bundle / "edgeseq.json").read_text())
    out = {}
    for kind, g in manifest["graphs"].items():
        m = onnx.load(str(bundle / g["file"]), load_external_data=False)
        weights = sorted(t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        out[kind] = {"file": g["file"], "initializers": weights, "inputs": [i.name for i in m.graph.input],
                     "outputs": [o.name for o in m.graph.output]}
    return out


def plain_step_graph(bundle: Path, ids, max_context: int | None = None) -> np.ndarray:
    """The step graph alone (sessions decode through the prefill graph), as an app drives it: plain
    onnxruntime, names and state shapes from the manifest, the state fed back by hand, the position fed
    where the graph takes one. Logits (t, vocab)."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "edgeseq.json").read_text())
    g = manifest["graphs"]["step"]
    dims = {"batch": 1, "max_context": max_context or manifest.get("max_context")}
    state = {s["name"]: np.full([dims.get(d, d) for d in s["shape"]], s["init"], np.float32)
             for s in manifest["state"]}
    sess = ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
    takes_position = "position" in [i.name for i in sess.get_inputs()]
    out = []
    for p, t in enumerate(ids):
        feeds = {"input_ids": np.array([[t]], np.int64), **state}
        if takes_position:
            feeds["position"] = np.array([p], np.int64)
        res = sess.run(g["outputs"], feeds)
        out.append(res[0][0])
        state = {s["name"]: r for s, r in zip(manifest["state"], res[1:])}
    return np.stack(out)


def session_logits(bundle: Path, load: dict, state_file: Path, save: bool) -> dict[str, np.ndarray]:
    """The logits of IDS through every path a session and an app take: `steps` (session.step),
    `prefill` and `prefill_then_steps` (session.prefill(IDS[:PROMPT]), then steps), `logits_all`,
    `step_graph` (plain onnxruntime) and `after_load_state` (the next step after load_state(state_file),
    in a session with another history). `save`: first write the prompt's state to `state_file`."""
    import edgeseq

    model = edgeseq.load(str(bundle), **load)
    s = model.session()
    steps = np.stack([s.step(t) for t in IDS])
    s = model.session()
    prefill = s.prefill(IDS[:PROMPT])
    out = {"steps": steps, "prefill": prefill}
    if save:
        s.save_state(str(state_file))
    out["prefill_then_steps"] = np.stack([s.step(t) for t in IDS[PROMPT:]])
    out["logits_all"] = model.session().logits_all(IDS)
    out["step_graph"] = plain_step_graph(bundle, IDS, load.get("max_context"))
    t = model.session()
    t.prefill(IDS[PROMPT + 1:])  # some other history, replaced by the file's
    t.load_state(str(state_file))
    assert t.position == PROMPT
    out["after_load_state"] = t.step(IDS[PROMPT])
    return out


def platform_key() -> dict:
    """What decides the float32 rounding of a given graph: onnxruntime's version and the CPU's kernels."""
    import onnxruntime as ort

    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = next((x for x in ("avx512f", "avx2", "asimd") if x in flags), "other")
    return {"onnxruntime": ort.__version__, "machine": platform.machine(), "isa": isa}


def _floats(a: np.ndarray) -> list:
    """float32 values as the shortest decimals that read back to the same float32 (checked)."""
    a = np.asarray(a, np.float32)
    if a.ndim > 1:
        return [_floats(r) for r in a]
    out = [float(str(x)) for x in a]  # str of a numpy float32: its shortest round-trip decimal
    assert np.array_equal(np.asarray(out, np.float32), a)
    return out


def to_json_logits(logits: dict[str, np.ndarray]) -> dict:
    return {k: _floats(v) for k, v in logits.items()}


def from_json_logits(d: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in d.items()}


def dump_json(obj) -> str:
    """Indented JSON with each row of logits on one line."""
    rows: list[str] = []

    def lift(x):
        if isinstance(x, dict):
            return {k: lift(v) for k, v in x.items()}
        if isinstance(x, list) and x and all(isinstance(v, float) for v in x):
            rows.append(json.dumps(x, separators=(",", ":")))
            return f"@row{len(rows) - 1}@"
        return [lift(v) for v in x] if isinstance(x, list) else x

    text = json.dumps(lift(obj), indent=1)
    return re.sub(r'"@row(\d+)@"', lambda m: rows[int(m.group(1))], text) + "\n"


def checkpoint_digest(ckpt: Path) -> str:
    """sha256 over the checkpoint's tensors (name, dtype, shape, bytes; *.safetensors of a folder or a
    .pth file), read by safetensors / torch, not by edgeseq: it tells a changed builder from a changed
    exporter."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    if ckpt.is_dir():
        for f in sorted(ckpt.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
    else:
        tensors = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    assert tensors, ckpt
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_and_export(case: Case, work: Path, out: Path) -> tuple[Path, Path]:
    """Build the case's checkpoint in `work` (emptied first) and export it to `out`: (checkpoint, out)."""
    from edgeseq.exporters.export import export

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = case.build(work)
    export(str(ckpt), str(out), **case.export_kwargs())
    return ckpt, out


def write_case(case: Case) -> dict:
    dest = GOLDEN / case.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    # a fixed checkpoint folder: the manifest records the checkpoint's path
    work = Path(tempfile.gettempdir()) / "edgeseq-golden" / case.name
    ckpt, bundle = build_and_export(case, work, dest / "bundle")
    state_file = dest / "prompt.state"
    logits = session_logits(bundle, case.load, state_file, save=True)
    manifest = json.loads((bundle / "edgeseq.json").read_text())
    assert manifest["family"] == case.family, (case.name, manifest["family"])
    for k, v in logits.items():
        assert np.isfinite(v).all(), (case.name, k)
    assert np.asarray(logits["steps"]).std() > 0.1, case.name  # not degenerate
    expected = {
        "case": case.name,
        "family": case.family,
        "export": case.export_kwargs(),
        "load": case.load,
        "ids": IDS,
        "prompt": PROMPT,
        "checkpoint_sha256": checkpoint_digest(ckpt),
        "recorded_on": platform_key(),
        "graphs": graph_names(bundle),
        "logits": to_json_logits(logits),
    }
    (dest / "expected.json").write_text(dump_json(expected))
    shutil.rmtree(work, ignore_errors=True)
    return expected


def main(args: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    force = "--force" in args
    names = [a for a in args if a != "--force"]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    for name in names or list(CASES):
        if (GOLDEN / name / "expected.json").exists() and not force:
            # the files prove compatibility only if the code of before wrote them
            print(f"{name:26s} kept (recorded already; --force rewrites it)")
            continue
        e = write_case(CASES[name])
        size = sum(f.stat().st_size for f in (GOLDEN / name).rglob("*") if f.is_file())
        print(f"{name:26s} {e['family']:16s} {size / 1024:7.1f} KiB  graphs {', '.join(e['graphs'])}")
    total = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    print(f"tests/data/golden: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
