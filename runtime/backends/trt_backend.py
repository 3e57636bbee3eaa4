"""TensorRT: the probe, CUDA helpers, engine building with a timing cache, and the runner,
side by side (as Polygraphy keeps a backend's loader and runner).

Written against the TensorRT 10.3+ Python API (name-based I/O: set_input_shape /
set_tensor_address / execute_async_v3; strongly typed networks, so precision comes
from the ONNX and never from builder flags, which TensorRT 11 removes).  cuda-python
for streams and buffers; no torch.  It runs only where TensorRT and a GPU exist; its
tests carry the `gpu` marker and have never run on the machines this was written on.
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avg_edge.errors import BackendError, BackendUnavailable
from avg_edge.runtime.backends.base import Backend
from avg_edge.specs import DECODER, DecoderRoles, GraphSpec, Profile

INSTALL_HINT = (
    "TensorRT needs an NVIDIA GPU machine: pip install 'avg-edge[gpu]' (tensorrt>=10.3, cuda-python), "
    "or on Jetson use the TensorRT that JetPack ships"
)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    tensorrt_version: str

    def to_manifest(self, timing_cache: Path | None = None) -> dict[str, Any]:
        d = {"version": self.tensorrt_version, "gpu": self.name, "compute_capability": self.compute_capability}
        if timing_cache is not None:
            d["timing_cache"] = str(timing_cache)
        return d


# -- probe and CUDA helpers -------------------------------------------------------------------
def cudart():
    """cuda-python's runtime module (12.6+ layout, then the older one)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as e:
            raise BackendUnavailable(f"cuda-python is not installed ({INSTALL_HINT})") from e
    return runtime


def _check(result: Any) -> Any:
    """cuda-python returns (err, *values); raise on err."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def probe() -> GpuInfo:
    """TensorRT version and the first GPU; raises BackendUnavailable saying why not."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"tensorrt is not installed ({INSTALL_HINT})") from e
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise BackendUnavailable(f"no usable CUDA GPU (cudaGetDeviceCount: {err}, {count} devices); "
                                 "a cuda-python newer than the driver's CUDA also fails here")
    err, props = rt.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise BackendUnavailable(f"cudaGetDeviceProperties failed ({err})")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name=name, compute_capability=f"{props.major}.{props.minor}", tensorrt_version=trt.__version__)


# TensorRT's ONNX parser maps TensorScatter + Attention (an in-place cache, --cache-op
# tensorscatter) onto IKVCacheUpdate + IAttention from this version on; JetPack 6.2's 10.3
# has neither.
IN_PLACE_MIN_VERSION = (10, 15)


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.15.1.29' -> (10, 15, 1, 29); stops at the first part that is not a number."""
    out = []
    for part in version.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def check_in_place_support(version: str) -> None:
    """Raise BackendUnavailable unless this TensorRT runs an in-place cache."""
    if version_tuple(version) < IN_PLACE_MIN_VERSION:
        need = ".".join(map(str, IN_PLACE_MIN_VERSION))
        raise BackendUnavailable(
            f"this decoder updates its KV cache in place (TensorScatter + Attention), which needs TensorRT {need}+ "
            f"(IKVCacheUpdate); this machine has TensorRT {version}. Rebuild the folder with "
            "avg-export build --kv-cache concat for this TensorRT")


def usable() -> bool:
    try:
        probe()
        return True
    except BackendUnavailable:
        return False


# -- engine building ---------------------------------------------------------------------------
def timing_cache_path(gpu: GpuInfo) -> Path:
    """One cache per TensorRT version and GPU architecture, reused across builds."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "avg-edge" / f"timing-trt{gpu.tensorrt_version}-sm{gpu.compute_capability}.cache"


def engine_file(spec: GraphSpec) -> str:
    return spec.file.replace(".onnx", ".engine")


def build_engine(onnx_path: Path, spec: GraphSpec, engine_path: Path, timing_cache: Path,
                 workspace_bytes: int = 4 * 1024**3) -> Path:
    """Parse the ONNX, add the spec's profiles, build a strongly typed engine, save it."""
    import tensorrt as trt

    if spec.name == DECODER and DecoderRoles(spec).kind == "inplace":
        check_in_place_support(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BackendError(f"TensorRT rejected the timing cache {timing_cache}; delete it and rebuild")
    for profile in spec.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile_shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)")
    with open(engine_path, "wb") as f:          # IHostMemory is a buffer: no extra copy
        f.write(serialized)
    used = config.get_timing_cache()
    if used is not None:
        with open(timing_cache, "wb") as f:
            f.write(used.serialize())
    return engine_path


