"""`avg-export triton`: the model repository, served for real by a tritonserver on
loopback (the one bundled in the nvidia-pytriton wheel, which `make test` unpacks into
build/tritonserver), against the runtime's own Pipeline."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from avg_edge.errors import ImageError, InputError, LimitError, UsageError
from avg_edge.export.triton import LocalTritonServer, TritonOptions, write_repository
from avg_edge.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
TRITON_ROOT = ROOT / "build" / "tritonserver" / "pytriton" / "tritonserver"
EXAMPLES = ROOT / "examples"
CASES = [("demo-1.png", "What colour is the background?", None),
         ("demo-2.png", "What colour is the marker right of the white dot?", None),
         ("demo-2.png", "What colour is the marker right of the white dot?", 36),
         ("demo-1.png", "Which side is the large shape on?", 576)]


@pytest.fixture(scope="module")
def demo_build(demo_ort_build) -> Path:
    return demo_ort_build


def _config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_repository_configs_parse_and_follow_the_specs(demo_build, tmp_path, backend):
    """Every config.pbtxt is a valid ModelConfig (a misspelt field would be rejected);
    names, dtypes and dims are the build's; vision and router are not batched."""
    pytest.importorskip("tritonclient.grpc", reason="the triton extra (tritonclient[grpc]) is not installed")
    repo = tmp_path / "repo"
    models = write_repository(demo_build, repo, TritonOptions(backend=backend, instances=2, orchestrators=3))
    assert models == ["vision", "router", "avg_edge"]
    assert sorted(p.name for p in repo.iterdir()) == sorted(models)          # every folder is taken for a model
    with Pipeline.load(demo_build, backend="ort") as pipe:
        for name in ("vision", "router"):
            cfg = _config(repo / name / "config.pbtxt")
            spec = pipe.manifest.spec(name)
            assert cfg.name == name and cfg.max_batch_size == 0
            assert cfg.backend == backend and cfg.instance_group[0].count == 2
            assert [i.name for i in cfg.input] == spec.input_names
            assert [o.name for o in cfg.output] == spec.output_names
            assert list(cfg.input[0].dims) == [-1 if isinstance(d, str) else d for d in spec.inputs[0].shape]
            assert (repo / name / "1" / spec.file).is_file()
            if backend == "python":
                assert (repo / name / "1" / "model.py").is_file()
            else:
                assert cfg.default_model_filename == spec.file
    orch = _config(repo / "avg_edge" / "config.pbtxt")
    assert orch.model_transaction_policy.decoupled and orch.instance_group[0].count == 3
    build = repo / "avg_edge" / "1" / "build"
    assert not (build / "vision.onnx").exists() and (build / "decoder.onnx").is_file()
    assert sorted(json.loads((build / "manifest.json").read_text())["files"]) == sorted(
        p.name for p in build.iterdir() if p.name != "manifest.json")


def test_tensorrt_repository_needs_engines_and_parses_with_them(demo_build, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="the triton extra (tritonclient[grpc]) is not installed")
    with pytest.raises(UsageError, match="no TensorRT engine for vision"):
        write_repository(demo_build, tmp_path / "trt", TritonOptions(backend="tensorrt"))
    assert not (tmp_path / "trt").exists() and not list(tmp_path.iterdir())      # nothing half-written
    # A build that lists engines (here: stand-in files; engines cannot be built without a GPU).
    import shutil

    fake = tmp_path / "with-engines"
    shutil.copytree(demo_build, fake)
    m = json.loads((fake / "manifest.json").read_text())
    for g in ("vision", "router"):
        (fake / f"{g}.engine").write_bytes(b"stand-in")
    m["engines"] = {"vision": "vision.engine", "router": "router.engine"}
    (fake / "manifest.json").write_text(json.dumps(m))
    repo = tmp_path / "trt-repo"
    write_repository(fake, repo, TritonOptions(backend="tensorrt"))
    cfg = _config(repo / "vision" / "config.pbtxt")
    assert cfg.backend == "tensorrt" and cfg.default_model_filename == "vision.engine"
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    assert (repo / "vision" / "1" / "vision.engine").read_bytes() == b"stand-in"


