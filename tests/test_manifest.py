"""A malformed build folder is a one-line BuildFolderError (category build) naming the
file and the key, never an 'internal' error; files the manifest names stay inside the
folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from avg_edge import constants as C
from avg_edge.errors import AvgEdgeError, BuildFolderError, category_of, one_line
from avg_edge.manifest import load_manifest
from avg_edge.runtime.pipeline import Pipeline


@pytest.fixture
def folder(tiny_build, tmp_path) -> Path:
    out = tmp_path / "parent" / "b"
    shutil.copytree(tiny_build[0], out)
    (tmp_path / "parent" / "other").mkdir()
    shutil.copy(out / "vision.onnx", tmp_path / "parent" / "other" / "vision.onnx")
    return out


def _edit(folder: Path, change) -> None:
    m = json.loads((folder / C.MANIFEST_FILE).read_text())
    change(m)
    (folder / C.MANIFEST_FILE).write_text(json.dumps(m))


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _graph_file(value):
    def change(m):
        m["graphs"]["vision"]["file"] = value
        m["files"].pop("vision.onnx")
    return change


def _fails(folder: Path, *parts: str, verify: bool = False) -> str:
    with pytest.raises(AvgEdgeError) as e:               # BuildFolderError; the tokenizer's CheckpointError
        Pipeline.load(folder, backend="ort", verify=verify).close()
    message = one_line(e.value)
    assert category_of(e.value).name == "build" and "\n" not in message
    for part in parts:
        assert part in message, message
    return message


@pytest.mark.parametrize("change,key,expected", [
    (_set("graphs", None), "'graphs'", "should be an object"),
    (lambda m: m.pop("graphs"), "'graphs'", "missing key"),
    (lambda m: m.pop("context_length"), "'context_length'", "missing key"),
    (_set("engines", ["a"]), "'engines'", "should be an object"),
    (_set("files", ["vision.onnx"]), "'files'", "should be an object"),
    (_set("files", {"vision.onnx": "abc"}), "'files'", "{sha256, bytes}"),
    (_set("tensorrt", [1]), "'tensorrt'", "should be an object or null"),
    (_set("validation", [1]), "'validation'", "should be an object"),
    (_set("phases", {}), "'phases'", "should be a list"),
    (_set("pinpoints", [1, 2]), "'pinpoints'", "[width, height] pairs"),
    (_set("granularities", ["a"]), "'granularities'", "positive integers in ascending order"),
    (_set("granularities", []), "'granularities'", "positive integers in ascending order"),
    (_set("granularities", [576, 36]), "'granularities'", "positive integers in ascending order"),
    (_set("image_mean", ["x"]), "'image_mean'", "3 numbers"),
    (_set("image_std", [0.2, 0.0, 0.2]), "'image_std'", "3 positive numbers"),
    (_set("context_length", -1), "'context_length'", "a positive integer"),
    (_set("hidden_size", 0), "'hidden_size'", "a positive integer"),
    (_set("eos_token_id", -2), "'eos_token_id'", "a token id >= 0"),
    (_set("crop_size", True), "'crop_size'", "should be an integer"),
    (lambda m: m["graphs"].__setitem__("vision", 3), "graph 'vision'", "malformed"),
])
def test_malformed_manifest_values_are_named(folder, change, key, expected):
    _edit(folder, change)
    _fails(folder, f"{folder / C.MANIFEST_FILE}: ", key, expected)


@pytest.mark.parametrize("raw,expected", [
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'"a string"', "expected a JSON object, got str"),
    (b'{"format_version": "\xff"}', "not valid UTF-8 JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b"{not json", "not valid UTF-8 JSON"),
    (b"", "not valid UTF-8 JSON"),
])
def test_unreadable_manifest_files_are_named(folder, raw, expected):
    (folder / C.MANIFEST_FILE).write_bytes(raw)
    _fails(folder, f"{folder / C.MANIFEST_FILE}: {expected}")


@pytest.mark.parametrize("change,key,path", [
    (_graph_file("../other/vision.onnx"), "graphs.vision.file", "../other/vision.onnx"),
    (_graph_file("{parent}/other/vision.onnx"), "graphs.vision.file", "{parent}/other/vision.onnx"),
    (_graph_file("link.onnx"), "graphs.vision.file", "link.onnx"),                  # a link leading out
    (lambda m: m["engines"].__setitem__("vision", "../x.engine"), "engines.vision", "../x.engine"),
    (lambda m: m["router"].__setitem__("text_file", "../b/router_text.npz"), "router.text_file", "../b/router_text.npz"),
    (lambda m: m["files"].__setitem__("/etc/hostname", {"sha256": "", "bytes": 0}), "files entry", "/etc/hostname"),
    (_graph_file(""), "graphs.vision.file", "''"),
])
@pytest.mark.parametrize("verify", [False, True])
def test_files_outside_the_folder_are_refused(folder, change, key, path, verify):
    parent = str(folder.parent)
    (folder / "link.onnx").symlink_to(folder.parent / "other" / "vision.onnx")
    if path.startswith("{parent}"):
        change = _graph_file(path.format(parent=parent))
    _edit(folder, change)
    _fails(folder, f"{folder}: {C.MANIFEST_FILE} {key}: expected a file", path.format(parent=parent), verify=verify)


@pytest.mark.parametrize("name,garbage,expected", [
    (C.EMBED_TABLE_FILE, b"garbage", "not a readable .npy table"),
    (C.EMBED_TABLE_FILE, b"", "not a readable .npy table"),
    (C.IMAGE_NEWLINE_FILE, b"\x93NUMPY\x01\x00garbage", "not a readable .npy table"),
    (C.ROUTER_TEXT_FILE, b"garbage", "not a readable router table"),
    (C.TOKENIZER_JSON_FILE, b"garbage", "not a valid tokenizer.json"),
    ("vision.onnx", b"garbage", "could not load"),
])
def test_garbage_files_name_the_file(folder, name, garbage, expected):
    (folder / name).write_bytes(garbage)
    _fails(folder, str(folder / name), expected)                       # without --verify: the reader names it
    _fails(folder, f"checksum mismatch for ['{name}']", verify=True)


def test_an_object_table_is_refused_without_suggesting_pickle(folder):
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / C.IMAGE_NEWLINE_FILE).write_bytes(buf.getvalue())
    with pytest.raises(Exception, match="holds Python objects") as e:
        Pipeline.load(folder)
    assert "pickle" not in str(e.value)


def test_load_manifest_alone_checks_the_same(folder):
    _edit(folder, _set("engines", {"decoder": "/etc/hostname"}))
    with pytest.raises(BuildFolderError, match=r"manifest.json engines.decoder: expected a file name inside the folder, "
                                               r"got '/etc/hostname'"):
        load_manifest(folder)
