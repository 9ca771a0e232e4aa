"""Shared helpers for the test suite: tiny random Hugging Face checkpoints built in temporary folders,
their float64 reference logits, a small byte-level BPE tokenizer, and exported bundles.

Every number the tests assert comes from an outside reference: transformers' own model classes.
Models are tiny (hidden 32-48, 2 layers) so the whole suite runs in a few minutes on two cores.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from pathlib import Path

import sys

import numpy as np
import pytest

# Tests import the installed edgeseq only. `python -m pytest` puts the working directory (the repository
# root) first on sys.path, where the top-level kernels/, runtime/, quant/ folders would answer imports meant
# for installed packages (transformers imports one called `kernels`); `python -P -m pytest` does not.
_ROOT = Path(__file__).resolve().parents[1]
if any(Path(p or os.getcwd()).resolve() == _ROOT for p in sys.path):
    raise pytest.UsageError(f"{_ROOT} is on sys.path, so its folders shadow installed packages: "
                            f"run `make test`, `python -P -m pytest` or `.venv/bin/pytest`, not `python -m pytest`")
os.environ["PYTHONSAFEPATH"] = "1"  # and the Python processes the tests start (`python -m edgeseq`, `-c`) likewise

import atexit
import shutil
import tempfile

# GGUF conversions and `edgeseq run CHECKPOINT` exports land in edgeseq's cache: a folder of this run's,
# never the user's ~/.cache/edgeseq (and the same for every process the tests start)
if "EDGESEQ_CACHE" not in os.environ:
    os.environ["EDGESEQ_CACHE"] = tempfile.mkdtemp(prefix="edgeseq-test-cache-")
    atexit.register(shutil.rmtree, os.environ["EDGESEQ_CACHE"], ignore_errors=True)

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

import edgeseq
from edgeseq.exporters.export import export

transformers.logging.set_verbosity_error()
# The reference models are tiny: one thread is fastest, and two OpenMP threads on a busy two-core
# machine can stall for seconds at every parallel region.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

# Shared data is read only through the relative path ../shared (beside the repository).
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CORPUS = SHARED / "corpora" / "tinyshakespeare.txt"

SEQ_LEN = 64
TOL = 1e-4  # max abs logit difference allowed in fp32 (logits here span about +-10)


def load_script(path: Path):
    """Import a script of examples/ or benchmarks/ by its path, without putting its folder on sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# tiny HF checkpoints
# ---------------------------------------------------------------------------------------------

def add_noise(model, seed: int = 0):
    """Random init of these classes is near-degenerate (the model repeats one token); add noise
    randn * 1.5 / sqrt(fan_in) to every parameter of two or more dimensions, seeded.

    Mamba-1's dt_proj gets a tenth of that: its fan-in is the dt rank (3-5 here), so the full recipe
    drives dt to ~40, the scan output to ~5e4 and the residual stream to ~1e4. Such a model is so
    ill-conditioned that float32 rounding alone (HF's own float32 forward included) moves the logits
    by ~1e-4, the tolerance the tests assert; with the smaller dt noise it moves them by ~2e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                scale = 0.15 if name.endswith("dt_proj.weight") else 1.5
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale / p.shape[-1] ** 0.5
                p.add_(noise.to(p.dtype))
    return model


def _build(cls, cfg_cls, defaults: dict, path, seed: int, tokenizer_vocab: int | None, **cfg):
    torch.manual_seed(seed)
    config = cfg_cls(**{**defaults, **cfg})
    model = add_noise(cls(config).eval(), seed)
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer_vocab:
        write_tokenizer(path / "tokenizer.json", tokenizer_vocab)
    return path


_MAMBA_DEFAULTS = dict(vocab_size=256, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)


def make_mamba(path, seed: int = 0, tokenizer_vocab: int | None = None, **cfg) -> Path:
    """A tiny random MambaForCausalLM saved with save_pretrained into `path`; returns `path`."""
    return _build(MambaForCausalLM, MambaConfig, _MAMBA_DEFAULTS, path, seed, tokenizer_vocab, **cfg)


def make_falcon_mamba(path, seed: int = 0, tokenizer_vocab: int | None = None, **cfg) -> Path:
    """A tiny random FalconMambaForCausalLM (RMS norms on dt, B, C) saved into `path`."""
    return _build(FalconMambaForCausalLM, FalconMambaConfig, _MAMBA_DEFAULTS, path, seed, tokenizer_vocab, **cfg)


def make_mamba2(path, seed: int = 0, tokenizer_vocab: int | None = None, **cfg) -> Path:
    """A tiny random Mamba2ForCausalLM saved into `path`. num_heads * head_dim must equal
    expand * hidden_size; chunk_size 16 makes HF's chunked reference cross chunk boundaries."""
    defaults = dict(vocab_size=256, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, num_heads=8,
                    head_dim=8, n_groups=1, conv_kernel=4, chunk_size=16)
    return _build(Mamba2ForCausalLM, Mamba2Config, defaults, path, seed, tokenizer_vocab, **cfg)


