"""TensorRT engines from the ONNX files (TensorRT 10.3+ Python API, ready for 11).

Strongly typed networks: precision comes from the ONNX (fp16 weights, Q/DQ nodes),
never from builder flags, which TensorRT 11 removes.  One optimisation profile per
spec profile (the decoder has prefill and decode).  Written against the documented
API; it runs only where TensorRT and a GPU exist (tests carry the `gpu` marker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from avg_edge.errors import AvgEdgeError
from avg_edge.export.specs import GraphSpec

INSTALL_HINT = (
    "TensorRT needs an NVIDIA GPU machine: pip install 'avg-edge[gpu]' (tensorrt>=10.3, cuda-python), "
    "or on Jetson use the TensorRT that JetPack ships"
)


class TensorRTUnavailable(AvgEdgeError):
    pass


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    tensorrt_version: str


def cudart():
    """cuda-python's runtime module (12.6+ layout, then the older one)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as e:
            raise TensorRTUnavailable(f"cuda-python is not installed ({INSTALL_HINT})") from e
    return runtime


def probe() -> GpuInfo:
    """TensorRT version and the first GPU; raises TensorRTUnavailable saying why not."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"tensorrt is not installed ({INSTALL_HINT})") from e
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise TensorRTUnavailable(f"no usable CUDA GPU (cudaGetDeviceCount: {err}, {count} devices); "
                                  "a cuda-python newer than the driver's CUDA also fails here")
    err, props = rt.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise TensorRTUnavailable(f"cudaGetDeviceProperties failed ({err})")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name=name, compute_capability=f"{props.major}.{props.minor}", tensorrt_version=trt.__version__)


def build_engine(onnx_path: Path, spec: GraphSpec, engine_path: Path, timing_cache: Path,
                 workspace_bytes: int = 4 * 1024**3) -> Path:
    """Parse the ONNX, add the spec's profiles, build a strongly typed engine, save it."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise AvgEdgeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise AvgEdgeError(f"TensorRT rejected the timing cache {timing_cache}; delete it and rebuild")
    for profile in spec.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile_shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AvgEdgeError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)")
    with open(engine_path, "wb") as f:          # IHostMemory is a buffer: no extra copy
        f.write(serialized)
    used = config.get_timing_cache()
    if used is not None:
        with open(timing_cache, "wb") as f:
            f.write(used.serialize())
    return engine_path


def timing_cache_path(gpu: GpuInfo) -> Path:
    """One cache per TensorRT version and GPU architecture, reused across builds."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "avg-edge" / f"timing-trt{gpu.tensorrt_version}-sm{gpu.compute_capability}.cache"
