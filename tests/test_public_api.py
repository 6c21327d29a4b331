"""The public API of README's "Your own model and data": the README's code block is the example file, at most
40 lines, and that file, run as a script with a user's command line, trains and exports an adapter."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_model.py"


def readme_block() -> str:
    block = re.search(r"<!-- example:own_model -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README lacks the own-model example block"
    return block.group(1)


def test_readme_shows_the_example_verbatim_in_at_most_40_lines():
    block = readme_block()
    assert block == EXAMPLE.read_text()
    assert len(block.splitlines()) <= 40, f"README's own-model app has {len(block.splitlines())} lines (at most 40)"


def test_own_model_example_runs_as_a_script(tiny_bert, tmp_path, monkeypatch):
    """The README's block, run as ``python examples/own_model.py "RUN_CONFIG"`` (its ``__main__``): the same
    code, with the Ray simulation it starts swapped for the in-process grid (same signature, no Ray)."""
    import server.simulation
    from lab.inprocess_grid import run_inprocess

    block = readme_block()
    assert block == EXAMPLE.read_text() and len(block.splitlines()) <= 40  # what runs here is the README's app
    run_config = (f"model='{tiny_bert}' max-length=8 rank=4 init-samples=16 num-server-rounds=2 local-steps=10 "
                  f"learning-rate=0.1 fraction-train=1.0 eval-max-samples=100 output-dir='{tmp_path / 'run'}'")
    monkeypatch.setattr(server.simulation, "simulate", run_inprocess)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), run_config])
    runpy.run_path(str(EXAMPLE), run_name="__main__")  # by path: Opacus installs a top-level `examples` package

    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["final_accuracy"] >= 0.9 and s["majority_rate"] <= 0.6, s  # learned the user's own labels
    peft = json.loads((run / "adapter" / "peft" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(tiny_bert) and peft["task_type"] == "SEQ_CLS"
