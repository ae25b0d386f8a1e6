"""The user documentation: README.md, CONTRIBUTING.md and docs/*.md.

The README stays short; no page names a path outside the repository or the machines the project
was built on; every relative link leads to a file of the repository (and, with #anchor, to one of
its headings); and every command `streamprune --help` lists has its page, docs/COMMAND.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220

# word-bounded where a plain substring would hit ordinary words ("equivalent", "silently")
FORBIDDEN = {
    "../shared": re.compile(re.escape("../shared")),
    "/work/": re.compile(re.escape("/work/")),
    "this machine": re.compile(r"\bthis\s+machine\b", re.IGNORECASE),
    "lent": re.compile(r"\blent\b", re.IGNORECASE),
    "loan": re.compile(r"\bloan(s|ed)?\b", re.IGNORECASE),
}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(page: Path) -> str:
    """The page without its fenced code blocks (links are not links there)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in prose(page).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def test_the_pages_exist():
    names = {page.name for page in PAGES if page.is_file()}
    assert {"README.md", "CONTRIBUTING.md", "guarantees.md", "security.md", "architecture.md", "data.md",
            "torchrun.md"} <= names  # fmt: skip


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_page_names_what_is_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    found = [word for word, pattern in FORBIDDEN.items() if pattern.search(text)]
    assert not found, f"{page_id(page)} mentions {found}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_leads_to_a_file_of_the_repository(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if ROOT not in linked.parents and linked != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{page_id(page)}: broken links: {', '.join(broken)}"


def test_every_command_has_its_page():
    from typer.testing import CliRunner

    from streamprune.cli import app

    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    panel = result.output.split("Commands", 1)[1]
    commands = re.findall(r"^(?:│ | {2})([a-z][a-z0-9-]*)\s{2,}\S", panel, re.MULTILINE)  # rich's panel or click's
    assert {"run", "plan", "eval", "depth", "width", "heal"} <= set(commands), result.output
    missing = [command for command in commands if not (ROOT / "docs" / f"{command}.md").is_file()]
    assert not missing, f"commands without a page docs/COMMAND.md: {missing}"
    readme = README.read_text(encoding="utf-8")
    unlinked = [command for command in commands if f"(docs/{command}.md)" not in readme]
    assert not unlinked, f"README.md does not link the pages of {unlinked}"
