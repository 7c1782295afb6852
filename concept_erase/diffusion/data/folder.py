"""A folder of images with a manifest: the one format of every resumable image run (the forget/retain cache of
`images.py`, the evaluation folders of `evaluation/generation.py`).

    <root>/manifest.jsonl            one JSON object per finished image; its "file" is relative to the image
                                     folder (`root`, or a subfolder of it)
    <root>/manifest-rank<r>.jsonl    process r's lines while several processes share the folder (`merge` folds
                                     them into manifest.jsonl)

An image counts as done only when its file was renamed into place AND its manifest line was appended, in that
order (`add`). A run killed at any point therefore leaves nothing that counts half-done: an image without a
line is made again, a line torn by the kill is skipped when read and ended before the next line is appended,
a temporary file is never listed. Resuming is reading what is done (`done`) and making only the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable

from ...io_utils import atomic_file

if TYPE_CHECKING:
    from PIL import Image

MANIFEST = "manifest.jsonl"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a manifest, one a line ([] when there is no file); a line torn by a kill (not valid
    JSON) or holding something else than an object is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def shard_manifest(rank: int) -> str:
    """The manifest process `rank` appends to while several share a folder (one writer per file)."""
    return f"manifest-rank{rank}.jsonl"


class ImageFolder:
    """Images under `root / images`, listed in `root`'s manifests once complete."""

    def __init__(self, root: str | os.PathLike, images: str = ""):
        self.root = Path(root)
        self.images = self.root / images

    def entries(self) -> list[dict]:
        """Every manifest line whose image is on disk: the shards' lines, then manifest.jsonl's (a merged line
        comes last, so it wins in `done`)."""
        return [entry for path in sorted(self.root.glob("manifest*.jsonl")) for entry in read_jsonl(path)
                if isinstance(entry.get("file"), str) and (self.images / entry["file"]).is_file()]

    def done(self, key: Callable[[dict], Hashable]) -> dict:
        """The finished entries by `key(entry)`; an image listed twice (a shard and its merge) counts once."""
        return {key(entry): entry for entry in self.entries()}

    def add(self, image: "Image.Image", entry: dict, manifest: str = MANIFEST) -> None:
        """Commit one image: the PNG `entry["file"]` (temporary sibling, then rename), then `entry`'s line,
        flushed to disk, so the manifest never lists a half-written image."""
        with atomic_file(self.images / entry["file"], overwrite=True) as tmp:
            image.save(tmp, format="PNG")
        with open(self.root / manifest, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a line torn by a kill: end it, don't extend it
                    f.write(b"\n")  # (appends go to the end, wherever the read left off)
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def merge(self, key: Callable[[dict], Hashable]) -> list[dict]:
        """Fold the shard manifests into manifest.jsonl (atomically, sorted by `key`, each image once), then drop
        them; readers meanwhile see every line twice at worst, which `done` collapses. Returns the entries."""
        done = self.done(key)
        entries = [done[k] for k in sorted(done)]
        with atomic_file(self.root / MANIFEST, overwrite=True) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        for shard in self.root.glob(shard_manifest("*")):
            shard.unlink()
        return entries
