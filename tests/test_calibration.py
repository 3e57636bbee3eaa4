"""int8 / int4 builds, drift reports, the accuracy threshold, and router re-alignment."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from avg_edge import constants as C
from avg_edge.calibration.quantized_build import DRIFT_FILE, QuantOptions, build_quantized
from avg_edge.cli import export_app
from avg_edge.export.exporter import BuildOptions
from avg_edge.manifest import load_manifest, sha256_file
from avg_edge.runtime.pipeline import Pipeline
from avg_edge.model.tiny import textured_image

ANSWERS = ("red", "left", "three", "dots", "AB12", "side")


def _jsonl(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img = folder / f"img{i}.png"
        textured_image(280 + 37 * i, 420 - 23 * i, seed=seed + i).save(img)
        lines.append(json.dumps({"image": img.name, "question": "What colour is the background?", "answer": ANSWERS[i % 6]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    return _jsonl(d / "calib", 6, 0), _jsonl(d / "eval", 6, 100)


@pytest.fixture(scope="module")
def int8_build(tiny_ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    lines: list[str] = []
    res = build_quantized(BuildOptions(model=tiny_ckpt, output=out, precision="int8"),
                          QuantOptions(calib_data=data[0], eval_data=data[1], eval_samples=6), progress=lines.append)
    return out, res, lines


@pytest.fixture(scope="module")
def int4_build(tiny_ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    res = build_quantized(BuildOptions(model=tiny_ckpt, output=out, precision="int4"),
                          QuantOptions(calib_data=data[0], eval_data=data[1], eval_samples=6), progress=lambda s: None)
    return out, res


def _trt_legal_qdq(path: Path) -> Counter:
    """What TensorRT's explicit quantization accepts: symmetric (zero-point 0), positive
    scales, int8 or int4 only, no ONNX Runtime contrib ops.  Returns op counts."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        assert n.domain in ("", "ai.onnx"), f"{n.op_type} from {n.domain} is not a standard op"
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = inits.get(n.input[1])
            if scale is not None:
                assert (scale > 0).all(), f"{n.name}: non-positive scale"
            if len(n.input) > 2 and n.input[2] in inits:
                assert not inits[n.input[2]].astype(np.int64).any(), f"{n.name}: non-zero zero-point"
    for i in m.graph.initializer:
        assert i.data_type not in (TensorProto.UINT8, TensorProto.UINT4), f"{i.name}: unsigned quantized type"
    return Counter(n.op_type for n in m.graph.node)


def test_int8_graphs_have_trt_legal_qdq(int8_build):
    out, res, lines = int8_build
    for g in ("vision", "router", "decoder"):
        ops = _trt_legal_qdq(out / f"{g}.onnx")
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"], (g, ops)
    m = load_manifest(out, verify=True)
    assert m.precision == "int8" and all("int8 Q/DQ" in m.quantization["graphs"][g]["method"] for g in m.graphs)
    assert m.quantization["calibration"]["samples"] == 6
    assert m.validation["decoder"]["status"] == "passed"          # the fp32 export was validated first
    r = Pipeline.load(out).generate(textured_image(300, 300), "What colour is the background?", max_new_tokens=4)
    assert r.granularity in (36, 72, 144, 288, 576) and 1 <= len(r.token_ids) <= 4


def test_drift_report_fields(int8_build):
    out, res, lines = int8_build
    d = json.loads((out / DRIFT_FILE).read_text())
    assert d == load_manifest(out).drift
    assert set(d["graphs"]) == {"vision", "router", "decoder"}
    for g in d["graphs"].values():
        o = g["outputs"]
        assert 0 < o["max_abs_diff"] and 0 < o["mean_abs_diff"] <= o["max_abs_diff"] and -1 <= o["cosine"] <= 1
    assert 0 <= d["router_agreement"] <= 1 and 0 <= d["token_agreement"] <= 1 and d["tokens"] == 32
    assert d["reference"] == "fp32" and d["precision"] == "int8"
    assert d["accuracy"]["questions"] == 6 and set(d["accuracy"]) == {"reference", "quantized", "drop_points", "questions"}
    assert set(d["answer_nll"]) == {"reference", "quantized"} and all(v > 0 for v in d["answer_nll"].values())
    assert d["sizes"]["quantized"] < d["sizes"]["reference"]
    assert d["speed"]["reference"] > 0 and d["speed"]["quantized"] > 0
    assert d["threshold"]["max_accuracy_drop"] == 1.0
    assert any(line.startswith("      router decision agreement") for line in lines)


def test_int4_decoder_is_blocked_weight_only(int4_build):
    out, res = int4_build
    m = onnx.load(str(out / "decoder.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {i.name: i for i in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(inits[n.input[0]].data_type == TensorProto.INT4 for n in dqs)
    for n in dqs:
        block = next(a.i for a in n.attribute if a.name == "block_size")
        k = inits[n.input[0]].dims[0]
        assert block == 32 and k % block == 0 and list(inits[n.input[1]].dims) == [k // block, inits[n.input[0]].dims[1]]
    _trt_legal_qdq(out / "decoder.onnx")
    lm_head = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and inits[n.input[1]].dims[-1] == 400]
    assert len(lm_head) == 1 and inits[lm_head[0].input[1]].data_type == TensorProto.FLOAT16   # kept in fp16
    assert all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in dqs)                # W4A16: fp16 scales
    for g in ("vision", "router"):                                     # untouched by int4
        assert not any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out / f"{g}.onnx")).graph.node)
    manifest = load_manifest(out, verify=True)
    assert manifest.graphs["decoder"]["inputs"][0]["dtype"] == "float16"
    assert "quantized graph" in manifest.validation["decoder"]["against"]      # engines are checked against ORT's int4 run
    assert manifest.validation["vision"].get("against", "PyTorch") == "PyTorch"


