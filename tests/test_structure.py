"""The package's shape stays readable: short functions and modules, and pure layers that import
nothing from the recipe, the evaluation or the toy models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sd_distill"
MODULES = sorted(PACKAGE.rglob("*.py"))
PURE_LAYERS = ("constants", "options", "files", "guidance", "models", "lora", "processes")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(PACKAGE)) for p in paths]


@pytest.mark.parametrize("path", MODULES, ids=_ids(MODULES))
def test_modules_and_functions_are_short(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{path.name} has {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} is {length} lines"


@pytest.mark.parametrize("name", PURE_LAYERS)
def test_pure_layers_import_nothing_above_them(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    above = [
        m
        for m in imported
        if m.lstrip(".").split(".")[0] in ("train", "eval", "toy")
        or m.startswith(("sd_distill.train", "sd_distill.eval", "sd_distill.toy"))
    ]
    assert not above, f"{name}.py imports {above}"


def test_evaluation_does_not_import_the_toy_models() -> None:
    for path in (PACKAGE / "eval").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in modules if "toy" in m], f"{path.name} imports the toy models"
