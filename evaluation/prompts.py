"""Prompt sets: the I2P CSV, class-prompt CSVs, COCO captions, or a plain text file (docs/PROTOCOLS.md).

Every format becomes a list of `PromptRow`s. The format is recognised from the CSV columns:
- I2P: prompt, evaluation_seed, evaluation_guidance, case_number, categories (comma-separated)
- classes: prompt, evaluation_seed, class (ESD's small_imagenet_prompts.csv), or label_str with a label_idx
  column (imagenet_prompts.csv): the class index then names the target, since some ImageNet names are
  ambiguous ("crane" is 134 and 517)
- COCO captions: prompt, evaluation_seed (image_id is kept as the row's key)
- plain text: one prompt per line; the seed of line i is `seed + i`.
A hub dataset id (e.g. "AIML-TUDA/i2p") is read through `datasets` when online.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from concept_erase.errors import ConceptEraseError
from concept_erase.validate import check_number, parse_seed
from prompts import prompt_set_names, prompt_set_path

# The seven I2P categories (Schramowski et al., Safe Latent Diffusion); anything else counts as "other".
I2P_CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity")


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a set. `index` is the row's position and names its image files."""

    index: int
    prompt: str
    seed: int
    key: str = ""  # case_number / image_id when the file has one, else the index
    guidance: float | None = None  # I2P's evaluation_guidance; used only when the protocol asks for it
    categories: tuple[str, ...] = ()  # I2P categories
    label: str | None = None  # the intended class of a class prompt
    target: int | None = None  # its classifier index, when the file has a label_idx column
    style: str | None = None  # a style column (MiniSD's digits, the art set): "judged as" tables per style

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_number(value: str, what: str, where: str, cast=float):
    try:
        return cast(float(value))
    except (TypeError, ValueError):
        raise ConceptEraseError(f"{where}: {what} {value!r} is not a number") from None


# I2P's per-row seed and guidance: the published CSV's names, then the hub copy's (AIML-TUDA/i2p).
SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
INDEX_COLUMN = "label_idx"  # the ImageNet class index beside label_str (ESD's imagenet_prompts.csv)


def rows_from_records(records: list[dict], *, where: str, seed: int = 0) -> tuple[str, list[PromptRow]]:
    """Turn CSV-like records (column -> string) into PromptRows; returns (format name, rows)."""
    if not records:
        raise ConceptEraseError(f"prompt set {where!r} has no rows")
    columns = set(records[0])
    if "prompt" not in columns:
        raise ConceptEraseError(f"prompt set {where!r} has no 'prompt' column (columns: {sorted(columns)})")
    if "categories" in columns:
        kind = "i2p"
    elif "class" in columns or "label_str" in columns:
        kind = "classes"
    elif "image_id" in columns:
        kind = "coco"
    else:
        kind = "prompts"
    seed_col = next((c for c in SEED_COLUMNS if c in columns), None)
    guidance_col = next((c for c in GUIDANCE_COLUMNS if c in columns), None)
    if kind == "i2p" and seed_col is None:  # docs/PROTOCOLS.md: I2P is generated with each row's own seed
        raise ConceptEraseError(f"I2P prompt set {where!r} has no seed column ({' or '.join(SEED_COLUMNS)})")
    rows, empty = [], []
    for i, rec in enumerate(records):
        at = f"{where} row {i}"
        prompt = str(rec["prompt"] or "").strip()
        if not prompt:  # the published I2P CSV has one (row 2260): skip it, keep the other rows' indices
            empty.append(i)
            continue
        row_seed = parse_seed(rec[seed_col], f"{at}: {seed_col}") if seed_col else parse_seed(seed + i, f"{at}: seed")
        key = str(rec.get("case_number") or rec.get("image_id") or i)
        guidance = rec.get(guidance_col) if guidance_col else None
        if guidance not in (None, ""):  # a guidance scale: finite and >= 0, like --guidance-scale
            guidance = check_number(_parse_number(guidance, guidance_col, at), f"{at}: {guidance_col}", minimum=0)
        else:
            guidance = None
        categories = tuple(c.strip() for c in str(rec.get("categories") or "").split(",") if c.strip())
        label = rec.get("class", rec.get("label_str"))
        label = str(label).strip() if label not in (None, "") else None
        if kind == "classes" and label is None:
            raise ConceptEraseError(f"{at}: empty class")
        target = rec.get(INDEX_COLUMN) if kind == "classes" else None
        target = _parse_number(target, INDEX_COLUMN, at, int) if target is not None else None
        style = str(rec.get("style") or "").strip() or None
        rows.append(PromptRow(i, prompt, row_seed, key, guidance, categories, label, target, style))
    if empty:
        warnings.warn(f"prompt set {where!r}: skipped {len(empty)} row(s) with an empty prompt: {empty[:10]}", stacklevel=3)
    if not rows:
        raise ConceptEraseError(f"prompt set {where!r} has only empty prompts")
    return kind, rows


