"""``fedsb compare`` on a tiny model: one run per method on identical settings, three files, five rows."""

from __future__ import annotations

import csv

from tests.conftest import tiny_run_config


def test_compare_writes_csv_markdown_and_plots(tiny_bert, sentiment_csv, tmp_path):
    from server.cli import main

    rc = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "unused", **{"num-server-rounds": 2, "local-steps": 3})
    rc.pop("output-dir")
    text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in rc.items())
    out = tmp_path / "cmp"
    assert main(["compare", "--num-supernodes", "3", "--out", str(out), "--run-config", text,
                 "--rank", "fed-sb=4,fedit=2,ffa-lora=2,fedex-lora=2,flora=2"]) == 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["method"] for r in rows] == ["fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora"]
    assert {r["method"]: int(r["rank"]) for r in rows}["fed-sb"] == 4 and rows[1]["rank"] == "2"
    by = {r["method"]: r for r in rows}
    assert int(by["fed-sb"]["bytes_one_time"]) > 0 and int(by["fedit"]["bytes_one_time"]) == 0
    assert int(by["fedex-lora"]["bytes_down_total"]) > int(by["fedit"]["bytes_down_total"])  # the residual (round 2)
    assert (out / "compare.md").read_text().count("\n") == 2 + 5
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