def test_int4_streams_external_data_to_the_same_graph(int4_build, tmp_path):
    """The writer reads external weights matrix by matrix: an external-data copy of the
    fp16 decoder quantizes to the same graph as the inline one."""
    from avg_edge.calibration.quantize import quantize_int4
    from avg_edge.export.exporter import BuildOptions, build

    out, res = int4_build
    fp16 = tmp_path / "fp16"
    build(BuildOptions(model=res.manifest.source["model"], output=fp16, precision="fp16", opset=21, validate=False,
                       backend="ort", max_context=4096, kv_cache="concat"), progress=lambda s: None)
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(onnx.load(str(fp16 / "decoder.onnx")), str(ext / "decoder.onnx"), save_as_external_data=True,
              location="decoder.onnx.data", size_threshold=0)
    quantize_int4(fp16 / "decoder.onnx", tmp_path / "inline.onnx")
    quantize_int4(ext / "decoder.onnx", ext / "q.onnx")
    assert (ext / "q.onnx.data").stat().st_size > 0 and not (tmp_path / "inline.onnx.data").exists()
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.standard_normal((1, 40, 64)).astype(np.float16), "attention_mask": np.ones((1, 40), np.int64),
             "position_ids": np.arange(40)[None], "logit_positions": np.array([39])}
    feeds.update({f"past_key_values.{i}.{w}": np.zeros((1, 4, 0, 16), np.float16) for i in range(2) for w in ("key", "value")})
    a = ort.InferenceSession(str(tmp_path / "inline.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(str(ext / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_onnx_runtime_runs_int4_as_matmulnbits(int4_build, tmp_path):
    out, _ = int4_build
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["MatMulNBits"] == 14 and ops["DequantizeLinear"] == 0


def test_accuracy_threshold_fails_the_build_and_keeps_the_old_one(int8_build, tiny_ckpt, data, tmp_path):
    import shutil

    out, _, _ = int8_build
    target = tmp_path / "int8"
    shutil.copytree(out, target)
    before = {p.name: sha256_file(p) for p in target.iterdir()}
    runner = CliRunner()
    args = ["build", "-m", str(tiny_ckpt), "-o", str(target), "--force", "--precision", "int8", 
            "--calib-data", str(data[0]), "--eval-data", str(data[1]), "--eval-samples", "6", "--max-accuracy-drop", "-1"]
    r = runner.invoke(export_app, args, terminal_width=400)
    assert r.exit_code == 1, r.output
    assert "more than --max-accuracy-drop -1.0" in r.stderr and "previous build" in r.stderr
    assert {p.name: sha256_file(p) for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]          # no scratch folders left behind
    r = runner.invoke(export_app, args + ["--accept-drift"], terminal_width=400)
    assert r.exit_code == 0, r.output
    assert load_manifest(target).drift["threshold"] == {"max_accuracy_drop": -1.0, "accept_drift": True, "exceeded": True}


def test_realign_changes_only_the_router(int8_build, data, tmp_path):
    import shutil

    from avg_edge.calibration.realign import REPORT_FILE, RealignOptions, realign

    out, _, _ = int8_build
    target = tmp_path / "b"
    shutil.copytree(out, target)
    before = {p.name: sha256_file(p) for p in target.iterdir()}
    report = realign(target, RealignOptions(calib_data=data[0], calib_samples=6, eval_data=data[1], eval_samples=6,
                                            epochs=3, lr=1e-3), progress=lambda s: None)
    after = {p.name: sha256_file(p) for p in target.iterdir()}
    changed = {n for n in after if before.get(n) != after[n]}
    # the router's table and its stored references follow the new weights
    assert changed == {"router.onnx", C.ROUTER_TEXT_FILE, C.REFERENCE_FILE, "manifest.json", REPORT_FILE}
    assert report["changed_tensors"] and all(k.startswith("router.") for k in report["changed_tensors"])
    for key in ("agreement", "accuracy", "mean_visual_tokens"):
        assert key in report["before"] and key in report["after"]
    m = load_manifest(target, verify=True)
    assert m.realign["epochs"] == 3 and m.quantization["graphs"]["router"]["method"] == "fp32 (realigned)"
    import onnxruntime as ort

    from avg_edge import validation as V

    spec = m.spec("router")
    sess = ort.InferenceSession(str(target / spec.file), providers=["CPUExecutionProvider"])
    check = V.check(spec, V.points_from_manifest(m.validation["router"]), V.load_references(target / C.REFERENCE_FILE),
                    lambda feeds: dict(zip(spec.output_names, sess.run(None, feeds))), (1e-4, 1e-4), "onnxruntime")
    assert check.status == "passed", check.to_dict()
