"""The manifest-backed image folder every resumable image run writes: commit order, torn lines, shards."""

import json

from PIL import Image

from concept_erase.diffusion.data.folder import ImageFolder, read_jsonl, shard_manifest


def key(entry):
    return entry["n"]


def test_an_image_counts_once_it_and_its_line_are_written(tmp_path):
    folder = ImageFolder(tmp_path, "images")
    folder.add(Image.new("RGB", (4, 4)), {"file": "a.png", "n": 0})
    assert (tmp_path / "images" / "a.png").is_file()
    assert (tmp_path / "manifest.jsonl").read_bytes() == b'{"file": "a.png", "n": 0}\n'  # the format readers know
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "b.png")  # written, never listed: not done
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"file": "c.png", "n": 2}\n{"file": "b.p')  # listed without an image, then a line torn by a kill
    assert list(folder.done(key)) == [0]

    folder.add(Image.new("RGB", (4, 4)), {"file": "b.png", "n": 1})  # the torn line is ended, not extended
    assert list(folder.done(key)) == [0, 1] and len(read_jsonl(tmp_path / "manifest.jsonl")) == 3


def test_shards_merge_into_one_sorted_manifest(tmp_path):
    folder = ImageFolder(tmp_path)
    for n, rank in ((3, 1), (1, 0), (2, 1)):
        folder.add(Image.new("L", (4, 4)), {"file": f"{n}.png", "n": n}, manifest=shard_manifest(rank))
    folder.add(Image.new("L", (4, 4)), {"file": "1.png", "n": 1})  # listed twice: counted once
    assert sorted(folder.done(key)) == [1, 2, 3]
    assert [e["n"] for e in folder.merge(key)] == [1, 2, 3]
    assert [p.name for p in tmp_path.glob("manifest*")] == ["manifest.jsonl"]
    assert [json.loads(line)["n"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()] == [1, 2, 3]
