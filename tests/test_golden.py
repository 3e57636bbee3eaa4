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


@pytest.fixture(scope="module", params=["inplace", "concat"])
def demo_build(tmp_path_factory, request):
    from avg_edge.export.exporter import BuildOptions, build

    out = tmp_path_factory.mktemp("demo") / f"fp32-{request.param}"
    build(BuildOptions(model=CHECKPOINT, output=out, validate=False, backend="ort", kv_cache=request.param),
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
