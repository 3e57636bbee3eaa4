"""Imports run one way: root contract <- runtime <- model, export <- calibration <- cli.

Every module's imports are read from its source (lazy imports inside functions too),
so a layer cannot reach up by importing late."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {"constants", "errors", "specs", "manifest", "precision", "validation"}
# What each layer may import from avg_edge (besides itself).
ALLOWED = {
    "contract": {"contract"},
    "runtime": {"contract"},
    "model": {"contract", "runtime"},
    "export": {"contract", "runtime", "model"},
    "calibration": {"contract", "runtime", "model", "export"},
    "cli": {"contract", "runtime", "model", "export", "calibration"},
    # The package's front door: `from avg_edge import Pipeline, load_model` (both lazy).
    "facade": {"contract", "runtime", "model"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts == ["avg_edge"]:
        return "facade"
    head = parts[1]
    if head in CONTRACT:
        return "contract"
    if head in ("runtime", "model", "export", "calibration", "cli"):
        return head
    raise AssertionError(f"{module}: not in any layer; add it to tests/test_layers.py")


def package_modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", "build", "builds", "docs", "examples") or rel.parts[0].startswith("."):
            continue
        parts = ["avg_edge", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; use absolute avg_edge imports"
            mod = node.module or ""
            # `from avg_edge import specs as S` imports the submodule avg_edge.specs
            found += [(node.lineno, f"{mod}.{a.name}" if mod == "avg_edge" and a.name != "__version__" else mod)
                      for a in node.names]
    return [(line, name) for line, name in found if name == "avg_edge" or name.startswith("avg_edge.")]


def test_every_module_is_in_a_layer():
    modules = package_modules()
    assert len(modules) > 40
    assert {layer_of(m) for m in modules} == set(ALLOWED)


def test_imports_run_one_way():
    bad = []
    for module, path in sorted(package_modules().items()):
        mine = layer_of(module)
        for line, target in imports_of(path):
            if target == "avg_edge":
                continue          # __version__
            theirs = layer_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target} ({theirs})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


@pytest.mark.parametrize("source,expected", [
    ("from avg_edge.export.graphs import X", ["avg_edge.export.graphs"]),
    ("def f():\n    import avg_edge.model.tiny", ["avg_edge.model.tiny"]),
    ("from avg_edge import specs as S", ["avg_edge.specs"]),
    ("import numpy", []),
])
def test_the_reader_finds_lazy_and_aliased_imports(tmp_path, source, expected):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert [name for _, name in imports_of(f)] == expected
