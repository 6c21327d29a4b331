"""The public API of README's "Your own model and data": the example file is the README's code, and it
runs in a federation (the in-process grid) to a trained, exported adapter."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    """``examples/<name>.py`` loaded by its path, as a module named ``fedsb_example_<name>``: never as
    ``examples.<name>``, because Opacus installs a top-level ``examples`` package of its own that this
    name could resolve to. Ray pickles it by value (its workers cannot import it by that name)."""
    import ray.cloudpickle

    spec = importlib.util.spec_from_file_location(f"fedsb_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    return module


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example:own_model -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README lacks the own-model example block"
    assert block.group(1) == (ROOT / "examples" / "own_model.py").read_text()


def test_own_model_example_runs_in_a_simulation(tiny_bert, tmp_path, monkeypatch):
    from lab.inprocess_grid import run_inprocess

    monkeypatch.setenv("MY_MODEL_DIR", str(tiny_bert))
    example = load_example("own_model")
    client_app, server_app = example.client_app, example.server_app

    run = run_inprocess({"max-length": 8, "rank": 4, "init-samples": 16, "num-server-rounds": 2, "local-steps": 10,
                         "learning-rate": 0.1, "fraction-train": 1.0, "eval-max-samples": 100,
                         "output-dir": str(tmp_path / "run")}, 3, client_app=client_app, server_app=server_app)
    s = json.loads((run / "summary.json").read_text())
    assert s["final_accuracy"] >= 0.9 and s["majority_rate"] <= 0.6, s  # learned the user's own labels
    peft = json.loads((run / "adapter" / "peft" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(tiny_bert) and peft["task_type"] == "SEQ_CLS"
