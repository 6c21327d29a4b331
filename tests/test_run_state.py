"""The run's history lives in metrics.jsonl only: a checkpoint holds the state a resume needs and does not
grow with the records; a resumed run reads the history back, without the rounds after its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsb.config import ConfigError, FedSBConfig
from fedsb.run.checkpoint import load_checkpoint
from fedsb.run import records
from fedsb.run.records import CHECKPOINT, METRICS, RunRecorder
from tests.conftest import tiny_run_config


def _server(tiny_bert, sentiment_csv, out, **extra):
    """The run directory of a FedSB strategy, without a grid: checkpoint and restore never reach the nodes."""
    from server.run_dir import RunDirectory
    from server.strategy import FedSB

    cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, out, method="fedit", **extra))
    return RunDirectory(FedSB(cfg))


def test_checkpoint_size_does_not_grow_with_the_records(tiny_bert, sentiment_csv, tmp_path):
    server = _server(tiny_bert, sentiment_csv, tmp_path / "run")
    server.rec.log(0, "evaluate", loss=0.7, accuracy=0.5)
    server.checkpoint(1)
    size = (tmp_path / "run" / CHECKPOINT).stat().st_size
    for k in range(200):
        server.rec.log(1, "train", loss=0.5, clients=3, rejected=[{"node": k, "reason": "shape"}])
    server.checkpoint(1)
    # equal but for the run's seconds so far, a number whose digits may differ; 200 records are ~20 kB
    assert abs((tmp_path / "run" / CHECKPOINT).stat().st_size - size) < 16
    assert "records" not in load_checkpoint(tmp_path / "run" / CHECKPOINT)[1]
    assert len((tmp_path / "run" / METRICS).read_text().splitlines()) == 201  # the history is all in metrics.jsonl


def test_resume_reads_the_history_back_without_the_rounds_after_the_checkpoint(tiny_bert, sentiment_csv, tmp_path):
    run = tmp_path / "run"
    server = _server(tiny_bert, sentiment_csv, run)
    for rnd in (0, 1):
        server.rec.log(rnd, "train", loss=1.0 / (rnd + 1))
        server.rec.log(rnd, "evaluate", loss=0.5, accuracy=0.75)
    server.checkpoint(1)
    kept = (run / METRICS).read_text()
    server.rec.log(2, "train", loss=0.25)  # written, then the run died before round 2's checkpoint
    with open(run / METRICS, "a") as fh:
        fh.write('{"round": 2, "phase": "evalu')  # and a line cut short by the crash
    server.close()  # the crashed process is gone (its run directory lock with it)
    resumed = _server(tiny_bert, sentiment_csv, run, resume=True)
    assert resumed.restore() == 2
    assert (run / METRICS).read_text() == kept  # rounds 0-1 as written, round 2 gone: it will run again
    assert resumed.rec.records == [json.loads(l) for l in kept.splitlines()]
    resumed.rec.log(2, "train", loss=0.25)
    assert [r["round"] for r in map(json.loads, (run / METRICS).read_text().splitlines())] == [0, 0, 1, 1, 2]


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    (tmp_path / METRICS).write_text('{"round": 0, "phase": "init"}\nnot json\n{"round": 1, "phase": "train"}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        RunRecorder.resume(tmp_path, "fed-sb", 1)


def test_server_adams_moments_ride_in_the_checkpoint_and_need_it_on_resume(tiny_bert, sentiment_csv, tmp_path):
    from server.fedopt import ServerAdam
    from server.run_dir import RunDirectory
    from server.strategy import FedSB

    def rundir(with_adam: bool, **extra) -> RunDirectory:
        cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "run", **extra))
        fedsb = FedSB(cfg)
        return RunDirectory(fedsb, ServerAdam(fedsb) if with_adam else None)

    saved = rundir(True)
    adam = saved.outer
    adam.m = {"adapter": np.array([0.1, -0.2, 3e-9], np.float32)}
    adam.v = {"adapter": np.array([1e-3, 4e-2, 1e-17], np.float32)}
    saved.checkpoint(1)
    saved.close()  # one writer at a time (the run directory's lock)
    resumed = rundir(True, resume=True)
    assert resumed.restore() == 2
    for got, want in ((resumed.outer.m, adam.m), (resumed.outer.v, adam.v)):
        assert got.keys() == want.keys() and got["adapter"].dtype == np.float32
        assert got["adapter"].tobytes() == want["adapter"].tobytes()
    resumed.close()
    with pytest.raises(ValueError, match="ServerAdam"):  # resumed without it: refused, not silently dropped
        rundir(False, resume=True).restore()


def test_a_second_writer_of_a_run_directory_is_refused_until_the_first_ends(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    """A run submitted again with resume=true while the run's first ServerApp still writes (it outlived a
    SuperLink restart) is refused, naming output-dir and the holder, and touches nothing; once the first
    writer is gone (here: closed; a dead process's lock goes with it), the resume proceeds."""
    monkeypatch.setattr(records, "LOCK_WAIT_SECONDS", 0.0)
    run = tmp_path / "run"
    first = _server(tiny_bert, sentiment_csv, run)
    first.rec.log(0, "evaluate", loss=0.5, accuracy=0.75)
    first.checkpoint(1)
    first.rec.log(2, "train", loss=0.25)  # the first writer goes on after its checkpoint
    before = (run / METRICS).read_text()
    with pytest.raises(ConfigError) as e:
        _server(tiny_bert, sentiment_csv, run, resume=True)
    assert e.value.key == "output-dir" and "another ServerApp" in str(e.value) and "flwr stop" in str(e.value)
    assert "pid " in str(e.value)  # the holder is named
    assert (run / METRICS).read_text() == before  # the refused run truncated nothing
    first.close()
    resumed = _server(tiny_bert, sentiment_csv, run, resume=True)
    assert resumed.restore() == 2
    resumed.close()
