"""avg-run: output channels, exit codes and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from avg_edge import constants as C
from avg_edge.cli import run_app
from avg_edge.model.tiny import textured_image

runner = CliRunner()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions (a decompression bomb) with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    ok = {}
    textured_image(640, 480).save(d / "photo.png")
    ok["photo"] = d / "photo.png"
    textured_image(1, 1).save(d / "one.png")
    ok["1x1"] = d / "one.png"
    textured_image(10, 500).save(d / "thin.png")
    ok["1:50"] = d / "thin.png"
    textured_image(200, 100).convert("RGBA").save(d / "rgba.png")
    ok["rgba"] = d / "rgba.png"
    textured_image(200, 100).convert("CMYK").save(d / "cmyk.jpg")
    ok["cmyk"] = d / "cmyk.jpg"
    Image.fromarray((np.arange(200 * 100, dtype=np.uint16).reshape(100, 200) * 3)).save(d / "gray16.png")
    ok["16-bit"] = d / "gray16.png"
    textured_image(200, 100).convert("P").save(d / "palette.png")
    ok["palette"] = d / "palette.png"
    frames = [textured_image(120, 80, seed=i) for i in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    ok["animated"] = d / "anim.gif"
    bad = {}
    (d / "empty.png").write_bytes(b"")
    bad["empty"] = (d / "empty.png", "is empty (0 bytes)")
    buf = io.BytesIO()
    textured_image(64, 64).save(buf, format="PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[:120])
    bad["truncated"] = (d / "cut.png", "cannot read")
    (d / "notes.txt").write_text("this is not an image\n")
    bad["text"] = (d / "notes.txt", "cannot read")
    (d / "bomb.png").write_bytes(_png_header_only(40000, 40000))
    bad["bomb"] = (d / "bomb.png", "decompression-bomb limit")
    return ok, bad


def _run(args):
    return runner.invoke(run_app, [str(a) for a in args], terminal_width=300)


@pytest.mark.parametrize("kind", ["photo", "1x1", "1:50", "rgba", "cmyk", "16-bit", "palette", "animated"])
def test_images_that_work(tiny_build, images, kind):
    r = _run([images[0][kind], "What colour is the background?", "-m", tiny_build[0], "-n", "3", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["granularity"] in (36, 72, 144, 288, 576) and d["visual_tokens"] > 0 and len(d["token_ids"]) <= 3


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "bomb"])
def test_bad_images_are_one_line_errors(tiny_build, images, kind):
    path, match = images[1][kind]
    r = _run([path, "What?", "-m", tiny_build[0]])
    assert r.exit_code == 1, r.output
    assert match in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.output


@pytest.mark.parametrize("args,code,match", [
    (["{img}", "   "], 2, "empty question"),
    (["{dir}/missing.png", "What?"], 2, "image file not found"),
    (["{img}", "What?", "-g", "100"], 2, "--granularity: expected auto or one of this build's granularities 36, 72, 144, 288, 576; got '100'"),
    (["{img}", "What?", "--backend", "cuda"], 2, "--backend: expected one of ['auto', 'ort', 'trt']"),
    (["{img}", "What?", "-m", "{dir}/no-build"], 2, "build folder not found"),
    (["{img}", "What?", "--temp", "-2"], 2, "temperature"),
    (["{img}", "What?", "--top-p", "1.5"], 2, "top_p"),
])
def test_usage_errors(tiny_build, images, tmp_path, args, code, match):
    args = [a.format(img=images[0]["photo"], dir=tmp_path) for a in args]
    if "-m" not in args:
        args += ["-m", str(tiny_build[0])]
    r = _run(args)
    assert r.exit_code == code, r.output
    assert match in r.stderr and "Traceback" not in r.output


def test_prompt_longer_than_context(small_context_build, images):
    r = _run([images[0]["photo"], "What?", "-m", small_context_build, "-g", "576"])
    assert r.exit_code == 1
    assert "the prompt is" in r.stderr and "(2340 visual)" in r.stderr and "context holds 256" in r.stderr
    ok = _run([images[0]["photo"], "What?", "-m", small_context_build, "-g", "36", "-n", "2"])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("damage,match", [
    ("missing", "missing file(s) ['router.onnx']"),
    ("checksum", "checksum mismatch for ['tokenizer.json']"),
    ("version", f"build format version 0, this avg-edge reads version {C.MANIFEST_FORMAT}"),
    ("no-router-entry", "'router' should be an object with 'text_file', 'text_candidates' and 'text_from'"),
    ("router-table", "'token_votes' should be float32 [400, 5], got float64 [400, 5]"),
])
def test_broken_build_folders(tiny_build, images, tmp_path, damage, match):
    folder = tmp_path / "b"
    shutil.copytree(tiny_build[0], folder)
    if damage == "missing":
        (folder / "router.onnx").unlink()
    elif damage == "checksum":
        with open(folder / C.TOKENIZER_JSON_FILE, "a") as f:
            f.write(" ")
    elif damage == "no-router-entry":
        m = json.loads((folder / C.MANIFEST_FILE).read_text())
        del m["router"]
        (folder / C.MANIFEST_FILE).write_text(json.dumps(m))
    elif damage == "router-table":           # a well-formed file of the wrong dtype (and no --verify checksum)
        with np.load(folder / C.ROUTER_TEXT_FILE) as z:
            arrays = {k: z[k] for k in z.files}
        np.savez(folder / C.ROUTER_TEXT_FILE, **{**arrays, "token_votes": arrays["token_votes"].astype(np.float64)})
        m = json.loads((folder / C.MANIFEST_FILE).read_text())
        m["files"].pop(C.ROUTER_TEXT_FILE)
        (folder / C.MANIFEST_FILE).write_text(json.dumps(m))
    else:
        m = json.loads((folder / C.MANIFEST_FILE).read_text())
        m["format_version"] = 0
        (folder / C.MANIFEST_FILE).write_text(json.dumps(m))
    r = _run([images[0]["photo"], "What?", "-m", folder, "--verify"])
    assert r.exit_code == 1, r.output
    assert match in r.stderr and "Traceback" not in r.output


def test_answer_on_stdout_timings_on_stderr(tiny_build, images):
    r = _run([images[0]["photo"], "What colour is the background?", "-m", tiny_build[0], "-n", "4", "-v"])
    assert r.exit_code == 0, r.output
    for words in ("load time:", "image preprocess:", "vision:", "router:", "visual tokens:", "prompt eval count:",
                  "prompt eval duration:", "eval count:", "eval duration:", "time to first token:", "tokens/s"):
        assert words in r.stderr and words not in r.stdout
    assert "vs 2340 at 576" in r.stderr


def test_a_one_token_answer_has_no_decode_rate(tiny_build, images):
    """With one token there is no decode step to time: say so instead of "0.00 tokens/s"."""
    r = _run([images[0]["photo"], "What colour is the background?", "-m", tiny_build[0], "-n", "1", "-v"])
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("eval duration:")]
    assert "no decode step" in line and "tokens/s" not in line, line


def test_console_script_end_to_end(tiny_build, images):
    cmd = [sys.executable, "-c", "from avg_edge.cli import run_main; run_main()", str(images[0]["photo"]),
           "What?", "-m", str(tiny_build[0]), "-n", "2", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["backend"] == "onnxruntime CPU"
    p = subprocess.run(cmd[:3] + ["/nonexistent.png", "What?", "-m", str(tiny_build[0])], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: image file not found: /nonexistent.png"
