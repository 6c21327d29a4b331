"""The layout promises of README's "Layout": fedsb/ is Flower-free, the project's modules import each other
without cycles, and every module says in its first line what it holds."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import fedsb

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsb", "server", "client")


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


def test_fedsb_never_imports_flower():
    names = sorted(m.name for m in pkgutil.walk_packages(fedsb.__path__, "fedsb."))
    assert len(names) > 20  # every module, found by walking the package: a new one cannot be left out
    code = "import sys\n" + "".join(f"import {m}\n" for m in names) + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_importing_fedsb_leaves_the_environment_alone():
    names = sorted(m.name for m in pkgutil.walk_packages(fedsb.__path__, "fedsb."))
    code = ("import os\nbefore = dict(os.environ)\n" + "".join(f"import {m}\n" for m in names)
            + "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # offline loading is each load's local_files_only, not a global setting


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


def test_every_module_opens_with_what_it_holds_and_stays_small():
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if name in PACKAGES and not doc:
            continue
        assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no opening docstring"
        assert len(path.read_text().splitlines()) <= 330, f"{path.relative_to(ROOT)} is over ~300 lines: split it"
