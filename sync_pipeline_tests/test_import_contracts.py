"""The import contracts of pyproject.toml ([tool.importlinter]): the layers hold, the engine and admin run
without Dagster, the engine sees clients only through their error types and request values, the sandbox
and the benchmark stay out of production code. ``.ci/run`` runs ``lint-imports`` too; this makes a plain
``pytest`` catch a broken contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def _lint(root: Path) -> subprocess.CompletedProcess:
    # cwd first on sys.path: the copy under test, not the installed package.
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_leak_breaks_its_contract(tmp_path) -> None:  # the contracts can fail
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(
        ROOT / "sync_pipeline", tmp_path / "sync_pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "sync_pipeline" / "engine" / "leak.py").write_text(
        "import dagster\nfrom sync_pipeline.clients import marketo\n"
    )
    (tmp_path / "sync_pipeline" / "sandbox" / "leak.py").write_text(
        "from sync_pipeline.config import model\n"
    )
    result = _lint(tmp_path)
    assert result.returncode != 0
    for line in (
        "sync_pipeline.engine.leak -> dagster",
        "sync_pipeline.engine.leak -> sync_pipeline.clients.marketo",
        "sync_pipeline.sandbox.leak -> sync_pipeline.config.model",
    ):
        assert line in result.stdout, result.stdout[-5000:]
    assert "3 broken" in result.stdout, result.stdout[-3000:]
