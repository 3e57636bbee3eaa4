"""`avg-export engines`: engines on the device, from the ONNX build folder, without torch.

TensorRT is absent here, so the engine build itself is a `gpu` test; what runs here is
that the command imports neither torch nor transformers, says what to install, and that
the torch-free check against the stored references (the same code the engines go through)
passes for the build's own graphs and fails when a reference is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from avg_edge import constants as C

TORCH_FREE = r"""
import sys
for name in ("torch", "transformers"):
    sys.modules[name] = None          # importing them now raises ImportError
from avg_edge.cli import export_main
sys.argv = ["avg-export", "engines", *sys.argv[1:]]
try:
    export_main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m] is not None)
print("EXIT", code, heavy, file=sys.stderr)
"""


def test_engines_command_is_torch_free_and_says_what_to_install(tiny_build):
    p = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tiny_build[0])], capture_output=True, text=True, timeout=120)
    last = p.stderr.strip().splitlines()
    assert last[-1] == "EXIT 2 []", p.stderr
    assert "avg-export engines: tensorrt is not installed" in last[0] and "pip install 'avg-edge[gpu]'" in last[0]


CHECK = r"""
import sys, json
for name in ("torch", "transformers"):
    sys.modules[name] = None
from pathlib import Path
from avg_edge.manifest import load_manifest
from avg_edge.runtime.backends.ort_backend import OrtBackend
from avg_edge.runtime.engines import check_backends
folder = Path(sys.argv[1])
m = load_manifest(folder)
checks = check_backends(folder, m, lambda n: OrtBackend(m.spec(n), folder / m.spec(n).file, providers="cpu"))
print(json.dumps({k: [v.status, v.max_abs_diff, len(v.points)] for k, v in checks.items()}))
"""


def test_stored_references_check_a_backend_without_torch(tiny_build, tmp_path):
    import shutil

    p = subprocess.run([sys.executable, "-c", CHECK, str(tiny_build[0])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert {k: v[0] for k, v in got.items()} == {"vision": "passed", "router": "passed", "decoder": "passed"}
    assert got["decoder"][2] == 6 and all(0 <= v[1] < 1e-3 for v in got.values())
    # a wrong reference is caught
    folder = tmp_path / "b"
    shutil.copytree(tiny_build[0], folder)
    with np.load(folder / C.REFERENCE_FILE) as z:
        refs = {k: z[k] for k in z.files}
    k = next(k for k in refs if k.startswith("decoder|decode:max|logits"))
    refs[k] = refs[k] + 0.1
    np.savez(folder / C.REFERENCE_FILE, **refs)
    p = subprocess.run([sys.executable, "-c", CHECK, str(folder)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["decoder"][0] == "failed"


def test_references_are_small_and_listed(tiny_build):
    from avg_edge.manifest import load_manifest

    m = load_manifest(tiny_build[0], verify=True)
    assert C.REFERENCE_FILE in m.files and m.files[C.REFERENCE_FILE]["bytes"] < 5 * 2**20
    points = m.validation["decoder"]["points"]
    assert [p["point"] for p in points] == ["prefill:min", "prefill:opt", "prefill:max", "decode:min", "decode:opt",
                                            "decode:max"]
    assert all("seed" in p and p["sizes"] for p in points)


def test_long_prefills_are_checked_at_a_bounded_length():
    from avg_edge import validation as V
    from avg_edge.specs import Bounds, decoder_spec

    spec = decoder_spec(4096, 2, 32, 128, 32000, Bounds(5, 4096, 36, 2928), "float16")
    points = {p.name: p for p in V.validation_points(spec, attention_heads=32)}
    assert points["prefill:max"].sizes[C.AXIS_SEQ] == 724 and "checked at 724" in points["prefill:max"].note
    assert points["decode:max"].sizes[C.AXIS_PAST] == 4095 and not points["decode:max"].note   # a long past is cheap
    small = {p.name: p for p in V.validation_points(spec, attention_heads=4)}
    assert small["prefill:max"].sizes[C.AXIS_SEQ] == 2048


@pytest.mark.gpu
def test_engines_are_built_checked_and_recorded(tiny_build, tmp_path):
    import shutil

    from avg_edge.runtime.engines import build_engines_for_folder

    folder = tmp_path / "b"
    shutil.copytree(tiny_build[0], folder)
    m = build_engines_for_folder(folder, progress=lambda s: None)
    assert set(m.engines) == set(m.graphs) and m.tensorrt["version"]
    assert all(m.validation[f"{g}.engine"]["status"] == "passed" for g in m.graphs)
