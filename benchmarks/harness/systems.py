"""Systems as plugins: each is a small class with prepare(model) and measure(...), run in fresh children.

Parent side (the driver calls these): `skip(built, quant)` says why a system cannot run a model (or
None), `prepare(ctx, built, quant)` writes its artifact (bundle, GGUF file) in a child of the system's
own Python and returns where it is, `measure(ctx, built, artifact, decode, prefill, threads, marks)` runs
one measurement (harness.measure) in a fresh child. Child side: `imports()` loads the system's
libraries (before the baseline memory reading) and `open(artifact, threads)` returns a runner with
`vocab`, `reset()`, `prefill(ids) -> logits`, `step(token) -> logits` and `info()`.

    edgeseq           edgeseq.load(bundle, threads): the fused ONNX bundle (the default export)
    edgeseq-portable  the portable flavour's bundle (standard ONNX ops only)
    edgeseq-lowmem    the fused bundle with low_memory=True (ONNX Runtime's prepacking off)
    edgeseq-mobile    `export --mobile` (step.ort), loaded by edgeseq
    edgeseq-gguf      edgeseq.load(x.gguf) of `edgeseq export --format gguf`, a first load each time (converted
                      at load into an empty cache folder)
    llamacpp          llama-cpp-python on edgeseq's f32 GGUF; other quants made from it by llama.cpp's
                      own quantizer (llama_model_quantize); Llama.eval of one token at a time
    llamacpp-gguf     llama-cpp-python on the very file edgeseq-gguf runs (edgeseq's writer, any quant)
    hf                transformers *ForCausalLM fp32, the model's cache stepped by hand
    rwkv              BlinkDL's rwkv package on the .pth, strategy "cpu fp32", JIT and CUDA kernel off

Every system runs under a Python: the harness's own by default; `--edgeseq-python PATH` adds a twin
of each edgeseq system run by another interpreter (another checkout's venv, whose edgeseq also exports
its own artifacts), labelled `edgeseq@LABEL`; `--llamacpp-python PATH` runs llamacpp in a venv with a
native llama.cpp build.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# --quant: (ONNX bundle quant, GGUF quant); None: the format has no such quant
QUANTS = {"f32": ("f32", "f32"), "f16": ("f16", "f16"), "int8": ("int8", "q8_0"), "q8_0": ("int8", "q8_0"),
          "int4": ("int4", "q4_0"), "q4_0": ("int4", "q4_0"), "bf16": (None, "bf16"), "w8a8": ("w8a8", "q8_0")}
QUANTS.update({q: (None, q) for q in ("q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")})
# llama.cpp's file types (llama_ftype) for its quantizer
LLAMA_FTYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q6_k": 18, "q4_k": 15, "q5_k": 17,
                "bf16": 32}


class System:
    name = "?"
    needs = ()  # checkpoint sources the system reads ("hf", "pth"); () = any

    def __init__(self, label: str | None = None, python: str | None = None, pythonpath: str | None = None):
        self.label = label or self.name
        self.python = python or sys.executable
        self.pythonpath = pythonpath  # a pinned snapshot of edgeseq, ahead of site-packages

    def spec(self) -> dict:
        return {"name": self.name, "label": self.label, "python": self.python, "pythonpath": self.pythonpath}

    def env(self, built: dict) -> dict:
        return {}

    # -- parent side --------------------------------------------------------------------------------
    def skip(self, built: dict, quant: str) -> str | None:
        if self.needs and built["source"] not in self.needs:
            return f"{self.name} reads {'/'.join(self.needs)} checkpoints, {built['name']} is {built['source']}"
        return None

    def _spawn(self, ctx, task: str, payload: dict, threads: int | None = None, built: dict | None = None,
               nice: int = 0) -> dict:
        from harness.protocol import spawn

        return spawn(self.python, task, payload, threads=threads, pythonpath=self.pythonpath,
                     env=self.env(built) if built else None, timeout=ctx.timeout, nice=nice)

    def _dir(self, ctx, built: dict) -> str:
        d = os.path.join(ctx.work, built["name"], self.label.replace("/", "_"))
        os.makedirs(d, exist_ok=True)
        return d

    def prepare(self, ctx, built: dict, quant: str) -> dict:
        return {"path": built["checkpoint"]}

    def measure(self, ctx, built: dict, artifact: dict, decode: int, prefill: int, threads: int,
                marks=(), max_context: int | None = None) -> dict:
        return self._spawn(ctx, "measure", {"system": self.spec(), "built": built, "artifact": artifact,
                                            "decode": decode, "prefill": prefill, "threads": threads,
                                            "marks": list(marks), "max_context": max_context},
                           threads=threads, built=built, nice=ctx.nice)

    # -- child side ---------------------------------------------------------------------------------
    def imports(self) -> None:
        pass

    def open(self, artifact: dict, built: dict, threads: int, max_context: int | None = None):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------
class Edgeseq(System):
    name, kind, low_memory = "edgeseq", "fused", False

    def skip(self, built, quant):
        if QUANTS[quant][0] is None:
            return f"no ONNX bundle of {quant}"
        return super().skip(built, quant)

    def prepare(self, ctx, built, quant):
        q = QUANTS[quant][0]
        out = os.path.join(self._dir(ctx, built), f"bundle-{self.kind}-{q}")
        return ctx.once(out, lambda: self._spawn(ctx, "export", {"kind": self.kind, "checkpoint": built["checkpoint"],
                                                                 "tokenizer": built["tokenizer"], "out": out,
                                                                 "quant": q}))

    def imports(self):
        import onnxruntime  # noqa: F401

        import edgeseq  # noqa: F401

    def open(self, artifact, built, threads, max_context=None):
        import edgeseq

        opts = {"low_memory": True} if self.low_memory else {}
        if max_context:
            opts["max_context"] = max_context
        return EdgeseqRunner(edgeseq.load(artifact["path"], threads=threads, **opts))


class EdgeseqPortable(Edgeseq):
    name, kind = "edgeseq-portable", "portable"


class EdgeseqLowmem(Edgeseq):
    name, low_memory = "edgeseq-lowmem", True


class EdgeseqMobile(Edgeseq):
    name, kind = "edgeseq-mobile", "mobile"


class EdgeseqGguf(Edgeseq):
    name = "edgeseq-gguf"

    def skip(self, built, quant):
        return System.skip(self, built, quant)

    def prepare(self, ctx, built, quant):
        q = QUANTS[quant][1]
        out = os.path.join(self._dir(ctx, built), f"model-{q}.gguf")
        return ctx.once(out, lambda: self._spawn(ctx, "export", {"kind": "gguf", "checkpoint": built["checkpoint"],
                                                                 "tokenizer": built["tokenizer"], "out": out,
                                                                 "quant": q}))

    def open(self, artifact, built, threads, max_context=None):
        # a first load each time (load_s includes the conversion): an empty cache folder of this child's own
        cache = tempfile.mkdtemp(prefix="edgeseq-bench-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["EDGESEQ_CACHE"] = cache
        return super().open(artifact, built, threads, max_context)


class EdgeseqRunner:
    def __init__(self, model):
        self.model, self.s = model, model.session()
        self.vocab = model.vocab_size

    def reset(self):
        self.s.reset()

    def prefill(self, ids):
        return self.s.prefill(ids)

    def step(self, tok):
        return self.s.step(tok)

    def info(self):
        import edgeseq

        return {"weights_bytes": self.model.weights_bytes, "state_bytes": self.model.state_bytes,
                "edgeseq_file": edgeseq.__file__}


# ---------------------------------------------------------------------------------------------------
class LlamaCpp(System):
    """llama-cpp-python. The file: edgeseq's f32 GGUF (llama.cpp's own tensor names and metadata, written
    by the harness's edgeseq); f16 and the quants are made from it by llama.cpp's own quantizer, run in
    this system's Python (e.g. a native GGML_NATIVE=ON build in its own venv: --llamacpp-python)."""
    name = "llamacpp"
    def skip(self, built, quant):
        from edgeseq.gguf_names import llama_archs  # the families whose GGUF llama.cpp runs

        if built["family"] not in {m.family for m in llama_archs().values()}:
            return f"llama.cpp has no {built['family']} architecture"
        return super().skip(built, quant)

    def prepare(self, ctx, built, quant):
        q = QUANTS[quant][1]
        f32 = EdgeseqGguf(label="edgeseq-gguf", pythonpath=ctx.pythonpath).prepare(ctx, built, "f32")
        if q == "f32":
            return f32
        out = os.path.join(self._dir(ctx, built), f"model-{q}.gguf")
        return ctx.once(out, lambda: self._spawn(ctx, "llama_quantize", {"src": f32["path"], "out": out, "quant": q}))

    def imports(self):
        import llama_cpp  # noqa: F401

    def open(self, artifact, built, threads, max_context=None):
        return LlamaRunner(artifact["path"], threads, max_context or 4096)


