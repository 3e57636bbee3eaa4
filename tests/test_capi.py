"""The C ABI: libavg_edge.so built with cffi, a C program compiled by the system C compiler."""

from __future__ import annotations

import json
import subprocess

import pytest

from avg_edge.errors import CATEGORIES
from avg_edge.model.tiny import textured_image
from avg_edge.runtime.capi.compile import cdef_from_header
from avg_edge.runtime.pipeline import Pipeline


@pytest.mark.parametrize("granularity", ["auto", "144"])
def test_c_example_answers_like_the_python_runtime(capi, clean_env, tiny_build, tmp_path, granularity):
    _, exe = capi
    image = tmp_path / "photo.png"
    textured_image(640, 480, seed=4).save(image)
    question = "What colour is the background?"
    p = subprocess.run([str(exe["example"]), str(tiny_build[0]), str(image), question, granularity],
                       capture_output=True, text=True, env=clean_env, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stderr.strip().splitlines()[-1])
    expected = Pipeline.load(tiny_build[0]).generate(image.read_bytes(), question, max_new_tokens=32,
                                                     granularity=None if granularity == "auto" else int(granularity))
    assert result["token_ids"] == expected.token_ids and result["granularity"] == expected.granularity
    assert result["answer"] == expected.text
    assert p.stdout.strip() == expected.text.strip()        # the streamed pieces add up to the answer


def test_bad_calls_return_codes_and_messages(capi, clean_env, tiny_build, tmp_path):
    _, exe = capi
    image = tmp_path / "photo.png"
    textured_image(300, 200).save(image)
    p = subprocess.run([str(exe["bad_calls"]), str(tiny_build[0]), str(image)], capture_output=True, text=True,
                       env=clean_env, timeout=300)
    assert p.returncode == 0, p.stderr                       # the host process survived every call
    rows = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in p.stdout.splitlines()}
    code = {k: int(v[0]) for k, v in rows.items() if v and v[0].lstrip("-").isdigit()}
    msg = {k: (v[1] if len(v) > 1 else "") for k, v in rows.items()}
    assert code["open_null_dir"] == 1 and "build_dir: expected a string, got NULL" in msg["open_null_dir"]
    assert code["open_null_out"] == 1 and "out_ctx" in msg["open_null_out"]
    assert code["open_missing"] == 2 and "build folder not found" in msg["open_missing"]
    assert code["open_bad_json"] == 1 and "expected a JSON object" in msg["open_bad_json"]
    assert code["open_ok"] == 0 and msg["open_ok"] == ""
    assert code["run_null_ctx"] == 1 and code["result_null_on_null_ctx"] == 1
    assert code["run_null_image"] == 1 and code["result_null_after_error"] == 1
    assert code["run_corrupt_image"] == 3 and "cannot read image bytes" in msg["run_corrupt_image"]
    assert code["run_empty_image"] == 3 and "empty (0 bytes)" in msg["run_empty_image"]
    assert code["run_null_question"] == 1
    assert code["run_bad_utf8_question"] == 1 and "question: expected UTF-8 text" in msg["run_bad_utf8_question"]
    assert code["run_bad_params"] == 1 and "[36, 72, 144, 288, 576]" in msg["run_bad_params"]
    assert code["run_unknown_param"] == 1 and "unknown keys ['colour']" in msg["run_unknown_param"]
    assert code["run_cancelled"] == 5 and code["callback_calls"] == 1
    assert code["close_ok"] == 0 and code["close_again"] == 1 and code["close_null"] == 0
    assert rows["version"][0].strip() == __import__("avg_edge").__version__


def test_header_is_the_cdef_source():
    cdef = cdef_from_header()
    for name in ("avg_edge_open", "avg_edge_run", "avg_edge_free_string", "avg_edge_last_error",
                 "avg_edge_version", "avg_edge_close", "AVG_EDGE_ERR_CANCELLED"):
        assert name in cdef
    assert "/*" not in cdef


def _one_call(capi, clean_env, build, image, question, params, *mode, timeout=120):
    p = subprocess.run([str(capi[1]["one_call"]), str(build), str(image), question, json.dumps(params), *mode],
                       capture_output=True, env=clean_env, timeout=timeout)   # a hang fails here
    assert p.returncode == 0, p.stderr
    rows = [line.split(" ", 2) for line in p.stdout.decode().splitlines()]
    return {r[0]: (int(r[1]), r[2] if len(r) > 2 else "") for r in rows}


@pytest.mark.parametrize("mode,call", [("rerun", "avg_edge_run"), ("close", "avg_edge_close")])
def test_token_callback_calling_into_its_own_context_is_refused(capi, clean_env, tiny_build, tmp_path, mode, call):
    """It used to wait for the run it was called from, forever.  Now: busy at once, the
    answer goes on, and the context stays open until the real close."""
    textured_image(300, 200).save(tmp_path / "photo.png")
    out = _one_call(capi, clean_env, tiny_build[0], tmp_path / "photo.png", "What?", {"max_new_tokens": 4}, mode)
    code, message = out["inner"]
    assert code == CATEGORIES["busy"].c_code and message.startswith(f"{call}: expected a context that is not running")
    assert out["run"] == (0, "") and out["close"] == (0, "")


@pytest.mark.parametrize("question,category,match", [
    ("word " * 3000, "limit", "the prompt is"),
    (b"caf\xe9?", "usage", "question: expected UTF-8 text"),
    (b"What\xff\xfe?", "usage", "question: expected UTF-8 text"),
])
def test_bad_questions_follow_the_table(capi, clean_env, tiny_build, tmp_path, question, category, match):
    textured_image(300, 200).save(tmp_path / "photo.png")
    out = _one_call(capi, clean_env, tiny_build[0], tmp_path / "photo.png", question, {"max_new_tokens": 2})
    code, message = out["run"]
    assert code == CATEGORIES[category].c_code and message.startswith(match), message


def test_header_documents_the_codes_of_the_table():
    """Each AVG_EDGE_ERR_* comment starts with its category's name (the table's, not another)."""
    import re

    from avg_edge.runtime.capi.compile import HEADER

    comments = dict(re.findall(r"#define (AVG_EDGE_ERR_\w+) \d+\s+/\* (\w+):", HEADER.read_text()))
    assert comments == {c.c_name: c.name for c in CATEGORIES.values()}
