"""`avg-export engines BUILD_DIR`: TensorRT engines for an existing ONNX build folder, on
the machine that will run them (engines are tied to a TensorRT version and a GPU).

Needs only the runtime install plus TensorRT: no torch, no checkpoint.  Each engine is
checked against the reference outputs the export stored (reference.npz) at the same
validation points, and the folder is committed atomically like every build (its other
files are hard links, so a 14 GB build is not copied).  Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from avg_edge import constants as C
from avg_edge import validation as V
from avg_edge.errors import BackendUnavailable, BuildError, UsageError
from avg_edge.manifest import BuildCommit, Manifest, load_manifest
from avg_edge.precision import precision
from avg_edge.runtime.backends.base import Backend
from avg_edge.runtime.phases import Phases, release_memory


def check_backends(folder: Path, manifest: Manifest, open_backend: Callable[[str], Backend],
                   label: Callable[[str], str] = lambda name: name) -> dict[str, V.GraphValidation]:
    """Every graph's backend (from `open_backend(graph)`) against the build's stored
    references, one backend open at a time."""
    ref_file = folder / C.REFERENCE_FILE
    if not ref_file.is_file():
        raise UsageError(f"{folder}: no {C.REFERENCE_FILE} (it was built with --no-validate); "
                         "rebuild with validation to check engines against PyTorch")
    refs = V.load_references(ref_file)
    tolerance = precision(manifest.precision).engine_tolerance
    out = {}
    for name in manifest.graphs:
        recorded = manifest.validation.get(name)
        if not isinstance(recorded, dict) or not recorded.get("points"):
            raise UsageError(f"{folder}: the manifest records no validation points for {name}; rebuild with validation")
        spec = manifest.spec(name)
        with open_backend(name) as backend:
            out[label(name)] = V.check(spec, V.points_from_manifest(recorded), refs,
                                       lambda feeds: backend.infer(feeds, check=False), tolerance, backend.describe(),
                                       recorded.get("against", "PyTorch"))
        release_memory()
    return out


def build_engines_for_folder(folder: Path, force: bool = False, timing_cache: Path | None = None,
                             workspace_bytes: int = 4 * 1024**3, progress: Callable[[str], None] = print) -> Manifest:
    from avg_edge.runtime.backends import trt_backend as T

    folder = Path(folder)
    m = load_manifest(folder, verify=True)
    try:
        gpu = T.probe()
    except BackendUnavailable as e:
        raise BackendUnavailable(f"avg-export engines: {e}") from e
    if m.in_place_op == "gqa":
        raise UsageError(f"{folder}: its decoder updates the KV cache in place with ONNX Runtime's GroupQueryAttention, "
                         "which TensorRT cannot parse; rebuild it with avg-export build --kv-cache inplace "
                         "--cache-op tensorscatter (TensorRT 10.15+) or --kv-cache concat")
    if m.in_place_op is not None:
        T.check_in_place_support(gpu.tensorrt_version)
    if m.engines and not force:
        raise UsageError(f"{folder} already has engines (TensorRT {m.tensorrt.get('version')} on "
                         f"{m.tensorrt.get('gpu')}); pass --force to rebuild them")
    cache = timing_cache or T.timing_cache_path(gpu)
    cache.parent.mkdir(parents=True, exist_ok=True)
    ph = Phases(progress, total=len(m.graphs) + 2)
    with BuildCommit(folder, start_from=folder) as commit:
        for f in m.engines.values():
            (commit.folder / f).unlink(missing_ok=True)
        engines = {}
        for name in m.graphs:
            spec = m.spec(name)
            with ph.phase(f"engine {T.engine_file(spec)}"):
                T.build_engine(commit.folder / spec.file, spec, commit.folder / T.engine_file(spec), cache, workspace_bytes)
            engines[name] = T.engine_file(spec)
        info = gpu.to_manifest(cache)
        with ph.phase("check the engines against the stored references") as detail:
            checks = check_backends(commit.folder, m, lambda n: T.TrtBackend(m.spec(n), commit.folder / engines[n], info),
                                    label=lambda n: f"{n}.engine")
            detail.text = ", ".join(f"{k}: {v.status} (max abs diff {v.max_abs_diff:.2e})" for k, v in checks.items())
        failed = [k for k, v in checks.items() if v.status == "failed"]
        if failed:
            raise BuildError(f"engines {failed} differ from the references beyond tolerance; {folder} is untouched")
        m.engines, m.tensorrt = engines, info
        m.validation = {**{k: v for k, v in m.validation.items() if not k.endswith(".engine")},
                        **{k: v.to_dict() for k, v in checks.items()}}
        with ph.phase(f"write {folder}"):
            commit.finish(m)
    return m