def test_repository_errors(demo_build, tmp_path):
    with pytest.raises(UsageError, match="expected one of"):
        write_repository(demo_build, tmp_path / "r", TritonOptions(backend="tflite"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="pass --force"):
        write_repository(demo_build, tmp_path / "exists", TritonOptions())
    with pytest.raises(UsageError, match="must not be inside the build folder"):
        write_repository(demo_build, demo_build / "repo", TritonOptions(force=True))


@pytest.fixture(scope="module")
def served(demo_build, tmp_path_factory):
    if not (TRITON_ROOT / "bin" / "tritonserver").is_file():
        pytest.skip(f"no tritonserver at {TRITON_ROOT} (make test unpacks it from the nvidia-pytriton wheel; "
                    "the download failed or make was not used)")
    pytest.importorskip("tritonclient.grpc", reason="the triton extra (tritonclient[grpc]) is not installed")
    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(demo_build, repo, TritonOptions(backend="python", orchestrators=2, threads=1))
    with LocalTritonServer(repo, TRITON_ROOT) as server:
        yield server


def test_triton_answers_like_the_pipeline(served, demo_build):
    """Concurrent streams through Triton: the same text, granularity and visual tokens as
    Pipeline.generate; the router model is skipped for fixed-granularity requests."""
    from avg_edge.runtime.triton import ask

    def stats() -> dict[str, int]:
        with urllib.request.urlopen(f"http://{served.http_url}/v2/models/stats", timeout=10) as r:
            body = json.loads(r.read())
        return {m["name"]: int(m["inference_stats"]["success"]["count"]) for m in body["model_stats"]}

    before = stats()
    with Pipeline.load(demo_build, backend="ort") as pipe:
        want = [pipe.generate(str(EXAMPLES / img), q, granularity=g, max_new_tokens=16) for img, q, g in CASES]
    with ThreadPoolExecutor(len(CASES)) as pool:
        got = list(pool.map(lambda c: ask(served.grpc_url, (EXAMPLES / c[0]).read_bytes(), c[1], granularity=c[2],
                                          max_tokens=16), CASES))
    for (img, q, g), w, r in zip(CASES, want, got):
        assert (r.text, r.granularity, r.visual_tokens, r.finish_reason) == \
            (w.text, w.granularity, w.visual_tokens, w.finish_reason), (img, q, g)
        assert r.pieces and "".join(r.pieces).strip() == w.text          # streamed, piece by piece
    after = stats()
    routed = sum(g is None for _, _, g in CASES)
    assert after["avg_edge"] - before["avg_edge"] == len(CASES)
    assert after["vision"] - before["vision"] == len(CASES)
    assert after["router"] - before["router"] == routed                  # skipped when the granularity is fixed


def test_triton_errors_keep_their_category(served):
    """Client mistakes reach the client as the error table's exceptions, and the server
    keeps serving."""
    from avg_edge.runtime.triton import ask

    with pytest.raises(ImageError, match="cannot read image bytes"):
        ask(served.grpc_url, b"not an image", "What colour is the background?")
    with pytest.raises(InputError, match="granularity: expected auto or one of"):
        ask(served.grpc_url, (EXAMPLES / "demo-1.png").read_bytes(), "What?", granularity=100)
    with pytest.raises(LimitError, match="fit no granularity"):
        ask(served.grpc_url, (EXAMPLES / "demo-1.png").read_bytes(), "What?", max_visual_tokens=10)
    r = ask(served.grpc_url, (EXAMPLES / "demo-1.png").read_bytes(), "What colour is the background?")
    assert r.finish_reason in ("stop", "length")                          # the server is still serving


def test_triton_matches_the_golden_tokens(served):
    """The golden matrix (tests/golden, shared by the PyTorch, ONNX Runtime and TensorRT
    paths) through Triton: the same granularity and text for every case."""
    import io

    from avg_edge.model.demo.data import sample
    from avg_edge.runtime.triton import ask

    golden = json.loads((ROOT / "tests" / "golden" / "demo_greedy.json").read_text())
    for case in golden:
        png = io.BytesIO()
        sample("test", case["index"]).image.save(png, format="PNG")        # lossless: the same pixels
        r = ask(served.grpc_url, png.getvalue(), case["question"], granularity=case["granularity"], max_tokens=8)
        assert (r.granularity, r.text) == (case["chosen"], case["text"]), case
