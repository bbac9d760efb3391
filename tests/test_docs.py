"""The documentation stays buildable and true to the repository: the MkDocs site builds in
strict mode (a broken link, a missing anchor or a page left out of the navigation fails it),
the README stays a front door, and every link or source path the docs give leads somewhere.

Runs inside the README's test command, so CI checks the docs like the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250

LINK = re.compile(r"\]\(([^)\s]+)\)")
# A path into the repository written in backticks: `proxy/gateway/admit.lua`,
# `tests/bench/run_bench.py`. Globs and placeholders (`*`, `<`, `…`) are not paths.
SOURCE_PATH = re.compile(
    r"`((?:proxy|tests|config|scripts|docs)/[\w./-]+\.(?:py|lua|md|toml|json|sh|png|gz))`"
)


def _markdown_files() -> list[Path]:
    return [README, REPO / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """The ids MkDocs gives a page's headings (Python-Markdown's toc slugs)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(m.group(1), "-") for m in re.finditer(r"^#{1,6} +(.+?) *$", text, re.M)}


def test_the_site_builds_in_strict_mode_without_a_warning(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "index.html").exists()
    assert (tmp_path / "console.png").exists()  # the console page's screenshot


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_ci_and_make_test_run_the_readmes_test_command() -> None:
    """.ci/run's last command is the README's test command, character for character, and
    ``make test`` runs the same line."""
    commands = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert commands[-1] in README.read_text()
    make_test = (REPO / "Makefile").read_text().split("\ntest:\n", 1)[1].splitlines()[0]
    assert make_test.strip() == commands[-1]


def test_every_relative_link_of_the_readme_resolves() -> None:
    """Into the repository (issue 11 item 7: it once linked ``../shared/spec/...``), to a file
    that exists, and to a heading that exists when it names one."""
    targets = [t for t in LINK.findall(README.read_text()) if not t.startswith(("http", "mailto:"))]
    assert targets, "the README links nothing"
    for target in targets:
        path_part, _, anchor = target.partition("#")
        page = (REPO / path_part).resolve() if path_part else README
        assert page.is_relative_to(REPO), target
        assert page.exists(), target
        if anchor and page.suffix == ".md":
            assert anchor in _anchors(page), target


def test_every_source_path_the_docs_name_exists() -> None:
    """Docs that name a module or script which has moved send readers nowhere."""
    missing = [
        f"{doc.relative_to(REPO)}: {path}"
        for doc in _markdown_files()
        for path in SOURCE_PATH.findall(doc.read_text())
        if not (REPO / path).exists()
    ]
    assert not missing, missing
