"""README's measured sentences are the current rendering of bench/results (bench/readme_prose.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.readme_prose import _wins, render

ROOT = Path(__file__).resolve().parents[2]


def test_readme_holds_the_current_rendering_of_the_measured_prose(monkeypatch):
    monkeypatch.chdir(ROOT)  # bench/results is read relative to the project root
    readme = (ROOT / "README.md").read_text()
    assert "<!-- prose:frontier:start -->\n- **Non-private**" in readme
    assert readme == render(readme), "README's measured sentences are stale: python -m bench.readme_prose"


def test_a_readme_without_a_block_is_refused_naming_the_markers(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="prose:one-time:start"):
        render("# README\n<!-- prose:frontier:start -->\n<!-- prose:frontier:end -->\n")


def _leader(budget, a, b, wins):
    return {"budget": budget, "leader": {"method": a, "rank": 4}, "runner_up": {"method": b, "rank": 8}, "wins": wins}


def test_wins_joins_consecutive_budgets_of_one_pair_and_keeps_the_rest_apart():
    leaders = [_leader(1e6, "x", "y", True), _leader(2e6, "x", "y", True), _leader(3e6, "x", "y", False),
               _leader(4e6, "x", "y", True), _leader(5e6, "z", "y", True)]
    assert _wins(leaders) == ("x r=4 over y r=8 at ≤ 1.0–2.0 MB; x r=4 over y r=8 at ≤ 4.0 MB; "
                              "z r=4 over y r=8 at ≤ 5.0 MB")
    assert _wins([_leader(1e6, "x", "y", False)]) == "none"
