"""The manual builds and stays whole: mkdocs builds docs/ in strict mode (a broken link,
a missing anchor or a page left out of the nav fails it), every page of docs/ is in the
nav, the README stays a ten-minute read, and the manual's front page gives the README's
first command word for word."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
"""The README is the front door; the rest of what it once held lives in docs/."""


def _nav_pages(nav) -> list[str]:
    """Every page file a mkdocs nav names, sections included."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    return [page for value in nav.values() for page in _nav_pages(value)]


def _code_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced code blocks, in order."""
    return markdown.split("```")[1::2]


def test_the_manual_builds_in_strict_mode(tmp_path):
    # mkdocs-material prints a banner about MkDocs 2.0 on every build; it is no warning
    # of the build's, and the variable is the documented way to silence it.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("index.html")}
    assert {"index.html", "guide/index.html", "results/index.html", "architecture/index.html"} <= pages
    assert (tmp_path / "board.png").is_file()


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(nav) == pages


def test_the_manual_is_built_away_from_the_leaderboard():
    # `bench site` writes site/ by default; the manual must never overwrite it.
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    assert config["site_dir"] == "build/manual"
    assert config["theme"]["name"] == "material"


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES


def test_the_front_page_gives_the_readme_first_command():
    readme_first = _code_blocks((ROOT / "README.md").read_text())[0]
    front_first = _code_blocks((ROOT / "docs" / "index.md").read_text())[0]
    assert readme_first == front_first
    assert "bench run --defense logit_squeeze --matrix full" in readme_first


def test_ci_runs_the_readme_test_command_word_for_word():
    """CI must run the very command a new user runs to test: the README's second command."""
    readme_tests = _code_blocks((ROOT / "README.md").read_text())[1].strip()
    assert readme_tests.startswith("pip install") and readme_tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_tests in ci
