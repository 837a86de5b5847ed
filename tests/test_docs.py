"""The user docs stay true: every Python block runs, the site builds, the links resolve.

Every page is found by glob (README.md and docs/**/*.md), so a new page is tested as soon
as it exists. A page's ```python blocks run in order in one namespace, in a temporary
working directory; there is no way to mark a block as not run (use ```bash or ```text for
code that must not run here).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
# A fenced block opens with ```python at the start of a line and closes with ``` alone.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)
FENCE = re.compile(r"^```", flags=re.M)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """Each page's Python blocks, in order, in one namespace (later blocks may use earlier names)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{_rel(page)}[python block {i}]", "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_fences_are_balanced(page):
    """An unclosed fence would silently swallow the blocks after it."""
    assert len(FENCE.findall(page.read_text(encoding="utf-8"))) % 2 == 0, f"{_rel(page)}: unbalanced ``` fences"


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move details to docs/ (at most ~150)"
    assert python_blocks(README), "the README lost its quick start"
    text = "\n".join(lines)
    for command in ("make demo", "make test"):
        assert command in text, command


def test_readme_links_resolve():
    """README.md is read on the repository host, so its relative links must point at files that exist."""
    prose = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    missing = [target for target in LINK.findall(prose) if "://" not in target and not (ROOT / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_page_is_in_the_nav():
    listed = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), f"add these pages to `nav` in mkdocs.yml: {sorted(pages - listed)}"
    assert listed - pages == set(), f"mkdocs.yml lists pages that do not exist: {sorted(listed - pages)}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_mkdocs_build_strict(tmp_path):
    """The site builds without a warning: API pages from the docstrings, links and anchors checked."""
    missing = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python") if not _installed(m)]
    if missing:
        pytest.skip(f"the docs toolchain is not installed ({', '.join(missing)}); `pip install -e '.[docs]'`")
    # Not --quiet: it silences the warnings that --strict turns into a failure.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
    result = subprocess.run(
        [*command, "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "layers" / "index.html").exists()
