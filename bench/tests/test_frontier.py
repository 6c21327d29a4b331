"""bench/frontier.py: the command BENCHMARKS.md shows is a valid ``fedsb compare`` command, and merging an
arm into bench/results keeps the arms that ran elsewhere."""

from __future__ import annotations

import json


def test_frontier_command_is_a_valid_compare_command(monkeypatch, tmp_path):
    """bench.frontier runs exactly the command BENCHMARKS.md shows: it must parse into a Comparison."""
    import shlex

    from bench.frontier import command
    from lab import compare

    seen = {}

    def fake_run(self):
        seen.update(methods=self.methods, ranks=self.ranks, lrs=self.lrs, seeds=self.seeds, overrides=self.overrides)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "compare.md").write_text("")
        return []

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare.Comparison, "run", fake_run)
    from server.cli import main

    assert main(shlex.split(command("nonprivate", "fed-sb", "train-pooler=true"))[1:]) == 1  # no rows
    assert seen["methods"] == ["fed-sb"] and seen["seeds"] == 3
    assert seen["ranks"] == {"fed-sb": [16, 32, 64, 128]} and seen["lrs"] == {"fed-sb": [2.5e-3, 5e-3, 1e-2]}
    assert seen["overrides"]["train-pooler"] is True and seen["overrides"]["max-length"] == 32
    assert main(shlex.split(command("private-eps3", "fed-sb-server"))[1:]) == 1
    assert seen["overrides"]["init-source"] == "server" and seen["overrides"]["dp"] is True
    assert seen["overrides"]["target-epsilon"] == 3.0 and seen["ranks"] == {"fed-sb": [32]}


def test_merge_keeps_an_arm_whose_run_directories_are_gone(monkeypatch, tmp_path):
    """A fresh checkout has bench/results but not the runs/ of another checkout: merging a new arm must keep
    the old arms' rows from the csv, typed as run_row gives them, and write the same table."""
    import bench.frontier as frontier
    from lab.compare_report import COLUMNS, read_rows, write_summary

    def row(arm, seed, acc, split="test"):
        return {"method": arm, "rank": 4, "lr": 5e-3, "seed": seed, "split": split, "final_accuracy": acc,
                "final_loss": 0.5, "bytes_up_total": 100, "bytes_down_total": 200, "bytes_one_time": 0,
                "bytes_total": 300, "bytes_up_per_client_round": 10.0, "trainable_params": 7,
                "communicated_params": 7, "rounds": 10, "seconds": 1.5, "epsilon": "", "majority_rate": "", "run_dir": f"runs/gone/{arm}-{seed}"}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(frontier, "RESULTS", tmp_path / "results")
    dest = tmp_path / "results" / "frontier-nonprivate"
    old = [row("fedit", s, 0.7 + s / 1000) for s in (42, 43, 44)]
    write_summary(old, dest)
    assert read_rows(dest / "compare.csv") == old and list(old[0]) == COLUMNS
    md = (dest / "compare.md").read_text()
    frontier.merge("nonprivate")  # no arm has run directories here: fedit's rows are kept as they were
    assert read_rows(dest / "compare.csv") == old and (dest / "compare.md").read_text() == md
    assert "--methods fedit" in (dest / "commands.txt").read_text()
    assert "--methods flora" not in (dest / "commands.txt").read_text()  # flora ran nowhere
    # flora runs here now (one run directory): its rows come from it, and fedit's stay
    run = tmp_path / "runs" / "frontier-nonprivate" / "flora" / "runs" / "flora-r4-s42"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "config": {"method": "flora", "rank": 4, "learning-rate": 5e-3, "seed": 42}, "final_accuracy": 0.6,
        "final_loss": 0.7, "bytes_basis_total": 0, "bytes_init_total": 0, "bytes_up_total": 100, "bytes_down_total": 200,
        "bytes_up_per_client_round": 10.0, "trainable_params": 7, "communicated_params": 7, "rounds": 10, "seconds": 1.0}))
    frontier.merge("nonprivate")
    merged = read_rows(dest / "compare.csv")
    assert [r for r in merged if r["method"] == "fedit"] == old
    assert [(r["method"], r["final_accuracy"]) for r in merged if r["method"] != "fedit"] == [("flora", 0.6)]
    assert "--methods flora" in (dest / "commands.txt").read_text()


