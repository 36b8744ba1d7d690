"""Design references in the code resolve inside the repository.

The code cites ``docs/<file>.md#anchor`` (or ``docs/<file>.md §Section``); each must name a file under
``docs/`` and a heading of that file. Citations of the design files that lived outside the repository
(the old design, stack-notes and reference-spec documents) are refused: a fresh clone cannot follow them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = ("src", "flows", "tests", "bench", "experiments")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh"}

# Spelled in pieces so this file does not match its own pattern.
OUTSIDE = re.compile("|".join([r"DESIGN" + r"\.md", r"DESIGN" + r" §", r"STACK" + "-NOTES", r"COIN" + "-REFERENCE"]))
ANCHOR_REF = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")
SECTION_REF = re.compile(r"docs/([\w.-]+\.md) §([\w-]+)")


def _files() -> list[Path]:
    out = []
    for top in SCANNED:
        out += [p for p in sorted((ROOT / top).rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                and "__pycache__" not in p.parts]
    out += sorted(ROOT.glob("*.md")) + [ROOT / "pyproject.toml"]
    return [p for p in out if p.exists()]


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens.

    >>> slug("Majority-class and chance")
    'majority-class-and-chance'
    >>> slug("MiniLM as a decoder")
    'minilm-as-a-decoder'
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of every Markdown heading of ``doc`` (fenced code blocks skipped)."""
    found, fenced = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            found.add(slug(m.group(1)))
    return found


def _citations() -> list[tuple[str, str, str]]:
    """``(where, docs file, anchor)`` for every docs reference in the scanned files."""
    out = []
    for path in _files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in ANCHOR_REF.finditer(line):
                out.append((f"{path.relative_to(ROOT)}:{n}", m.group(1), m.group(2).lower()))
            for m in SECTION_REF.finditer(line):
                out.append((f"{path.relative_to(ROOT)}:{n}", m.group(1), slug(m.group(2))))
    return out


def test_no_citation_points_outside_the_repository() -> None:
    bad = []
    for path in _files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "cite docs/<file>.md#<section> instead:\n" + "\n".join(bad)


def test_the_code_cites_the_docs() -> None:
    assert _citations(), "no docs/ reference found: the scan is broken"


@pytest.mark.parametrize("where, doc, anchor", _citations())
def test_docs_reference_resolves(where: str, doc: str, anchor: str) -> None:
    path = DOCS / doc
    assert path.is_file(), f"{where}: docs/{doc} does not exist"
    assert anchor in anchors(path), f"{where}: docs/{doc} has no heading with anchor #{anchor}"


def test_docs_cross_links_resolve() -> None:
    """Links between the docs pages (``[text](file.md#anchor)``, ``(#anchor)``) resolve too."""
    bad = []
    for doc in sorted(DOCS.glob("*.md")):
        for m in re.finditer(r"\]\(([\w.-]*\.md)?(?:#([\w-]+))?\)", doc.read_text(encoding="utf-8")):
            target = DOCS / m.group(1) if m.group(1) else doc
            if not target.is_file():
                bad.append(f"{doc.name}: {m.group(0)} (no such file)")
            elif m.group(2) and m.group(2) not in anchors(target):
                bad.append(f"{doc.name}: {m.group(0)} (no such heading)")
    assert not bad, "\n".join(bad)


def test_the_strong_params_say_how_to_run_them_under_dvc_and_what_unnamed_tasks_get():
    """dvc.yaml's stages read params.yaml only: the strong file said "use it wherever params.yaml goes", and a
    user's dvc repro silently ran the default. And unnamed tasks of a per-task pairs.templates get the
    classification templates, not "all"."""
    from coin.data.pairs import templates_for

    root = Path(__file__).resolve().parents[1]
    assert "cp params-strong.yaml params.yaml" in (root / "README.md").read_text()
    assert "cp params-strong.yaml params.yaml" in (root / "params-strong.yaml").read_text()
    assert templates_for("cola", {"sst2": [0, 4]}) == "classification"
    for name in ("params.yaml", "params-strong.yaml"):
        text = (root / name).read_text()
        assert "(others: all)" not in text and "(others: classification)" in text
