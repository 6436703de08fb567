"""The documents hold together: every relative Markdown link in README.md and docs/ points
to a file that exists, every docs/... path named in code or docs exists, and nothing in
the repository cites a machine's paths, a design file outside the repository or an
issue number, which a reader of the repository cannot follow."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: [text](target) and ![alt](target); the target ends at whitespace or ")"
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: a path under docs/ named in prose or code, e.g. docs/results/performance.md
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w\.(?:md|png|json)\b")
#: what a reader of the repository cannot follow (a class like [o] keeps grep off this file)
FORBIDDEN = {
    "a machine path": re.compile(r"/w[o]rk/|/r[o]ot/|/h[o]me/\w"),
    "a design file outside the repository": re.compile(r"D[E]SIGN\.md|\.\./sh[a]red/"),
    "an issue number": re.compile(r"\b[Ii]ssues? #?\d|\(#\d+\)"),
}


def _tracked(*patterns: str) -> list[Path]:
    """Files in the repository (tracked or new, not ignored) matching the git pathspecs."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *patterns],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({REPO / line for line in out.splitlines() if (REPO / line).is_file()})


MARKDOWN = [REPO / "README.md", *_tracked("docs/*.md", "docs/**/*.md")]
#: every text file but this one, whose patterns and examples name what they forbid
TEXT = [
    path
    for path in _tracked("*.md", "*.py", "*.sh", "*.toml", "Makefile", ".ci/*", "docs/*.json")
    if path != Path(__file__).resolve()
]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_documents_are_found() -> None:
    names = {_rel(p) for p in MARKDOWN}
    assert {"README.md", "docs/design.md", "docs/results/performance.md"} <= names
    assert any(name.startswith("docs/dev/") for name in names)


@pytest.mark.parametrize("doc", MARKDOWN, ids=_rel)
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    broken = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for target in MARKDOWN_LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{_rel(doc)}:{number}: {target}")
    assert broken == []


def test_docs_paths_named_anywhere_exist() -> None:
    missing = []
    for path in TEXT:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in DOCS_PATH.findall(line):
                if not (REPO / name).exists():
                    missing.append(f"{_rel(path)}:{number}: {name}")
    assert missing == []


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_nothing_cites_what_a_reader_cannot_follow(what: str) -> None:
    pattern = FORBIDDEN[what]
    hits = []
    for path in TEXT:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{_rel(path)}:{number}: {line.strip()[:120]}")
    assert hits == [], f"{what} in: {hits}"


def test_the_link_pattern_finds_links_and_images() -> None:
    line = 'see [a](x.md), ![b](img/y.png "title") or [c](https://e.org/f#g)'
    assert MARKDOWN_LINK.findall(line) == ["x.md", "img/y.png", "https://e.org/f#g"]


def test_the_forbidden_patterns_match_what_they_name() -> None:
    assert FORBIDDEN["a machine path"].search("cd " + "/work" + "/main && make")
    assert FORBIDDEN["a design file outside the repository"].search("see " + "DESIGN" + ".md")
    assert FORBIDDEN["a design file outside the repository"].search(".." + "/shared/vectors")
    assert FORBIDDEN["an issue number"].search("the target of iss" + "ue 6")
    assert FORBIDDEN["an issue number"].search("fixed (#12)")
    assert not FORBIDDEN["an issue number"].search("known issues above; rows 1-2")
