"""The device package's text never sends a reader to design documents that are not in the repository
(ROUTET2I.md, CONTRACTS.md, STYLE.md live outside it): it says the thing in place or names a README
section, and every README section it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = ("ROUTET2I.md", "CONTRACTS.md", "STYLE.md", "shared/design")


def _sources():
    return sorted(p for p in (REPO / "sdk").rglob("*") if p.suffix in (".py", ".pyi", ".proto"))


def test_no_references_to_documents_outside_the_repository():
    hits = [f"{p.relative_to(REPO)}:{i}" for p in _sources()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if any(name in line for name in OUTSIDE)]  # fmt: skip
    assert hits == []


def test_named_readme_sections_exist():
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M)}
    named = set()
    for p in _sources():
        text = re.sub(r"\s*\n\s*#?\s*", " ", p.read_text(encoding="utf-8"))
        named |= {
            m.group(1) for m in re.finditer(r"README, sections? ([A-Z][\w.:-]*(?: [a-z:][\w.:-]*)*)", text)
        }
    assert named and all(any(h.startswith(n.rstrip(".:")) for h in headings) for n in named), (
        named,
        headings,
    )
