"""TensorRT backend: the build's engines, explicit CUDA stream and device buffers
(cuda-python; no torch).  Written against the TensorRT 10.3+ name-based API
(set_input_shape / set_tensor_address / execute_async_v3).  Runs only where TensorRT
and a GPU exist; its tests carry the `gpu` marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avg_edge.export.specs import GraphSpec, Profile
from avg_edge.runtime.backends.base import Backend, BackendError


def _check(result: Any) -> Any:
    """cuda-python returns (err, *values); raise on err."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


@dataclass(frozen=True)
class DeviceArray:
    """A tensor left on the GPU by the TensorRT backend."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def _profile_for(spec: GraphSpec, feeds: dict[str, Any]) -> int:
    """Index of the first profile whose bounds hold every input's dims."""
    for i, p in enumerate(spec.profiles):
        if _fits(spec, p, feeds):
            return i
    sizes = {t.name: list(feeds[t.name].shape) for t in spec.inputs}
    raise BackendError(f"{spec.name}: no optimisation profile accepts input shapes {sizes}")


def _fits(spec: GraphSpec, p: Profile, feeds: dict[str, np.ndarray]) -> bool:
    for t in spec.inputs:
        for d, n in zip(t.shape, feeds[t.name].shape):
            if isinstance(d, str) and d in p.axes and not p.axes[d].min <= n <= p.axes[d].max:
                return False
    return True


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, spec: GraphSpec, engine_path: Path, built_with: dict[str, Any] | None) -> None:
        super().__init__(spec)
        from avg_edge.export.tensorrt_build import TensorRTUnavailable, probe

        try:
            gpu = probe()
        except TensorRTUnavailable as e:
            raise BackendError(f"--backend trt: {e}") from e
        if not built_with:
            raise BackendError(f"{engine_path.parent}: this build has no TensorRT engines; rebuild with avg-export build --backend trt")
        if (built_with.get("version"), built_with.get("compute_capability")) != (gpu.tensorrt_version, gpu.compute_capability):
            raise BackendError(
                f"{engine_path.name} was built with TensorRT {built_with.get('version')} for sm {built_with.get('compute_capability')}; "
                f"this machine has TensorRT {gpu.tensorrt_version} on sm {gpu.compute_capability} ({gpu.name}). "
                "Engines are not portable: rebuild with avg-export build --backend trt on this machine"
            )
        import tensorrt as trt

        from avg_edge.export.tensorrt_build import cudart as _cudart

        cudart = _cudart()
        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        import mmap

        with open(engine_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            self.engine = self._runtime.deserialize_cuda_engine(blob)   # no second copy in host memory
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {engine_path.name}; rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self._buffers: dict[tuple[str, int], tuple[int, int]] = {}  # (name, slot) -> (pointer, capacity)
        self._slot: dict[str, int] = {}
        self._profile = -1

    def _device_buffer(self, key: tuple[str, int], nbytes: int) -> int:
        ptr, cap = self._buffers.get(key, (0, 0))
        if nbytes > cap:  # grow-only: decode steps reuse the same allocation
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            cap = max(nbytes, 2 * cap, 256)
            ptr = _check(self._cudart.cudaMalloc(cap))
            self._buffers[key] = (ptr, cap)
        return ptr

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer_bound(feeds, to_host=tuple(self.spec.output_names), timed=False)

    def infer_bound(self, feeds: dict[str, Any], to_host: tuple[str, ...], timed: bool = True) -> dict[str, Any]:
        """Inputs may be DeviceArrays (no copy); outputs not in `to_host` stay on the GPU as
        DeviceArrays.  Those live in two alternating buffers per name, so the KV cache a
        step returns can feed the next step while that step writes the other buffer.
        A returned DeviceArray is valid until the second call after the one that made it."""
        import time

        cudart, ctx = self._cudart, self.context
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        t0 = time.perf_counter()
        shapes = {n: (v.shape if isinstance(v, DeviceArray) else np.shape(v)) for n, v in feeds.items()}
        profile = _profile_for(self.spec, {n: _Shape(tuple(s)) for n, s in shapes.items()})
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, self.stream):
                raise BackendError(f"{self.spec.name}: TensorRT refused optimisation profile {profile}")
            self._profile = profile
        hosts = []
        for t in self.spec.inputs:
            v = feeds[t.name]
            if not ctx.set_input_shape(t.name, tuple(shapes[t.name])):
                raise BackendError(f"{self.spec.name}.{t.name}: TensorRT refused shape {tuple(shapes[t.name])}")
            if isinstance(v, DeviceArray):
                ctx.set_tensor_address(t.name, v.ptr)
                continue
            arr = np.ascontiguousarray(v)
            hosts.append(arr)
            ptr = self._device_buffer((t.name, 0), arr.nbytes)
            if arr.nbytes:
                _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            ctx.set_tensor_address(t.name, ptr)
        outs: dict[str, Any] = {}
        for t in self.spec.outputs:
            shape = tuple(ctx.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.spec.name}.{t.name}: output shape {shape} is unresolved "
                                   f"for inputs {({n: tuple(v) for n, v in shapes.items()})}")
            nbytes = int(np.prod(shape)) * np.dtype(t.dtype).itemsize
            slot = 0 if t.name in to_host else self._slot.get(t.name, 0) ^ 1
            self._slot[t.name] = slot
            ptr = self._device_buffer((t.name, slot), nbytes)
            ctx.set_tensor_address(t.name, ptr)
            outs[t.name] = (np.empty(shape, dtype=np.dtype(t.dtype)) if t.name in to_host
                            else DeviceArray(ptr, shape, t.dtype))
        if not ctx.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run {self.spec.name}")
        for name in to_host:
            arr = outs[name]
            if arr.nbytes:
                _check(cudart.cudaMemcpyAsync(arr.ctypes.data, self._buffers[(name, 0)][0], arr.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        del hosts
        if timed:
            self.last_inference_time = time.perf_counter() - t0
            self.total_inference_time += self.last_inference_time
        return outs

    def describe(self) -> str:
        return f"tensorrt {self._trt.__version__}"

    def __del__(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
