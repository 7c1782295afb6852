"""Markdown reports: the protocol block, tables, a PNG bar chart and an image grid of matched seeds.

Every report starts with the protocol that produced its images (docs/PROTOCOLS.md: pin it, print it). Files are
written atomically; matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from concept_erase.io_utils import atomic_file


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def protocol_block(run_info: dict, title: str = "Protocol") -> str:
    """The generation protocol, model and prompt set of a generation folder's run.json, as Markdown."""
    rows = [(k, v) for k, v in run_info.get("protocol", {}).items()]
    rows += [("model", run_info.get("model", "")), ("model fingerprint", run_info.get("fingerprint", "")),
             ("prompt set", run_info.get("prompts", "")), ("prompt rows", run_info.get("rows", ""))]
    return f"## {title}\n\n" + markdown_table(["setting", "value"], [(k, "none" if v is None else v) for k, v in rows])


def bar_figure(series: dict[str, dict[str, float]], *, title: str, ylabel: str):
    """Grouped bars: one group per key of the inner dicts (shown as written), one bar per series (e.g. before
    / after), the legend outside the axes so it never covers a bar. A matplotlib Figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(k for values in series.values() for k in values))
    width = 0.8 / max(len(series), 1)
    legend_w = 1.6 if len(series) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(groups) * max(len(series), 1)) + legend_w, 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get(g) or 0.0 for g in groups]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[fmt(y, 1) for y in ys], fontsize=7)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylim(bottom=0, top=max([1.0] + [v or 0.0 for values in series.values() for v in values.values()]) * 1.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def bar_chart(path: str | Path, series: dict[str, dict[str, float]], *, title: str, ylabel: str) -> Path:
    """`bar_figure` written as a PNG."""
    import matplotlib.pyplot as plt

    fig = bar_figure(series, title=title, ylabel=ylabel)
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def bar_chart_image(series: dict[str, dict[str, float]], *, title: str, ylabel: str):
    """`bar_figure` as a PIL image (for the app)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    fig = bar_figure(series, title=title, ylabel=ylabel)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as im:
        return im.convert("RGB")


@dataclass
class GridRow:
    """One labelled row of a `labelled_grid`: a few images per model, e.g. the seeds of one prompt class."""

    label: str
    images: dict[str, list]  # model name -> images (the same prompts and seeds in every model)
    marked: bool = False  # the erased concept: drawn first by the caller, in red


MARK = (200, 30, 30)


def labelled_grid(path: str | Path, models: Sequence[str], rows: Sequence[GridRow], *, cell: int = 64) -> Path:
    """A compact grid: one labelled row per group (e.g. prompt class), one block of columns per model with its
    name on top, the marked rows' labels in red with a red frame."""
    from PIL import Image, ImageDraw

    per_model = max((len(v) for r in rows for v in r.images.values()), default=1) or 1
    label_w, header, gap = 150, 20, 8
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


def write_report(out_dir: str | Path, title: str, sections: Sequence[str], results: dict,
                 name: str = "report") -> Path:
    """Write `<name>.md` (title + sections) and `results.json` (the numbers) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "results.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2), encoding="utf-8")
    with atomic_file(out_dir / f"{name}.md", overwrite=True) as tmp:
        tmp.write_text(f"# {title}\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    return out_dir / f"{name}.md"