def load_hf(path, dtype=None):
    """Load a checkpoint written by the helpers above (HF layout) in its stored dtype."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto").eval()


def write_state_spaces(hf_path, out) -> Path:
    """Rewrite an HF Mamba / Mamba-2 checkpoint in the original state-spaces layout: config.json with
    d_model / n_layer / vocab_size / ssm_cfg (no "architectures"), tensors named backbone.embedding.*,
    lm_head.weight present even when tied (as mamba_ssm saves it), one pickled pytorch_model.bin."""
    model = load_hf(hf_path, torch.float32)
    c = model.config
    out = Path(out)
    out.mkdir(parents=True)
    if isinstance(model, Mamba2ForCausalLM):
        ssm_cfg = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                   "headdim": c.head_dim, "ngroups": c.n_groups}
    else:
        ssm_cfg = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                   "dt_rank": c.time_step_rank}
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
           "vocab_size": c.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
           "tie_embeddings": bool(c.tie_word_embeddings)}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().clone().contiguous()
          for k, v in model.state_dict().items()}
    assert "lm_head.weight" in sd and "backbone.embedding.weight" in sd
    torch.save(sd, out / "pytorch_model.bin")
    return out


def as_f64(model_or_path):
    """A float64 copy of an HF model (or the model itself when it is float64 already)."""
    model = load_hf(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    if next(model.parameters()).dtype == torch.float64:
        return model
    return copy.deepcopy(model).double().eval()


def hf_logits64(model_or_path, ids) -> np.ndarray:
    """HF's logits at every position, float64 weights and activations, full forward without cache.

    Why float64: HF's own float32 forward differs from its float64 forward by 2e-5 to 1e-4 on models
    like these, and 1e-4 is the tolerance we assert, so a float32 reference would eat the budget.
    HF's slow paths still cast a few pieces to float32 inside (A = -exp(A_log.float()), the scan
    inputs), so this is float64 as far as HF goes: measured ~1e-5 from an all-float64 run, far
    closer than HF's float32 forward."""
    m64 = as_f64(model_or_path)
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
    with torch.no_grad():
        out = m64(ids_t, use_cache=False).logits[0]
    return out.double().numpy()


def hf_cache64(model_or_path, ids):
    """HF's cache (conv and recurrent state per layer) after a float64 forward over `ids`, as numpy."""
    m64 = as_f64(model_or_path)
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
    with torch.no_grad():
        cache = m64(ids_t, use_cache=True).cache_params
    n = m64.config.num_hidden_layers
    return ([cache.get_conv_state(i).double().numpy() for i in range(n)],
            [cache.get_recurrent_state(i).double().numpy() for i in range(n)])


