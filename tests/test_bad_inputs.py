"""Bad input through the CLI, as a user meets it: every case is one line on stderr naming the bad value,
exit 2, and nothing written. Each case fails before any model is loaded or image generated, so the table
runs in seconds.

`{tmp}` in an argument is the case's own empty folder (also the working directory); `{file}` is a plain
file in it (a destination under it cannot be created); `{in:NAME}` is one of the input files below;
`{replay:NAME}` a saved attack folder (`REPLAYS`: damaged, or learned on another model structure);
`{locked:NAME}` a destination another run holds the lock of (`io_utils.destination_lock`).
"""

from __future__ import annotations

import pytest

from concept_erase.cli import main

import random

INPUTS = {
    # Latin-1 bytes (0xe9) where UTF-8 is expected
    "latin1.csv": "prompt,evaluation_seed\ncaf\xe9 au lait,1\n".encode("latin-1"),
    "binary.csv": b"prompt,evaluation_seed\n\x00\x01\x02\x89PNG\x00,1\n",
    "fractional_seed.csv": b"prompt,evaluation_seed\na cat,1.7\n",
    "huge_seed.csv": b"prompt,evaluation_seed\na cat,100000000000000000000000000000\n",
    "negative_seed.csv": b"prompt,evaluation_seed\na cat,-3\n",
    "duplicate_column.csv": b"prompt,evaluation_seed,prompt\na cat,1,a dog\n",
    "random.ckpt": random.Random(0).randbytes(4096),
    "retain.txt": b"a tree\na house\na dog\n",
    "nan_guidance.csv": b"prompt,categories,evaluation_seed,evaluation_guidance\na cat,sexual,1,nan\n",
    "garbage.onnx": random.Random(1).randbytes(2048),
}


def _saved_attack(folder, learned_on="minisd", edit=None):
    """An embedding attack saved as `attack` writes it, for a model of `learned_on`'s structure (made without
    loading the model), then `edit(folder)`."""
    import torch

    from concept_erase.diffusion.models.family import Conditioning
    from evaluation.attacks.core import Learned
    from evaluation.attacks.structure import model_structure
    from evaluation.prompts import PromptRow

    structure = model_structure(learned_on)
    cond = Conditioning(torch.zeros(1, 16, structure["conditioning"]))
    if structure["family"] == "sdxl":
        cond.added.update(text_embeds=torch.zeros(1, 32), time_ids=torch.zeros(1, 6))
    Learned("embedding", {"steps": 4, "lr": 0.01, "batch_size": 8}, [PromptRow(0, "a digit seven", 0)],
            ["a digit seven"], conditioning=cond, history=[1.0] * 4, structure=structure, model=learned_on).save(folder)
    if edit:
        edit(folder)


def _rewrite(name, text):
    return lambda folder: (folder / name).write_text(text)


