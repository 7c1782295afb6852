"""Labelled image grids: a compact block of images per model (or per seed), one labelled row per group.

Used by the evaluation reports (`compare`: one row per prompt class, the erased concept first and marked) and
by `generate`'s contact sheet (one row per prompt, one column per seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .io_utils import atomic_file


@dataclass
class GridRow:
    """One labelled row of a `labelled_grid`: a few images per model, e.g. the seeds of one prompt class."""

    label: str
    images: dict[str, list]  # model name -> images (the same prompts and seeds in every model)
    marked: bool = False  # the erased concept: drawn first by the caller, in red


MARK = (200, 30, 30)


def labelled_grid(path: str | Path, models: Sequence[str], rows: Sequence[GridRow], *, cell: int = 64,
                  gap: int = 8) -> Path:
    """A compact grid: one labelled row per group (e.g. prompt class), one block of columns per model with its
    name on top, the marked rows' labels in red with a red frame."""
    from PIL import Image, ImageDraw

    per_model = max((len(v) for r in rows for v in r.images.values()), default=1) or 1
    label_w, header = 150, 20
    block = per_model * cell
    width = label_w + len(models) * (block + gap)
    grid = Image.new("RGB", (width, header + cell * max(len(rows), 1)), "white")
    draw = ImageDraw.Draw(grid)
    for m, name in enumerate(models):
        x = label_w + m * (block + gap)
        draw.text((x + 2, 4), _fit(draw, name, block - 4), fill="black")
    for r, row in enumerate(rows):
        y = header + r * cell
        colour = MARK if row.marked else (0, 0, 0)
        draw.multiline_text((4, y + 4), _wrap(draw, row.label, label_w - 8, lines=max(1, cell // 14)), fill=colour)
        for m, name in enumerate(models):
            x = label_w + m * (block + gap)
            for i, image in enumerate(row.images.get(name, [])[:per_model]):
                grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x + i * cell, y))
            if row.marked:
                draw.rectangle((x, y, x + block - 1, y + cell - 1), outline=MARK, width=2)
    with atomic_file(path, overwrite=True) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)


def _fit(draw, text: str, width: int) -> str:
    """`text` cut (with an ellipsis) to `width` pixels in the default font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw, text: str, width: int, lines: int) -> str:
    """Words wrapped to `width` pixels, at most `lines` lines (the last one cut to fit)."""
    out, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate) > width:
            out.append(line)
            line = word
        else:
            line = candidate
    out.append(line)
    if len(out) > lines:
        out = out[:lines - 1] + [_fit(draw, " ".join(out[lines - 1:]), width)]
    return "\n".join(_fit(draw, x, width) for x in out)
