"""The package's layers are a checked contract: a module imports only from layers below
its own (pyproject.toml's import-linter contract, described in ARCHITECTURE.md)."""
import ast
import pathlib

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_layers_contract_is_kept(monkeypatch):
    monkeypatch.chdir(ROOT)  # the contract lives in pyproject.toml
    assert importlinter_cli.lint_imports(no_cache=True, no_logo=True) == 0


def test_no_module_imports_a_private_name_of_another():
    """No private cross-module calls: ``from ctxpar.x import _name`` or ``module._name``
    reaching into another ctxpar module."""
    offenders = []
    for path in (ROOT / "src" / "ctxpar").rglob("*.py"):
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("ctxpar") for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ctxpar"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not offenders, offenders
