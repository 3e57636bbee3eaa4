"""avg-export build/inspect on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from avg_edge import constants as C
from avg_edge.cli import export_app
from avg_edge.export.exporter import BuildOptions, bounds_for, build, graph_specs
from avg_edge.errors import BuildFolderError
from avg_edge.manifest import load_manifest, sha256_file
from avg_edge.model.tiny import textured_image
from avg_edge.runtime.router import RouterText

runner = CliRunner()


@pytest.fixture(scope="module")
def fp32_build(tiny_build):
    return tiny_build


def test_build_folder_holds_graphs_tables_tokenizer_manifest(fp32_build):
    out, result, lines = fp32_build
    names = {p.name for p in out.iterdir()}
    assert {"vision.onnx", "router.onnx", "decoder.onnx", C.EMBED_TABLE_FILE, C.IMAGE_NEWLINE_FILE,
            C.TOKENIZER_JSON_FILE, C.MANIFEST_FILE} <= names
    for f in ("vision.onnx", "router.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(out / f))
    assert np.load(out / C.EMBED_TABLE_FILE, allow_pickle=False).shape == (result.manifest.graphs["decoder"]["outputs"][0]["shape"][2], 64)
    # one progress line per phase, numbered, with its time and peak memory, also in the manifest
    stages = [ln for ln in lines if ln.startswith("[")]
    assert len(stages) == 10 and stages[0].startswith("[1/10] tokenizer.json") and stages[-1].startswith("[10/10] write")
    assert all(re.search(r"\(\d+\.\d s, peak RSS \d+\.\d\d GiB\)$", ln) for ln in stages), stages
    recorded = load_manifest(out).phases
    assert len(recorded) == 9 and all(r["peak_rss_bytes"] > 100 * 2**20 and r["seconds"] >= 0 for r in recorded)


def test_manifest_contents(fp32_build, tiny_ckpt):
    out, result, _ = fp32_build
    m = load_manifest(out, verify=True)
    assert m.format_version == C.MANIFEST_FORMAT and m.precision == "fp32" and m.opset == 18
    assert m.granularities == [36, 72, 144, 288, 576] and m.crop_size == 336
    assert m.pinpoints[0] == [336, 672] and m.has_router and m.context_length == 4096
    assert (m.bos_token_id, m.eos_token_id) == (1, 2)
    assert m.chat_template == {"name": "vicuna_v1", "system": C.VICUNA_V1_SYSTEM, "roles": ["USER", "ASSISTANT"],
                               "sep": " ", "sep2": "</s>"}
    roles = {(t["role"], t["layer"]) for t in m.graphs["decoder"]["inputs"]}
    assert ("past_key", 1) in roles and ("past_value", 0) in roles and ("inputs_embeds", None) in roles
    assert set(m.files) == {p.name for p in out.iterdir() if p.name != C.MANIFEST_FILE}
    assert all(m.files[n]["sha256"] == sha256_file(out / n) for n in m.files)
    for graph, n_points in (("vision", 3), ("router", 3), ("decoder", 6)):
        v = m.validation[graph]
        assert v["status"] == "passed" and len(v["points"]) == n_points
        assert 0 <= v["max_abs_diff"] < 1e-3
    assert m.validation["decoder_code_vs_transformers"] < 1e-4
    # The batched decode points, each row against itself run alone (rows at their own pasts).
    rows = m.validation["decoder.rows"]
    assert rows["status"] == "passed" and [p["point"] for p in rows["points"]] == ["decode:opt:rows", "decode:max:rows"]
    assert rows["points"][1]["sizes"]["batch"] == 4 and "rows at pasts [4095, 2047, 1023, 511]" in rows["points"][1]["note"]
    assert rows["max_abs_diff"] < 1e-5
    assert {"torch", "onnx", "onnxruntime", "transformers", "avg_edge"} <= set(m.tools)
    assert m.tensorrt is None and m.engines == {}


def test_onnx_graphs_reproduce_the_reference_greedy_answer(tiny_concat_build, tiny_model):
    """Independent of the build's own validation: run the three graphs by hand (the concat
    cache, whose convention is written out here) on a real image and prompt and compare
    with the reference's choice and greedy tokens."""
    import onnxruntime as ort

    out = tiny_concat_build
    sess = {g: ort.InferenceSession(str(out / f"{g}.onnx"), providers=["CPUExecutionProvider"]) for g in ("vision", "router", "decoder")}
    image, question = textured_image(500, 380, seed=11), "What colour is the background?"
    ref = tiny_model.generate(image, question, max_new_tokens=8)
    prep = tiny_model.prepare(image, question)

    feats = sess["vision"].run(None, {"pixel_values": prep.image.pixel_values})
    for g, f in zip(tiny_model.config.granularities, feats):
        np.testing.assert_allclose(f, prep.scaled[g].numpy(), atol=1e-4)
    table = np.load(out / C.EMBED_TABLE_FILE)
    ids = np.asarray(prep.ids_before + prep.ids_after)
    votes, direction = sess["router"].run(None, {"features_576": feats[-1]})
    rt = RouterText.load(out / C.ROUTER_TEXT_FILE, granularities=5, vocab=table.shape[0],
                         k=tiny_model.config.filtered_text_num)
    logits = rt.logits(votes, direction, ids, table[ids])
    assert tiny_model.config.granularities[int(np.argmax(logits))] == ref.granularity
    np.testing.assert_allclose(logits, np.array(ref.router_logits), atol=1e-4)

    emb = prep.inputs_embeds.numpy()
    n_layers = tiny_model.config.text.num_hidden_layers
    kv = {f"past_key_values.{i}.{w}": np.zeros((1, 4, 0, 16), np.float32) for i in range(n_layers) for w in ("key", "value")}
    ids, pos = [], emb.shape[1]
    feeds = {"inputs_embeds": emb, "attention_mask": np.ones((1, pos), np.int64),
             "position_ids": np.arange(pos)[None], "logit_positions": np.array([pos - 1]), **kv}
    for _ in range(8):
        outs = sess["decoder"].run(None, feeds)
        nxt = int(outs[0][0, -1].argmax())
        if nxt == tiny_model.config.text.eos_token_id:
            break
        ids.append(nxt)
        kv = {f"past_key_values.{i}.{w}": outs[1 + 2 * i + j] for i in range(n_layers) for j, w in enumerate(("key", "value"))}
        feeds = {"inputs_embeds": table[[nxt]][None], "attention_mask": np.ones((1, pos + 1), np.int64),
                 "position_ids": np.array([[pos]]), "logit_positions": np.array([0]), **kv}
        pos += 1
    assert ids == ref.token_ids


