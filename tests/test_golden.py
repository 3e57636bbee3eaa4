"""Golden greedy tokens on the demo model, shared by the PyTorch, ONNX Runtime and
TensorRT paths (regenerate with tests/golden/make_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avg_edge.model.demo import CHECKPOINT

GOLDEN = Path(__file__).parent / "golden" / "demo_greedy.json"
pytestmark = pytest.mark.skipif(not (CHECKPOINT / "config.json").is_file() or not GOLDEN.is_file(),
                                reason="the demo checkpoint or its golden tokens are not in this tree")


def _cases():
    return json.loads(GOLDEN.read_text())


def _ask(generate, case):
    from avg_edge.model.demo.data import sample

    return generate(sample("test", case["index"]).image, case["question"], granularity=case["granularity"], max_new_tokens=8)


@pytest.fixture(scope="module", params=["inplace", "concat", "tensorscatter"])
def demo_build(tmp_path_factory, request):
    """Both KV caches, and the in-place one with both operator sets (--cache-op)."""
    from avg_edge.export.exporter import BuildOptions, build

    if request.param == "inplace":                  # the default ONNX Runtime build (conftest)
        return request.getfixturevalue("demo_ort_build")
    kv_cache, cache_op = ("inplace", "tensorscatter") if request.param == "tensorscatter" else (request.param, "auto")
    out = tmp_path_factory.mktemp("demo") / f"fp32-{request.param}"
    build(BuildOptions(model=CHECKPOINT, output=out, validate=False, backend="ort", kv_cache=kv_cache, cache_op=cache_op),
          progress=lambda s: None)
    return out


def test_reference_matches_golden():
    from avg_edge.model import load_model

    model = load_model(CHECKPOINT)
    for case in _cases():
        r = _ask(model.generate, case)
        assert (r.granularity, r.token_ids) == (case["chosen"], case["token_ids"]), case


def test_onnx_runtime_matches_golden(demo_build):
    from avg_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(demo_build, backend="ort")
    for case in _cases():
        r = _ask(pipe.generate, case)
        assert (r.granularity, r.token_ids) == (case["chosen"], case["token_ids"]), case


@pytest.mark.gpu
def test_tensorrt_matches_golden(tmp_path):
    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.runtime.pipeline import Pipeline

    build(BuildOptions(model=CHECKPOINT, output=tmp_path / "trt", backend="trt"), progress=lambda s: None)
    pipe = Pipeline.load(tmp_path / "trt", backend="trt")
    for case in _cases():
        r = _ask(pipe.generate, case)
        assert (r.granularity, r.token_ids) == (case["chosen"], case["token_ids"]), case


@pytest.mark.gpu
def test_tensorrt_in_place_cache_matches_golden(tmp_path):
    """TensorRT 10.15+ runs the tensorscatter decoder with IKVCacheUpdate writing into the
    cache the runtime binds as both past and present (never run on the machines this was
    written on: no GPU)."""
    import tensorrt as trt

    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.runtime.backends.trt_backend import IN_PLACE_MIN_VERSION, version_tuple
    from avg_edge.runtime.pipeline import Pipeline

    if version_tuple(trt.__version__) < IN_PLACE_MIN_VERSION:
        pytest.skip(f"TensorRT {trt.__version__} has no IKVCacheUpdate (10.15+)")
    build(BuildOptions(model=CHECKPOINT, output=tmp_path / "trt", backend="trt", kv_cache="inplace"),
          progress=lambda s: None)
    pipe = Pipeline.load(tmp_path / "trt", backend="trt")
    assert pipe.manifest.in_place_op == "tensorscatter" and "decoder" in pipe.manifest.engines
    for case in _cases():
        r = _ask(pipe.generate, case)
        assert (r.granularity, r.token_ids) == (case["chosen"], case["token_ids"]), case