class LlamaCppSameFile(LlamaCpp):
    """llama.cpp on the very file edgeseq-gguf runs: edgeseq's GGUF writer at the same quant."""
    name = "llamacpp-gguf"

    def prepare(self, ctx, built, quant):
        return EdgeseqGguf(label="edgeseq-gguf", pythonpath=ctx.pythonpath).prepare(ctx, built, quant)


class LlamaRunner:
    def __init__(self, path, threads, n_ctx):
        import llama_cpp
        import numpy as np

        self.lc, self.np = llama_cpp, np
        self.llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _logits(self):
        p = self.lc.llama_get_logits_ith(self.llm.ctx, -1)
        return self.np.ctypeslib.as_array(p, shape=(self.vocab,)).copy()

    def reset(self):
        self.llm.reset()

    def prefill(self, ids):
        self.llm.eval(list(ids))
        return self._logits()

    def step(self, tok):
        self.llm.eval([tok])
        return self._logits()

    def info(self):
        return {"llama_cpp_file": self.lc.__file__}


# ---------------------------------------------------------------------------------------------------
class HF(System):
    name, needs = "hf", ("hf",)

    def skip(self, built, quant):
        if quant != "f32":
            return "hf runs f32 only"
        return super().skip(built, quant)

    def imports(self):
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def open(self, artifact, built, threads, max_context=None):
        return HFRunner(artifact["path"], threads)


