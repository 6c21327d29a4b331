"""Config: defaults agree with pyproject, and every bad value fails before training, naming its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedsb.config import ConfigError, FedSBConfig
from fedsb.config_text import markdown_table, readme_with_table
from fedsb.tasks import get_task
from fedsb.tasks.base import _load_task
from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_config_defaults():
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert FedSBConfig.from_run_config(app_cfg) == FedSBConfig()
    assert sorted(app_cfg) == sorted(FedSBConfig.keys())


def test_readme_holds_the_current_rendering_of_the_key_table():
    readme = (ROOT / "README.md").read_text()
    assert readme == readme_with_table(FedSBConfig, readme), "README's key table is stale: python -m fedsb.config --write-readme README.md"
    table = markdown_table(FedSBConfig)
    assert all(f"| `{k}` |" in table for k in FedSBConfig.keys())
    assert '"s ' not in table and "`0.4` | fraction of nodes sampled" in table  # the drifted values of the old table


def test_trim_fraction_has_one_rule_checked_at_parse_time():
    from client.flower_private import SUPERLINK_NODE_ID, TaskIdentity
    from fedsb.aggregation.robust import TRIM_FRACTION_MAX
    from server.robust import robust_combine

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as in a run

    with pytest.raises(ConfigError) as e:
        FedSBConfig.from_run_config({"aggregation": "trimmed-mean", "trim-fraction": 0.5})
    assert e.value.key == "trim-fraction" and "< 0.5" in str(e.value)
    ok = FedSBConfig.from_run_config({"aggregation": "trimmed-mean", "trim-fraction": 0.49})
    robust_combine("trimmed-mean", [np.zeros(3, np.float32)] * 4, ok.trim_fraction)  # what parses, aggregates
    assert TRIM_FRACTION_MAX == 0.5


def test_misspelt_key_suggests_the_closest_ones():
    with pytest.raises(ConfigError) as e:
        FedSBConfig.from_run_config({"rnak": 4})
    assert e.value.key == "rnak" and "Did you mean 'rank'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        FedSBConfig.from_run_config({"learning_rate": 0.1})  # the Python name instead of the key
    assert "Did you mean 'learning-rate'" in str(e.value)


def test_identity_is_every_key_that_changes_the_run():
    ident = FedSBConfig.identity_keys()
    # the keys the old hand-written list forgot: each changes the data or the training
    for k in ("test-fraction", "text-pair-column", "num-examples", "learning-rate", "local-steps", "batch-size",
              "max-length", "eval-max-samples", "init-basis", "basis-dtype", "aggregation", "target-epsilon"):
        assert k in ident, k
    operational = set(FedSBConfig.keys()) - set(ident)
    assert operational == {"num-server-rounds", "min-available-nodes", "round-timeout", "eval-every",
                           "federated-evaluate", "output-dir", "resume", "eval-generate-samples", "max-new-tokens",
                           "device", "gradient-checkpointing"}


def test_resume_refuses_a_checkpoint_made_with_another_split():
    from fedsb.run.checkpoint import CheckpointMismatch, check_compatible

    saved = FedSBConfig().to_run_config()
    check_compatible(saved, FedSBConfig(num_server_rounds=20, round_timeout=5.0).identity())  # operational: fine
    with pytest.raises(CheckpointMismatch) as e:
        check_compatible(saved, FedSBConfig(test_fraction=0.2).identity())
    assert "test-fraction" in str(e.value)


@pytest.mark.parametrize("planned", [{"dp": True}, {"lr_schedule": "linear"}])
def test_resume_refuses_other_rounds_when_noise_or_schedule_was_planned_over_them(planned):
    """σ (calibrated to target-epsilon over all rounds) and the linear schedule both depend on the number of
    rounds: a resume with more would silently change both, so it is refused, naming the key."""
    from fedsb.run.checkpoint import CheckpointMismatch, check_compatible

    saved = FedSBConfig(num_server_rounds=10, **planned).to_run_config()
    check_compatible(saved, FedSBConfig(num_server_rounds=10, round_timeout=5.0, **planned).identity())
    with pytest.raises(CheckpointMismatch) as e:
        check_compatible(saved, FedSBConfig(num_server_rounds=20, **planned).identity())
    assert e.value.field == "num-server-rounds"
    check_compatible(FedSBConfig().to_run_config(), FedSBConfig(num_server_rounds=20).identity())  # neither: fine


@pytest.mark.parametrize("key, value, fragment", [
    ("method", "fedavg", "accepted values"),
    ("rank", 0, ">= 1"),
    ("fraction-train", 1.5, "<= 1.0"),
    ("learning-rate", -1.0, "> 0.0"),
    ("dp", "maybe", "true or false"),
    ("num-server-rounds", "ten", "integer"),
    ("init-update", "adam", "sign, grad"),
    ("lerning-rate", 0.1, "unknown key"),
])
def test_bad_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError) as e:
        FedSBConfig.from_run_config({key: value})
    assert e.value.key == key and f"'{key}'" in str(e.value) and fragment in str(e.value)


@pytest.mark.parametrize("override, key", [
    ({"target-modules": "q_proj"}, "target-modules"),
    ({"rank": 64}, "rank"),  # tiny BERT layers are 32 wide
    ({"model": "/nonexistent/model"}, "model"),
    ({"label-column": "sentiment"}, "label-column"),
    ({"text-column": "body"}, "text-column"),
    ({"dataset": "/nonexistent.csv"}, "dataset"),
])
def test_bad_run_config_fails_before_training(tiny_bert, sentiment_csv, tmp_path, override, key):
    _load_task.cache_clear()
    cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "out", **override))
    with pytest.raises(ConfigError) as e:
        get_task(cfg)
    assert e.value.key == key, str(e.value)
    if key == "target-modules":
        assert "query" in str(e.value)  # lists the model's linear layers
    assert not (tmp_path / "out").exists()  # nothing was started or written


@pytest.mark.parametrize("word, value", [("on", True), ("OFF", False), ("yes", True), ("0", False)])
def test_booleans_take_the_usual_words(word, value):
    assert FedSBConfig.from_run_config({"dp": word}).dp is value


def test_a_bad_boolean_says_what_is_accepted():
    with pytest.raises(ConfigError) as e:
        FedSBConfig.from_run_config({"secagg": "enabled"})
    assert all(w in str(e.value) for w in ("true", "false", "yes", "no", "on", "off")), str(e.value)


def test_existing_run_is_not_overwritten(tmp_path):
    from fedsb.run.records import prepare_run_dir

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(FedSBConfig(output_dir=str(tmp_path)))
    assert e.value.key == "output-dir"
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_held_out_prefix_is_a_random_sample_of_labels():
    from fedsb.tasks.data import split_indices

    labels = np.repeat([0, 1, 2], 1000)  # a file sorted by label
    train, test = split_indices(len(labels), 0.2, seed=3)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 3000
    counts = np.bincount(labels[test[:100]], minlength=3)
    assert counts.min() >= 15, counts  # every class present in a capped evaluation set