def test_every_sweep_command_is_a_valid_compare_command(monkeypatch, tmp_path):
    """bench.sweep runs one command per (arm, rank) of each part, over the in-process backend: each must parse
    into a Comparison with the part's keys, that one rank, and the arm's ServerApp."""
    import shlex

    from bench.frontier import PARTS
    from bench.sweep import jobs_of
    from lab import compare

    seen = []

    def fake_run(self):
        seen.append(self)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "compare.md").write_text("")
        return []

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare.Comparison, "run", fake_run)
    from server.cli import main

    jobs = jobs_of(list(PARTS))
    for _, _, cmd in jobs:
        assert main(shlex.split(cmd)[1:]) == 1
    assert len(seen) == len(jobs) and all(c.backend == "inprocess" for c in seen)
    assert all(len(next(iter(c.ranks.values()))) == 1 for c in seen)
    by_dir = {c.out.parts[-2:]: c for c in seen}
    long_w8 = [c for (part, arm), c in by_dir.items() if (part, arm) == ("frontier-long-nonprivate", "fed-sb-weights-int8")]
    assert long_w8 and long_w8[0].overrides["init-basis"] == "weights" and long_w8[0].overrides["upload-dtype"] == "int8"
    assert long_w8[0].rounds == 30 and long_w8[0].select_rounds == 15
    udp = by_dir[("frontier-user-dp", "fedit")]
    assert udp.num_supernodes == 100 and udp.server_app == "bench.compose:user_dp"
    assert udp.overrides["min-available-nodes"] == 100 and udp.overrides["fraction-train"] == 0.1
    adam = by_dir[("frontier-server-adam", "fed-sb-adam")]  # the step size chosen among the apps on validation
    assert adam.server_apps == [f"bench.compose:adam_{eta}" for eta in ("3e_3", "1e_2", "3e_2", "1e_1", "3e_1")]
    assert adam.overrides["partitioner"] == "dirichlet" and adam.lrs == {"fed-sb": [0.005]}
    assert by_dir[("frontier-server-adam", "fed-sb")].server_app == ""
    import bench.compose as compose  # every app the part names exists

    assert all(hasattr(compose, a.split(":")[1]) for a in adam.server_apps)


def _rows(method: str, rank: int, accs: list[float], total: int, val: float | None = None) -> list[dict]:
    """Held-out rows of one (method, rank), the bytes alike, and one selection run at the same rate."""
    rows = [{"method": method, "rank": rank, "lr": 1e-2, "split": "test", "seed": 42 + i, "final_accuracy": a,
             "bytes_up_per_client_round": 1, "bytes_one_time": 0, "bytes_up_total": total * 10**6, "bytes_down_total": 0,
             "bytes_total": total * 10**6} for i, a in enumerate(accs)]
    if val is not None:
        rows.append({**rows[0], "split": "validation", "final_accuracy": val})
    return rows


def test_long_goal_is_judged_beyond_two_standard_errors():
    """Issue 31's goal lines: Fed-SB wins where its margin exceeds 2 SE, is beaten where another method's does;
    a budget where Fed-SB alone fits is no accuracy win."""
    from bench.report_frontier import long_goal

    cheap = _rows("fed-sb-weights-int8", 32, [0.70, 0.71, 0.72], 10)
    win = cheap + _rows("fed-sb-int8", 64, [0.80, 0.81, 0.80], 30) + _rows("ffa-lora-int8", 4, [0.70, 0.71, 0.70], 20)
    text = long_goal("long-nonprivate", win)[0]
    assert "): met.**" in text and "≤ 30.0 MB: fed-sb-int8 r=64 over ffa-lora-int8 r=4" in text, text
    assert "only method that fits" in text and "Beaten beyond 2 SE at: no budget where it fits" in text, text
    assert "Why" not in text, text
    lose = cheap + _rows("ffa-lora-int8", 4, [0.80, 0.81, 0.80], 20)
    text = long_goal("long-nonprivate", lose)[0]
    assert "): unmet.**" in text and "Beaten beyond 2 SE at: ≤ 20.0 MB: ffa-lora-int8 r=4 over fed-sb-weights-int8" in text
    tie = cheap + _rows("ffa-lora-int8", 4, [0.70, 0.72, 0.71], 20)
    text = long_goal("long-nonprivate", tie)[0]
    assert "): unmet.**" in text and "no budget where it fits" in text and "lie within 0.000 of each other" in text, text


def test_private_goal_takes_the_basis_validation_chose_not_the_best_held_out_one():
    """At ε = 1 the basis is a hyperparameter: the goal compares the one whose selection run scored best, even
    where another basis has the better held-out mean."""
    from bench.report_frontier import long_goal

    rows = (_rows("fed-sb-random", 32, [0.60, 0.61, 0.60], 10, val=0.70)
            + _rows("fed-sb-weights", 32, [0.90, 0.91, 0.90], 10, val=0.50)
            + _rows("ffa-lora", 8, [0.70, 0.71, 0.70], 10, val=0.6))
    text = long_goal("long-private-eps1", rows)[0]
    assert "): unmet.**" in text and "is fed-sb-random: held-out 0.603" in text, text
    assert "not measured yet" in long_goal("long-private-eps1", rows[:4])[0]
