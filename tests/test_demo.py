"""The demo: a (shortened) run writes its table, grid and report atomically; the app's cached model."""

import json


def _small():
    from concept_erase.demo import DemoConfig

    return DemoConfig(steps=3, num_forget=16, num_retain=27, eval_seeds=1)


def test_demo_writes_table_grid_and_report(tmp_path, capsys):
    from PIL import Image

    from concept_erase.demo import run_demo

    out = tmp_path / "demo"
    (out).mkdir()
    (out / "summary.json").write_text("{}")  # a previous demo report: replaced, stale files and all
    (out / "stale.txt").write_text("old run")
    summary = run_demo(_small(), out, progress=False)
    assert capsys.readouterr().out == ""  # the library prints nothing; the command prints summary["table"]
    assert '"seven" judged seven (negative)' in summary["table"] and "other nine digits" in summary["table"]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "report.md", "summary.json"]
    grid = Image.open(out / "grid.png")
    assert grid.size == (120 + 10 * 64, 18 + 6 * 64)  # digit names on top, 3 styles x (before, after), 10 digits
    seven = 120 + 7 * 64
    assert grid.getpixel((seven, 18 + 100)) == (200, 30, 30)  # the erased digit's column is framed in red
    assert grid.getpixel((seven - 64, 18 + 100)) != (200, 30, 30)
    report = (out / "report.md").read_text()
    assert "| metric | before | after |" in report and "seven in negative" in report
    saved = json.loads((out / "summary.json").read_text())
    assert saved["before"]["images"] == 30 and set(saved["timings"]) >= {"mask_s", "erase_s", "total_s"}
    assert summary["config"]["steps"] == 3
    assert not list(tmp_path.glob(".demo.tmp-*"))


def test_demo_rejects_bad_digit(capsys):
    from concept_erase.cli import main

    assert main(["demo", "--digit", "eleven"]) == 2
    assert "'eleven'" in capsys.readouterr().err


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    from concept_erase.cli import main

    mine = tmp_path / "my-work"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(mine) in err and "not a demo report" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_demo_erased_model_is_cached(tmp_path, monkeypatch):
    import concept_erase.demo as demo
    from concept_erase.diffusion.models.card import read_model_card
    from concept_erase.diffusion.models.loading import load_pipeline

    path = demo.demo_erased_model(tmp_path, config=_small())
    assert read_model_card(path)["method"] == "salun"
    assert load_pipeline(str(path)).unet.dtype.is_floating_point

    def boom(*a, **k):
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(demo, "erase_demo", boom)
    assert demo.demo_erased_model(tmp_path, config=_small()) == path
