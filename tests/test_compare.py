"""``fedsb compare``: grid and flag parsing, the validation split, learning-rate selection that never sees the
held-out set, one csv row per run, and mean/std computed from those rows (tiny model, in-process runs)."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest

from tests.conftest import tiny_run_config


# ---------------------------------------------------------------- parsing
def test_grids_parse_per_method_and_sort():
    from lab.compare import parse_lrs, parse_ranks

    m = ["fed-sb", "fedit"]
    assert parse_ranks("fed-sb=64|16|32, fedit=4", m) == {"fed-sb": [16, 32, 64], "fedit": [4]}
    assert parse_lrs("fed-sb=1e-2|5e-3", m) == {"fed-sb": [5e-3, 1e-2]}
    assert parse_ranks("", m) == {}


@pytest.mark.parametrize("flag,text,says", [
    ("--rank", "fed-sb", "METHOD=VALUE"),
    ("--rank", "fed-sb=16|x", "'x' (for fed-sb) is not a int"),
    ("--rank", "fed-sb=0", "must be a positive number"),
    ("--rank", "flora=4", "'flora' is not among --methods"),
    ("--rank", "fed-sb=4,fed-sb=8", "given twice"),
    ("--lr", "fed-sb=1e-3|1e-3", "lists a value twice"),
    ("--lr", "fedit=nan", "must be a positive number"),
    ("--lr", "fedit=", "METHOD=VALUE"),
])
def test_bad_grids_name_the_flag_and_the_fix(flag, text, says):
    from lab.compare import parse_lrs, parse_ranks

    with pytest.raises(ValueError) as e:
        (parse_ranks if flag == "--rank" else parse_lrs)(text, ["fed-sb", "fedit"])
    assert str(e.value).startswith(flag) and says in str(e.value)


def test_bad_compare_flags_exit_2_with_one_line(tmp_path, capsys):
    from server.cli import main

    out = str(tmp_path / "c")
    cases = [(["--seeds", "0"], "--seeds"), (["--lr", "fed-sb=1e-3|2e-3", "--validation-fraction", "0"], "--lr"),
             (["--run-config", "rank=8"], "--run-config: rank is set by compare"),
             (["--methods", "fed-sb,nope"], "--methods"), (["--run-config", "ranc=8"], "ranc"),
             (["--method-config", "fed-sb", "rank=8"], "--method-config fed-sb: rank is set by compare"),
             (["--method-config", "fedit", "upload-dtype='int8'"], "--method-config: method 'fedit' is not among"),
             (["--method-config", "fed-sb", "download-dtype='int2'"], "--method-config fed-sb: run-config 'download-dtype'"),
             (["--method-config", "fed-sb", "ranc=8"], "ranc"),
             (["--method-config", "fed-sb", "seed=1", "--method-config", "fed-sb", "seed=2"], "given twice")]
    for extra, says in cases:
        assert main(["compare", "--methods", "fed-sb", "--out", out, *extra]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "c" / "runs").exists()  # nothing ran


def test_compare_help_states_the_rank_and_lr_it_uses_by_default(tmp_path, capsys):
    """rank and learning-rate in --run-config are refused, so the defaults are fedsb's own: the help says
    which, and they are the ones a comparison without --rank/--lr runs."""
    import pytest

    from server.cli import main
    from lab.compare import Comparison

    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    c = Comparison(["fed-sb"], 3, tmp_path, {}, {}, {})
    assert f"default for a method not named: {c.default_rank}, fedsb's default rank" in text
    assert f"default for a method not named: {c.default_lr:g}, fedsb's default learning-rate" in text
    assert "the run config's rank" not in text and "the run config's learning-rate" not in text


# ---------------------------------------------------------------- statistics
def test_mean_std_and_verdicts_come_from_the_rows():
    from lab.compare_report import group_rows, mean_std, verdicts

    def row(method, rank, seed, acc, total, split="test", lr=1e-3):
        return {"method": method, "rank": rank, "lr": lr, "seed": seed, "split": split, "final_accuracy": acc,
                "bytes_up_per_client_round": 10, "bytes_one_time": 0, "bytes_up_total": total, "bytes_down_total": 0,
                "bytes_total": total}

    accs = {"a": [0.80, 0.82, 0.81], "b": [0.70, 0.71, 0.69], "c": [0.805, 0.70, 0.90]}
    rows = [row(m, 4, 42 + i, x, 1e6 if m != "c" else 2e6) for m, xs in accs.items() for i, x in enumerate(xs)]
    rows += [row("a", 4, 42, 0.1, 1e6, "validation", lr) for lr in (5e-4, 1e-3, 2e-3)]
    g = {x["method"]: x for x in group_rows(rows)}
    assert g["a"]["seeds"] == 3 and g["a"]["accuracy_mean"] == pytest.approx(statistics.fmean(accs["a"]))
    assert g["a"]["accuracy_std"] == pytest.approx(statistics.stdev(accs["a"]))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert not g["a"]["lr_at_edge"] and not g["b"]["lr_at_edge"]
    v = verdicts(list(g.values()))
    assert "**a wins**" in v[0]  # a vs b at 1 MB: 0.11 apart, SE ~ 0.008
    assert "not resolved" in v[1]  # at 2 MB c (0.802 ± 0.1) against a (0.81): within the spread
    # a one-time cost counts in the total but not in the per-round view (a long deployment amortizes it)
    g["a"] = dict(g["a"], bytes_one_time=int(5e6), bytes_total=int(6e6))
    by_total, by_round = verdicts(list(g.values())), verdicts(list(g.values()), "bytes_rounds")
    assert "only b r=4 fits" in by_total[0] and "MB total" in by_total[0]
    assert "**a wins**" in by_round[0] and "per-round traffic" in by_round[0]


def test_lr_grid_grows_at_its_edge_until_the_best_is_inside(tmp_path):
    """The selection (with a stand-in for the runs): validation accuracy peaks at 0.04, the grid starts at
    0.005-0.02, so it grows upward twice; with max-extend=1 it stops at the edge and says so."""
    from lab.compare import Comparison

    def fake(peak):
        ran = []

        def execute(self, spec):
            ran.append((spec.lr, spec.split))
            return {"final_accuracy": 1 - abs(np.log2(spec.lr / peak))}
        return execute, ran

    for max_extend, want_lr, want_runs in ((3, 0.04, 5), (1, 0.04, 4)):
        execute, ran = fake(0.04 if max_extend == 3 else 0.08)
        c = Comparison(["fed-sb"], 3, tmp_path, {}, {}, {"fed-sb": [0.005, 0.01, 0.02]}, max_extend=max_extend)
        c.execute = execute.__get__(c)
        assert c.choose_lr("fed-sb", 32) == want_lr
        assert len(ran) == want_runs and {s for _, s in ran} == {"validation"}
    one = Comparison(["fed-sb"], 3, tmp_path, {}, {}, {"fed-sb": [0.01]}, validation_fraction=0.0)
    assert one.choose_lr("fed-sb", 32) == 0.01  # a single rate: nothing to choose, nothing run


def test_several_server_apps_are_chosen_among_on_validation(tmp_path):
    """--server-app 'a|b': each app runs its validation run (one rate: one run each), the better one on
    validation is the one the seeds run with, and its name is in the runs' directories; with one app the names
    stay as they were."""
    from lab.compare import Comparison, RunSpec

    ran = []

    def execute(self, spec):
        ran.append(spec)
        return {"final_accuracy": {"m:adam_a": 0.6, "m:adam_b": 0.7}.get(spec.server_app, 0.5)}

    c = Comparison(["fed-sb"], 3, tmp_path, {}, {}, {"fed-sb": [0.01]}, seeds=2, server_app="m:adam_a|m:adam_b")
    c.execute = execute.__get__(c)
    assert c.choose("fed-sb", 32) == (0.01, "m:adam_b")
    assert [(s.server_app, s.split) for s in ran] == [("m:adam_a", "validation"), ("m:adam_b", "validation")]
    assert RunSpec("fed-sb", 32, 0.01, 42, "test", "m:adam_b").name == "fed-sb-r32-lr0.01-adam_b-s42"
    assert RunSpec("fed-sb", 32, 0.01, 42, "test").name == "fed-sb-r32-lr0.01-s42"
    one = Comparison(["fed-sb"], 3, tmp_path, {}, {}, {"fed-sb": [0.01]}, server_app="m:adam_a")
    assert one.choose("fed-sb", 32) == (0.01, "")  # one app: nothing to choose, names unchanged
    with pytest.raises(ValueError, match="--server-app.*validation split"):
        Comparison(["fed-sb"], 3, tmp_path, {}, {}, {}, validation_fraction=0.0, server_app="m:a|m:b")


# ---------------------------------------------------------------- the validation split
def test_validation_split_is_disjoint_from_held_out_and_every_partition(tiny_bert, sentiment_csv, tmp_path):
    from fedsb.config import FedSBConfig
    from fedsb.tasks import get_task

    rc = tiny_run_config(tiny_bert, sentiment_csv, tmp_path, **{"validation-fraction": 0.2})
    data = get_task(FedSBConfig.from_run_config(rc)).data
    plain = get_task(FedSBConfig.from_run_config(dict(rc, **{"validation-fraction": 0.0}))).data
    val, test = set(data.val_idx.tolist()), set(data.test_idx.tolist())
    assert len(val) == round(0.2 * len(plain.train_idx)) and not val & test
    assert np.array_equal(data.test_idx, plain.test_idx)  # the held-out set does not move
    assert sorted(val | set(data.train_idx.tolist())) == sorted(plain.train_idx.tolist())
    cfg = FedSBConfig.from_run_config(rc)
    for pid in range(3):
        assert not val & set(data.client_dataset(pid, 3, cfg).indices.tolist())
    on_val = get_task(FedSBConfig.from_run_config(dict(rc, **{"eval-split": "validation"}))).data
    assert np.array_equal(on_val.test_dataset().indices, data.val_idx)


def test_eval_split_validation_needs_a_validation_slice():
    from fedsb.config import ConfigError, FedSBConfig

    with pytest.raises(ConfigError, match="eval-split.*validation-fraction > 0"):
        FedSBConfig.from_run_config({"eval-split": "validation"})


# ---------------------------------------------------------------- end to end
def test_compare_selects_lr_on_validation_then_runs_seeds(tiny_bert, sentiment_csv, tmp_path, capsys, monkeypatch):
    from server.cli import main
    from lab.inprocess_grid import run_inprocess

    # every run of the comparison over the in-process grid (what compare decides is the subject here)
    runs = []
    monkeypatch.setattr("server.simulation.simulate", lambda cfg, n, **_: runs.append(cfg) or run_inprocess(cfg, n))

    rc = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "unused", **{"num-server-rounds": 2, "local-steps": 3})
    for key in ("output-dir", "rank", "learning-rate"):
        rc.pop(key)
    text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in rc.items())
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "fed-sb", "--num-supernodes", "3", "--out", str(out), "--run-config", text,
            "--rank", "fed-sb=4", "--lr", "fed-sb=0.01|0.03|0.1", "--seeds", "2", "--select-rounds", "1",
            "--max-extend", "0"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    dirs = sorted(p.parent for p in out.glob("*/*/summary.json"))
    assert len(rows) == len(dirs) == len(runs) and {r["run_dir"] for r in rows} == {str(d) for d in dirs}
    sel = [r for r in rows if r["split"] == "validation"]
    assert {r["method"] for r in sel} == {"fed-sb"} and len(sel) == 3 and {r["rounds"] for r in sel} == {"1"}
    for r in sel:  # a selection run evaluated on the validation slice, never on the held-out set
        assert json.loads((out / "select" / r["run_dir"].split("/")[-1] / "summary.json").read_text())["config"]["eval-split"] == "validation"
    best = max(sel, key=lambda r: (float(r["final_accuracy"]), -float(r["lr"])))
    final = [r for r in rows if r["split"] == "test"]
    assert sorted((r["method"], r["seed"]) for r in final) == [("fed-sb", "1"), ("fed-sb", "2")]
    assert {r["lr"] for r in final if r["method"] == "fed-sb"} == {best["lr"]}
    md = (out / "compare.md").read_text()
    accs = [float(r["final_accuracy"]) for r in final if r["method"] == "fed-sb"]
    line = next(l for l in md.splitlines() if l.startswith("| fed-sb | 4 |"))
    assert f"{statistics.fmean(accs):.4f} | {statistics.stdev(accs):.4f}" in line
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
    # a second call reuses every finished run (nothing retrains) and rewrites the same table
    before = {d: (d / "summary.json").stat().st_mtime for d in dirs}
    assert main(args) == 0
    assert {d: (d / "summary.json").stat().st_mtime for d in dirs} == before and len(runs) == len(dirs)
    assert (out / "compare.md").read_text() == md


def test_method_config_applies_to_its_method_only(tiny_bert, sentiment_csv, tmp_path):
    """fed-sb with quantized transfers beside fedit at float32, in one comparison (over the in-process grid)."""
    from server.cli import main

    rc = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "unused", **{"num-server-rounds": 1, "local-steps": 2})
    for key in ("output-dir", "rank", "learning-rate"):
        rc.pop(key)
    text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in rc.items())
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "fed-sb,fedit", "--num-supernodes", "3", "--out", str(out), "--run-config",
                 text, "--rank", "fed-sb=4,fedit=2", "--lr", "fed-sb=0.1,fedit=0.01", "--validation-fraction", "0",
                 "--backend", "inprocess", "--method-config", "fed-sb",
                 "init-basis='weights' upload-dtype='int8' download-dtype='int8' local-steps=3"]) == 0
    config = {d.name.split("-r")[0]: json.loads((d / "summary.json").read_text())["config"]
              for d in (out / "runs").iterdir()}
    assert set(config) == {"fed-sb", "fedit"}
    assert (config["fed-sb"]["upload-dtype"], config["fed-sb"]["download-dtype"], config["fed-sb"]["local-steps"]) == (
        "int8", "int8", 3)
    assert (config["fedit"]["upload-dtype"], config["fedit"]["download-dtype"], config["fedit"]["local-steps"]) == (
        "float32", "float32", 2)
    assert (config["fed-sb"]["init-basis"], config["fedit"]["init-basis"]) == ("weights", "gradient")
    assert config["fedit"]["num-server-rounds"] == config["fed-sb"]["num-server-rounds"] == 1  # --run-config: both


def test_compare_refuses_an_unknown_backend_or_a_server_app_without_attribute(tmp_path):
    from lab.compare import Comparison

    with pytest.raises(ValueError, match="--backend"):
        Comparison(["fed-sb"], 3, tmp_path, {}, {}, {}, backend="dask")
    with pytest.raises(ValueError, match="--server-app.*module:attribute"):
        Comparison(["fed-sb"], 3, tmp_path, {}, {}, {}, server_app="bench.compose")
