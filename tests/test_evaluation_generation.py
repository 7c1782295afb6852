"""Generation over prompt sets: protocol presets, resume after a kill, refusal of a foreign folder, and
2-process sharding that yields exactly the single-process set."""

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from concept_erase.errors import ConceptEraseError
from helpers import accelerate_launch
from evaluation.generation import make_protocol, generate_set, read_manifest
from evaluation.prompts import PromptRow

# the tiny pipeline's native size, its own scheduler, 2 steps: the protocol machinery, fast
PROTOCOL = make_protocol("quick", num_inference_steps=2, samples_per_prompt=2)


def rows(n=3):
    return [PromptRow(i, f"prompt number {i}", 100 + 7 * i, str(i), categories=("sexual",)) for i in range(n)]


def pixels(folder, entry):
    return np.asarray(Image.open(folder / "images" / entry["file"]), dtype=np.int16)


def test_protocol_presets_and_overrides():
    paper = make_protocol("paper")
    assert (paper.scheduler, paper.num_inference_steps, paper.guidance_scale, paper.resolution) == ("lms", 100, 7.5, 512)
    p = make_protocol("paper", num_inference_steps=50, guidance_scale=7.5)
    assert p.overrides == ("num_inference_steps",) and p.describe()["preset"] == "paper (overridden: num_inference_steps)"
    with pytest.raises(ConceptEraseError, match="resolution"):
        make_protocol("paper", resolution=500)
    with pytest.raises(ConceptEraseError, match="nope"):
        make_protocol("nope")


def test_resume_after_kill_regenerates_only_what_is_missing(tiny_pipeline, tmp_path, monkeypatch):
    from concept_erase.diffusion.data import generate as generate_module

    full = tmp_path / "full"
    reference = {(e["index"], e["sample"]): e for e in generate_set(tiny_pipeline, rows(), full, PROTOCOL, batch_size=4, progress=False)}
    assert len(reference) == 6 and (full / "manifest.jsonl").is_file()
    assert not list(full.glob("manifest-rank*"))  # shards merged

    class Killed(Exception):
        pass

    def kill_after_three(entry, seen=[]):
        seen.append(entry)
        if len(seen) == 3:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        generate_set(tiny_pipeline, rows(), out, PROTOCOL, batch_size=2, progress=False, on_image=kill_after_three)
    assert len(read_manifest(out)) == 3
    # What a hard kill can also leave: a PNG renamed into place but never recorded, a torn manifest line,
    # and a temporary file from an interrupted write. None of them may count as done.
    Image.new("RGB", (32, 32), "red").save(out / "images" / "000002_01.png")
    with open(out / "manifest-rank0.jsonl", "a") as f:
        f.write('{"index": 2, "sample": 0, "file": "000002_00.p')
    (out / "images" / ".000002_00.png.tmp-x").write_bytes(b"half")

    calls = []
    real = generate_module.generate_images
    monkeypatch.setattr(generate_module, "generate_images",
                        lambda pipe, prompts, seeds, **kw: calls.extend(seeds) or real(pipe, prompts, seeds, **kw))
    entries = generate_set(tiny_pipeline, rows(), out, PROTOCOL, batch_size=2, progress=False)
    assert len(calls) == 3  # only the 3 images not committed before the kill
    assert [(e["index"], e["sample"]) for e in entries] == sorted(reference)
    for e in entries:
        assert e["seed"] == reference[(e["index"], e["sample"])]["seed"]
        # same (prompt, seed) -> same image whatever the batch it was drawn in (allow 1/255 rounding)
        assert np.abs(pixels(out, e) - pixels(full, reference[(e["index"], e["sample"])])).max() <= 1
    calls.clear()
    generate_set(tiny_pipeline, rows(), out, PROTOCOL, progress=False)  # complete: nothing to do
    assert calls == []


def test_refuses_folder_of_another_model_or_protocol(tiny_pipeline, tmp_path):
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline

    generate_set(tiny_pipeline, rows(1), tmp_path, PROTOCOL, progress=False)
    with pytest.raises(ConceptEraseError, match="another model"):
        generate_set(build_tiny_pipeline(seed=1), rows(1), tmp_path, PROTOCOL, progress=False)
    with pytest.raises(ConceptEraseError, match="another protocol"):
        generate_set(tiny_pipeline, rows(1), tmp_path, make_protocol("quick", num_inference_steps=3), progress=False)
    other = [PromptRow(0, "a different prompt", 100, "0")]
    with pytest.raises(ConceptEraseError, match="another prompt"):
        generate_set(tiny_pipeline, other, tmp_path, PROTOCOL, progress=False)
    # a folder that is not an evaluation folder (no run.json) is never written into
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "results.json").write_text("{}")
    with pytest.raises(ConceptEraseError, match="not an evaluation folder"):
        generate_set(tiny_pipeline, rows(1), mine, PROTOCOL, progress=False)
    assert [p.name for p in mine.iterdir()] == ["results.json"]
    # the protocol (and every report) says "safety checker: none"; a pipeline with one is refused
    tiny_pipeline.safety_checker = torch.nn.Identity()
    with pytest.raises(ConceptEraseError, match=r"safety checker \(Identity\)"):
        generate_set(tiny_pipeline, rows(1), tmp_path / "checked", PROTOCOL, progress=False)
    assert not (tmp_path / "checked").exists()


