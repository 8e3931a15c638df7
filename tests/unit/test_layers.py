"""The pipeline's layering (pyproject.toml's import-linter contracts) holds, bites, and has no cycles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter with the project's contracts on the ``relay`` package found under ``root``."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_every_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.replace("0 broken", "")


def test_a_stage_importing_upward_breaks_the_layers(tmp_path):
    """The contracts are not vacuous: the spool importing the process wiring is refused."""
    shutil.copytree(REPO / "relay", tmp_path / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    model = tmp_path / "relay" / "spool" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _upward():\n    import relay.process.main  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "relay.spool.model -> relay.process.main" in result.stdout


def test_only_the_spool_names_its_backends(tmp_path):
    shutil.copytree(REPO / "relay", tmp_path / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    scheduler = tmp_path / "relay" / "delivery" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\n\nfrom relay.spool.sqlite import SqliteSpool  # noqa: E402, F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Only the spool knows its backends BROKEN" in result.stdout


def test_no_import_cycles():
    """Counting imports made only for type checking too: a cycle there is a tangle all the same."""
    graph = grimp.build_graph("relay")
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path)
        path.pop()
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [])
    assert cycles == []
