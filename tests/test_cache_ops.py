"""The in-place cache's two operator sets (--cache-op): ONNX Runtime's GroupQueryAttention
and standard opset-24 TensorScatter + Attention, the one TensorRT 10.15+ runs in place.
Golden tokens for both are in test_golden.py; here the graph, the options and the
TensorRT version rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from avg_edge.errors import BackendUnavailable, BuildFolderError, UsageError
from avg_edge.export.exporter import BuildOptions, build, check_options
from avg_edge.manifest import Manifest, load_manifest
from avg_edge.runtime.backends.trt_backend import check_in_place_support, version_tuple


@pytest.fixture(scope="module")
def scatter_build(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scatter") / "tiny"
    build(BuildOptions(model=tiny_ckpt, output=out, backend="ort", kv_cache="inplace", cache_op="tensorscatter",
                       max_context=2048), progress=lambda s: None)
    return out


def test_the_graph_uses_standard_operators_only_and_validates(scatter_build):
    m = load_manifest(scatter_build)
    assert (m.kv_cache, m.cache_op, m.in_place_op, m.opset) == ("inplace", "tensorscatter", "tensorscatter", 24)
    graph = onnx.load(str(scatter_build / m.spec("decoder").file), load_external_data=False)
    ops = {(n.domain or "", n.op_type) for n in graph.graph.node}
    layers = m.spec("decoder").to_dict()
    assert ("", "TensorScatter") in ops and ("", "Attention") in ops
    assert not any(domain for domain, _ in ops), f"non-standard operators: {sorted(o for o in ops if o[0])}"
    assert sum(n.op_type == "TensorScatter" for n in graph.graph.node) == 2 * sum(
        1 for t in layers["inputs"] if t["role"] == "past_key")
    assert m.validation["decoder"]["status"] == "passed", m.validation["decoder"]
    assert m.validation["decoder.rows"]["status"] == "passed", m.validation["decoder.rows"]


def test_same_greedy_tokens_as_the_gqa_build(scatter_build, pipe):
    """The same requests through both in-place operator sets (router, fixed granularities,
    a batched decode of three requests at different lengths) give the same tokens."""
    from avg_edge.runtime.pipeline import Pipeline
    from avg_edge.runtime.slots import DecodeSlots
    from avg_edge.model.tiny import textured_image

    scatter = Pipeline.load(scatter_build, backend="ort")
    assert pipe.manifest.in_place_op == "gqa"
    img = textured_image(500, 300, seed=3)
    for g in (None, 36, 576):
        a = pipe.generate(img, "What colour is it?", granularity=g, max_new_tokens=6)
        b = scatter.generate(img, "What colour is it?", granularity=g, max_new_tokens=6)
        assert (a.granularity, a.token_ids) == (b.granularity, b.token_ids), g

    def batched(p):
        slots = DecodeSlots(p, 3)
        tokens: dict[int, list[int]] = {}
        for i, q in enumerate(("a", "What is it?", "What colour is the big shape on the left?")):
            ev = slots.admit(p.prepare(img, q, granularity=(36, 72, 144)[i]), 5)
            tokens.setdefault(ev.slot, []).append(ev.token)
        while slots.active:
            for ev in slots.step():
                tokens.setdefault(ev.slot, []).append(ev.token)
        slots.close()
        return tokens

    assert batched(pipe) == batched(scatter)


@pytest.mark.parametrize("opts, message", [
    (dict(kv_cache="concat", cache_op="tensorscatter"), "add --kv-cache inplace"),
    (dict(kv_cache="inplace", cache_op="tensorscatter", opset=18), "use opset 24"),
    (dict(kv_cache="inplace", cache_op="tensorscatter", precision="int8"), "int8 builds use opsets"),
    (dict(kv_cache="inplace", cache_op="flash"), "expected auto, gqa or tensorscatter"),
    (dict(kv_cache="inplace", cache_op="gqa", backend="trt"), "--cache-op tensorscatter"),
])
def test_option_errors_name_the_fix(tiny_ckpt, tmp_path, opts, message):
    with pytest.raises(UsageError, match=message.replace("-", r"\-")):
        check_options(BuildOptions(model=tiny_ckpt, output=tmp_path / "out", **opts))
    assert not (tmp_path / "out").exists()


def test_auto_picks_gqa_for_onnx_runtime_and_tensorscatter_for_engines():
    def op(**kw):
        return BuildOptions(model=Path("m"), output=Path("o"), **kw).resolved_cache_op
    assert op(kv_cache="inplace", backend="ort") == "gqa"
    assert op(kv_cache="inplace", backend="trt") == "tensorscatter"
    assert op(kv_cache="concat", backend="ort") is None
    assert BuildOptions(model=Path("m"), output=Path("o"), kv_cache="inplace", cache_op="tensorscatter").resolved_opset == 24


def test_tensorrt_before_10_15_is_refused_with_the_way_out():
    assert version_tuple("10.15.1.29") == (10, 15, 1, 29) and version_tuple("10.3.0") == (10, 3, 0)
    check_in_place_support("10.15.0")
    check_in_place_support("11.0.0")
    with pytest.raises(BackendUnavailable, match=r"10\.15\+.*10\.3\.0.*--kv-cache concat"):
        check_in_place_support("10.3.0")


def test_manifest_cache_op_is_checked(scatter_build):
    d = json.loads((scatter_build / "manifest.json").read_text())
    assert Manifest.from_dict(d).in_place_op == "tensorscatter"
    assert Manifest.from_dict({**d, "cache_op": None}).in_place_op == "gqa"     # builds before the option
    with pytest.raises(BuildFolderError, match="'cache_op' should be null or one of"):
        Manifest.from_dict({**d, "cache_op": "flash"})
