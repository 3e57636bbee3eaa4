"""The package installs whole: a wheel built from a clean copy carries the demo checkpoint
and the C header, installs into a fresh venv without torch, and its avg-run answers there;
missing extras are usage errors that name the extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from avg_edge.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the background?"
IMAGE = ROOT / "examples" / "demo-1.png"


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from the files git knows (a clean clone's content), not from this working tree's build/."""
    src = tmp_path_factory.mktemp("src") / "avg-edge"
    listed = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, cannot list the clean sources: {listed.stderr.strip()}")
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    p = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src])
    assert p.returncode == 0, p.stderr
    (whl,) = out.glob("avg_edge-*.whl")
    return whl


@pytest.fixture(scope="module")
def bare_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel and its base dependencies (no torch)."""
    env = tmp_path_factory.mktemp("venv") / "v"
    venv.create(env, with_pip=True)
    p = _run([env / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    assert p.returncode == 0, p.stderr
    return env


@pytest.fixture(scope="module")
def demo_build(demo_ort_build) -> Path:
    return demo_ort_build


def test_wheel_carries_data_files(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "avg_edge/include/avg_edge.h" in names
    assert "avg_edge/model/demo/checkpoint/config.json" in names
    assert any(n.startswith("avg_edge/model/demo/checkpoint/") and n.endswith(".safetensors") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "avg_edge/tests/")) for n in names)


def test_avg_run_answers_in_a_venv_without_torch(bare_venv, demo_build):
    py = bare_venv / "bin" / "python"
    p = _run([py, "-c", "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') is None else 3)"])
    assert p.returncode == 0, "the bare venv has torch; it should not"
    p = _run([bare_venv / "bin" / "avg-run", IMAGE, QUESTION, "-m", demo_build, "--json"])
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    with Pipeline.load(demo_build, backend="ort") as pipe:
        want = pipe.generate(IMAGE, QUESTION)
    assert (got["answer"], got["token_ids"], got["granularity"]) == (want.text, want.token_ids, want.granularity)
    p = _run([py, "-c", "from avg_edge import Pipeline; import sys; "
                        "print(Pipeline.__module__, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"])
    assert p.stdout.split() == ["avg_edge.runtime.pipeline", "[]"], p.stderr


@pytest.mark.parametrize("cmd,extra", [
    (["avg-serve", "-m", "."], "serve"),
    (["avg-export", "build", "-o", "x"], "export"),
    (["avg-export", "realign", "."], "export"),
])
def test_missing_extras_are_usage_errors_naming_them(bare_venv, tmp_path, cmd, extra):
    p = _run([bare_venv / "bin" / cmd[0], *cmd[1:]], cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert f"pip install 'avg-edge[{extra}]'" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1


def test_avg_export_build_without_m_from_the_wheel(wheel, tmp_path):
    """The wheel's own demo checkpoint and header are what the installed package finds
    (the export extra's packages come from this test's environment)."""
    target = tmp_path / "site"
    p = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel])
    assert p.returncode == 0, p.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    p = _run([sys.executable, "-c", "import avg_edge, avg_edge.runtime.capi.compile as c, avg_edge.model.demo as d; "
                                    "print(avg_edge.__file__); print(c.HEADER, c.HEADER.is_file()); print(d.CHECKPOINT)"],
             env=env)
    assert p.returncode == 0, p.stderr
    package, header, checkpoint = p.stdout.splitlines()
    assert package.startswith(str(target)) and header.startswith(str(target)) and header.endswith(" True")
    assert checkpoint.startswith(str(target))
    p = _run([sys.executable, "-c", "from avg_edge.cli import export_main; export_main()", "build", "-o", tmp_path / "b",
              "--no-validate", "--backend", "ort"], env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["model"].startswith(str(target))
