"""``de-en-libreoffice``: aligned paragraphs of the English and German LibreOffice help (Debian packages).

35,072 pairs from libreoffice-help-{en-us,de} 4:7.4.7-1+deb12u14: valid 1,000, test 2,000, train 32,072.
"""

from __future__ import annotations

from pathlib import Path

import lxml.html

from ..progress import progress_bar
from .dataset import BuiltDataset
from .sources import SourceFetcher, common_license, titled
from .translation import normalize_space, pairs_dataset, unique_pairs

PACKAGES = {"en": ("libreoffice-help-en-us", "en-US"), "de": ("libreoffice-help-de", "de")}
BLOCK_TAGS = ("p", "h1", "h2", "h3", "h4", "h5", "h6", "td", "li", "div")
ALIGNED_ID_PREFIXES = ("par_id", "hd_id")
QUOTAS = {"valid": 1_000, "test": 2_000}


def paragraphs(html_file: Path) -> dict[tuple[str, int], str]:
    """{(element id, occurrence): visible text} for the block elements whose id is the same in every language.

    An id can occur several times in one page (embedded sections), hence the occurrence number. Inline
    switches list platform/module variants as ``hidden`` spans; the ``default*`` variant is kept (e.g. "Ctrl"
    rather than the macOS "Command"), the others are dropped. Blocks that contain another aligned block are
    skipped so no text is counted twice.
    """
    tree = lxml.html.parse(str(html_file))
    aligned = [element for element in tree.iter(*BLOCK_TAGS) if element.get("id", "").startswith(ALIGNED_ID_PREFIXES)]
    texts: dict[tuple[str, int], str] = {}
    occurrences: dict[str, int] = {}
    for element in aligned:
        element_id = element.get("id")
        occurrence = occurrences[element_id] = occurrences.get(element_id, -1) + 1
        if _contains_aligned_block(element):
            continue
        for variant in element.xpath(".//*[@hidden][not(starts-with(@id, 'default'))]"):
            variant.drop_tree()
        text = normalize_space(element.text_content())
        if text:
            texts[(element_id, occurrence)] = text
    return texts


def _contains_aligned_block(element: lxml.html.HtmlElement) -> bool:
    return any(child.get("id", "").startswith(ALIGNED_ID_PREFIXES) for child in element.iterdescendants(*BLOCK_TAGS))


def build(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    english, german = (fetcher.deb(PACKAGES[lang][0]) for lang in ("en", "de"))
    english_help = english.root / "usr/share/libreoffice/help" / PACKAGES["en"][1]
    german_help = german.root / "usr/share/libreoffice/help" / PACKAGES["de"][1]
    relative_files = sorted(path.relative_to(english_help) for path in english_help.rglob("*.html"))
    pairs = []
    for relative in progress_bar(relative_files, enabled=progress, desc="de-en-libreoffice: aligning help pages", leave=False):
        if not (german_help / relative).is_file():
            continue
        german_texts = paragraphs(german_help / relative)
        for key, english_text in paragraphs(english_help / relative).items():
            pairs.append((english_text, german_texts.get(key, "")))
    license_text = (
        titled(f"{english.source.package} {english.source.version}: /usr/share/doc/.../copyright", english.copyright())
        + titled(f"{german.source.package} {german.source.version}: /usr/share/doc/.../copyright", german.copyright())
        + titled("MPL-2.0 full text", common_license("MPL-2.0"))
    )
    return pairs_dataset(
        unique_pairs(pairs),
        salt="de-en-libreoffice",
        quotas=QUOTAS,
        sources=[english.source, german.source],
        license_text=license_text,
        details={
            "alignment": "block elements (p, h1-h6, td, li, div) keyed by (relative html path, par_id*/hd_id* id, "
            "occurrence of that id in the page); text without tags, inline switches reduced to their default "
            "variant, whitespace normalised; empty and identical pairs dropped; exact duplicate pairs removed",
            "html_files": len(relative_files),
        },
    )
