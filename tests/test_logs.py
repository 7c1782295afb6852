"""The one logging style: what a command announces is said once per process world, on stderr."""

import os
from types import SimpleNamespace

from concept_erase import runtime
from concept_erase.logs import announce, rough_duration


def test_announce_speaks_on_the_main_process_only(monkeypatch, capsys):
    announce("defaults for minisd: --guidance-scale 5")
    assert capsys.readouterr().err == "concept-erase: defaults for minisd: --guidance-scale 5\n"
    monkeypatch.setattr(runtime, "process_state", lambda: SimpleNamespace(is_main_process=False))
    announce("said by rank 1")
    assert capsys.readouterr().err == ""


def test_rough_duration():
    assert [rough_duration(s) for s in (40, 180, 9000)] == ["40 s", "3 min", "2.5 h"]


def test_no_progress_imports_no_library_before_the_checks():
    """--no-progress is a switch the libraries read when they load, not an import of them at the start: a bad
    input is refused without diffusers or transformers in the process."""
    import subprocess
    import sys

    code = ("import os, sys; from concept_erase.cli import main; "
            "rc = main(['export', 'model', '--to', 'single-file', '--no-progress']); "
            "print(rc, [m for m in ('diffusers', 'transformers') if m in sys.modules], "
            "os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": ""})
    assert done.stdout.strip() == "2 [] 1", done.stdout + done.stderr
    assert "--output is required" in done.stderr  # refused after the output flags took effect (the switch is set)


def test_no_progress_hides_the_libraries_loading_bars_and_export_ends_with_a_summary(
        tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    import json

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from concept_erase.cli import main
    from concept_erase.logs import PROGRESS_SWITCH

    monkeypatch.setenv(PROGRESS_SWITCH, "")  # restored afterwards: --no-progress sets it for the process
    bars = ("Loading pipeline components", "Loading weights")
    try:
        diffusers_logging.enable_progress_bar()  # as a fresh process starts
        transformers_logging.enable_progress_bar()
        assert main(["export", str(tiny_pipeline_dir), "--to", "diffusers", "--output", str(tmp_path / "a")]) == 0
        said = capsys.readouterr()
        assert all(bar in said.err for bar in bars), said.err  # the control: the bars show by default
        assert said.out.splitlines()[0] == f"wrote {tmp_path / 'a'}/: {tiny_pipeline_dir} as a diffusers folder " \
                                           "with its model card"
        assert said.out.splitlines()[-1] == f"next: concept-erase generate --model {tmp_path / 'a'} --prompt PROMPT " \
                                            "--output IMAGES"

        assert main(["export", str(tiny_pipeline_dir), "--to", "diffusers", "--output", str(tmp_path / "b"),
                     "--no-progress", "--json"]) == 0
        said = capsys.readouterr()
        assert not any(bar in said.err for bar in bars), said.err
        assert "concept-erase: model family: sd1" in said.err  # status lines stay
        assert json.loads(said.out) == {"output": str(tmp_path / "b"), "to": "diffusers",
                                        "source": str(tiny_pipeline_dir), "base_model": None}
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def test_apply_ends_with_a_summary_and_its_record_under_json(tiny_pipeline_dir, other_pipeline, tmp_path, capsys):
    import json

    from concept_erase.cli import main
    from concept_erase.diffusion.models.delta import save_delta
    from concept_erase.diffusion.models.loading import load_pipeline

    base = load_pipeline(tiny_pipeline_dir)
    save_delta(base.unet, other_pipeline.unet, None, tmp_path / "delta", base_model=str(tiny_pipeline_dir))
    args = ["apply", str(tmp_path / "delta"), "--model", str(tiny_pipeline_dir), "--strength", "0.5"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tiny_pipeline_dir} is the erasure's base (same weights): not a transfer"
    assert out[-2].startswith("applied delta ") and out[-2].endswith(f"wrote {tmp_path / 'a'}/: the model and its "
                                                                     "card (the erasure's record)")
    assert out[-1] == f"next: concept-erase app --base {tiny_pipeline_dir} --erased {tmp_path / 'a'}  (the model " \
                      "before and after, side by side)"
    assert main([*args, "--output", str(tmp_path / "b"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["output"], record["kind"], record["strength"], record["transfer"]) == (
        str(tmp_path / "b"), "delta", 0.5, False)
    assert record["parameters"] > 0


def test_app_prints_its_address_as_the_summary_or_as_json(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    import json
    import shutil

    from app.cli import launch
    from concept_erase.cli import build_parser

    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_pipeline_dir, tmp_path / "erased")
    args = build_parser("app").parse_args(["app", "--base", str(tiny_pipeline_dir), "--erased",
                                           str(tmp_path / "erased"), "--port", "0", "--json"])
    demo = launch(args, block=False)
    try:
        record = json.loads(capsys.readouterr().out)
        assert record["url"] == demo.local_url and record["models"] == [record["base"], "erased"]
    finally:
        demo.close()


def test_every_command_takes_the_same_output_flags():
    from concept_erase.cli import _leaf_parsers, build_parser

    for leaf in _leaf_parsers(build_parser()):
        flags = leaf._option_string_actions
        assert {"--json", "--quiet", "--no-progress"} <= set(flags), leaf.prog
        assert flags["--no-progress"].help.startswith("progress bars, ours and the libraries'"), leaf.prog


def test_a_command_ends_with_a_summary_or_with_json_and_quiet_silences_status_lines(capsys):
    import json

    from concept_erase.cli import main

    assert main(["concepts", "minisd-digit-three"]) == 0
    said = capsys.readouterr()
    assert said.out.startswith("minisd-digit-three\n  recipe: 50 steps")
    assert said.out.splitlines()[-1] == "next: concept-erase erase --model MODEL --concept minisd-digit-three --output ERASED"
    assert main(["concepts", "minisd-digit-three", "--json"]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["recipe"]["steps"] == 50  # stdout: the result alone
    assert "concept-erase: next: concept-erase erase" in said.err  # the summary: status lines
    assert main(["concepts", "minisd-digit-three", "--json", "--quiet"]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["name"] == "minisd-digit-three" and said.err == ""
