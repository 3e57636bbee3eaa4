"""One table from error category to exit code, HTTP status and C return code: README and
include/avg_edge.h agree with it, and each front end answers each category it can meet
with the table's code.

Not reachable by construction (and so not tested per front end): `internal` in the C
ABI (it needs a bug; the mapping itself is tested), `cancelled` over HTTP (the client
that cancels is gone), `build` on a running server (the build folder is read at
startup, where it is the CLI's exit code), `busy` in avg-run (nothing to queue)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from avg_edge.errors import CATEGORIES, AvgEdgeError, BackendError, category_of, markdown_table
from avg_edge.model.tiny import textured_image

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_readme_shows_the_table():
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_header_defines_the_table_codes():
    header = (ROOT / "include" / "avg_edge.h").read_text()
    defined = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define (AVG_EDGE_ERR_\w+) (\d+)", header)}
    assert defined == {c.c_name: c.c_code for c in CATEGORIES.values()}
    assert "#define AVG_EDGE_OK 0" in header


def test_every_error_class_has_a_category():
    import avg_edge.errors as E

    classes = [v for v in vars(E).values() if isinstance(v, type) and issubclass(v, AvgEdgeError)]
    assert len(classes) >= 12 and all(c.category in CATEGORIES for c in classes)
    assert category_of(ZeroDivisionError()).name == "internal" and category_of(KeyboardInterrupt()).name == "cancelled"


# -- builds that fail in each way --------------------------------------------------------
@pytest.fixture(scope="module")
def broken_build(tiny_build, tmp_path_factory) -> Path:
    """A build whose vision graph loads but fails when run (a Reshape no input fits)."""
    out = tmp_path_factory.mktemp("broken") / "b"
    shutil.copytree(tiny_build[0], out)
    m = json.loads((out / "manifest.json").read_text())
    spec = m["graphs"]["vision"]
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["crops", 3, 336, 336])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [25, -1])
    nodes = [helper.make_node("Reshape", ["pixel_values", "shape"], ["flat"])]
    outs = []
    for t in spec["outputs"]:
        nodes.append(helper.make_node("Identity", ["flat"], [t["name"]]))
        outs.append(helper.make_tensor_value_info(t["name"], TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "broken", [x], outs, initializer=[shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(out / "vision.onnx"))
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "photo.png"
    textured_image(640, 480).save(p)
    return p


@pytest.fixture(scope="module")
def junk_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "junk.png"
    p.write_bytes(b"definitely not an image")
    return p


def cases(tiny_build, small_context_build, broken_build, image_file, junk_file, tmp_path):
    """category -> (build folder, image, question, granularity)."""
    return {
        "usage": (tiny_build[0], image_file, "What?", "100"),
        "image": (tiny_build[0], junk_file, "What?", "auto"),
        "build": (tmp_path / "no-such-build", image_file, "What?", "auto"),
        "limit": (small_context_build, image_file, "What?", "576"),
        "failed": (broken_build, image_file, "What?", "auto"),
    }


# -- avg-run -----------------------------------------------------------------------------
@pytest.mark.parametrize("category", ["usage", "image", "build", "limit", "failed"])
def test_avg_run_exit_codes(category, tiny_build, small_context_build, broken_build, image_file, junk_file, tmp_path):
    from avg_edge.cli import run_app

    folder, image, question, g = cases(tiny_build, small_context_build, broken_build, image_file, junk_file, tmp_path)[category]
    (tmp_path / "no-such-build").mkdir() if category == "build" else None      # a folder without a manifest
    r = runner.invoke(run_app, [str(image), question, "-m", str(folder), "-g", g, "-n", "2"], terminal_width=300)
    assert r.exit_code == CATEGORIES[category].exit_code, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.output


@pytest.mark.parametrize("category,raised", [("cancelled", KeyboardInterrupt()), ("internal", ZeroDivisionError("x"))])
def test_avg_run_exit_codes_for_interrupts_and_bugs(category, raised, tiny_build, image_file, monkeypatch):
    from avg_edge.cli import run_app
    from avg_edge.runtime.pipeline import Pipeline

    def boom(*a, **k):
        raise raised

    monkeypatch.setattr(Pipeline, "generate", boom)
    r = runner.invoke(run_app, [str(image_file), "What?", "-m", str(tiny_build[0])], terminal_width=300)
    assert r.exit_code == CATEGORIES[category].exit_code, r.output
    assert ("internal: ZeroDivisionError" if category == "internal" else "interrupted") in r.stderr


# -- avg-serve (in process) ----------------------------------------------------------------
def _client(folder: Path):
    from starlette.testclient import TestClient

    from avg_edge.runtime.pipeline import Pipeline
    from avg_edge.runtime.server import ServerOptions, create_app

    pipe = Pipeline.load(folder, backend="ort")
    return TestClient(create_app(pipe, ServerOptions(model_id="m")), raise_server_exceptions=False), pipe


def _body(image: Path, granularity: str, stream: bool = False) -> dict:
    import base64

    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 2, "granularity": granularity if granularity == "auto" else int(granularity), "stream": stream}


@pytest.mark.parametrize("category", ["usage", "image", "limit", "failed"])
def test_server_statuses(category, tiny_build, small_context_build, broken_build, image_file, junk_file, tmp_path):
    folder, image, _, g = cases(tiny_build, small_context_build, broken_build, image_file, junk_file, tmp_path)[category]
    client, pipe = _client(folder)
    with client, pipe:
        r = client.post("/v1/chat/completions", json=_body(image, g))
    assert r.status_code == CATEGORIES[category].http_status, r.text
    err = r.json()["error"]
    assert err["code"] == category and err["type"] == ("invalid_request_error" if r.status_code < 500 else "server_error")


def test_server_status_for_a_bug(tiny_build, image_file, monkeypatch):
    client, pipe = _client(tiny_build[0])
    monkeypatch.setattr(pipe, "prepare", lambda *a, **k: 1 / 0)       # what the scheduler calls first
    with client, pipe:
        r = client.post("/v1/chat/completions", json=_body(image_file, "auto"))
    assert r.status_code == CATEGORIES["internal"].http_status and r.json()["error"]["code"] == "internal"
    assert "internal: ZeroDivisionError" in r.json()["error"]["message"]


# -- the C ABI ------------------------------------------------------------------------------
@pytest.mark.parametrize("category", ["usage", "image", "build", "limit", "failed", "cancelled"])
def test_c_return_codes(category, capi, clean_env, tiny_build, small_context_build, broken_build, image_file, junk_file,
                        tmp_path):
    folder, image, question, g = cases(tiny_build, small_context_build, broken_build, image_file, junk_file,
                                       tmp_path).get(category, (tiny_build[0], image_file, "What?", "auto"))
    params = json.dumps({"granularity": g if g == "auto" else int(g), "max_new_tokens": 4})
    extra = ["cancel"] if category == "cancelled" else []
    p = subprocess.run([str(capi[1]["one_call"]), str(folder), str(image), question, params, *extra],
                       capture_output=True, text=True, env=clean_env, timeout=300)
    assert p.returncode == 0, p.stderr
    codes = {line.split(" ", 2)[0]: int(line.split(" ", 2)[1]) for line in p.stdout.splitlines()}
    last = codes.get("run", codes["open"])
    assert last == CATEGORIES[category].c_code, p.stdout


def test_c_code_for_a_bug_is_internal():
    from avg_edge.runtime.capi.impl import code_for

    assert code_for(ZeroDivisionError()) == CATEGORIES["internal"].c_code
    assert code_for(BackendError("x")) == CATEGORIES["failed"].c_code
    assert np.unique([code_for(type(c.name, (AvgEdgeError,), {"category": c.name})()) for c in CATEGORIES.values()]).size \
        == len(CATEGORIES)