# -- the runner ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceArray:
    """A tensor left on the GPU by the TensorRT backend."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    owner: Any = None      # keeps an allocate()d buffer alive while any view of it is


class _Allocation:
    """Device memory freed when the last DeviceArray that holds it is collected (a
    request's in-place cache lives as long as its generation)."""

    def __init__(self, cudart: Any, nbytes: int) -> None:
        self.ptr = _check(cudart.cudaMalloc(nbytes))
        weakref.finalize(self, cudart.cudaFree, self.ptr)


def profile_for(spec: GraphSpec, shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose bounds hold every input's dims."""
    for i, p in enumerate(spec.profiles):
        if _fits(spec, p, shapes):
            return i
    raise BackendError(f"{spec.name}: no optimisation profile accepts input shapes {shapes}")


def _fits(spec: GraphSpec, p: Profile, shapes: dict[str, tuple[int, ...]]) -> bool:
    for t in spec.inputs:
        for d, n in zip(t.shape, shapes[t.name]):
            if isinstance(d, str) and d in p.axes and not p.axes[d].min <= n <= p.axes[d].max:
                return False
    return True


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, spec: GraphSpec, engine_path: Path, built_with: dict[str, Any] | None) -> None:
        super().__init__(spec)
        gpu = probe()
        if not built_with:
            raise BackendError(f"{engine_path.parent}: this build has no TensorRT engines; "
                               f"make them with: avg-export engines {engine_path.parent}")
        if (built_with.get("version"), built_with.get("compute_capability")) != (gpu.tensorrt_version, gpu.compute_capability):
            raise BackendError(
                f"{engine_path.name} was built with TensorRT {built_with.get('version')} for sm {built_with.get('compute_capability')}; "
                f"this machine has TensorRT {gpu.tensorrt_version} on sm {gpu.compute_capability} ({gpu.name}). "
                f"Engines are not portable: rebuild them here with avg-export engines {engine_path.parent} --force"
            )
        import tensorrt as trt

        self._trt, self._cudart = trt, cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(engine_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            self.engine = self._runtime.deserialize_cuda_engine(blob)   # no second copy in host memory
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {engine_path.name}; rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[tuple[str, int], tuple[int, int]] = {}  # (name, slot) -> (pointer, capacity)
        self._slot: dict[str, int] = {}
        self._profile = -1
        # An in-place decoder's IKVCacheUpdate writes each present into its past's memory,
        # so those pairs are always bound to one buffer, also in a plain infer().
        self._in_place = DecoderRoles(spec).aliases() if spec.name == DECODER else {}
        if self._in_place:
            check_in_place_support(gpu.tensorrt_version)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        """A zeroed device buffer for an in-place cache, freed with its last view."""
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 256)
        memory = _Allocation(self._cudart, nbytes)
        _check(self._cudart.cudaMemset(memory.ptr, 0, nbytes))
        return DeviceArray(memory.ptr, tuple(shape), np.dtype(dtype).name, memory)

    def rows(self, buffer: DeviceArray, start: int, stop: int) -> DeviceArray:
        """Rows start..stop-1 of a buffer from allocate(), in its memory (rows are contiguous)."""
        if not 0 <= start <= stop <= buffer.shape[0]:
            raise BackendError(f"{self.spec.name}: rows {start}..{stop} of a buffer of {buffer.shape[0]}")
        row = int(np.prod(buffer.shape[1:])) * np.dtype(buffer.dtype).itemsize
        return DeviceArray(buffer.ptr + start * row, (stop - start, *buffer.shape[1:]), buffer.dtype, buffer.owner)

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
        return self._infer_kv_impl(feeds, tuple(self.spec.output_names), {})

    def _infer_kv_impl(self, feeds: dict[str, Any], to_host: tuple[str, ...], aliases: dict[str, str]) -> dict[str, Any]:
        """Inputs may be DeviceArrays (no copy); outputs not in `to_host` stay on the GPU as
        DeviceArrays.  Those live in two alternating buffers per name, so the KV cache a
        step returns can feed the next step while that step writes the other buffer.
        A returned DeviceArray is valid until the second call after the one that made it."""
        aliases = aliases or self._in_place   # the runtime passes the same pairs; infer() passes none
        cudart, ctx = self._cudart, self.context
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = {n: tuple(v.shape if isinstance(v, DeviceArray) else np.shape(v)) for n, v in feeds.items()}
        profile = profile_for(self.spec, shapes)
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, self.stream):
                raise BackendError(f"{self.spec.name}: TensorRT refused optimisation profile {profile}")
            self._profile = profile
        hosts = []
        address: dict[str, int] = {}
        for t in self.spec.inputs:
            v = feeds[t.name]
            if not ctx.set_input_shape(t.name, shapes[t.name]):
                raise BackendError(f"{self.spec.name}.{t.name}: TensorRT refused shape {shapes[t.name]}")
            if isinstance(v, DeviceArray):
                address[t.name] = v.ptr
            else:
                arr = np.ascontiguousarray(v)
                hosts.append(arr)
                address[t.name] = self._device_buffer((t.name, 0), arr.nbytes)
                if arr.nbytes:
                    _check(cudart.cudaMemcpyAsync(address[t.name], arr.ctypes.data, arr.nbytes, h2d, self.stream))
            ctx.set_tensor_address(t.name, address[t.name])
        outs: dict[str, Any] = {}
        for t in self.spec.outputs:
            shape = tuple(ctx.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.spec.name}.{t.name}: output shape {shape} is unresolved for inputs {shapes}")
            if t.name in aliases:    # written in place: the output is its input's memory
                ptr = address[aliases[t.name]]
                source = feeds[aliases[t.name]]
                device = source if isinstance(source, DeviceArray) else DeviceArray(ptr, shape, t.dtype)
            else:
                nbytes = int(np.prod(shape)) * np.dtype(t.dtype).itemsize
                slot = 0 if t.name in to_host else self._slot.get(t.name, 0) ^ 1
                self._slot[t.name] = slot
                ptr = self._device_buffer((t.name, slot), nbytes)
                device = DeviceArray(ptr, shape, t.dtype)
            address[t.name] = ptr
            ctx.set_tensor_address(t.name, ptr)
            outs[t.name] = np.empty(shape, dtype=np.dtype(t.dtype)) if t.name in to_host else device
        if not ctx.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run {self.spec.name}")
        for name in to_host:
            arr = outs[name]
            if arr.nbytes:
                _check(cudart.cudaMemcpyAsync(arr.ctypes.data, address[name], arr.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        del hosts
        return outs

    def describe(self) -> str:
        return f"tensorrt {self._trt.__version__}"

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._cudart.cudaStreamDestroy(self.stream)
        self.context = self.engine = None
