"""The front door stays small and every page it opens leads somewhere real (issue 30).

README.md is at most ``README_LIMIT`` bytes; every relative markdown link in README.md and docs/*.md resolves to a
file or directory; every ``results/...`` path those pages name (in a link, an inline code span or a fenced code
block) exists, so a figure always points at committed evidence; and every docs/ page is linked from README.md.
Plain text only: no torch, no network, well under a second.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_LIMIT = 12_000  # bytes

LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target)
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?\s*\)")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.MULTILINE | re.DOTALL)  # list items indent them
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
RESULTS_PATH = re.compile(r"(?<![\w./-])((?:\.\./)*results/[^\s`'\"()\[\],;|]*)")
PLACEHOLDER = ("<", "*", "{")  # results/<study>/report.md, results/bench-*.md: patterns, not files
EXTERNAL = ("http://", "https://", "mailto:")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def links(text: str) -> list[str]:
    """Link and image targets outside code: [text](target), ![alt](target)."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(prose) + IMAGE.findall(prose)


def code_texts(text: str) -> list[str]:
    """What inline code spans and fenced code blocks hold."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    spans = [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub("", text))]
    return blocks + spans


def resolve_link(page: Path, target: str) -> Path | None:
    """The file a relative link points at, or None for an external link or a bare #anchor."""
    if target.startswith(EXTERNAL) or target.startswith("#"):
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    return (REPO / path.lstrip("/")) if path.startswith("/") else (page.parent / path)


def broken_links(page: Path) -> list[str]:
    out = []
    for target in links(page.read_text(encoding="utf-8")):
        path = resolve_link(page, target)
        if path is not None and not path.exists():
            out.append(f"{_name(page)}: ({target}) -> {os.path.relpath(path, REPO)} does not exist")
    return out


def missing_results(page: Path) -> list[str]:
    """``results/...`` paths named in code that do not exist: ``results/`` from the repository root,
    ``../results/`` from the page's own folder (as a link would be read)."""
    out = []
    for code in code_texts(page.read_text(encoding="utf-8")):
        for raw in RESULTS_PATH.findall(code):
            path = raw.rstrip(".:")
            if any(c in path for c in PLACEHOLDER):
                continue
            where = (page.parent / path) if path.startswith("../") else (REPO / path)
            if not where.exists():
                out.append(f"{_name(page)}: `{path}` does not exist")
    return out


def test_readme_is_a_front_door():
    size = README.stat().st_size
    assert size <= README_LIMIT, (f"README.md is {size:,} bytes, over {README_LIMIT:,}: move the detail to a page "
                                  "in docs/ and link it")


def test_there_are_pages():
    assert DOCS.is_dir() and list(DOCS.glob("*.md")), "docs/ holds no .md pages"


@pytest.mark.parametrize("check", [broken_links, missing_results], ids=["links", "results-paths"])
def test_every_reference_resolves(check):
    problems = [p for page in pages() for p in check(page)]
    assert not problems, f"{len(problems)} broken:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {path.resolve() for t in links(README.read_text(encoding="utf-8"))
              if (path := resolve_link(README, t)) is not None}
    orphans = [_name(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not orphans, "docs pages README.md does not link: " + ", ".join(orphans)


def test_the_checks_catch_what_they_should(tmp_path):
    """The helpers themselves: a broken link and a missing results path are reported, code is not a link,
    placeholders and external links are skipped."""
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md#x) [web](https://example.org) [here](#top)\n"
                    "`[not a link](nowhere.md)` `results/<study>/report.md` `results/bench-*.md`\n"
                    "```\nmake bench  # -> results/no-such-file.md\n```\n")
    assert links(page.read_text()) == ["page.md", "nowhere.md#x", "https://example.org", "#top"]
    assert [resolve_link(page, t) for t in links(page.read_text())][1] == tmp_path / "nowhere.md"
    assert [p for t in links(page.read_text()) if (p := resolve_link(page, t)) and not p.exists()] == [
        tmp_path / "nowhere.md"]
    found = [raw for code in code_texts(page.read_text()) for raw in RESULTS_PATH.findall(code)]
    assert found == ["results/no-such-file.md", "results/<study>/report.md", "results/bench-*.md"]
