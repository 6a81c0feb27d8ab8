"""The project's documentation as the tests read it: README.md (the front page) and the
reference pages in docs/, which the README links to. Tests that run documented commands
find them here, whichever page holds them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def doc_pages() -> list[Path]:
    """README.md first, then every docs/*.md page: in the order the README first links
    them (a reader's order), then any page it does not link, by name."""
    readme = REPO / "README.md"
    pages = sorted((REPO / "docs").glob("*.md"))
    linked = re.findall(r"\]\(docs/([^)#\s]+\.md)", readme.read_text())
    order = {name: i for i, name in reversed(list(enumerate(linked)))}
    return [readme, *sorted(pages, key=lambda p: (order.get(p.name, len(order)), p.name))]


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks of a markdown text, in order."""
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def section(heading: str) -> str:
    """The text under `heading` (a whole line, e.g. "## Sharing ...") up to the next
    heading of the same or a higher level (outside code blocks), from the one page that
    has it."""
    level = len(heading) - len(heading.lstrip("#"))
    found = []
    for page in doc_pages():
        lines = page.read_text().splitlines()
        if heading not in lines:
            continue
        start = lines.index(heading) + 1
        end, fenced = len(lines), False
        for i in range(start, len(lines)):
            fenced ^= lines[i].lstrip().startswith("```")
            if not fenced and re.match(rf"#{{1,{level}}} ", lines[i]):
                end = i
                break
        found.append("\n".join(lines[start:end]))
    assert len(found) == 1, f"{heading!r} is on {len(found)} pages, not one"
    return found[0]
