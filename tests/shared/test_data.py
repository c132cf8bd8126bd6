"""Tests of axon_shared.data on the REAL offline datasets.

The data root is session-wide: ``$AXON_DATA`` if set (the Makefile sets it), else ``~/.cache/axon``. The first
run prepares everything (downloads included, well under a minute here); later runs only read the cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from axon_shared.data import DataSourceError, data_root, list_datasets, load_meta, load_split, prepare
from axon_shared.data.cli import main as cli_main
from axon_shared.data.registry import DATASETS

SPLITS = ("train", "valid", "test")


def load_all(name: str) -> dict:
    return {split: load_split(name, split) for split in SPLITS}


def assert_counts(splits: dict, exact: dict[str, int]) -> None:
    sizes = {split: len(part["labels"]) if isinstance(part, dict) else len(part) for split, part in splits.items()}
    assert sizes == exact


def assert_disjoint(splits: dict, key) -> None:
    keys = {split: {key(item) for item in part} for split, part in splits.items()}
    for first, second in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not keys[first] & keys[second], f"{first}/{second} share items"


def image_hashes(split: dict) -> set[bytes]:
    return {hashlib.sha1(image.tobytes()).digest() for image in split["images"]}


def check_pairs(splits: dict, min_total: int, valid: int, test: int) -> None:
    assert len(splits["valid"]) == valid and len(splits["test"]) == test
    assert sum(len(part) for part in splits.values()) >= min_total
    for part in splits.values():
        for record in part:
            assert set(record) == {"en", "de"}
            assert record["en"].strip() and record["de"].strip() and record["en"] != record["de"]
            assert record["en"] == " ".join(record["en"].split())
    assert_disjoint(splits, lambda record: record["en"])
    every_pair = [(r["en"], r["de"]) for part in splits.values() for r in part]
    assert len(every_pair) == len(set(every_pair))


def check_images(splits: dict, shape: tuple[int, int]) -> None:
    for part in splits.values():
        assert part["images"].dtype == np.uint8 and part["labels"].dtype == np.int64
        assert part["images"].shape[1:] == shape and part["images"].ndim == 3
        assert len(part["images"]) == len(part["labels"])
        assert part["labels"].min() == 0 and part["labels"].max() == 9
        assert part["images"].max() > 200


# ----- one test per dataset, on the real prepared data -----


def test_de_en_libreoffice() -> None:
    splits = load_all("de-en-libreoffice")
    check_pairs(splits, min_total=30_000, valid=1_000, test=2_000)
    assert any(r["en"] == "Choose Tools - Options - LibreOffice - Advanced." for r in splits["train"])


def test_de_en_ding() -> None:
    splits = load_all("de-en-ding")
    check_pairs(splits, min_total=18_000, valid=1_000, test=1_000)
    for record in splits["valid"]:
        assert record["de"][-1] in ".!?" and record["en"][-1] in ".!?"
        assert len(record["de"].split()) >= 4
        assert not any(mark in record["de"] + record["en"] for mark in "{}[]<>")


def test_de_en_bible() -> None:
    splits = load_all("de-en-bible")
    check_pairs(splits, min_total=30_000, valid=1_000, test=2_000)
    assert_counts(splits, {"train": 27_808, "valid": 1_000, "test": 2_000})
    text = " ".join(r["en"] + r["de"] for part in splits.values() for r in part)
    assert "`" not in text and "[" not in text and "Jehova" in text


def test_en_text() -> None:
    splits = load_all("en-text")
    assert_counts(splits, {"train": 166, "valid": 7, "test": 7})
    documents = [doc for part in splits.values() for doc in part]
    assert {doc["source"] for doc in documents} == {"bible-web", "bible-kjv", "shakespeare", "austen"}
    assert sum(doc["source"] == "shakespeare" for doc in documents) == 42
    assert sum(doc["source"] == "austen" for doc in documents) == 6
    assert sum(doc["source"].startswith("bible") for doc in documents) == 132
    for doc in documents:
        assert set(doc) == {"source", "title", "text"} and doc["title"] and len(doc["text"]) > 500
    assert_disjoint(splits, lambda doc: (doc["source"], doc["title"]))
    assert_disjoint(splits, lambda doc: doc["title"])  # a Bible book's WEB and KJV versions share a split
    assert sum(len(doc["text"]) for doc in documents) > 15_000_000


def test_fashion_mnist() -> None:
    splits = load_all("fashion-mnist")
    assert_counts(splits, {"train": 55_000, "valid": 5_000, "test": 10_000})
    check_images(splits, (28, 28))
    assert np.bincount(splits["valid"]["labels"]).tolist() == [500] * 10
    assert np.bincount(splits["test"]["labels"]).tolist() == [1_000] * 10
    assert not image_hashes(splits["train"]) & image_hashes(splits["valid"])
    assert load_meta("fashion-mnist")["official_counts"] == {"train": 60_000, "test": 10_000}


def test_mnist_5k() -> None:
    splits = load_all("mnist-5k")
    assert_counts(splits, {"train": 4_000, "valid": 500, "test": 500})
    check_images(splits, (28, 28))
    assert np.bincount(splits["test"]["labels"]).tolist() == [50] * 10
    hashes = {split: image_hashes(part) for split, part in splits.items()}
    assert not hashes["train"] & hashes["valid"] and not hashes["train"] & hashes["test"]
    assert not hashes["valid"] & hashes["test"]


def test_digits() -> None:
    splits = load_all("digits")
    assert_counts(splits, {"train": 1_257, "valid": 180, "test": 360})
    check_images(splits, (8, 8))
    allowed = {round(value * 255 / 16) for value in range(17)}
    assert set(np.unique(splits["train"]["images"]).tolist()) <= allowed
    assert splits["train"]["images"].max() == 255


def test_vader_sentiment() -> None:
    splits = load_all("vader-sentiment")
    assert_counts(splits, {"train": 20_150, "valid": 1_184, "test": 2_369})
    records = [record for part in splits.values() for record in part]
    sources = ("movie", "amazon", "nyt", "tweets")
    per_source = {source: sum(r["source"] == source for r in records) for source in sources}
    assert per_source == {"movie": 10_605, "amazon": 3_708, "nyt": 5_190, "tweets": 4_200}
    for record in records:
        assert -4 <= record["mean"] <= 4 and record["text"].strip() and "\r" not in record["text"]
        assert record["ratings"] and all(-4 <= score <= 4 for score in record["ratings"])
    assert len({(r["source"], r["id"]) for r in records}) == len(records)
    assert_disjoint(splits, lambda record: record["text"])


# ----- cache files, idempotency, failures, determinism -----


@pytest.mark.parametrize("name", list(DATASETS))
def test_meta_and_license(name: str) -> None:
    directory = prepare(name, progress=False)
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    assert meta["name"] == name and meta["license"] and meta["splits"]
    assert meta["counts"] == {split: meta["counts"][split] for split in SPLITS}
    assert meta["counts"]["valid"] == DATASETS[name].expected_counts["valid"]
    assert meta["counts"]["test"] == DATASETS[name].expected_counts["test"]
    for source in meta["source"]:
        assert source["package"] and source["version"] and source["file"] and source["command"]
    assert len((directory / "LICENSE.txt").read_text(encoding="utf-8")) > 500
    assert directory.parent == data_root()


def test_list_datasets_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    prepare("digits", progress=False)
    infos = {info.name: info for info in list_datasets()}
    assert set(infos) == set(DATASETS)
    assert infos["digits"].prepared and infos["digits"].counts == {"train": 1_257, "valid": 180, "test": 360}
    assert cli_main(["list"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in DATASETS)
    assert cli_main(["prepare", "digits", "--quiet"]) == 0


def test_bad_names() -> None:
    with pytest.raises(DataSourceError, match="split"):
        load_split("digits", "dev")
    with pytest.raises(DataSourceError, match="unknown dataset 'no-such-dataset'; known: de-en-libreoffice"):
        prepare("no-such-dataset")


def test_a_damaged_split_file_is_noticed_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A split file cut short (half deleted, rewritten) no longer matches meta.json's counts: `list` does not call
    it prepared, and loading rebuilds it instead of training on what is left."""
    from axon_shared.data.storage import read_npz, write_npz

    directory = prepare("digits", root=tmp_path, progress=False)
    valid = read_npz(directory / "valid.npz")
    write_npz(directory / "valid.npz", {key: array[:90] for key, array in valid.items()})
    assert not {i.name: i for i in list_datasets(tmp_path)}["digits"].prepared
    assert len(load_split("digits", "valid", root=tmp_path)["labels"]) == 180
    assert "valid.npz holds 90 records, meta.json recorded 180; rebuilding it" in capsys.readouterr().out
    (directory / "test.npz").write_bytes((directory / "test.npz").read_bytes()[:1000])  # cut mid-file
    assert len(load_split("digits", "test", root=tmp_path)["labels"]) == 360
    assert "test.npz holds no readable records" in capsys.readouterr().out
