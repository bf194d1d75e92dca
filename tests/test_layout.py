"""Adapters are translation: the core imports no orchestrator and no adapter, no adapter
imports another, and each adapter names its extra when its framework is missing."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORCHESTRATORS = {"airflow", "prefect", "prefect_dask", "distributed", "dask"}
ADAPTERS = {"airflow_provider", "prefect_blocks", "dask_plugins"}


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level package names a module imports, anywhere in it (lazy imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _modules(package: str, skip: tuple[str, ...] = ()) -> list[pathlib.Path]:
    return [
        p
        for p in sorted((ROOT / package).rglob("*.py"))
        if not any(part in skip for part in p.relative_to(ROOT).parts)
    ]


@pytest.mark.parametrize(
    "path",
    # The demo and the test harness start real orchestrators on purpose; the library does not.
    [
        pytest.param(p, id=str(p.relative_to(ROOT)))
        for p in _modules("faultkit", ("demo", "testing"))
    ],
)
def test_core_imports_no_orchestrator_and_no_adapter(path):
    """A core module imports neither an orchestrator nor an adapter, even lazily."""
    bad = _imports(path) & (ORCHESTRATORS | ADAPTERS)
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_no_adapter_imports_another(adapter):
    """An adapter translates its host onto the core; it never reaches into another adapter."""
    for path in _modules(adapter):
        bad = _imports(path) & (ADAPTERS - {adapter})
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "adapter,framework,extra",
    [
        pytest.param("airflow_provider", "airflow", "airflow", id="airflow"),
        pytest.param("prefect_blocks", "prefect", "prefect", id="prefect"),
        pytest.param("dask_plugins", "distributed", "dask", id="dask"),
    ],
)
def test_missing_framework_names_the_extra(adapter, framework, extra):
    """Importing an adapter without its framework says exactly what to pip install."""
    code = f"import sys; sys.modules[{framework!r}] = None; import {adapter}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"pip install 'faultkit[{extra}]'" in r.stderr, r.stderr[-2000:]
