"""The device package (sdk/ -> `routet2i`) never imports training, export or cloud-server code, nor the torch
stack: every import statement of every module under sdk/ is checked, at module level and inside functions
(ast walk), including relative imports and `importlib.import_module("...")` with a literal name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[1] / "sdk"
FORBIDDEN = (
    "routet2i.training",
    "routet2i.export",
    "routet2i.cloud_server",
    "torch",
    "torchvision",
    "transformers",
    "diffusers",
    "optimum",
    "accelerate",
    "safetensors",
    "sentence_transformers",
)


def _package_of(path: Path) -> str:
    rel = path.relative_to(SDK).with_suffix("")
    parts = ["routet2i", *rel.parts]
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def imported_names(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (or ``source`` as if it were that file),
    wherever it sits."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = _package_of(path)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_no_device_module_imports_workstation_or_cloud_code() -> None:
    files = sorted(SDK.rglob("*.py"))
    assert len(files) > 10 and (SDK / "client.py") in files
    bad = [
        f"{path.relative_to(SDK.parent)}:{line}: imports {module}"
        for path in files
        for line, module in imported_names(path)
        if _forbidden(module)
    ]
    assert not bad, "the device package must not import these:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    from routet2i.training.cli import main\n", "routet2i.training.cli"),
        ("import routet2i.cloud_server.store as s\n", "routet2i.cloud_server.store"),
        ("from routet2i import training\n", "routet2i.training"),
        ("class A:\n    def m(self):\n        import torch\n", "torch"),
        ("import importlib\nimportlib.import_module('routet2i.export.edge')\n", "routet2i.export.edge"),
    ],
)
def test_the_walk_sees_imports_anywhere(tmp_path, source, expected) -> None:
    """The checker itself: imports inside functions and methods, `from routet2i import training`, and
    `importlib.import_module` are all found (else the test above proves nothing)."""
    path = SDK / "_probe_for_test.py"  # a path under sdk/ for package resolution; never written
    names = [m for _, m in imported_names_from_source(source, path)]
    assert expected in names and _forbidden(expected)


def test_relative_imports_resolve_to_the_package() -> None:
    names = [m for _, m in imported_names_from_source("from .cloud import v1\n", SDK / "client.py")]
    assert "routet2i.cloud" in names and "routet2i.cloud.v1" in names


def imported_names_from_source(source: str, path: Path) -> list[tuple[int, str]]:
    return imported_names(path, source)


def test_no_cli_demo_import_circle() -> None:
    """The device CLI launches the demo in a subprocess; no module of sdk/ is named demo any more."""
    assert not (SDK / "demo.py").exists()
    names = [m for _, m in imported_names(SDK / "cli.py")]
    assert not any("demo" in m for m in names)
