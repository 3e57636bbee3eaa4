"""Shared fixtures: tiny random AVG-LLaVA configs and checkpoints written by the tests."""

from __future__ import annotations

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
