"""Writing a benchmark's section into docs/benchmarks.md, leaving the others intact."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
INTRO = "# Benchmarks\n\nBenchmarks: ratios measured side by side in one run; rerun with the command shown.\n"


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace the section between ``<!-- name -->`` markers, or append it."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else INTRO
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
