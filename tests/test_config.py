"""Config: defaults agree with pyproject, and every bad value fails before training, naming its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedsb.config import ConfigError, FedSBConfig
from fedsb.task import get_task
from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_config_defaults():
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert FedSBConfig.from_run_config(app_cfg) == FedSBConfig()
    assert sorted(app_cfg) == sorted(FedSBConfig.keys())


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in FedSBConfig.keys() if f"`{k}`" not in readme]
    assert not missing, f"README lacks config keys {missing}"


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
    get_task.cache_clear()
    cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "out", **override))
    with pytest.raises(ConfigError) as e:
        get_task(cfg)
    assert e.value.key == key, str(e.value)
    if key == "target-modules":
        assert "query" in str(e.value)  # lists the model's linear layers
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_existing_run_is_not_overwritten(tmp_path):
    from fedsb.records import prepare_run_dir

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(FedSBConfig(output_dir=str(tmp_path)))
    assert e.value.key == "output-dir"
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_held_out_prefix_is_a_random_sample_of_labels():
    from fedsb.data import split_indices

    labels = np.repeat([0, 1, 2], 1000)  # a file sorted by label
    train, test = split_indices(len(labels), 0.2, seed=3)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 3000
    counts = np.bincount(labels[test[:100]], minlength=3)
    assert counts.min() >= 15, counts  # every class present in a capped evaluation set
