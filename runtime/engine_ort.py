"""The ONNX Runtime engine: one InferenceSession per graph kind, the weights mapped once and shared.

Every graph of a bundle points into the same `weights.bin`. Left to itself, each InferenceSession
would read its own copy; instead the engine memory-maps the file once and hands ONNX Runtime the
mapped tensors as shared initializers, so step and prefill sessions hold the weights once between them.
"""
from __future__ import annotations

import os

import numpy as np

from edgeseq.errors import EdgeseqError


def _ort():
    import onnxruntime as ort

    return ort


class OrtEngine:
    def __init__(self, directory: str, manifest: dict, device: str = "cpu", threads: int | None = None,
                 share_weights: bool = True):
        self.ort = ort = _ort()
        self.directory = directory
        self.manifest = manifest
        self.device = device
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EdgeseqError("device='cuda' needs onnxruntime-gpu with the CUDA provider; this onnxruntime has: "
                                   + ", ".join(ort.get_available_providers()))
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            self.providers = ["CPUExecutionProvider"]
        else:
            raise EdgeseqError(f"device {device!r} is not supported (cpu or cuda)")
        self.threads = threads
        self._sessions: dict[str, object] = {}
        self._shared = self._map_weights() if share_weights and device == "cpu" else None

    def _map_weights(self) -> dict:
        """Memory-map weights.bin and wrap each tensor as an OrtValue (no copy)."""
        ort = _ort()
        w = self.manifest["weights"]
        path = os.path.join(self.directory, w["file"])
        if w["bytes"] == 0:
            return {}
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        self._mm = mm
        values = {}
        for kind in self.manifest["graphs"]:
            import onnx

            model = onnx.load(os.path.join(self.directory, self.manifest["graphs"][kind]["file"]), load_external_data=False)
            for t in model.graph.initializer:
                if t.name in values or t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                ext = {e.key: e.value for e in t.external_data}
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                off, n = int(ext["offset"]), int(ext["length"])
                arr = mm[off:off + n].view(dtype).reshape(tuple(t.dims))
                values[t.name] = ort.OrtValue.ortvalue_from_numpy(arr)
        return values

    def session(self, kind: str):
        if kind not in self._sessions:
            ort = _ort()
            g = self.manifest["graphs"].get(kind)
            if g is None:
                raise EdgeseqError(f"{self.directory}: the bundle has no {kind} graph")
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
                so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "1")
            if self._shared:
                import onnx

                model = onnx.load(os.path.join(self.directory, g["file"]), load_external_data=False)
                names = [t.name for t in model.graph.initializer if t.name in self._shared]
                so.add_external_initializers(names, [self._shared[n] for n in names])
                # prepacking would copy every shared matrix into each session
                so.add_session_config_entry("session.disable_prepacking", "1")
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=self.providers)
            else:
                sess = ort.InferenceSession(os.path.join(self.directory, g["file"]), so, providers=self.providers)
            self._sessions[kind] = sess
        return self._sessions[kind]