def test_fp16_build_validates(tiny_ckpt, tmp_path):
    res = build(BuildOptions(model=tiny_ckpt, output=tmp_path / "fp16", precision="fp16", max_context=256), progress=lambda s: None)
    m = load_manifest(tmp_path / "fp16")
    assert m.precision == "fp16" and m.graphs["decoder"]["inputs"][0]["dtype"] == "float16"
    assert np.load(tmp_path / "fp16" / C.EMBED_TABLE_FILE).dtype == np.float16
    for g in ("vision", "router", "decoder"):
        assert m.validation[g]["status"] == "passed", m.validation[g]
        assert 1e-6 < m.validation[g]["max_abs_diff"] < 2e-2  # fp16 differs, but not much
    assert all(r.validation == "passed" for r in res.rows)


def test_stage3_build_has_no_router_graph(tiny_stage3_ckpt, tmp_path):
    build(BuildOptions(model=tiny_stage3_ckpt, output=tmp_path / "s3", max_context=256, validate=False), progress=lambda s: None)
    m = load_manifest(tmp_path / "s3")
    assert not m.has_router and "router" not in m.graphs and not (tmp_path / "s3" / "router.onnx").exists()
    assert m.validation == {}


def test_tensorrt_profiles_come_from_the_specs(tiny_model):
    b = bounds_for(tiny_model.config, None, None)
    assert (b.max_crops, b.max_context, b.min_visual, b.max_visual) == (5, 4096, 36, 2928)
    specs = graph_specs(tiny_model.config, b, "fp16")
    dec = specs["decoder"]
    prefill, decode = dec.profiles
    shapes = dec.profile_shapes(prefill)
    assert shapes["inputs_embeds"] == ((1, 36, 64), (1, 84, 64), (1, 4096, 64))
    assert shapes["past_key_values.0.key"] == ((1, 4, 0, 16),) * 3
    assert shapes["logit_positions"] == ((1,), (1,), (256,))   # scoring cap, not the whole context
    shapes = dec.profile_shapes(decode)
    assert shapes["inputs_embeds"] == ((1, 1, 64),) * 3
    assert shapes["past_key_values.1.value"] == ((1, 4, 36, 16), (1, 4, 2976, 16), (1, 4, 4095, 16))
    assert shapes["attention_mask"] == ((1, 37), (1, 2977), (1, 4096))
    assert specs["vision"].profile_shapes(specs["vision"].profiles[0])["pixel_values"] == (
        (1, 3, 336, 336), (3, 3, 336, 336), (5, 3, 336, 336))
    assert specs["router"].profile_shapes(specs["router"].profiles[0])["features_576"] == (
        (1, 576, 64), (3, 576, 64), (5, 576, 64))
    assert specs["router"].input_names == ["features_576"]                          # the others are its pools
    assert specs["router"].output_names == ["image_votes", "text_direction"]       # the question's part is a table


