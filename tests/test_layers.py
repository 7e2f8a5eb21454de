"""The package's layer order (pyproject.toml, [tool.importlinter]) holds, and the check really
catches what it is there to catch: an upward import, an import between independent siblings and
an import cycle inside a package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports finds the package from the working directory and the contracts in
    # pyproject.toml there; --no-cache keeps it from writing into the checkout.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_of_the_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(
        ROOT / "watcher", project / "watcher", ignore=shutil.ignore_patterns("__pycache__")
    )
    return project


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as module:
        module.write(line + "\n")


def test_the_package_keeps_every_import_contract() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_lower_layer_importing_an_upper_one_breaks_the_layers(tmp_path: Path) -> None:
    project = _copy_of_the_project(tmp_path)
    _append(project / "watcher" / "store" / "__init__.py", "from watcher.service import daemon")

    result = _lint_imports(project)

    assert result.returncode == 1
    assert "watcher.store is not allowed to import watcher.service:" in result.stdout
    assert "Contracts: 1 kept, 1 broken." in result.stdout


def test_the_store_and_the_client_may_not_import_each_other(tmp_path: Path) -> None:
    project = _copy_of_the_project(tmp_path)
    _append(project / "watcher" / "nucleus" / "__init__.py", "from watcher import store")

    result = _lint_imports(project)

    assert result.returncode == 1
    assert "watcher.nucleus is not allowed to import watcher.store:" in result.stdout


def test_an_import_cycle_inside_a_package_breaks_the_contract(tmp_path: Path) -> None:
    project = _copy_of_the_project(tmp_path)
    files = project / "watcher" / "files"
    (files / "cycle_one.py").write_text("from watcher.files import cycle_two\n", encoding="utf-8")
    (files / "cycle_two.py").write_text("from watcher.files import cycle_one\n", encoding="utf-8")

    result = _lint_imports(project)

    assert result.returncode == 1
    assert "No cycles are allowed in watcher.files." in result.stdout
    assert "Contracts: 1 kept, 1 broken." in result.stdout