def _truncate(folder):
    data = (folder / "learned.safetensors").read_bytes()
    (folder / "learned.safetensors").write_bytes(data[:len(data) // 2])


def _set(key, value):
    def edit(folder):
        import json

        meta = json.loads((folder / "attack.json").read_text())
        meta[key] = value
        (folder / "attack.json").write_text(json.dumps(meta))
    return edit


def _wider(folder):
    from safetensors.torch import save_file

    import torch

    save_file({"conditioning.hidden": torch.zeros(1, 16, 33)}, str(folder / "learned.safetensors"))
    _set("tensors", {"conditioning.hidden": [1, 16, 33]})(folder)


REPLAYS = {
    "bad_json": ("minisd", _rewrite("attack.json", "{not json")),
    "missing_key": ("minisd", _rewrite("attack.json", '{"attack": "embedding"}')),
    "bogus": ("minisd", _set("attack", "bogus")),
    "truncated": ("minisd", _truncate),
    "wider": ("minisd", _wider),
    "sdxl": ("minisd-xl", None),
    "sd1": ("minisd", None),
}

GENERATE = ["generate", "--model", "minisd", "--prompt", "a", "--output", "{tmp}/g"]
ATTACK = ["attack", "--concept", "minisd-digit-seven", "--output", "{tmp}/att"]
AUDIT = ["audit", "minisd", "--base", "minisd", "--concept", "minisd-digit-seven", "--output", "{tmp}/audit"]
PLAN = ["plan", "--model", "minisd"]
MASK = ["mask", "--model", "minisd", "--forget", "a", "--surrogate", "b", "--output", "{tmp}/m.safetensors"]
ERASE = ["erase", "--model", "minisd", "--forget", "a", "--surrogate", "b"]
EVALUATE = ["evaluate", "nudity", "--model", "minisd", "--out", "{tmp}/eval"]
CASES = {
    # item 3 / 2: destinations that cannot be written are refused before any work
    "generate --out under a file": (
        ["generate", "--model", "minisd", "--prompt", "a", "--out", "{file}/out"], "'{file}' is a file"),
    "evaluate --out under a file": (
        ["evaluate", "nudity", "--model", "minisd", "--prompts", "{in:negative_seed.csv}", "--out", "{file}/e"],
        "'{file}' is a file"),
    "compare --out exists": (["compare", "{tmp}", "{tmp}", "--out", "{file}"], "already exists"),
    "classify --out under a file": (["classify", "--out", "{file}/out"], "'{file}' is a file"),
    "demo --out under a file": (["demo", "--out", "{file}/demo"], "'{file}' is a file"),
    "attack --output under a file": (
        ["attack", "--model", "minisd", "--concept", "minisd-digit-three", "--attack", "inversion", "--output",
         "{file}/a"], "'{file}' is a file"),
    "minisd train-judges --out not .safetensors": (
        ["minisd", "train-judges", "--out", "{tmp}/judges.pt"], "'{tmp}/judges.pt' must end in .safetensors"),
    "export --to single-file not .safetensors": (
        ["export", "minisd", "--to", "single-file", "{tmp}/model.ckpt"], "'{tmp}/model.ckpt' must end in .safetensors"),
    "export --to diffusers onto a file": (
        ["export", "minisd", "--to", "diffusers", "{file}", "--overwrite"], "'{file}' exists and is a file"),
    "export --to lora with both --rank and --energy": (
        ["export", "minisd", "--to", "lora", "--rank", "4", "--energy", "0.9", "--output", "{tmp}/l.safetensors"],
        "exactly one of --rank"),
    "export --to lora --energy above 1": (
        ["export", "minisd", "--to", "lora", "--energy", "1.5", "--output", "{tmp}/l.safetensors"], "1.5"),
    "export --rank with --to single-file": (
        ["export", "minisd", "--to", "single-file", "--rank", "4", "--output", "{tmp}/m.safetensors"],
        "--rank, --energy and --layout only apply to --to lora"),
    "export --to lora not .safetensors": (
        ["export", "minisd", "--to", "lora", "--rank", "4", "--output", "{tmp}/l.pt"], "must end in .safetensors"),
    "apply --strength above 1.5": (
        ["apply", "{in:random.ckpt}", "--model", "minisd", "--strength", "2", "--output", "{tmp}/o"], "2"),
    "apply of random bytes": (
        ["apply", "{in:random.ckpt}", "--model", "minisd", "--output", "{tmp}/o"], "as a LoRA or LyCORIS file"),
    # item 9: a damaged .ckpt gives no advice to unpickle it unsafely
    "export of random bytes .ckpt": (
        ["export", "{in:random.ckpt}", "--config", "minisd", "--to", "diffusers", "{tmp}/out"],
        "is not a checkpoint (or is damaged): unreadable pickle data"),
    "erase --export-single-file not .safetensors": (
        [*ERASE, "--output", "{tmp}/o", "--export-single-file", "{tmp}/m.ckpt"],
        "--export-single-file '{tmp}/m.ckpt' must end in .safetensors"),
    "erase --save-delta under a file": (
        [*ERASE, "--output", "{tmp}/o", "--save-delta", "{file}/d"], "--save-delta '{file}/d' cannot be created"),
    "erase --checkpoint-dir is a file": (
        [*ERASE, "--output", "{tmp}/o", "--checkpoint-dir", "{file}"], "--checkpoint-dir '{file}' exists and is a file"),
    "erase --save-delta is --output": (
        [*ERASE, "--output", "{tmp}/o", "--save-delta", "{tmp}/o"], "--save-delta and --output are the same path"),
    "mask --output not .safetensors": (
        ["mask", "--model", "minisd", "--forget", "a", "--surrogate", "b", "--output", "{tmp}/m.pt"],
        "--output '{tmp}/m.pt' must end in .safetensors"),
    # item 8: a number of images that cannot cover the prompts
    "erase --num-retain-images below the prompts": (
        ["erase", "--model", "{tiny}", "--forget", "a", "--surrogate", "b", "--retain-prompts", "{in:retain.txt}",
         "--num-retain-images", "2", "--output", "{tmp}/o"], "--num-retain-images 2 is fewer than the 3 prompts"),
    # item 6: prompt CSVs
    "CSV not UTF-8": ([*EVALUATE, "--prompts", "{in:latin1.csv}"], "is not UTF-8 text (byte 0xe9"),
    "CSV binary": ([*EVALUATE, "--prompts", "{in:binary.csv}"], "is binary data (a NUL byte at offset 23)"),
    "CSV seed 1.7": ([*EVALUATE, "--prompts", "{in:fractional_seed.csv}"], "evaluation_seed '1.7' is not a whole"),
    "CSV seed huge": ([*EVALUATE, "--prompts", "{in:huge_seed.csv}"], "'100000000000000000000000000000' is out of"),
    "CSV seed negative": ([*EVALUATE, "--prompts", "{in:negative_seed.csv}"], "evaluation_seed '-3' is out of range"),
    "CSV repeated column": ([*EVALUATE, "--prompts", "{in:duplicate_column.csv}"], "the column 'prompt' more than once"),
    # item 5: numbers: finite, in range, and what the loaded model can do (checked before any image or folder)
    "erase --alpha nan": ([*ERASE, "--output", "{tmp}/o", "--alpha", "nan"], "--alpha must be a finite number, got nan"),
    "erase --weight-decay nan": (
        [*ERASE, "--output", "{tmp}/o", "--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    "generate guidance nan": ([*GENERATE, "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    "generate guidance inf": ([*GENERATE, "--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    "generate guidance negative": ([*GENERATE, "--guidance-scale", "-1"], "--guidance-scale must be >= 0, got -1.0"),
    "evaluate guidance nan": (
        [*EVALUATE, "--prompts", "minisd-digits", "--guidance-scale", "nan"], "--guidance-scale must be a finite"),
    "mask guidance nan": (
        ["mask", "--model", "minisd", "--forget", "a", "--surrogate", "b", "--output", "{tmp}/m.safetensors",
         "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    "app default guidance nan": (["app", "--default-guidance", "nan"], "--default-guidance must be a finite number"),
    "CSV guidance nan": ([*EVALUATE, "--prompts", "{in:nan_guidance.csv}"], "evaluation_guidance must be a finite"),
    "mask seed negative": (
        ["mask", "--model", "minisd", "--forget", "a", "--surrogate", "b", "--output", "{tmp}/m.safetensors",
         "--seed", "-1"], "--seed -1 is out of range"),
    "erase seed above 2**63": (
        [*ERASE, "--output", "{tmp}/o", "--seed", "9223372036854775808"], "--seed 9223372036854775808 is out of range"),
    "generate steps above the scheduler's": (
        ["generate", "--model", "{tiny}", "--prompt", "a", "--output", "{tmp}/g", "--num-inference-steps", "5000"],
        "--num-inference-steps 5000 is more than the 1000 timesteps"),
    "evaluate steps above the scheduler's (no folder left)": (
        [*EVALUATE, "--prompts", "minisd-digits", "--limit", "1", "--num-inference-steps", "5000"],
        "--num-inference-steps 5000 is more than the 1000 timesteps"),
    "erase --esd-ddim-steps above the scheduler's": (
        ["erase", "--model", "{tiny}", "--forget", "a", "--surrogate", "b", "--output", "{tmp}/o", "--method", "esd-x",
         "--esd-ddim-steps", "5000"], "--esd-ddim-steps 5000 is more than the 1000 timesteps"),
    "generate --height without --width": ([*GENERATE, "--height", "16"], "--height 16 needs --width too"),
    "generate height not a multiple of 8": (
        ["generate", "--model", "{tiny}", "--prompt", "a", "--output", "{tmp}/g", "--height", "17", "--width", "16"],
        "--height 17 is not a multiple of 8"),
    "generate height negative": ([*GENERATE, "--height", "-16", "--width", "16"], "--height must be >= 8, got -16"),
    "erase resolution not a multiple of 8": (
        ["erase", "--model", "{tiny}", "--forget", "a", "--surrogate", "b", "--output", "{tmp}/o", "--resolution",
         "20"], "--resolution 20 is not a multiple of 8"),
    # item 5: seeds, one rule for every command
    "generate seed above 2**32": (
        ["generate", "--model", "minisd", "--prompt", "a", "--seeds", "4294967296", "--out", "{tmp}/g"],
        "--seeds '4294967296' is out of range"),
    "generate seed range of billions": (
        ["generate", "--model", "minisd", "--prompt", "a", "--seeds", "0-4294967295", "--out", "{tmp}/g"],
        "asks for more than 100000 seeds"),
    # round three, item 1: every attack budget is finite (the report would show an unmeasured 0.0%)
    "attack --embedding-lr inf": (
        [*ATTACK, "--model", "minisd", "--attack", "embedding", "--embedding-lr", "inf"],
        "--embedding-lr must be a finite number, got inf"),
    "attack --inversion-lr inf": (
        [*ATTACK, "--model", "minisd", "--attack", "inversion", "--inversion-lr", "inf"],
        "--inversion-lr must be a finite number, got inf"),
    "attack --ringabell-eta inf": (
        [*ATTACK, "--model", "minisd", "--attack", "ringabell", "--ringabell-eta", "inf"],
        "--ringabell-eta must be a finite number, got inf"),
    "attack --unlearndiffatk-lr nan": (
        [*ATTACK, "--model", "minisd", "--attack", "unlearndiffatk", "--unlearndiffatk-lr", "nan"],
        "--unlearndiffatk-lr must be a finite number, got nan"),
    # item 2: --replay folders, checked whole before any model loads
    "attack --replay bad JSON": ([*ATTACK, "--model", "minisd", "--replay", "{replay:bad_json}"],
                                 "attack.json is not readable JSON"),
    "attack --replay missing key": ([*ATTACK, "--model", "minisd", "--replay", "{replay:missing_key}"],
                                    "attack.json has no 'budget'"),
    "attack --replay unknown attack": ([*ATTACK, "--model", "minisd", "--replay", "{replay:bogus}"],
                                       "unknown attack 'bogus' in attack.json"),
    "attack --replay truncated tensors": ([*ATTACK, "--model", "minisd", "--replay", "{replay:truncated}"],
                                          "learned.safetensors is not readable"),
    "attack --replay tensor of the wrong width": ([*ATTACK, "--model", "minisd", "--replay", "{replay:wider}"],
                                                  "conditioning.hidden [1, 16, 33] is not (rows, tokens, 32)"),
    "attack --replay SDXL attack on SD 1.x": (
        [*ATTACK, "--model", "minisd", "--replay", "{replay:sdxl}"],
        "cannot replay the embedding attack learned on sdxl"),
    "attack --replay SD 1.x embedding on SDXL": (
        [*ATTACK, "--model", "minisd-xl", "--replay", "{replay:sd1}"],
        "cannot replay the embedding attack learned on sd1"),
    "attack --replay with --prompts": (
        [*ATTACK, "--model", "minisd", "--replay", "{replay:sd1}", "--prompts", "minisd-digits"],
        "--prompts and --limit do not apply to --replay"),
    # item 3: audit checks what it needs before the first image
    "audit FID of one retain image": ([*AUDIT, "--retain-prompts", "1", "--seeds", "0"],
                                      "Frechet distance needs at least 2"),
    "audit missing --fid-weights": ([*AUDIT, "--fid-weights", "{tmp}/none.pth"], "'{tmp}/none.pth' does not exist"),
    "audit missing --clip-model": ([*AUDIT, "--clip-model", "{tmp}/no-clip"], "'{tmp}/no-clip' does not exist"),
    # item 4: plan checks what erase checks
    "plan resolution not a multiple of 8": ([*PLAN, "--resolution", "12"], "--resolution 12 is not a multiple of 8"),
    "plan resolution far from the model's": ([*PLAN, "--resolution", "100000"], "--resolution 100000 px does not suit"),
    "plan batch not divisible": ([*PLAN, "--batch-size", "8", "--gradient-accumulation-steps", "3"],
                                 "batch_size 8 must be divisible by processes x gradient_accumulation_steps = 1 x 3"),
    "plan budget without a unit": ([*PLAN, "--memory-budget", "0.4"], "--memory-budget '0.4' is not a size with"),
    "plan budget negative": ([*PLAN, "--memory-budget", "-5GB"], "--memory-budget '-5GB' is not a size with"),
    "plan keep of no weight": ([*PLAN, "--keep", "1e-12"], "keep 1e-12 keeps none of the 3,141,700 weights"),
    # item 5: the smaller cases
    "evaluate garbage --nudenet-model": ([*EVALUATE, "--prompts", "minisd-digits", "--nudenet-model",
                                          "{in:garbage.onnx}"], "is not a NudeNet ONNX model"),
    "erase --lr -inf": ([*ERASE, "--output", "{tmp}/o", "--lr", "-inf"], "--lr must be a finite number, got -inf"),
    "erase --concept a,,b": (["erase", "--model", "minisd", "--concept", "minisd-digit-one,,minisd-digit-two",
                              "--output", "{tmp}/o"], "has an empty name"),
    "erase --concept trailing comma": (["erase", "--model", "minisd", "--concept", "minisd-digit-one,",
                                        "--output", "{tmp}/o"], "has an empty name"),
    "mask --keep that keeps no weight": (
        ["mask", "--model", "{tiny}", "--forget", "a", "--surrogate", "b", "--output", "{tmp}/m.safetensors",
         "--keep", "1e-12"], "keep 1e-12 keeps none of the"),
    "mask --resolution 7 names its own flag": ([*MASK, "--resolution", "7"],
                                               "does not suit minisd, which draws 16 px images; use --resolution 16"),
    # item 6: one run at a time writes an output
    "erase into an --output another run holds": (
        ["erase", "--model", "{tiny}", "--forget", "a", "--surrogate", "b", "--output", "{locked:o}"],
        "--output '{tmp}/o' is being written by run 1 on another machine"),
}


def _fill(arg: str, tmp, tiny="") -> str:
    if arg.startswith("{in:"):
        name = arg[len("{in:"):-1]
        path = tmp / name
        path.write_bytes(INPUTS[name])
        return str(path)
    if arg.startswith("{replay:"):
        name = arg[len("{replay:"):-1]
        _saved_attack(tmp / name, *REPLAYS[name])
        return str(tmp / name)
    if arg.startswith("{locked:"):
        name = arg[len("{locked:"):-1]
        (tmp / f"{name}.lock").write_text("1 0000beef\n")  # pid 1 of another host: held, whatever its age
        return str(tmp / name)
    return arg.replace("{tmp}", str(tmp)).replace("{file}", str(tmp / "file")).replace("{tiny}", str(tiny))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, monkeypatch, capsys, tiny_pipeline_dir):
    argv, expected = CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "file").write_text("a user's file")
    argv = [_fill(a, tmp_path, tiny_pipeline_dir) for a in argv]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    # notices before it (e.g. the defaults chosen for the model) are fine; the error is one line, the last
    errors = [line for line in err.splitlines() if line.startswith("concept-erase: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert _fill(expected, tmp_path) in errors[0] and "weights_only" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "file").read_text() == "a user's file"


# The evaluation stack's cases, refused from the flags and the files they name before torch, diffusers or
# transformers is imported (`import torch` alone takes seconds; benchmarks/refusal_latency.py).
REFUSED_BEFORE_TORCH = (
    "CSV not UTF-8", "CSV binary", "CSV seed 1.7", "CSV seed huge", "CSV seed negative", "CSV repeated column",
    "CSV guidance nan", "evaluate guidance nan", "evaluate garbage --nudenet-model", "audit FID of one retain image",
    "audit missing --fid-weights", "audit missing --clip-model", "attack --replay bad JSON",
    "attack --replay missing key", "attack --replay unknown attack", "attack --replay truncated tensors",
    "attack --replay tensor of the wrong width", "attack --replay SDXL attack on SD 1.x",
    "attack --replay SD 1.x embedding on SDXL")
REFUSE = """
import sys
from concept_erase.cli import main
code = main(sys.argv[1:])
print(code, sorted(m for m in ("torch", "diffusers", "transformers", "onnxruntime") if m in sys.modules))
"""


@pytest.mark.parametrize("case", REFUSED_BEFORE_TORCH)
def test_the_evaluation_stack_refuses_before_torch_is_imported(case, tmp_path):
    import os
    import subprocess
    import sys

    argv, expected = CASES[case]
    argv = [_fill(a, tmp_path) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    run = subprocess.run([sys.executable, "-c", REFUSE, *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    errors = [line for line in run.stderr.splitlines() if line.startswith("concept-erase: error: ")]
    assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0], run.stderr[-2000:]
    assert _fill(expected, tmp_path) in errors[0], errors
    assert run.stdout.splitlines()[-1] == "2 []", (run.stdout, run.stderr[-2000:])
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_a_write_that_fails_mid_command_is_one_line_exit_2(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """A file size limit (`ulimit -f`) met while saving images: no traceback, no output, no temporary."""
    import resource

    monkeypatch.chdir(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))  # a 32x32 PNG is larger
    try:
        code = main(["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a cat", "--steps", "1",
                     "--out", str(tmp_path / "out")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("concept-erase: error: cannot write"), err
    assert "File too large" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", list(REPLAYS))
def test_a_bad_replay_is_refused_before_any_model_loads(name, tmp_path, monkeypatch, capsys):
    from concept_erase.diffusion.models import loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", no_model)
    model = "minisd-xl" if name == "sd1" else "minisd"
    folder = _fill(f"{{replay:{name}}}", tmp_path)
    assert main(["attack", "--model", model, "--concept", "minisd-digit-seven", "--replay", folder,
                 "--output", str(tmp_path / "att")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("concept-erase: error: ") and "Traceback" not in "".join(err), err


def test_a_malicious_optimizer_state_is_refused_without_torchs_advice(tmp_path):
    """A checkpoint's optimizer.pt whose pickle names code: refused, the code not run, and the refusal never
    suggests retrying with weights_only=False."""
    import json
    import os

    import torch
    from safetensors.torch import save_file

    from concept_erase.diffusion.training.checkpoints import load_checkpoint
    from concept_erase.diffusion.training.config import TrainConfig
    from concept_erase.errors import ConceptEraseError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"step": 1, "config": {}, "losses": []}))
    save_file({"w": torch.zeros(1)}, str(folder / "unet.safetensors"))
    save_file({"cpu": torch.get_rng_state()}, str(folder / "rng.safetensors"))
    torch.save({"state": Payload()}, folder / "optimizer.pt")
    with pytest.raises(ConceptEraseError) as err:
        load_checkpoint(folder, None, None, TrainConfig())
    assert "needs code to run" in str(err.value) and "weights_only" not in str(err.value), str(err.value)
    assert not marker.exists()


def test_images_with_nan_pixels_are_never_cached_or_masked(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """`mask --guidance-scale 1e30`: the model draws NaN pixels, which would be cached as black images and
    build a mask; the run stops with one line instead, and no image or mask is written."""
    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.safetensors"
    assert main(["mask", "--model", str(tiny_pipeline_dir), "--forget", "a", "--surrogate", "b", "--output", str(out),
                 "--guidance-scale", "1e30", "--num-forget-images", "1", "--num-inference-steps", "2"]) == 2
    err = capsys.readouterr().err  # the progress bar shares the error's line
    assert "concept-erase: error: the model drew non-finite (NaN) pixels at guidance scale 1e+30" in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list((tmp_path / "cache").rglob("*.png"))
