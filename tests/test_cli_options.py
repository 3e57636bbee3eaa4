"""Option bounds of avg-run, avg-serve and avg-export: a value out of range is a usage
error (exit 2) with one line on stderr, found before any build folder is read (the
folders here are empty: passing the check would end in a build error, exit 1)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from avg_edge.cli import export_app, run_app, serve_app
from avg_edge.errors import CATEGORIES
from avg_edge.model.tiny import textured_image

runner = CliRunner()
USAGE = CATEGORIES["usage"].exit_code


def _usage_error(r, option: str) -> None:
    assert r.exit_code == USAGE, r.output
    assert r.stderr.startswith(f"error: {option}") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.output


@pytest.fixture
def image(tmp_path):
    textured_image(64, 48).save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


@pytest.mark.parametrize("args,option", [
    (["--temp", "-1"], "temperature"),
    (["--temp", "nan"], "temperature"),
    (["--temp", "inf"], "temperature"),
    (["--top-p", "2"], "top_p"),
    (["--top-p", "nan"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "0"], "top_k"),
    (["--top-k", "-3"], "top_k"),
    (["--seed", "-1"], "seed"),
    (["-n", "0"], "--max-tokens"),
    (["--max-visual-tokens", "0"], "--max-visual-tokens"),
    (["--backend", "cuda"], "--backend"),
])
def test_avg_run_bad_options_are_usage_errors(image, tmp_path, args, option):
    (tmp_path / "empty-build").mkdir()
    r = runner.invoke(run_app, [str(image), "What?", "-m", str(tmp_path / "empty-build"), *args], terminal_width=300)
    _usage_error(r, option)


@pytest.mark.parametrize("args,option", [
    (["--port", "99999"], "--port: expected an integer 1..65535, got 99999"),
    (["--port", "-1"], "--port"),
    (["--port", "0"], "--port"),
    (["--max-request-mb", "-1"], "--max-request-mb: expected a number of megabytes > 0, got -1.0"),
    (["--max-request-mb", "0"], "--max-request-mb"),
    (["--max-request-mb", "nan"], "--max-request-mb"),
    (["--max-request-mb", "inf"], "--max-request-mb"),
    (["--max-queue", "0"], "--max-queue"),
    (["--threads", "-1"], "--threads: expected an integer 0..1024, got -1"),
    (["--api-key", ""], "--api-key"),
    (["--host", "192.0.2.1"], "--port"),               # TEST-NET: not an address of this machine
])
def test_avg_serve_bad_options_are_usage_errors(tmp_path, args, option):
    r = runner.invoke(serve_app, ["-m", str(tmp_path), *args], terminal_width=300)
    _usage_error(r, option)


def test_avg_serve_port_in_use_is_a_usage_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = runner.invoke(serve_app, ["-m", str(tmp_path), "--port", str(port)], terminal_width=300)
    _usage_error(r, f"--port {port}: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("command,args,option", [
    ("engines", ["--workspace-gb", "nan"], "--workspace-gb"),
    ("engines", ["--workspace-gb", "0"], "--workspace-gb"),
    ("build", ["--calib-samples", "0"], "--calib-samples"),
    ("build", ["--eval-samples", "-1"], "--eval-samples"),
    ("build", ["--max-accuracy-drop", "nan"], "--max-accuracy-drop"),
    ("build", ["--int4-block-size", "0"], "--int4-block-size"),
    ("realign", ["--epochs", "0"], "--epochs"),
    ("realign", ["--lr", "-0.1"], "--lr"),
    ("realign", ["--token-cost", "nan"], "--token-cost"),
    ("triton", ["--instances", "0"], "--instances"),
    ("triton", ["--threads", "-1"], "--threads"),
])
def test_avg_export_bad_options_are_usage_errors(tmp_path, command, args, option):
    target = {"build": ["-m", str(tmp_path), "-o", str(tmp_path / "out")], "triton": [str(tmp_path), str(tmp_path / "repo")]}.get(command, [str(tmp_path)])
    r = runner.invoke(export_app, [command, *target, *args], terminal_width=300)
    _usage_error(r, option)
