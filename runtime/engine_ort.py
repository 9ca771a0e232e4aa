"""The ONNX Runtime engine: InferenceSessions over a bundle's graphs, created on first use.

Which graph decodes: the prefill graph takes any number of tokens, one included, and measured as
fast as the step graph for one token in both flavours (docs/benchmarks.md), so one session serves
prompt and decode and ONNX Runtime holds the weights once. The step graph (static shapes, no loops)
is for apps and mobile runtimes. `low_memory` turns off ONNX Runtime's prepacking of matrices: the
session then maps the weights as stored, at some cost in speed.

A mobile bundle (`export --mobile`) has only the step graph: it then decodes and prefills through it.
`cuda_graph` (device cuda): the step graph runs under ONNX Runtime's CUDA graphs (provider option
`enable_cuda_graph`): captured once per ping-pong parity, replayed every token. That needs static shapes,
no control-flow nodes (the prefill graph's Scan cannot be captured) and every input and output bound to
fixed device buffers, so the session then decodes through the step graph with fixed IO bindings
(`fixed_io`); prompts still go through the prefill graph, a second session without capture.
`fixed_io=True` alone takes that path on any device without capturing anything: on the CPU it is how
the path is tested, and how an app can see what its CUDA-graph decode computes.
"""
from __future__ import annotations

import os

from edgeseq import integrity
from edgeseq.errors import EdgeseqError


class OrtEngine:
    def __init__(self, directory: str, manifest: dict, device: str = "cpu", threads: int | None = None,
                 low_memory: bool = False, cuda_graph: bool = False, fixed_io: bool = False):
        import onnxruntime as ort

        self.ort = ort
        self.directory = directory
        self.manifest = manifest
        self.device = device
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EdgeseqError("device='cuda' needs onnxruntime-gpu with the CUDA provider; this onnxruntime has: "
                                   + ", ".join(ort.get_available_providers()))
            # TF32 would round fp32 matrix products to 10-bit mantissas; a f32 bundle computes in f32
            self.providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        elif device == "cpu":
            if manifest.get("quant", {}).get("compute") == "bfloat16":
                raise EdgeseqError(f"{directory}: this bundle computes in bfloat16, which ONNX Runtime's CPU provider "
                                   f"does not run; load it with device='cuda' (--device cuda), or export an f32, f16 "
                                   f"or int8 bundle for the CPU")
            self.providers = ["CPUExecutionProvider"]
        else:
            raise EdgeseqError(f"device {device!r} is not supported (cpu or cuda)")
        if cuda_graph and device != "cuda":
            raise EdgeseqError(f"cuda_graph needs device='cuda' (this session is on {device!r})")
        self.threads = threads
        self.low_memory = low_memory
        self.cuda_graph = cuda_graph
        # fixed_io: the step graph decodes with every input and output bound once to fixed buffers on the
        # device (what CUDA graphs require; cuda_graph implies it)
        self.fixed_io = bool(fixed_io or cuda_graph)
        self._next_graph_id = 1
        self.decode_graph = "prefill" if "prefill" in manifest["graphs"] and not self.fixed_io else "step"
        self._sessions: dict[str, object] = {}
        self._prefill_ro = None

    def prefill_run_options(self):
        """RunOptions of a prompt's last run on the CPU: ONNX Runtime's arena gives back what the prompt's
        activations took (a 256-token prefill grew a mamba-130m process by 43 MiB for good) when the run
        ends; decode steps keep theirs (small, and their allocations are on every token's path)."""
        if self._prefill_ro is None:
            self._prefill_ro = self.ort.RunOptions()
            if self.device == "cpu":
                self._prefill_ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return self._prefill_ro

    def new_graph_ids(self, n: int) -> list[int]:
        """Fresh CUDA graph ids (run option gpu_graph_id; 0 is ONNX Runtime's own, -1 means no capture)."""
        first = self._next_graph_id
        self._next_graph_id = first + n
        return list(range(first, first + n))

    def session(self, kind: str):
        if kind not in self._sessions:
            ort = self.ort
            g = self.manifest["graphs"].get(kind)
            if g is None:
                raise EdgeseqError(f"{self.directory}: the bundle has no {kind} graph")
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
                so.inter_op_num_threads = 1
            if self.low_memory:
                so.add_session_config_entry("session.disable_prepacking", "1")
            path = os.path.join(self.directory, g["file"])
            try:
                providers = self.providers
                if self.cuda_graph and kind == "step":
                    providers = [("CUDAExecutionProvider", {"use_tf32": "0", "enable_cuda_graph": "1"}),
                                 "CPUExecutionProvider"]
                self._sessions[kind] = ort.InferenceSession(path, so, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                raise EdgeseqError(f"{path}: ONNX Runtime cannot load this graph: {e}") from None
            # the session feeds what the manifest says: a graph that disagrees is named now, not at a token
            integrity.check_graph_io(integrity.ort_io_dims(self._sessions[kind]), path, g, self.manifest)
        return self._sessions[kind]
