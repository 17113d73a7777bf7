"""Dependencies point one way: flows → tasks → (model, data_contracts)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model": {
        "prefect",
        "mlflow",
        "great_expectations",
        "pandas",
        "sqlalchemy",
        "tasks",
        "flows",
        "data_contracts",
        "yaml",
        "pyarrow",
    },
    "data_contracts": {"prefect", "mlflow", "torch", "sqlalchemy", "tasks", "flows", "model"},
    "tasks": {"flows"},
    "flows": {"torch", "pandas", "mlflow", "sqlalchemy", "numpy", "great_expectations"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    offences = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {file: names for file, names in offences.items() if names} == {}
