"""ONNX Runtime backend: TensorRT EP, CUDA EP or CPU EP, with a loud fallback notice."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from avg_edge.export.specs import GraphSpec
from avg_edge.runtime.backends.base import Backend, BackendError

log = logging.getLogger("avg_edge")

TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def choose_providers(requested: str, available: list[str], engine_cache: Path) -> list[Any]:
    """auto: the fastest present (TensorRT EP, then CUDA EP, then CPU); cpu/cuda/tensorrt: that one."""
    trt_opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engine_cache)}
    if requested == "auto":
        chain = [p for p in (TRT_EP, CUDA_EP) if p in available]
    elif requested == "tensorrt":
        chain = [TRT_EP, CUDA_EP]
    elif requested == "cuda":
        chain = [CUDA_EP]
    elif requested == "cpu":
        chain = []
    else:
        raise BackendError(f"ONNX Runtime provider: expected auto, cpu, cuda or tensorrt, got {requested!r}")
    return [(p, trt_opts) if p == TRT_EP else p for p in chain] + [CPU_EP]


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, spec: GraphSpec, path: Path, providers: str = "auto", threads: int = 0) -> None:
        super().__init__(spec)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        wanted = choose_providers(providers, ort.get_available_providers(), path.parent / "ort-trt-cache")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=wanted)
        except Exception as e:  # onnxruntime has its own exception types
            raise BackendError(f"ONNX Runtime could not load {path.name}: {str(e).splitlines()[0][:300]}") from e
        got = self.session.get_providers()
        self.providers = got
        asked_gpu = [p if isinstance(p, str) else p[0] for p in wanted if (p if isinstance(p, str) else p[0]) != CPU_EP]
        if asked_gpu and got[0] == CPU_EP:
            # Never silent: a GPU provider was asked for and ONNX Runtime runs on the CPU.
            log.warning("ONNX Runtime could not use %s for %s; running on the CPU (slow). "
                        "Check onnxruntime-gpu, CUDA and cuDNN versions.", "/".join(asked_gpu), path.name)
        self.on_cpu = got[0] == CPU_EP
        self._device = "cpu" if self.on_cpu else "cuda"

    def describe(self) -> str:
        return f"onnxruntime {self.providers[0].replace('ExecutionProvider', '')}"

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.spec.output_names
        return dict(zip(names, self.session.run(names, feeds)))

    # -- IO binding: outputs stay as OrtValues on the device, fed back without copies --
    def infer_bound(self, feeds: dict[str, Any], to_host: tuple[str, ...]) -> dict[str, Any]:
        """Like infer, but inputs may be OrtValues and only `to_host` outputs become numpy;
        the rest stay OrtValues (the KV cache never leaves the device)."""
        import time

        import onnxruntime as ort

        t0 = time.perf_counter()
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.spec.output_names:
            binding.bind_output(name, "cpu" if name in to_host else self._device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        out = {}
        for name, v in zip(self.spec.output_names, values):
            out[name] = v.numpy() if name in to_host else v
        self.last_inference_time = time.perf_counter() - t0
        self.total_inference_time += self.last_inference_time
        return out
