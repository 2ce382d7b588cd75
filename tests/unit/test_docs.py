"""The documents the code cites live in this repository (docs/), and every section a citation names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
# documents that were never part of this repository (research notes, the first design draft)
OUTSIDE = re.compile(r"DESIGN\.md|protocols\.md|competitors\.md|style-anchors\.md|reference/|notes/[\w-]+\.md")


def _sources() -> list[Path]:
    files = [path for folder in ("dingdifyd", "tests", "bench") for path in sorted((ROOT / folder).rglob("*.py"))]
    return [path for path in files if path != Path(__file__).resolve()]


def _anchors(document: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", document.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_cited_section_exists() -> None:
    cited = 0
    problems = []
    for path in _sources():
        for name, anchor in CITATION.findall(path.read_text(encoding="utf-8")):
            cited += 1
            document = ROOT / "docs" / name
            if not document.is_file():
                problems.append(f"{path.relative_to(ROOT)}: docs/{name} does not exist")
            elif anchor and anchor not in _anchors(document):
                problems.append(f"{path.relative_to(ROOT)}: docs/{name} has no section #{anchor}")
    assert cited > 0
    assert problems == []


def test_no_citation_of_documents_outside_the_repository() -> None:
    outside = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _sources()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert outside == []
