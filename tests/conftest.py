"""Shared fixtures: tiny random AVG-LLaVA configs and checkpoints written by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from avg_edge.model.tiny import make_tiny_checkpoint


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need TensorRT and a CUDA GPU; elsewhere they skip saying which is missing."""
    from avg_edge.errors import BackendUnavailable
    from avg_edge.runtime.backends.trt_backend import probe

    try:
        probe()
        return
    except BackendUnavailable as e:
        skip = pytest.mark.skip(reason=f"gpu test skipped: {e}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "avg-llava-tiny", router=True)


@pytest.fixture(scope="session")
def tiny_stage3_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt3") / "avg-llava-stage3-tiny", router=False, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from avg_edge.model import load_model

    return load_model(tiny_ckpt)


@pytest.fixture(scope="session")
def tiny_build(tiny_ckpt, tmp_path_factory):
    """An fp32 build of the tiny checkpoint: (folder, BuildResult, progress lines)."""
    from avg_edge.export.exporter import BuildOptions, build

    out = tmp_path_factory.mktemp("builds") / "tiny-fp32"
    lines: list[str] = []
    result = build(BuildOptions(model=tiny_ckpt, output=out, max_context=4096), progress=lines.append)
    return out, result, lines


@pytest.fixture(scope="session")
def tiny_concat_build(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with the concat KV cache (the form TensorRT runs)."""
    from avg_edge.export.exporter import BuildOptions, build

    out = tmp_path_factory.mktemp("builds") / "tiny-concat"
    build(BuildOptions(model=tiny_ckpt, output=out, kv_cache="concat", validate=False, backend="ort"),
          progress=lambda s: None)
    return out


@pytest.fixture(scope="session")
def small_context_build(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with a 256-token context: a 576-granularity prompt does not fit."""
    from avg_edge.export.exporter import BuildOptions, build

    out = tmp_path_factory.mktemp("ctx") / "ctx256"
    build(BuildOptions(model=tiny_ckpt, output=out, max_context=256, validate=False), progress=lambda s: None)
    return out


@pytest.fixture(scope="session")
def demo_ort_build(tmp_path_factory) -> Path:
    """The bundled demo model built as `avg-export build` does by default for ONNX Runtime
    (fp32, in-place cache, not validated): one build shared by the golden, packaging and
    Triton tests, which only read it (each build is about 50 s of a make test)."""
    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.model.demo import CHECKPOINT

    out = tmp_path_factory.mktemp("demo") / "build"
    build(BuildOptions(model=CHECKPOINT, output=out, validate=False, backend="ort"), progress=lambda s: None)
    return out


@pytest.fixture(scope="session")
def capi(tmp_path_factory):
    """libavg_edge.so and the C programs that use it, compiled by the system C compiler:
    (library, {name: executable})."""
    from avg_edge.runtime.capi.compile import HEADER, build_library

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no system C compiler (cc/gcc) to build the C programs")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("capi")
    lib = build_library(out)
    binaries = {}
    for name, src in (("example", root / "examples" / "c" / "avg_edge_example.c"),
                      ("bad_calls", root / "tests" / "c" / "bad_calls.c"), ("one_call", root / "tests" / "c" / "one_call.c")):
        exe = out / name
        subprocess.run([cc, "-Wall", "-Werror", "-I", str(HEADER.parent), str(src), "-L", str(out), "-lavg_edge",
                        f"-Wl,-rpath,{out}", "-o", str(exe)], check=True, capture_output=True, text=True)
        binaries[name] = exe
    return lib, binaries


@pytest.fixture
def clean_env() -> dict[str, str]:
    """No PYTHONPATH, no virtualenv: the C library must find the package on its own."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def pipe(tiny_build):
    """The tiny build opened with ONNX Runtime (in-place cache, batch axis)."""
    from avg_edge.runtime.pipeline import Pipeline

    with Pipeline.load(tiny_build[0], backend="ort") as p:
        yield p


@pytest.fixture(scope="module")
def concat_pipe(tiny_concat_build):
    """The tiny concat-cache build opened with ONNX Runtime."""
    from avg_edge.runtime.pipeline import Pipeline

    with Pipeline.load(tiny_concat_build, backend="ort") as p:
        yield p
