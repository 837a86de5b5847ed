"""The Python blocks of the drop-in and training-loop pages run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["differences.md", "training-loops.md"]
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    path = DOCS / page
    blocks = PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))
    assert blocks, f"{page} has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/{page}[python block {i}]", "exec"), namespace)