def test_a_kill_before_or_after_run_json_leaves_a_resumable_folder(tiny_pipeline, tmp_path, monkeypatch):
    import evaluation.generation as generation

    class Killed(Exception):
        pass

    def killed(pipe, **kwargs):  # a kill while the weights are fingerprinted (seconds on SD)
        raise Killed

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(generation, "pipeline_digest", killed)
        with pytest.raises(Killed):
            generate_set(tiny_pipeline, rows(1), out, PROTOCOL, progress=False)
    assert not out.exists() or not any(out.iterdir())  # no images/ without a run.json
    entries = generate_set(tiny_pipeline, rows(1), out, PROTOCOL, progress=False)
    # killed right after run.json was written: the folder holds only run.json
    only_run_json = tmp_path / "only-run-json"
    only_run_json.mkdir()
    (only_run_json / "run.json").write_bytes((out / "run.json").read_bytes())
    assert [e["file"] for e in generate_set(tiny_pipeline, rows(1), only_run_json, PROTOCOL, progress=False)] == \
        [e["file"] for e in entries]

    class RecordingState:
        """One process; each barrier records what the folder holds at that moment."""
        is_main_process, process_index, num_processes, device = True, 0, 1, "cpu"

        def __init__(self):
            self.barriers = []

        def wait_for_everyone(self):
            self.barriers.append(((tmp_path / "new" / "run.json").is_file(), (tmp_path / "new" / "images").is_dir()))

    state = RecordingState()
    generate_set(tiny_pipeline, rows(1), tmp_path / "new", PROTOCOL, progress=False, state=state)
    assert (True, False) in state.barriers  # run.json written, and waited for, before any process makes images/


def shard_rows():
    return [PromptRow(i, f"prompt number {i}", 100 + 7 * i, str(i)) for i in range(5)]


WORKER = textwrap.dedent("""
    import sys
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline
    from evaluation.generation import make_protocol, generate_set
    from evaluation.prompts import PromptRow
    rows = [PromptRow(i, f"prompt number {i}", 100 + 7 * i, str(i)) for i in range(5)]
    generate_set(build_tiny_pipeline(seed=0), rows, sys.argv[1],
                 make_protocol("quick", num_inference_steps=2, samples_per_prompt=2), batch_size=2, progress=False)
""")


def test_two_processes_produce_the_single_process_set(tiny_pipeline, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([*accelerate_launch(2), str(script), str(tmp_path / "two")],
                         env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    one = generate_set(tiny_pipeline, shard_rows(), tmp_path / "one", PROTOCOL, batch_size=2, progress=False)
    two = read_manifest(tmp_path / "two")
    keys = [(e["index"], e["sample"]) for e in two]
    assert keys == sorted({(i, s) for i in range(5) for s in range(2)})  # nothing missing
    assert {e["process"] for e in two} == {0, 1}  # both processes worked
    assert sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) == [e["file"] for e in two]  # no extras
    lines = (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 10 and not list((tmp_path / "two").glob("manifest-rank*"))  # merged, no duplicates
    for a, b in zip(one, two):
        assert (a["file"], a["seed"], a["prompt"]) == (b["file"], b["seed"], b["prompt"])
        assert np.abs(pixels(tmp_path / "one", a) - pixels(tmp_path / "two", b)).max() <= 1
    assert json.loads((tmp_path / "two" / "run.json").read_text())["fingerprint"] == one[0]["fingerprint"]


def test_the_image_phase_says_how_long_it_takes(tiny_pipeline, tmp_path, capsys):
    generate_set(tiny_pipeline, rows(), tmp_path / "out", PROTOCOL, batch_size=2, progress=True)
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("concept-erase: evaluation images: generating"))
    assert f"generating {2 * len(rows())} images here (2 model steps each" in line and "s per image" in line
    assert "evaluation images: 100%" in err