def random_ids(vocab: int, n: int = SEQ_LEN, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train([str(CORPUS)], trainer)
    assert tok.get_vocab_size() == vocab_size
    return tok.to_str()


def write_tokenizer(path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json with exactly `vocab_size` tokens, trained on tiny Shakespeare."""
    path = Path(path)
    path.write_text(_tokenizer_json(vocab_size))
    return path


# ---------------------------------------------------------------------------------------------
# exported bundles shared by several test files
# ---------------------------------------------------------------------------------------------

def export_bundle(ckpt, out, **kw) -> Path:
    export(str(ckpt), str(out), **kw)
    return Path(out)


class Exported:
    """A checkpoint, the ids a reference ran and its logits `ref` (t, vocab), the absolute tolerance
    edgeseq's float32 logits must meet, and the checkpoint's bundles exported on demand (cached)."""

    tol = TOL

    def __init__(self, ckpt: Path, workdir: Path, ids: list[int], ref=None, tol: float | None = None):
        self.ckpt, self.workdir, self.ids = Path(ckpt), Path(workdir), ids
        if ref is not None:
            self.ref = ref
        if tol is not None:
            self.tol = tol
        self._bundles: dict = {}
        self._models: dict = {}

    def reference(self, ids) -> np.ndarray:
        """The reference's logits of other ids (where the case keeps its reference at hand)."""
        raise NotImplementedError(f"{self.ckpt}: no reference kept for other ids")

    def tol_for(self, ref) -> float:
        """The tolerance against other reference logits `ref` (the case's own: an absolute one)."""
        return self.tol

    def bundle(self, portable: bool = False, quant: str = "f32") -> Path:
        key = (portable, quant)
        if key not in self._bundles:
            out = self.workdir / f"bundle-{'portable' if portable else 'fused'}-{quant}"
            self._bundles[key] = export_bundle(self.ckpt, out, portable=portable, quant=quant)
        return self._bundles[key]

    def model(self, portable: bool = False, quant: str = "f32"):
        key = (portable, quant)
        if key not in self._models:
            self._models[key] = edgeseq.load(self.bundle(portable, quant))
        return self._models[key]


class Built(Exported):
    """One HF checkpoint, its float64 reference logits, and its bundles exported on demand (cached)."""

    def __init__(self, ckpt: Path, workdir: Path, ids: list[int], hf_source: Path | None = None):
        super().__init__(ckpt, workdir, ids)
        self.hf = load_hf(hf_source or ckpt)  # the HF-layout twin of a state-spaces checkpoint
        # MoE models: transformers' eager experts (its default grouped_mm kernel takes no float64); no-op elsewhere
        self.hf.set_experts_implementation("eager")
        self.hf64 = as_f64(self.hf)
        self.ref = self.reference(ids)

    def reference(self, ids) -> np.ndarray:
        return hf_logits64(self.hf64, ids)

    @functools.cached_property
    def cache64(self):
        """HF's (conv states, recurrent states) after the whole sequence, float64."""
        return hf_cache64(self.hf64, self.ids)


@pytest.fixture(scope="session")
def byte_mamba(tmp_path_factory) -> Built:
    """A byte-level (vocab 256) Mamba model, exported in the fused flavour on first use."""
    d = tmp_path_factory.mktemp("byte_mamba")
    ck = make_mamba(d / "ckpt", seed=11, hidden_size=32, state_size=8, expand=2, time_step_rank=4)
    return Built(ck, d, random_ids(256, SEQ_LEN, seed=5))


@pytest.fixture(scope="session")
def other_byte_mamba(tmp_path_factory) -> Built:
    """The same shapes as `byte_mamba` with other random weights."""
    d = tmp_path_factory.mktemp("other_byte_mamba")
    ck = make_mamba(d / "ckpt", seed=12, hidden_size=32, state_size=8, expand=2, time_step_rank=4)
    return Built(ck, d, random_ids(256, SEQ_LEN, seed=5))


@pytest.fixture(scope="session")
def bpe_mamba(tmp_path_factory) -> Built:
    """A Mamba model with a 301-token byte-level BPE tokenizer.json beside it."""
    d = tmp_path_factory.mktemp("bpe_mamba")
    ck = make_mamba(d / "ckpt", seed=13, vocab_size=301, tokenizer_vocab=301, hidden_size=32, state_size=8)
    return Built(ck, d, random_ids(301, SEQ_LEN, seed=6))


# ---------------------------------------------------------------------------------------------
# the registry of family cases (tests/families.py), built once per session
# ---------------------------------------------------------------------------------------------

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The conformance suite's tests case by case (in registry order), so each case's loaded models can go
    when its checks are done."""
    idx = [i for i, item in enumerate(items) if item.path.name == "test_conformance.py"]
    if not idx:
        return
    import families

    order = {cid: n for n, cid in enumerate(families.CASES)}

    def key(i):
        case = getattr(items[i], "callspec", None) and items[i].callspec.params.get("case")
        return (order.get(getattr(case, "id", None), -1), i)

    ordered = [items[j] for j in sorted(idx, key=key)]
    for i, item in zip(idx, ordered):
        items[i] = item


@pytest.fixture(scope="session")
def family_case(tmp_path_factory):
    """family_case("mamba/falcon"): the registered case built (checkpoint, reference logits, bundles on
    demand), once per session whichever test file asks first."""
    import families

    return lambda case_id: families.built(case_id, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# helpers of the conformance suite and the family test files
# ---------------------------------------------------------------------------------------------

def step_all(session, ids) -> np.ndarray:
    """Feed `ids` one token at a time; the logits after each, stacked (t, vocab)."""
    return np.stack([session.step(int(t)) for t in ids])


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def graph_ops(bundle: Path, kind: str) -> set[tuple[str, str]]:
    """(domain, op_type) of every node of a bundle's graph, subgraphs included."""
    import onnx

    m = onnx.load(str(Path(bundle) / f"{kind}.onnx"), load_external_data=False)
    ops = set()

    def walk(g):
        for n in g.node:
            ops.add((n.domain or "", n.op_type))
            for a in n.attribute:
                if a.g is not None and a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)

    walk(m.graph)
    return ops


def steps_alone(case: Exported, portable: bool) -> np.ndarray:
    """The logits of stepping the whole sequence one token at a time (cached per flavour)."""
    cache = case.__dict__.setdefault("_steps", {})
    if portable not in cache:
        cache[portable] = step_all(case.model(portable).session(), case.ids)
    return cache[portable]


def plain_ort(case: Exported, portable: bool) -> "PlainOrt":
    """The case's bundle in plain onnxruntime (cached per flavour: creating the sessions is the cost)."""
    cache = case.__dict__.setdefault("_plain_ort", {})
    if portable not in cache:
        cache[portable] = PlainOrt(case.bundle(portable))
    return cache[portable]


class PlainOrt:
    """A bundle driven the way an app developer would: plain onnxruntime, the tensor names, shapes and
    initial values taken from the manifest (edgeseq.json), the state fed back by hand, and the position
    too for families with attention. `max_context` is the ring length the app chooses."""

    def __init__(self, bundle, max_context: int = 64):
        import onnxruntime as ort

        self.bundle = Path(bundle)
        self.manifest = json.loads((self.bundle / "edgeseq.json").read_text())
        self.spec = self.manifest["state"]
        dims = {"batch": 1, "max_context": max_context}
        self.zeros = {s["name"]: np.full([dims.get(d, d) for d in s["shape"]], s["init"], np.float32)
                      for s in self.spec}
        self.sessions = {k: ort.InferenceSession(str(self.bundle / g["file"]), providers=["CPUExecutionProvider"])
                         for k, g in self.manifest["graphs"].items()}

    def run(self, kind: str, ids, state: dict | None = None, position: int = 0):
        """One call of graph `kind` on `ids` from `state` (the initial state if None): (logits, state)."""
        g = self.manifest["graphs"][kind]
        feeds = {"input_ids": np.asarray([list(ids)], np.int64), **(self.zeros if state is None else state)}
        if "position" in g["inputs"]:
            feeds["position"] = np.array([position], np.int64)
        outs = self.sessions[kind].run(g["outputs"], feeds)
        return outs[0], {s["name"]: o for s, o in zip(self.spec, outs[1:])}

    def steps(self, ids, state: dict | None = None, position: int = 0):
        """The step graph token by token: (logits (t, vocab), the state after the last)."""
        logits = []
        for p, t in enumerate(ids):
            out, state = self.run("step", [t], state, position + p)
            logits.append(out[0])
        return np.stack(logits), state