class HFRunner:
    """The model's own cache, stepped by hand (as fast as generate()), passed back under the name its
    forward takes (Mamba: cache_params; Zamba: past_key_values, or `cache` where that replaced it); RecurrentGemma keeps its recurrent state on its
    modules and gets a DynamicCache and explicit position_ids (without them every call is position 0,
    where the RG-LRU resets)."""

    def __init__(self, path, threads):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.vocab = self.m.config.vocab_size
        self.rg = self.m.config.model_type == "recurrent_gemma"
        import inspect

        params = inspect.signature(self.m.forward).parameters
        self.kw = next(k for k in ("cache_params", "cache", "past_key_values") if k in params)
        self.reset()

    def reset(self):
        self.cache, self.pos = None, 0

    def _run(self, ids):
        torch, m = self.torch, self.m
        kw = {"use_cache": True, "logits_to_keep": 1}
        if self.rg:
            if self.cache is None:
                from transformers import DynamicCache

                self.cache = DynamicCache(config=m.config)
                m.model._setup_cache(m.config, 1, "cpu", torch.float32)
            kw.update(past_key_values=self.cache, position_ids=torch.arange(self.pos, self.pos + len(ids))[None])
        elif self.cache is not None:
            kw[self.kw] = self.cache
        with torch.inference_mode():
            out = m(torch.tensor([list(ids)]), **kw)
        if not self.rg:
            self.cache = next(c for c in (getattr(out, k, None) for k in ("cache_params", "cache", "past_key_values"))
                              if c is not None)
        self.pos += len(ids)
        return out.logits[0, -1].float().numpy()

    def prefill(self, ids):
        return self._run(ids)

    def step(self, tok):
        return self._run([tok])

    def info(self):
        return {}


# ---------------------------------------------------------------------------------------------------
class RwkvPkg(System):
    """BlinkDL's `rwkv` package: prefill = forward(list of tokens) (its sequence mode), decode =
    forward([token], state). Its RWKV-7 code is chosen at import (RWKV_V7_ON=1) and is TorchScript
    whatever RWKV_JIT_ON says."""
    name, needs = "rwkv", ("pth",)

    def skip(self, built, quant):
        if quant != "f32":
            return "the rwkv package runs f32 only here (strategy cpu fp32)"
        return super().skip(built, quant)

    def env(self, built):
        env = {"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}
        if built["family"] == "rwkv7":
            env["RWKV_V7_ON"] = "1"
        return env

    def imports(self):
        import rwkv.model  # noqa: F401
        import torch  # noqa: F401

    def open(self, artifact, built, threads, max_context=None):
        return RwkvRunner(artifact["path"], threads, built["family"] == "rwkv7", built["vocab"])


class RwkvRunner:
    def __init__(self, pth, threads, v7, vocab):
        import torch
        from rwkv.model import RWKV

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.model = RWKV(model=pth[:-4], strategy="cpu fp32", **({} if v7 else {"verbose": False}))
        self.vocab, self.state = vocab, None

    def reset(self):
        self.state = None

    def prefill(self, ids):
        out, self.state = self.model.forward(list(ids), self.state)
        return out.float().numpy()

    def step(self, tok):
        out, self.state = self.model.forward([tok], self.state)
        return out.float().numpy()

    def info(self):
        return {}


SYSTEMS = {c.name: c for c in (Edgeseq, EdgeseqPortable, EdgeseqLowmem, EdgeseqMobile, EdgeseqGguf, LlamaCpp,
                               LlamaCppSameFile, HF, RwkvPkg)}


def from_spec(spec: dict) -> System:
    return SYSTEMS[spec["name"]](spec["label"], spec["python"], spec.get("pythonpath"))
