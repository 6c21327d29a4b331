"""The on-disk cache of tokenized tables and partitions: a changed dataset, config or model is a new key, and a
corrupt or foreign file is rebuilt, never trusted."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from tests.conftest import make_sentiment_csv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDSB_DATA_CACHE", raising=False)
    from fedsb.tasks import seq_cls

    seq_cls._load.cache_clear()  # the in-process cache would hide the disk one
    return tmp_path / "cache" / "data"


def _encode(model, csv, max_length=16):
    from fedsb.tasks.data import load_table
    from fedsb.tasks.seq_cls import _encode

    t = load_table(str(csv), "text", "label")
    return _encode(t.texts, t.pairs, t.labels, t.label_names, str(model), max_length, 0.2, 1)


def _tokens(data) -> list[list[int]]:
    ids = data.dataset.encodings["input_ids"]
    return [ids[j].tolist() for j in range(len(ids))]


def _fresh(model, csv, max_length=16) -> list[list[int]]:
    from fedsb.tasks.data import load_table
    from fedsb.tasks.models import load_tokenizer

    t = load_table(str(csv), "text", "label")
    return load_tokenizer(str(model))(t.texts, truncation=True, max_length=max_length)["input_ids"]


def test_a_second_load_reads_the_cache_and_equals_tokenizing(tiny_bert, sentiment_csv, cache):
    first = _encode(tiny_bert, sentiment_csv)
    files = sorted(cache.glob("tokens-*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = _encode(tiny_bert, sentiment_csv)
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    assert _tokens(first) == _tokens(second) == _fresh(tiny_bert, sentiment_csv)
    item = second.dataset[3]
    assert item["input_ids"].dtype.is_floating_point is False and item["attention_mask"].sum() == len(item["input_ids"])


def test_changed_dataset_config_or_model_is_a_new_entry(tiny_bert, sentiment_csv, cache, tmp_path):
    _encode(tiny_bert, sentiment_csv)
    other = make_sentiment_csv(tmp_path / "other.csv", seed=5)  # different texts
    assert _tokens(_encode(tiny_bert, other)) == _fresh(tiny_bert, other)
    assert _tokens(_encode(tiny_bert, sentiment_csv, 8)) == _fresh(tiny_bert, sentiment_csv, 8)
    model2 = tmp_path / "model2"
    shutil.copytree(tiny_bert, model2)
    vocab = (model2 / "vocab.txt").read_text().splitlines()
    vocab[1000:1010] = vocab[1005:1010] + vocab[1000:1005]  # another tokenizer: some ids swapped
    (model2 / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (model2 / "tokenizer.json").unlink()  # make transformers build it from the changed vocab
    assert _tokens(_encode(model2, sentiment_csv)) == _fresh(model2, sentiment_csv)
    assert len(list(cache.glob("tokens-*.npz"))) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_a_corrupt_or_foreign_cache_file_is_rebuilt(tiny_bert, sentiment_csv, cache, tmp_path, caplog, damage):
    _encode(tiny_bert, sentiment_csv)
    (path,) = cache.glob("tokens-*.npz")
    if damage == "garbage":
        path.write_bytes(b"not a zip at all" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a valid file of another key under this name
        other = make_sentiment_csv(tmp_path / "other.csv", seed=5)
        before = set(cache.glob("tokens-*.npz"))
        _encode(tiny_bert, other)
        (new,) = set(cache.glob("tokens-*.npz")) - before
        shutil.copy(new, path)
    with caplog.at_level(logging.WARNING, logger="fedsb.tasks.cache"):
        again = _encode(tiny_bert, sentiment_csv)
    assert "rebuilding" in caplog.text
    assert _tokens(again) == _fresh(tiny_bert, sentiment_csv)
    with np.load(path) as z:  # and the file is whole again
        assert "__key__" in z.files


def test_partitions_come_back_identical_and_a_bad_file_is_rebuilt(cache):
    from fedsb.tasks.data import _partition, partition_indices

    labels = np.random.default_rng(0).integers(0, 3, 500)
    want = _partition(labels, 5, 2, "dirichlet", 0.5, 7)
    assert np.array_equal(partition_indices(labels, 5, 2, "dirichlet", 0.5, 7), want)
    (path,) = cache.glob("partition-*.npz")
    assert np.array_equal(partition_indices(labels, 5, 2, "dirichlet", 0.5, 7), want)
    path.write_bytes(b"\0" * 64)
    assert np.array_equal(partition_indices(labels, 5, 2, "dirichlet", 0.5, 7), want)
    assert not np.array_equal(partition_indices(labels, 5, 2, "dirichlet", 0.5, 8), want)  # the seed is in the key
    labels2 = labels.copy()
    labels2[0] = (labels2[0] + 1) % 3
    assert np.array_equal(partition_indices(labels2, 5, 2, "dirichlet", 0.5, 7), _partition(labels2, 5, 2, "dirichlet", 0.5, 7))


def test_cache_off(tiny_bert, sentiment_csv, cache, monkeypatch):
    monkeypatch.setenv("FEDSB_DATA_CACHE", "0")
    assert _tokens(_encode(tiny_bert, sentiment_csv)) == _fresh(tiny_bert, sentiment_csv)
    assert not cache.exists()
