"""The layout promises of README's "Layout": fedsb/ is Flower-free, the project's modules import each other
without cycles, bench/ and tests/ never import each other, and every module says in its first line what it
holds."""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedsb

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsb", "server", "client", "lab")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path``: function level and under TYPE_CHECKING too (a
    type-only import that closes a cycle is the same dependency, hidden from the interpreter)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in modules else node.module)
    return {m for m in found if m in modules}


@pytest.fixture(scope="module")
def fedsb_imported() -> tuple[str, str]:
    """Every fedsb module imported in a fresh process (one start for both tests below: torch and transformers
    take seconds to import), without the offline settings the tests run with: (the environment variables the
    imports changed, the flwr modules they loaded), each as the process printed it."""
    names = sorted(m.name for m in pkgutil.walk_packages(fedsb.__path__, "fedsb."))
    assert len(names) > 20  # every module, found by walking the package: a new one cannot be left out
    code = ("import os, sys\nbefore = dict(os.environ)\n" + "".join(f"import {m}\n" for m in names)
            + "print(sorted(set(os.environ.items()) ^ set(before.items())))\n"
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    changed, flower = out.stdout.strip().splitlines()
    return changed, flower


def test_fedsb_never_imports_flower(fedsb_imported):
    assert fedsb_imported[1] == "[]"


def test_importing_fedsb_leaves_the_environment_alone(fedsb_imported):
    assert fedsb_imported[0] == "[]"  # offline loading is each load's local_files_only, not a global setting


def test_type_checking_imports_count_as_dependencies(tmp_path):
    # the cycle check below would miss a cycle closed by a type-only import if these were skipped
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from b import B\n")
    assert _imports(tmp_path / "a.py", {"b": tmp_path / "b.py"}) == {"b"}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    # a package's __init__ that re-exports its own submodules is not a cycle with them
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") and modules[m].name == "__init__.py")
                    and not m.startswith(d + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.split(".")[0] for node in ast.walk(tree) for n in (
        [a.name for a in node.names] if isinstance(node, ast.Import) else
        [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])}


def test_bench_and_tests_never_import_each_other():
    """What both need lives in lab/ (tiny models, harnesses, the run comparer); bench's own tests in bench/tests/."""
    found = [f"{p.relative_to(ROOT)} imports {other}" for here, other in (("bench", "tests"), ("tests", "bench"))
             for p in (ROOT / here).rglob("*.py") if other in _top_level_imports(p)]
    assert found == []


def test_every_module_opens_with_what_it_holds_and_stays_small():
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if name in PACKAGES and not doc:
            continue
        assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no opening docstring"
        limit = 400 if name == "lab.docker_harness" else 330  # the Docker test harness, moved from tests/ as it was
        assert len(path.read_text().splitlines()) <= limit, f"{path.relative_to(ROOT)} is over ~300 lines: split it"


def _tree() -> list[Path]:
    """Every file of the checkout, without descending into the virtual environment (`make install` puts it
    in the checkout: tens of thousands of files), git's folder, Flower's home or node_modules."""
    skip = {".venv", ".git", ".flwr", "node_modules"}
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        out += [Path(folder) / f for f in files]
    return out


def test_no_file_cites_notes_outside_the_project():
    """The project explains itself in its own files: code, README and BENCHMARKS never send a reader to notes
    that are not in the repository (design notes, style notes, a shared folder beside it)."""
    import re

    cited = re.compile(r"DESIGN\.md|STYLE\.md|NOTES-[\w.-]*\.md|\.\./shared")
    files = [p for p in _tree() if p.suffix == ".py" or p.name in ("README.md", "BENCHMARKS.md")]
    assert len(files) > 50  # the whole tree was walked
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if cited.search(line) and p != Path(__file__)]
    assert not offenders, offenders


def test_the_examples_are_never_imported_as_a_package_named_examples():
    """Opacus installs a top-level ``examples`` package too: ``import examples`` may be Opacus's. The
    project's examples are files loaded by path (tests/test_public_api.py), never that package."""
    assert not (ROOT / "examples" / "__init__.py").exists()
    offenders = []
    for path in (p for p in _tree() if p.suffix == ".py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "examples"]
    assert not offenders, offenders
