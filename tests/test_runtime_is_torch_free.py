"""The runtime must run where torch and transformers are not installed."""

from __future__ import annotations

import subprocess
import sys

CODE = r"""
import importlib, pkgutil, sys
import avg_edge.runtime as rt
names = sorted(m.name for m in pkgutil.walk_packages(rt.__path__, "avg_edge.runtime."))
for n in names:
    importlib.import_module(n)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "safetensors"))
print(len(names), heavy)
"""


def test_runtime_imports_neither_torch_nor_transformers():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 5, "expected the runtime's modules to be found"
    assert out[1].strip() == "[]", f"runtime imported heavy modules: {out[1]}"
