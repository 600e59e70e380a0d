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


def bar_chart(data: list[tuple[str, float]], path: Path, title: str, unit: str = "") -> None:
    """Horizontal bars, one per (label, value), drawn with Pillow (the project's own dependency)."""
    from PIL import Image, ImageDraw

    width, label_w, bar_h = 1250, 660, 22
    img = Image.new("RGB", (width, bar_h * len(data) + 40), "white")
    draw = ImageDraw.Draw(img)
    draw.text((5, 5), title, fill="black")
    top = max(v for _, v in data) or 1.0
    span = width - label_w - 110
    for i, (name, value) in enumerate(data):
        y = 25 + i * bar_h
        draw.text((5, y + 4), name, fill="black")
        draw.rectangle([label_w, y + 2, label_w + int(span * value / top), y + bar_h - 4], fill=(74, 122, 181))
        draw.text((label_w + int(span * value / top) + 5, y + 4), f"{value:.3f}{unit}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
