"""Flower's non-public API is used in one module only (client/flower_private.py), every name there still
resolves in the installed Flower, and everything else imports from Flower only what Flower exports."""

from __future__ import annotations

import ast
import importlib
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from client import flower_private

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_MODULE = ROOT / "client" / "flower_private.py"
# Flower's public packages: a name imported from one of them must be in its __all__
PUBLIC = ("flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp", "flwr.common", "flwr.server", "flwr.server.strategy",
          "flwr.server.workflow", "flwr.client", "flwr.client.mod", "flwr.simulation")
# `from flwr.x import a, _b`, `import flwr.x._y`, `flwr.x._y(...)` (this file's own examples excepted)
PRIVATE_NAME = re.compile(r"from\s+flwr[\w.]*\s+import\s+\(?[^#\n]*\b_\w+|flwr(\.\w+)*\._\w+")
SHIPPED = ("fedsb", "server", "client", "lab", "examples", "bench")


def _project_files(dirs=None):
    for d in dirs or [p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")]:
        for path in sorted((ROOT / d).rglob("*.py")):
            if path not in (PRIVATE_MODULE, Path(__file__).resolve()) and ".venv" not in path.parts:
                yield path


@pytest.mark.parametrize("name", sorted(flower_private.PRIVATE))
def test_every_private_flower_name_still_resolves(name):
    try:
        getattr(flower_private, name)
    except ImportError as e:
        pytest.fail(str(e))


def test_a_name_flower_dropped_fails_naming_the_module(monkeypatch):
    monkeypatch.setitem(flower_private.PRIVATE, "gone_in_this_release", "flwr.common.constant")
    with pytest.raises(ImportError, match=r"client/flower_private\.py: Flower [\d.]+ has no flwr\.common\.constant"):
        flower_private.gone_in_this_release  # noqa: B018


def test_no_module_imports_a_private_flower_name_outside_flower_private():
    """A grep: `from flwr.x import _name`, `import flwr.x._y` or `flwr.x._y` anywhere but the one module."""
    pattern = PRIVATE_NAME
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _project_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == [], "private Flower names belong in client/flower_private.py:\n" + "\n".join(hits)


def test_the_grep_finds_a_private_import():
    """The pattern above is not vacuous: it matches the import this project used to have."""
    pattern = PRIVATE_NAME
    assert pattern.search("    from flwr.simulation.run_simulation import _run_simulation")
    assert pattern.search("x = flwr.simulation.run_simulation._run_simulation")
    assert not pattern.search("from flwr.app import Context, RecordDict")


def test_shipped_code_imports_only_what_flower_exports():
    """Outside client/flower_private.py, fedsb/server/client/lab/examples/bench import from Flower only names in
    the __all__ of one of its public packages."""
    bad = []
    for path in _project_files(SHIPPED):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
                exported = getattr(importlib.import_module(node.module), "__all__", ())
                bad += [f"{path.relative_to(ROOT)}: from {node.module} import {a.name}" for a in node.names
                        if node.module not in PUBLIC or a.name not in exported]
            elif isinstance(node, ast.Import):
                bad += [f"{path.relative_to(ROOT)}: import {a.name}" for a in node.names
                        if a.name.split(".")[0] == "flwr" and a.name not in PUBLIC]
    assert bad == [], "not Flower's public API (use it, or move it to client/flower_private.py):\n" + "\n".join(bad)


def test_the_warm_start_finds_flower_clientapp_through_its_command():
    (ep,) = entry_points(group="console_scripts", name="flwr-clientapp")
    assert callable(ep.load())
