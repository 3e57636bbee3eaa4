"""TensorRT engines from the ONNX files (TensorRT 10.3+ Python API, ready for 11).

Strongly typed networks: precision comes from the ONNX (fp16 weights, Q/DQ nodes),
never from builder flags, which TensorRT 11 removes.  One optimisation profile per
spec profile (the decoder has prefill and decode).  Written against the documented
API; it runs only where TensorRT and a GPU exist (tests carry the `gpu` marker).
"""

from __future__ import annotations

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


def probe() -> GpuInfo:
    """TensorRT version and the first GPU; raises TensorRTUnavailable saying why not."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"tensorrt is not installed ({INSTALL_HINT})") from e
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as e:
            raise TensorRTUnavailable(f"cuda-python is not installed ({INSTALL_HINT})") from e
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise TensorRTUnavailable("no CUDA GPU is visible (cudaGetDeviceCount found none)")
    err, props = cudart.cudaGetDeviceProperties(0)
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
    config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in spec.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile_shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AvgEdgeError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path
