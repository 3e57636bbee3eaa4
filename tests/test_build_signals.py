"""A build stopped by a signal leaves nothing half-written: SIGTERM cleans up its own
hidden folder (as Ctrl-C does); what SIGKILL leaves, the next build into the same parent
removes, while a running build's folder is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avg_edge import constants as C
from avg_edge.errors import CATEGORIES
from avg_edge.manifest import BuildCommit


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("kind", ["building", "old", "work"])
def test_leftovers_of_dead_builds_are_removed_by_the_next_build(tmp_path, kind):
    dead, alive = _dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".b.{kind}-{pid}").mkdir()
        (tmp_path / f".b.{kind}-{pid}" / "vision.onnx").write_bytes(b"half")
    (tmp_path / f".notes.{kind}-x").mkdir()                           # not ours: no pid
    with BuildCommit(tmp_path / "other") as commit:
        (commit.folder / "f").write_text("x")
        commit.finish(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".b.{kind}-{alive}", f".notes.{kind}-x", "other"])


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_leaving_the_block_early_removes_the_hidden_folder(tmp_path, raised):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / C.MANIFEST_FILE).write_text("{}")
    with pytest.raises(raised):
        with BuildCommit(tmp_path / "b") as commit:
            (commit.folder / "vision.onnx").write_bytes(b"half")
            commit.scratch()
            raise raised()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                # restored


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, CATEGORIES["cancelled"].exit_code),
                                      (signal.SIGINT, CATEGORIES["cancelled"].exit_code)])
def test_a_signalled_build_removes_its_own_folder(tiny_ckpt, tmp_path, sig, code):
    target = tmp_path / "parent" / "build"
    # Ctrl-C at a terminal reaches a Python that has its own SIGINT handler.  A shell that
    # starts the tests in the background (`bash .ci/run &`) hands its children SIGINT
    # ignored, and the build rightly keeps that, so the child puts Python's handler back.
    boot = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    cmd = [sys.executable, "-c", boot + "from avg_edge.cli import export_main; export_main()",
           "build", "-m", str(tiny_ckpt), "-o", str(target), "--max-context", "256", "--no-validate"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        deadline = time.time() + 120
        for line in proc.stderr:                   # wait until the export is under way
            lines.append(line)
            if "export vision.onnx" in line or time.time() > deadline:
                break
        assert (target.parent / f".build.building-{proc.pid}").is_dir(), lines
        proc.send_signal(sig)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, rest
    assert "error: interrupted" in rest.strip().splitlines() and "Traceback" not in rest, rest
    assert list(target.parent.iterdir()) == []                              # no .build.building-PID, no build


def test_finish_is_not_split_by_a_signal(tmp_path, monkeypatch):
    """Between moving the old build aside and the new one in, SIGTERM waits."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old-file").write_text("old")
    renames = []
    real_rename = os.rename

    def rename(src, dst):
        renames.append(Path(dst).name)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGTERM)                           # arrives mid-finish
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with BuildCommit(tmp_path / "b") as commit:
            (commit.folder / "new-file").write_text("new")
            commit.finish(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (tmp_path / "b" / "new-file").is_file()
    assert len(renames) == 2


