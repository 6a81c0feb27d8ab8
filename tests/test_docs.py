"""The docs' shape: README.md is a front page that links every reference page in docs/,
every relative link of the docs resolves, and the README's test command is CI's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs import REPO, doc_pages

README = REPO / "README.md"
# Every markdown page of the project's own docs (not the card template, not data/).
PAGES = [*doc_pages(), REPO / "BENCHMARKS.md", REPO / "RELIABILITY.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _links(text: str) -> list[str]:
    """The targets of the markdown links and images of a text, outside code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [a or b for a, b in LINK.findall(prose)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lstrip("#").strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(line) for line in prose.splitlines() if re.match(r"#{1,6} ", line)}


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; reference belongs in docs/"


def test_every_docs_page_is_linked_from_the_readme():
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert len(pages) >= 10, pages
    linked = {
        (README.parent / t.split("#")[0]).resolve()
        for t in _links(README.read_text())
        if not re.match(r"[a-z]+:", t)
    }
    missing = [p for p in pages if (REPO / "docs" / p).resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    text = page.read_text()
    assert "../shared" not in text and "shared/" not in text  # outside the project
    checked = 0
    for target in _links(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target} ({dest} does not exist)"
        assert REPO in dest.parents or dest == REPO, f"{page.name}: {target} leaves the repo"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {path}"
        checked += 1
    if page == README:
        assert checked >= 10  # the README's links are what this test is for


def test_readme_test_command_is_ci_s():
    """.ci/run says it runs exactly the README's test command: byte for byte."""
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv") and ci.endswith("pytest")
    assert f"\n{ci}\n" in README.read_text()
