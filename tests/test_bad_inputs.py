"""Bad input through the CLI, as a user meets it: every case is one line on stderr naming the bad value,
exit 2, and nothing written. Each case fails before any model is loaded or image generated, so the table
runs in seconds.

`{tmp}` in an argument is the case's own empty folder (also the working directory); `{file}` is a plain
file in it (a destination under it cannot be created); `{in:NAME}` is one of the input files below.
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
}

GENERATE = ["generate", "--model", "minisd", "--prompt", "a", "--output", "{tmp}/g"]
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
}


def _fill(arg: str, tmp, tiny="") -> str:
    if arg.startswith("{in:"):
        name = arg[len("{in:"):-1]
        path = tmp / name
        path.write_bytes(INPUTS[name])
        return str(path)
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