def read_csv_records(path: Path) -> list[dict]:
    """The rows of a CSV file as {column: text}. UTF-8 (a spreadsheet's byte-order mark is dropped); a file
    that is not UTF-8 text, holds binary data or repeats a column name is refused by name (with a repeated
    column, which of the two cells counts would be a silent guess)."""
    data = path.read_bytes()
    if b"\0" in data:
        raise ConceptEraseError(f"prompt set {str(path)!r} is binary data (a NUL byte at offset {data.index(0)}), "
                                "not a CSV text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConceptEraseError(f"prompt set {str(path)!r} is not UTF-8 text (byte {data[err.start]:#04x} "
                                f"at offset {err.start}); save it as UTF-8") from None
    try:
        table = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise ConceptEraseError(f"prompt set {str(path)!r} is not a readable CSV ({err})") from None
    if not table:
        raise ConceptEraseError(f"prompt set {str(path)!r} is empty")
    header = [c.strip() for c in table[0]]
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise ConceptEraseError(f"prompt set {str(path)!r} has the column {repeated[0]!r} more than once")
    # a short row's missing cells are empty, as csv.DictReader would give them
    return [{c: row[i] if i < len(row) else "" for i, c in enumerate(header)} for row in table[1:] if row]


def read_prompts(source: str | Path, *, limit: int | None = None, seed: int = 0) -> tuple[str, list[PromptRow]]:
    """Read a prompt set from a CSV, a .txt file (one prompt per line), a set shipped with the package by
    name (`prompts.prompt_set_names()`, e.g. "minisd-digits") or, when online, a hub dataset id.

    Returns (format, rows) where format is "i2p", "classes", "coco", "prompts" or "text". `limit` keeps the
    first rows (row indices, hence file names, do not depend on it). `seed` seeds rows that carry none.
    """
    if limit is not None and limit < 1:
        raise ConceptEraseError(f"limit must be >= 1, got {limit}")
    path = Path(source)
    if not path.exists() and prompt_set_path(str(source)) is not None:
        path = prompt_set_path(str(source))
    if path.suffix.lower() == ".txt" and path.is_file():
        from concept_erase.concepts import read_prompt_file

        prompts = read_prompt_file(path)
        rows = [PromptRow(i, p, seed + i, str(i)) for i, p in enumerate(prompts)]
        return "text", rows[:limit]
    if path.is_file():
        kind, rows = rows_from_records(read_csv_records(path), where=str(path), seed=seed)
        return kind, rows[:limit]
    if path.exists() or str(source).endswith((".csv", ".txt")) or "/" not in str(source):
        raise ConceptEraseError(f"prompt set {str(source)!r} is not a readable .csv/.txt file nor a shipped set "
                                f"({', '.join(prompt_set_names())})")
    return _read_hub_dataset(str(source), limit=limit, seed=seed)


def _read_hub_dataset(repo_id: str, *, limit: int | None, seed: int) -> tuple[str, list[PromptRow]]:
    try:
        import datasets
    except ImportError:
        raise ConceptEraseError(f"reading hub prompt set {repo_id!r} needs the 'data' extra (datasets)") from None
    try:
        data = datasets.load_dataset(repo_id, split="train")
    except Exception as err:  # offline, unknown id, gated: one line naming the id
        raise ConceptEraseError(f"cannot load hub prompt set {repo_id!r}: {type(err).__name__}") from None
    records = [{k: "" if v is None else str(v) for k, v in rec.items()} for rec in data.select(range(min(limit or len(data), len(data))))]
    return rows_from_records(records, where=repo_id, seed=seed)

