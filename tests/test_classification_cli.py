"""`concept-erase classify` end to end on tiny budgets, the Hugging Face folder path offline, and bad input."""

import json

import numpy as np
import pytest

from concept_erase.cli import main

TINY = ["--seeds", "1", "--epochs", "2", "--unlearn-epochs", "1", "--lr-grid", "0.01,0.05"]


def test_classify_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["classify", "--forget", "random:0.1", "--methods", "all", *TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names == ["Retrain", "FT", "GA", "RL", "l1-sparse", "SalUn", "Original (no unlearning)"]
    assert "(" not in rows[1].split("|")[2] and "(" in rows[2].split("|")[2]  # gaps everywhere but Retrain
    # progress within a seed: a line as each model is trained or unlearned
    for name in ("Original trained", "Retrain done", "FT done", "SalUn done"):
        assert f"  seed 1 of 1: {name} (" in captured.err, name

    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["forget"] == 126 and results["config"]["forget"] == "random:0.1"
    for key in ("retrain", "ft", "ga", "rl", "l1", "salun"):
        row = results["summary"][key]
        assert {"UA", "RA", "TA", "MIA", "RTE", "avg_gap", "avg_gap_paired"} <= set(row)
        assert all(0 <= row[m]["mean"] <= 100 for m in ("UA", "RA", "TA", "MIA"))
    for run in results["per_seed"]["salun"]:
        assert run["lr"] in (0.01, 0.05)
    assert results["masks"][0]["kept_fraction"] == pytest.approx(0.5, abs=1e-3)
    assert (out / "results.md").read_text().strip() == results["table"]

    # an existing output is refused before any work, and replaced with --overwrite
    assert main(["classify", "--methods", "rl", *TINY, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["classify", "--methods", "rl", *TINY, "--out", str(out), "--overwrite"]) == 0
    assert set(json.loads((out / "results.json").read_text())["summary"]) == {"retrain", "rl", "original"}


def test_classify_with_a_mask_file(tmp_path, capsys):
    """A saved mask (here a random-mask control) is used for SalUn instead of the saliency mask."""
    import torch

    from concept_erase.classification.models import build_model
    from concept_erase.saliency import SaliencyMask

    torch.manual_seed(0)
    path = SaliencyMask.random(build_model("cnn", 10, 1), keep=0.2).save(tmp_path / "m.safetensors")
    out = tmp_path / "res"
    assert main(["classify", "--methods", "salun", *TINY, "--mask", str(path), "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["masks"] == []  # no mask computed


def _tiny_image_folder(path):
    """A 3-class RGB dataset in `save_to_disk` form, with no validation split (one is carved from train)."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n_per_class):
        images, labels = [], []
        for label in range(3):
            for _ in range(n_per_class):
                pixels = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
                pixels[..., label] += 150  # each class has its own colour: learnable in a step or two
                images.append(Image.fromarray(pixels))
                labels.append(label)
        return datasets.Dataset.from_dict(
            {"img": images, "label": labels},
            features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)}),
        )

    datasets.DatasetDict({"train": split(10), "test": split(4)}).save_to_disk(str(path))
    return path


def test_hf_dataset_folder_loads(tmp_path):
    from concept_erase.classification.data import load_data

    data = load_data(str(_tiny_image_folder(tmp_path / "tiny")))
    assert data.num_classes == 3 and data.image_shape == (3, 8, 8)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (27, 3, 12)
    assert sorted(data.y_val.tolist()) == [0, 1, 2]  # stratified


def test_classify_hf_folder_with_resnet18(tmp_path, capsys):
    """The real-dataset path (CIFAR ResNet-18 by default) on a tiny local `datasets` folder, offline."""
    folder = _tiny_image_folder(tmp_path / "tiny")
    out = tmp_path / "res"
    code = main(["classify", "--dataset", str(folder), "--forget", "class:2", "--methods", "rl,salun",
                 "--seeds", "1", "--epochs", "1", "--unlearn-epochs", "1", "--lr-grid", "0.01", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "resnet18" and results["dataset"]["forget"] == 9
    assert results["dataset"]["test_scored"] == 8  # the forgotten class's test images are not in TA


@pytest.mark.parametrize(
    "args, message",
    [
        (["--forget", "random:1.5"], "random:1.5"),
        (["--methods", "ft,bogus"], "'bogus'"),
        (["--keep", "0"], "--keep"),
        (["--keep", "1.5"], "--keep"),
        (["--lr-grid", "0.1,abc"], "--lr-grid"),
        (["--seeds", "0"], "--num-seeds"),
        (["--dataset", "no/such/folder"], "no/such/folder"),
        (["--mask", "MISSING"], "mask file"),
        (["--mask", "GARBAGE"], "mask file"),
        (["--mask", "GARBAGE", "--methods", "rl"], "salun"),
        (["--mask", "GARBAGE", "--keep", "0.3"], "--keep"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    args = [str(tmp_path / "missing.safetensors") if a == "MISSING" else str(garbage) if a == "GARBAGE" else a
            for a in args]
    out = tmp_path / "res"
    assert main(["classify", *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("concept-erase: error:") and len(err.splitlines()) == 1 and message in err
    assert not out.exists()