@pytest.mark.gpu
def test_tensorrt_engines_build_and_are_recorded(tiny_ckpt, tmp_path):
    res = build(BuildOptions(model=tiny_ckpt, output=tmp_path / "trt", precision="fp16", backend="trt", max_context=512),
                progress=lambda s: None)
    m = res.manifest
    assert set(m.engines) == {"vision", "router", "decoder"} and m.tensorrt["version"]
    assert all((tmp_path / "trt" / f).stat().st_size > 0 for f in m.engines.values())


def test_inspect_prints_manifest_and_io_tables(fp32_build):
    out, _, _ = fp32_build
    r = runner.invoke(export_app, ["inspect", str(out), "--verify"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert f"format {C.MANIFEST_FORMAT}, fp32, opset 18, context 4096, router: yes" in r.output
    assert "KV cache inplace (gqa); decode batch up to 4" in r.output and "past_length" in r.output
    assert "past_key_values.1.value" in r.output and "[batch[1..4], 4, 4096, 16]" in r.output  # the cache's capacity
    assert "profile decode: batch 1/2/4, seq_len 1/1/1" in r.output and "TensorRT engines: none" in r.output


def test_inspect_shows_the_concat_cache(tiny_concat_build):
    r = runner.invoke(export_app, ["inspect", str(tiny_concat_build)], terminal_width=200)
    assert r.exit_code == 0 and "KV cache concat; decode batch up to 1" in r.output
    assert "[1, 4, past_len[0..4095], 16]" in r.output


@pytest.mark.parametrize("args,code,match", [
    (["-m", "/nonexistent/model", "-o", "{tmp}/o"], 2, "model folder not found: /nonexistent/model"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--precision", "fp8"], 2, "--precision: expected one of ['fp32', 'fp16', 'int8', 'int4'], got 'fp8'"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--precision", "int8", "--calib-data", "{tmp}/nope.jsonl"], 2, "--calib-data: expected a .jsonl file or a folder"),
    (["-m", "{ckpt}", "-o", "{tmp}/exists"], 2, "already exists; pass --force"),
    (["-m", "{ckpt}", "-o", "{tmp}/afile/o"], 2, "is a file, not a folder"),
    (["-m", "{ckpt}", "-o", "/proc/avg-edge-build"], 2, "cannot write the output"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--backend", "trt"], 2, "pip install 'avg-edge[gpu]'"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--opset", "12"], 2, "--opset: fp32 builds use opsets 17..23, got 12"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--precision", "int4", "--opset", "18"], 2, "int4 builds use opsets 21..23"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--backend", "onnx"], 2, "('onnx' is now called 'ort')"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--max-batch", "0"], 2, "--max-batch: expected 1..64 requests per decode step, got 0"),
    (["-m", "{ckpt}", "-o", "{tmp}/o", "--kv-cache", "concat", "--max-batch", "4"], 2,
     "--max-batch 4: only the in-place KV cache batches requests, and this build's is concat (--kv-cache concat)"),
])
def test_build_errors_are_one_line_with_exit_codes(tiny_ckpt, tmp_path, args, code, match):
    (tmp_path / "exists").mkdir()
    (tmp_path / "afile").write_text("x")
    args = [a.format(tmp=tmp_path, ckpt=tiny_ckpt) for a in args]
    r = runner.invoke(export_app, ["build", *args], terminal_width=400)
    assert r.exit_code == code, r.output
    assert match in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_inspect_errors(tmp_path):
    r = runner.invoke(export_app, ["inspect", str(tmp_path)])
    assert r.exit_code == 1 and "no manifest.json; not a complete build" in r.output
    (tmp_path / C.MANIFEST_FILE).write_text(json.dumps({"format_version": 99}))
    r = runner.invoke(export_app, ["inspect", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 1 and f"build format version 99, this avg-edge reads version {C.MANIFEST_FORMAT}" in r.output


def test_killed_build_leaves_previous_build_intact(fp32_build, tiny_ckpt, tmp_path):
    out, _, _ = fp32_build
    target = tmp_path / "kill" / "build"
    target.parent.mkdir()
    import shutil

    shutil.copytree(out, target)
    before = {p.name: sha256_file(p) for p in target.iterdir()}
    cmd = [sys.executable, "-c", "from avg_edge.cli import export_main; export_main()",
           "build", "-m", str(tiny_ckpt), "-o", str(target), "--force", "--max-context", "512"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 120
        for line in proc.stderr:               # wait until the export is under way
            if "export vision.onnx" in line or time.time() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: sha256_file(p) for p in target.iterdir()} == before
    load_manifest(target, verify=True)
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert leftovers and all(p.name == f".build.building-{proc.pid}" for p in leftovers)
    for p in leftovers:                        # a half build is never accepted
        with pytest.raises(BuildFolderError, match="no manifest.json"):
            load_manifest(p)
    # the next build into the same parent removes what the killed one left
    build(BuildOptions(model=tiny_ckpt, output=target.parent / "other", max_context=256, validate=False, backend="ort"),
          progress=lambda s: None)
    assert sorted(p.name for p in target.parent.iterdir()) == ["build", "other"]


def test_default_model_is_the_demo_when_present(tmp_path, monkeypatch):
    import avg_edge.cli as cli

    monkeypatch.setattr(cli, "demo_checkpoint", lambda: tmp_path / "missing-demo")
    r = runner.invoke(export_app, ["build"], terminal_width=300)
    assert r.exit_code == 2 and "no -m given and the bundled demo model is missing" in r.output


@pytest.mark.parametrize("graph,weight", [
    ("decoder", "layers.1.mlp.down_proj.weight"),
    ("vision", "model.mm_projector.2.bias"),
    ("router", "router.router.2.weight"),
])
def test_a_wrong_weight_in_the_export_fails_validation(tiny_ckpt, tmp_path, graph, weight):
    """The build's two halves, composed here: references from the checkpoint's model, the
    ONNX file exported with one weight nudged (what an exporter bug would do).  The check
    the build runs against the references fails; with the right weight it passes."""
    import torch

    from avg_edge import validation as V
    from avg_edge.export.graphs import graph_module
    from avg_edge.export.onnx_export import export_graph
    from avg_edge.export.validate import reference_outputs
    from avg_edge.model import load_model
    from avg_edge.precision import precision
    from avg_edge.runtime.backends.ort_backend import OrtBackend

    model = load_model(tiny_ckpt)
    spec = graph_specs(model.config, bounds_for(model.config, None, 256), "fp32")[graph]
    points = V.validation_points(spec, attention_heads=4)
    refs = reference_outputs(graph_module(graph, model, spec), spec, points)
    statuses = []
    for nudge in (0.5, 0.0):
        module = graph_module(graph, load_model(tiny_ckpt), spec)      # export_graph transposes its Linear weights
        with torch.no_grad():
            dict(module.named_parameters())[weight].view(-1)[0] += nudge
        export_graph(module, spec, tmp_path, 18)
        with OrtBackend(spec, tmp_path / spec.file, providers="cpu") as b:
            statuses.append(V.check(spec, points, refs, lambda f: b.infer(f, check=False), precision("fp32").tolerance,
                                    b.describe()).status)
    assert statuses == ["failed", "passed"]


def test_a_failed_export_is_reported_from_its_process(tiny_ckpt, tmp_path):
    """An error inside the export's own process reaches the build as a one-line error with
    its category, and nothing is written."""
    from avg_edge.errors import AvgEdgeError

    bad = tmp_path / "ckpt"
    import shutil

    shutil.copytree(tiny_ckpt, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (bad / shard).write_bytes((bad / shard).read_bytes()[:1000])          # truncated shard
    with pytest.raises(AvgEdgeError, match="not a readable safetensors file") as e:
        build(BuildOptions(model=bad, output=tmp_path / "b", max_context=256), progress=lambda s: None)
    assert e.value.category == "build" and not (tmp_path / "b").exists()
