"""ONNX Runtime backend: TensorRT EP, CUDA EP or CPU EP, with a loud fallback notice."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from avg_edge.errors import BackendError, BuildFolderError
from avg_edge.runtime.backends.base import Backend
from avg_edge.specs import GraphSpec

log = logging.getLogger("avg_edge")

TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def choose_providers(requested: str, spec: GraphSpec | None = None, cache_dir: Path | None = None) -> list[Any]:
    """auto: CUDA EP when present, else CPU.  The TensorRT EP only when asked for: this
    project's own TensorRT backend runs prebuilt engines, while the EP would build engines
    at run time.  When asked, it gets the spec's widest bounds as its profile so decoding
    (a growing past) does not trigger rebuilds."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "auto":
        chain: list[Any] = [CUDA_EP] if CUDA_EP in available else []
    elif requested == "tensorrt":
        opts: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_timing_cache_enable": True}
        if cache_dir is not None:
            opts.update(trt_engine_cache_path=str(cache_dir), trt_timing_cache_path=str(cache_dir))
        if spec is not None:
            opts.update(_trt_ep_profile(spec))
        chain = [(TRT_EP, opts), CUDA_EP]
    elif requested == "cuda":
        chain = [CUDA_EP]
    elif requested == "cpu":
        chain = []
    else:
        raise BackendError(f"ONNX Runtime provider: expected auto, cpu, cuda or tensorrt, got {requested!r}")
    return chain + [CPU_EP]


def _cpu_only(chain: list[Any]) -> bool:
    return all((p if isinstance(p, str) else p[0]) == CPU_EP for p in chain)


def _trt_ep_profile(spec: GraphSpec) -> dict[str, str]:
    axes = spec.axes()
    shapes = {}
    for which in ("min", "opt", "max"):
        sizes = {n: getattr(a, which) for n, a in axes.items()}
        shapes[which] = ",".join(f"{t.name}:" + "x".join(str(d) for d in spec.shape_of(t, sizes)) for t in spec.inputs)
    return {"trt_profile_min_shapes": shapes["min"], "trt_profile_opt_shapes": shapes["opt"],
            "trt_profile_max_shapes": shapes["max"]}


def ort_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "avg-edge" / "ort-tensorrt"


# OrtValue.data_type() -> numpy dtype, for the buffers `allocate` makes (cache dtypes).
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class OrtRows:
    """Rows start..stop-1 (first axis) of an OrtValue made by OrtBackend.allocate, bound to
    a session by address (IOBinding with a pointer, on the buffer's device): what a call
    writes lands in the buffer, nothing is copied.  Holds the OrtValue, so the memory
    lives as long as the view."""

    buffer: Any
    start: int
    stop: int

    def shape(self) -> list[int]:
        return list(self._shape)

    @cached_property                    # bound at every decode step: computed once per view
    def _shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.buffer.shape()[1:])

    @cached_property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.buffer.data_type()])

    @cached_property
    def _address(self) -> int:
        row = int(np.prod(self._shape[1:], dtype=np.int64)) * self.dtype.itemsize
        return self.buffer.data_ptr() + self.start * row

    def data_ptr(self) -> int:
        return self._address

    def numpy(self) -> np.ndarray:
        """A host copy of the rows (tests, debugging)."""
        return self.buffer.numpy()[self.start:self.stop]


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, spec: GraphSpec, path: Path, providers: str = "auto", threads: int = 0,
                 quantized: bool = False, spin: bool = True) -> None:
        super().__init__(spec)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        # After a call ONNX Runtime's worker threads spin for more work (the default).  A
        # pipeline runs vision, router and decoder in turn: threads of the graph that just
        # ran, spinning, took the cores from the next one (the demo's routed time to first
        # token fell from 120 to 74 ms without it).  The decoder, called step after step,
        # keeps spinning: sleeping between its steps cost the tiny model a fifth of its
        # decode rate.  `spin` is chosen by the caller per graph (open_backends).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        wanted = choose_providers(providers, spec, ort_cache_dir())
        # (Quantized graphs need full optimisation: it fuses their DequantizeLinear into MatMulNBits.)
        self.lean = _cpu_only(wanted) and not quantized and any(t.dtype == "float16" for t in spec.inputs)
        if self.lean:
            # ONNX Runtime's CPU provider has no fp16 MatMul: it inserts Casts, and full
            # optimisation folds them into an fp32 copy of every weight (twice the fp16
            # file in memory: 26 GiB for 7B).  Basic optimisation keeps the Casts per call
            # (about the same speed here), priority-based order runs each Cast next to its
            # MatMul instead of all first, and without the arena freed memory is returned.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            opts.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=wanted)
        except Exception as e:  # onnxruntime has its own exception types
            raise BuildFolderError(f"ONNX Runtime could not load {path}: {str(e).splitlines()[0][:300]} "
                                   "(rebuild with avg-export build)") from e
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
        try:
            return dict(zip(names, self.session.run(names, feeds)))
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime failed on {self.spec.name}: {str(e).splitlines()[0][:300]}") from e

    # -- IO binding: outputs stay as OrtValues on the device, fed back without copies --
    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        import onnxruntime as ort

        # Zeroed: TensorScatter + Attention (--cache-op tensorscatter) reads the whole
        # capacity, masked rows too, and a masked NaN still poisons probs @ V.  On the CPU
        # the OrtValue shares the numpy array's memory (np.zeros: pages are zeroed lazily,
        # so an unused capacity costs nothing); elsewhere the zeros are copied over once.
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self._device)

    def rows(self, buffer: Any, start: int, stop: int) -> Any:
        if not 0 <= start < stop <= buffer.shape()[0]:
            raise BackendError(f"{self.spec.name}: rows {start}..{stop - 1} of a buffer of {buffer.shape()[0]}")
        return OrtRows(buffer, start, stop)

    def _infer_kv_impl(self, feeds: dict[str, Any], to_host: tuple[str, ...], aliases: dict[str, str]) -> dict[str, Any]:
        """Inputs may be OrtValues (or OrtRows); only `to_host` outputs become numpy, the
        rest stay OrtValues (the KV cache never leaves the device).  An aliased output is
        bound to its input's OrtValue or rows: the graph writes into it, nothing is copied."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif isinstance(value, OrtRows):
                binding.bind_input(name, self._device, 0, value.dtype.type, value.shape(), value.data_ptr())
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.spec.output_names:
            source = feeds.get(aliases.get(name, ""))
            if isinstance(source, ort.OrtValue):
                binding.bind_ortvalue_output(name, source)
            elif isinstance(source, OrtRows):
                binding.bind_output(name, self._device, 0, source.dtype.type, source.shape(), source.data_ptr())
            else:
                binding.bind_output(name, "cpu" if name in to_host else self._device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime failed on {self.spec.name}: {str(e).splitlines()[0][:300]}") from e
        return {name: (v.numpy() if name in to_host else feeds[aliases[name]] if name in aliases else v)
                for name, v in zip(self.spec.output_names, binding.get_outputs())}

    def close(self) -> None:
        super().close()
        self.session = None
