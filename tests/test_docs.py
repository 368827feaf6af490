"""The README and the pages under docs/: every relative link and anchor resolves (GitHub's anchors), every page is
listed in the README and links back to it, and the README stays a first screen plus links."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code (where a ``](x)`` or a ``# line`` is no link or heading)."""
    text = re.sub(r"^```.*?^```$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-', repeats numbered."""
    found: set[str] = set()
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        unique, n = slug, 0
        while unique in found:
            n += 1
            unique = f"{slug}-{n}"
        found.add(unique)
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists() or (anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved))):
            broken.append(target)
    return broken


def test_every_relative_link_and_anchor_resolves() -> None:
    assert len(PAGES) >= 10
    assert {path.name: broken_links(path) for path in [ROOT / "README.md", *PAGES]} == {
        path.name: [] for path in [ROOT / "README.md", *PAGES]
    }
    assert "the-data-path" in anchors(ROOT / "docs" / "redemption-and-data-path.md")  # the slug rules themselves
    assert "the-assertion-and-gatewaydownstream" in anchors(ROOT / "docs" / "redemption-and-data-path.md")


def test_every_page_is_listed_in_the_readme_and_opens_with_its_purpose_and_a_link_back() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", readme.split("\n## Documentation\n", 1)[1]))
    assert listed == {path.name for path in PAGES}
    for path in PAGES:
        title, purpose, back = path.read_text().split("\n\n", 3)[:3]
        assert title.startswith("# ") and "\n" not in title, path.name
        assert purpose[:1].isupper() and purpose.rstrip().endswith((".", ")")), path.name
        assert "](../README.md)" in back, path.name


def test_the_readme_stays_a_first_screen_and_links() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for command in ("make run", "make test", ".venv/bin/impersonation-gateway"):
        assert command in readme
