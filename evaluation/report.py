"""Markdown reports: the protocol block, tables, a PNG bar chart and an image grid of matched seeds.

Every report starts with the protocol that produced its images (docs/PROTOCOLS.md: pin it, print it). Files are
written atomically; matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from concept_erase.grid import GridRow, labelled_grid  # noqa: F401  (the reports' grids)
from concept_erase.io_utils import atomic_file


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def human_bytes(n: int | float) -> str:
    """848 MiB, 1.5 GiB: a size for people (binary units, as memory is counted)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} bytes"


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
