"""The erasure loop and the `mask` / `erase` commands on tiny real pipelines (CPU)."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import assert_same_training, weights_copy

from concept_erase.cli import main
from concept_erase.diffusion.data.latents import LatentSet
from concept_erase.diffusion.training.config import TrainConfig
from concept_erase.diffusion.training.loop import _epoch_indices, train_unet
from concept_erase.diffusion.models.tiny import build_tiny_pipeline
from concept_erase.errors import ConceptEraseError
from concept_erase.saliency import SaliencyMask


def _sets(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    forget = LatentSet(torch.randn(n, 4, 16, 16, generator=g), ["a nude"] * n, ["a dressed"] * n)
    retain = LatentSet(torch.randn(n, 4, 16, 16, generator=g), ["a dressed", "a tree"] * (n // 2))
    return forget, retain


class Interrupt(Exception):
    pass


def _hook_on_call(unet, call, action):
    """Run `action(output)` at the `call`-th UNet forward (1-based); it may raise or return a new output."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if count[0] == call:
            return action(output)

    return unet.register_forward_hook(hook)


def test_forget_batches_are_shuffled_and_cycled():
    seen = [_epoch_indices(10, seed=3, step=s, batch_size=4).tolist() for s in range(5)]  # 20 items = 2 epochs
    flat = sum(seen, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch
    assert seen[0] != seen[1]  # not the first batch every step (the reference bug)
    assert _epoch_indices(10, 3, 4, 4).tolist() == seen[4]  # a function of (seed, step): resumable


def test_salun_trains_only_salient_weights_and_rl_trains_all():
    forget, retain = _sets()
    pipe = build_tiny_pipeline(0)
    base = weights_copy(pipe.unet)
    mask = SaliencyMask.random(pipe.unet, keep=0.3, seed=1)
    # AdamW with weight decay: masking gradients alone would still move frozen weights (docs/ALGORITHMS.md 1)
    cfg = TrainConfig(method="salun", steps=3, batch_size=4, lr=1e-2, weight_decay=0.1)
    result = train_unet(pipe, forget, retain, cfg, mask=mask)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(l["loss"])) for l in result.losses)
    assert result.unet is pipe.unet and not any(p.requires_grad for p in pipe.unet.parameters())
    after = weights_copy(pipe.unet)
    moved = 0
    for name, m in mask.masks.items():
        assert torch.equal(after[name][~m], base[name][~m]), name
        moved += int((after[name][m] != base[name][m]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.masks.values())

    pipe = build_tiny_pipeline(0)
    train_unet(pipe, forget, retain, TrainConfig(method="rl", steps=1, batch_size=4, lr=1e-2))
    after = weights_copy(pipe.unet)
    changed = sum(not torch.equal(after[k], base[k]) for k in base)
    assert changed > 0.9 * len(base)
    with pytest.raises(ConceptEraseError, match="salun"):
        train_unet(build_tiny_pipeline(0), forget, retain, TrainConfig(method="salun", steps=1))


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_esd_scopes(method):
    forget, _ = _sets()
    pipe = build_tiny_pipeline(0)
    base = weights_copy(pipe.unet)
    cfg = TrainConfig(method=method, steps=1, batch_size=2, lr=1e-2, esd_ddim_steps=3)
    assert cfg.alpha == 0.0  # ESD has no retain term unless asked for
    train_unet(pipe, LatentSet(forget.latents, forget.prompts), None, cfg)
    after = dict(pipe.unet.named_parameters())
    changed = {k for k in after if not torch.equal(after[k], base[k])}
    assert changed
    if method == "esd-x":
        assert all("attn2" in k for k in changed)
    else:
        assert not any("attn2" in k for k in changed)


@pytest.mark.parametrize("method", ["salun", "esd-x"])
def test_training_does_not_depend_on_the_pipelines_sampler(method):
    """Community checkpoints ship with LMS/Euler, whose add_noise scales by sigma: training must still noise
    with q_sample and ESD still sample with DDIM, so the weights match a DDIM pipeline's exactly."""
    from diffusers import EulerDiscreteScheduler, LMSDiscreteScheduler

    forget, retain = _sets()
    cfg = TrainConfig(method=method, steps=2, batch_size=2, lr=1e-3, **({"esd_ddim_steps": 3} if method == "esd-x" else {}))
    mask = SaliencyMask.random(build_tiny_pipeline(0).unet, keep=0.5, seed=0) if method == "salun" else None
    runs = []
    for sampler in (None, LMSDiscreteScheduler, EulerDiscreteScheduler):
        pipe = build_tiny_pipeline(0)
        if sampler is not None:
            pipe.scheduler = sampler.from_config(pipe.scheduler.config)
        runs.append(weights_copy(train_unet(pipe, forget, retain if method == "salun" else None, cfg, mask=mask).unet))
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_the_loop_trains_with_the_method_object_it_is_given():
    """run_erase builds the method once and passes the object; a config is the same as its method."""
    forget, retain = _sets()
    cfg = TrainConfig(method="rl", steps=2, batch_size=2, lr=1e-2)
    method = cfg.build_method()
    by_object = weights_copy(train_unet(build_tiny_pipeline(0), forget, retain, method).unet)
    by_config = weights_copy(train_unet(build_tiny_pipeline(0), forget, retain, cfg).unet)
    assert all(torch.equal(by_object[k], by_config[k]) for k in by_object)


def test_gradient_accumulation_and_checkpointing_match_the_full_batch():
    forget, retain = _sets()
    runs = []
    for accum in (1, 2):
        pipe = build_tiny_pipeline(0)
        base = weights_copy(pipe.unet)
        cfg = TrainConfig(method="rl", steps=2, batch_size=4, lr=1e-3, gradient_accumulation_steps=accum,
                          gradient_checkpointing=accum == 2)
        runs.append(weights_copy(train_unet(pipe, forget, retain, cfg).unet))
    assert_same_training(runs[0], runs[1], base, lr=1e-3)
    with pytest.raises(ConceptEraseError, match="divisible"):
        train_unet(build_tiny_pipeline(0), forget, retain, TrainConfig(method="rl", batch_size=3,
                                                                       gradient_accumulation_steps=2))


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    forget, retain = _sets()
    cfg = TrainConfig(method="salun", steps=4, batch_size=2, lr=1e-3, weight_decay=0.01, checkpointing_steps=2)
    mask = SaliencyMask.random(build_tiny_pipeline(0).unet, keep=0.5, seed=0)

    straight = train_unet(build_tiny_pipeline(0), forget, retain, cfg, mask=mask, checkpoint_dir=tmp_path / "a")

    pipe = build_tiny_pipeline(0)
    # salun runs the UNet twice per step (surrogate target, then the joint forward): call 5 is inside step 3
    handle = _hook_on_call(pipe.unet, 5, lambda out: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        train_unet(pipe, forget, retain, cfg, mask=mask, checkpoint_dir=tmp_path / "b")
    handle.remove()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-2"]

    resumed = train_unet(build_tiny_pipeline(0), forget, retain, cfg, mask=mask, checkpoint_dir=tmp_path / "b",
                         resume="latest")
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [l["loss"] for l in straight.losses] == [l["loss"] for l in resumed.losses]
    # a checkpoint made with other settings is refused
    with pytest.raises(ConceptEraseError, match="lr"):
        train_unet(build_tiny_pipeline(0), forget, retain, replace(cfg, lr=1.0), mask=mask,
                   checkpoint_dir=tmp_path / "b", resume="latest")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    forget, retain = _sets()
    pipe = build_tiny_pipeline(0)
    _hook_on_call(pipe.unet, 5, lambda out: type(out)(sample=out.sample * float("nan")))  # step 3's target
    cfg = TrainConfig(method="rl", steps=5, batch_size=2, lr=1e-3, checkpointing_steps=1)
    # the loss of step 3 is the first the weights after step 2 give: checkpoint-2 did not pass
    with pytest.raises(ConceptEraseError, match=r"non-finite loss nan at step 3; .*passed: .*checkpoint-1 "):
        train_unet(pipe, forget, retain, cfg, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2.diverged"]


def test_a_finite_blow_up_stops_before_the_ruined_weights_are_checkpointed(tmp_path):
    """--lr 1e6: the weights after one Adam step are finite but ruined. Their norm stops the run before they
    are written as a checkpoint, so nothing is named good and `--resume latest` has nothing ruined to pick."""
    forget, retain = _sets()
    cfg = TrainConfig(method="rl", steps=3, batch_size=2, lr=1e6, checkpointing_steps=1)
    with pytest.raises(ConceptEraseError, match=r"norm grew .*x after step 1 .*; no checkpoint passed"):
        train_unet(build_tiny_pipeline(0), forget, retain, cfg, checkpoint_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_loss_jump_stops_and_only_checkpoints_that_passed_are_kept(tmp_path):
    """A loss far above its running value indicts the weights that gave it: their checkpoint is set aside,
    and --checkpoints-total-limit 1 never pruned the last one that passed in favour of it."""
    forget, retain = _sets()
    pipe = build_tiny_pipeline(0)
    _hook_on_call(pipe.unet, 7, lambda out: type(out)(sample=out.sample * 1e4))  # step 4's target: loss x1e8
    cfg = TrainConfig(method="rl", steps=6, batch_size=2, lr=1e-3, checkpointing_steps=1, checkpoints_total_limit=1)
    with pytest.raises(ConceptEraseError, match=r"loss .* at step 4 is .*x its running value .*passed: .*checkpoint-2 "):
        train_unet(pipe, forget, retain, cfg, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3.diverged"]
    resumed = train_unet(build_tiny_pipeline(0), forget, retain, cfg, checkpoint_dir=tmp_path, resume="latest")
    assert resumed.resumed_from == 2 and resumed.steps == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3.diverged", "checkpoint-6"]


def test_xformers_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    forget, retain = _sets()
    with pytest.raises(ConceptEraseError, match="xformers needs a CUDA GPU"):
        train_unet(build_tiny_pipeline(0), forget, retain, TrainConfig(method="rl", enable_xformers=True))


# ------------------------------------------------------------------------------------------------ the CLI

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("image-cache")


def _common(pipe_dir, cache, erase=True):
    return ["--model", str(pipe_dir), "--forget", "a nude", "--surrogate", "a dressed", "--num-forget-images", "4",
            "--image-steps", "2", "--cache-dir", str(cache), "--batch-size", "2", "--no-progress"] + (
            ["--num-retain-images", "4"] if erase else [])


def test_mask_then_erase_commands(tiny_pipeline_dir, cache, tmp_path, capsys):

    from concept_erase.diffusion.models.card import read_model_card

    from concept_erase.diffusion.models.loading import load_pipeline

    mask_file = tmp_path / "mask.safetensors"
    assert main(["mask", *_common(tiny_pipeline_dir, cache, erase=False), "--output", str(mask_file), "--keep", "0.2"]) == 0
    base = load_pipeline(tiny_pipeline_dir)
    mask = SaliencyMask.load(mask_file, model=base.unet)
    assert mask.kept_fraction == pytest.approx(0.2, abs=0.01)
    # without --json: a summary for a person, what was written where and the next command
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith(f"wrote the mask {mask_file} (") and "of the weights kept" in said[0]
    assert said[-1].startswith(f"next: concept-erase erase --model {tiny_pipeline_dir} --forget 'a nude' --mask ")

    out = tmp_path / "erased"
    argv = ["erase", *_common(tiny_pipeline_dir, cache), "--output", str(out), "--mask", str(mask_file),
            "--steps", "2", "--lr", "1e-2"]
    assert main([*argv, "--json"]) == 0
    said = capsys.readouterr()
    summary = json.loads(said.out)  # --json: stdout is the result alone; the summary is a status line
    assert f"concept-erase: wrote {out}/: the erased model" in said.err and "next: concept-erase app" in said.err
    assert summary["steps"] == 2 and summary["method"] == "salun" and summary["peak_memory_bytes"] > 0
    card = read_model_card(out)
    assert card["concept"] == "custom: a nude" and card["surrogate"] == "a dressed" and card["steps"] == 2
    assert card["keep"] == pytest.approx(0.2, abs=0.01)
    assert SaliencyMask.load(out / "mask.safetensors").masks.keys() == mask.masks.keys()
    assert json.loads((out / "erase_summary.json").read_text())["losses"][-1]["step"] == 2
    erased = load_pipeline(out).unet.state_dict()
    b = base.unet.state_dict()
    for name, m in mask.masks.items():  # frozen means frozen, through save and reload
        assert torch.equal(erased[name][~m], b[name][~m])
    assert any(not torch.equal(erased[k], b[k]) for k in b)
    assert not (tmp_path / "erased.checkpoints").exists()  # no checkpoints asked for: nothing left behind

    # a resumed run must be the same job: another concept's checkpoints (and mask) are refused
    ckpt_args = ["erase", *_common(tiny_pipeline_dir, cache), "--steps", "2", "--lr", "1e-2",
                 "--checkpointing-steps", "1", "--checkpoint-dir", str(tmp_path / "ckpts")]
    assert main([*ckpt_args, "--output", str(tmp_path / "first")]) == 0
    assert (tmp_path / "ckpts" / "resume-mask.safetensors").is_file()
    other = [a if a != "a nude" else "a cat" for a in ckpt_args]
    _one_line_error(capsys, [*other, "--output", str(tmp_path / "second"), "--resume", "latest"], "cannot resume", "custom: a cat")
    assert not (tmp_path / "second").exists()

    # an existing output without --overwrite: refused before any work (nothing loaded: no other output)
    capsys.readouterr()
    assert main(argv) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if "concept-erase: defaults" not in line)
    assert len(err.splitlines()) == 1 and "already exists" in err and str(out) in err


@pytest.mark.parametrize("flag", ["--model-config", "--config"])
def test_mask_from_a_single_file_checkpoint(flag, tiny_pipeline_dir, tiny_pipeline, cache, tmp_path):
    """A community single-file checkpoint goes through the same command, with the local config folder
    under either spelling (generate, export and evaluate call it --config)."""
    from concept_erase.diffusion.models.single_file import export_single_file

    ckpt = export_single_file(tiny_pipeline, tmp_path / "model.safetensors")
    argv = _common(tiny_pipeline_dir, cache, erase=False)
    argv[argv.index("--model") + 1] = str(ckpt)
    out = tmp_path / "mask.safetensors"
    assert main(["mask", *argv, flag, str(tiny_pipeline_dir), "--output", str(out)]) == 0
    assert SaliencyMask.load(out, model=tiny_pipeline.unet).kept_fraction == pytest.approx(0.5, abs=0.01)


def _one_line_error(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    # stderr may hold loading progress bars before it; the error itself is one line, and the last
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("concept-erase: error:"), err
    for fragment in fragments:
        assert fragment in err[0]
    return err[0]


def test_cli_reliability_errors(tiny_pipeline_dir, cache, tmp_path, capsys):
    common = _common(tiny_pipeline_dir, cache)
    # a mask made for another model
    other = build_tiny_pipeline(0, unet_channels=(16, 32))
    SaliencyMask.random(other.unet, keep=0.5).save(tmp_path / "other.safetensors")
    _one_line_error(capsys, ["erase", *common, "--output", str(tmp_path / "o1"),
                             "--mask", str(tmp_path / "other.safetensors")], "mask parameter")
    # an empty prompt file
    (tmp_path / "empty.txt").write_text("# nothing\n")
    _one_line_error(capsys, ["erase", *common, "--output", str(tmp_path / "o2"),
                             "--retain-prompts", str(tmp_path / "empty.txt")], "empty.txt", "no prompts")
    # a blow-up: stop before the ruined weights are checkpointed, name none as good, write no model
    _one_line_error(capsys, ["erase", *common, "--output", str(tmp_path / "o3"), "--method", "rl", "--lr", "1e30",
                             "--steps", "6", "--checkpointing-steps", "1"], "non-finite norm after step 1",
                    "no checkpoint passed")
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o3.checkpoints").exists()
    # ... and with no checkpoints to resume from, the mask kept for --resume is not left behind either
    _one_line_error(capsys, ["erase", *common, "--output", str(tmp_path / "o5"), "--lr", "1e30", "--steps", "6"],
                    "non-finite")
    # settings this launch cannot run: refused before any images or mask are made
    _one_line_error(capsys, ["erase", *common, "--output", str(tmp_path / "o6"), "--batch-size", "3",
                             "--gradient-accumulation-steps", "2"], "batch_size 3 must be divisible", "1 x 2")
    _one_line_error(capsys, ["erase", *common, "--output", str(tmp_path / "o7"), "--mask-scope", "["],
                    "--mask-scope '['", "not a valid regex")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["erase", *common, "--output", str(tmp_path / "o4"), "--enable-xformers"], "xformers")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o4", "o5", "o6", "o7"))
    assert not any((tmp_path / f"{n}.checkpoints").exists() for n in ("o1", "o2", "o4", "o5", "o6", "o7"))


def test_recipe_defaults_and_user_overrides():
    from concept_erase.diffusion.training.config import EraseConfig

    cfg = EraseConfig.for_concept(concept="nudity", model="m", output="o", steps=5)
    # recipe, then the user; nudity's alpha is the reference nudity run's 0.1, not the class command's 0.5
    assert (cfg.num_forget_images, cfg.lr, cfg.alpha, cfg.steps) == (800, 1e-5, 0.1, 5)
    assert EraseConfig.for_concept(concept="imagenette-church", model="m", output="o").alpha == 0.5
    assert EraseConfig(model="m", output="o", forget=["x"], surrogate=["y"], method="esd-u").alpha == 0.0
    with pytest.raises(ConceptEraseError, match="keep"):
        EraseConfig(model="m", output="o", concept="nudity", keep=0.0)
    with pytest.raises(ConceptEraseError, match="--concept"):
        EraseConfig(model="m", output="o")


def test_forget_and_retain_images_are_sampled_with_the_base_models_settings(capsys):
    from concept_erase.cli import build_parser
    from concept_erase.diffusion.cli import ERASE_FIELDS, _config

    parser = build_parser("erase")
    argv = ["erase", "--model", "minisd", "--concept", "minisd-digit-three", "--output", "o"]
    assert _config(parser.parse_args(argv), ERASE_FIELDS, "erase").image_guidance == 5.0  # MiniSD's, not SD's 7.5
    assert "--guidance-scale 5" in capsys.readouterr().err
    assert _config(parser.parse_args([*argv, "--image-guidance", "3"]), ERASE_FIELDS, "erase").image_guidance == 3.0
    with pytest.raises(ConceptEraseError, match="512 px does not suit minisd"):
        _config(parser.parse_args([*argv, "--resolution", "512"]), ERASE_FIELDS, "erase")


def test_an_output_write_that_fails_after_training_keeps_the_weights(tiny_pipeline_dir, cache, tmp_path, capsys,
                                                                      monkeypatch):
    """The write of OUTPUT fails after training (full disk): the trained weights become the final checkpoint,
    the error names it, and --resume latest with another --output writes the model without training again."""
    from concept_erase.diffusion.training import job as erase

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real = erase._save_outputs
    monkeypatch.setattr(erase, "_save_outputs", full_disk)
    args = ["erase", *_common(tiny_pipeline_dir, cache), "--method", "rl", "--steps", "2",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    message = _one_line_error(capsys, [*args, "--output", str(tmp_path / "o1")], "No space left on device",
                              "the trained weights are kept in", "checkpoint-2", "--resume latest")
    assert not (tmp_path / "o1").exists() and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-2"]
    monkeypatch.setattr(erase, "_save_outputs", real)
    assert main([*args, "--output", str(tmp_path / "o2"), "--resume", "latest"]) == 0, message
    summary = json.loads((tmp_path / "o2" / "erase_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 2



@pytest.mark.parametrize("method", ["salun", "esd-x"])
def test_sdxl_mask_and_erase_at_a_chosen_resolution(method, tiny_sdxl_pipeline_dir, tiny_pipeline_dir, cache,
                                                    tmp_path, capsys):
    """The same commands and flags on SDXL: forget/retain images at --resolution, the UNet conditioned with
    both encoders, the pooled embedding and size ids of that resolution; the output is an SDXL pipeline whose
    card names the family; an SDXL mask on an SD 1.x model is refused in one line, writing nothing."""
    from concept_erase.diffusion.models.card import read_model_card
    from concept_erase.diffusion.models.loading import load_pipeline

    common = [*_common(tiny_sdxl_pipeline_dir, cache), "--resolution", "24"] if method == "salun" else [
        "--model", str(tiny_sdxl_pipeline_dir), "--forget", "a nude", "--surrogate", "a dressed", "--cache-dir",
        str(cache), "--batch-size", "2",
        "--no-progress", "--resolution", "24"]  # ESD samples its own images: no image counts
    mask_file = tmp_path / "mask.safetensors"
    if method == "salun":
        assert main(["mask", *_common(tiny_sdxl_pipeline_dir, cache, erase=False), "--resolution", "24",
                     "--output", str(mask_file), "--keep", "0.3"]) == 0
    out = tmp_path / "erased"
    seen = []
    from concept_erase.diffusion import conditioning as conditioning_module

    real = conditioning_module.PromptEmbeddings.__call__
    conditioning_module.PromptEmbeddings.__call__ = lambda self, prompts: seen.append(self.size) or real(self, prompts)
    try:
        argv = ["erase", *common, "--output", str(out), "--method", method, "--steps", "2", "--lr", "1e-2"]
        assert main(argv + (["--mask", str(mask_file)] if method == "salun" else [])) == 0
    finally:
        conditioning_module.PromptEmbeddings.__call__ = real
    assert set(seen) == {(24, 24)}  # size ids of the training images, not the model's default 32 px
    erased, base = load_pipeline(out), load_pipeline(tiny_sdxl_pipeline_dir)
    assert type(erased).__name__ == "StableDiffusionXLPipeline"
    assert read_model_card(out)["model_family"] == "sdxl"
    e, b = erased.unet.state_dict(), base.unet.state_dict()
    changed = {k for k in b if not torch.equal(e[k], b[k])}
    assert changed
    if method == "esd-x":  # ESD-x: cross-attention only, asked of the family
        assert all("attn2" in k for k in changed)
        return
    mask = SaliencyMask.load(mask_file)
    for name, m in mask.masks.items():
        assert torch.equal(e[name][~m], b[name][~m])
    bad = tmp_path / "on-sd1"
    _one_line_error(capsys, ["erase", *_common(tiny_pipeline_dir, cache), "--output", str(bad), "--mask",
                             str(mask_file), "--steps", "1"], "made for an SDXL UNet", "this model is sd1")
    assert not bad.exists()


def test_a_failed_extra_output_leaves_no_output_at_all(tiny_pipeline_dir, cache, tmp_path, capsys, monkeypatch):
    """--save-delta fails after the model folder and the single file were written: neither is left, so the
    retry (which --resume latest makes cheap) finds every destination free."""
    from concept_erase.diffusion.models import delta

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(delta, "save_delta", full_disk)
    _one_line_error(capsys, ["erase", *_common(tiny_pipeline_dir, cache), "--method", "rl", "--steps", "1",
                             "--output", str(tmp_path / "o"), "--export-single-file", str(tmp_path / "o.safetensors"),
                             "--save-delta", str(tmp_path / "d"), "--checkpoint-dir", str(tmp_path / "c")],
                    "No space left on device", "the trained weights are kept in")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_grad_release_matches_the_step_after_backward_and_checks_the_loss_before_it(tmp_path):
    """--grad-release: the same weights as stepping after the backward (SalUn's mask, gradient checkpointing);
    a NaN loss is caught before its backward pass, so the weights it would have moved are the step-2 ones."""
    forget, retain = _sets()
    mask = SaliencyMask.random(build_tiny_pipeline(0).unet, keep=0.5, seed=0)
    cfg = TrainConfig(method="salun", steps=3, batch_size=2, lr=1e-3, weight_decay=0.01, gradient_checkpointing=True)
    runs = [weights_copy(train_unet(build_tiny_pipeline(0), forget, retain, replace(cfg, grad_release=release),
                                    mask=mask).unet) for release in (False, True)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    two_steps = weights_copy(train_unet(build_tiny_pipeline(0), forget, retain, replace(cfg, steps=2), mask=mask).unet)
    pipe = build_tiny_pipeline(0)
    _hook_on_call(pipe.unet, 5, lambda out: type(out)(sample=out.sample * float("nan")))  # step 3's target
    with pytest.raises(ConceptEraseError, match="non-finite loss nan at step 3"):
        train_unet(pipe, forget, retain, replace(cfg, grad_release=True, checkpointing_steps=1), mask=mask,
                   checkpoint_dir=tmp_path)
    assert all(torch.equal(pipe.unet.state_dict()[k], two_steps[k]) for k in two_steps)
    pipe.unet.requires_grad_(True)  # the failed run left no hook behind: a later backward steps nothing
    sum(p.sum() for p in pipe.unet.parameters()).backward()
    assert all(p.grad is not None for p in pipe.unet.parameters())
    assert all(torch.equal(pipe.unet.state_dict()[k], two_steps[k]) for k in two_steps)
    with pytest.raises(ConceptEraseError, match=r"--grad-release .*one micro-batch \(--gradient-accumulation-steps 2\)"):
        train_unet(build_tiny_pipeline(0), forget, retain, replace(cfg, grad_release=True, gradient_accumulation_steps=2),
                   mask=mask)


def test_grad_release_may_change_on_resume(tmp_path):
    """--grad-release is resume-free: it changes when each weight steps, not the step. RL's optimizer is torch
    Adam without it and a MaskedOptimizer over whole tensors with it; both keep one torch optimizer's state
    format, so a run interrupted with one setting and resumed with the other ends bit-identical."""
    forget, retain = _sets()
    cfg = TrainConfig(method="rl", steps=4, batch_size=2, lr=1e-3, weight_decay=0.01, checkpointing_steps=2)
    straight = weights_copy(train_unet(build_tiny_pipeline(0), forget, retain, cfg).unet)
    for first in (False, True):
        pipe = build_tiny_pipeline(0)
        _hook_on_call(pipe.unet, 5, lambda out: (_ for _ in ()).throw(Interrupt()))  # in step 3
        with pytest.raises(Interrupt):
            train_unet(pipe, forget, retain, replace(cfg, grad_release=first), checkpoint_dir=tmp_path / str(first))
        resumed = train_unet(build_tiny_pipeline(0), forget, retain, replace(cfg, grad_release=not first),
                             checkpoint_dir=tmp_path / str(first), resume="latest")
        assert resumed.resumed_from == 2
        assert all(torch.equal(v, straight[k]) for k, v in resumed.unet.state_dict().items()), first


@pytest.mark.parametrize("master", ["salient-fp32", "bf16-stochastic"])
def test_bf16_master_weights_train_the_salient_entries_and_resume_exactly(master, tmp_path):
    forget, retain = _sets()
    base = build_tiny_pipeline(0).unet
    mask = SaliencyMask.random(base, keep=0.5, seed=0)
    cfg = TrainConfig(method="salun", steps=4, batch_size=2, lr=1e-3, mixed_precision="bf16", master_weights=master,
                      checkpointing_steps=2)
    straight = train_unet(build_tiny_pipeline(0), forget, retain, cfg, mask=mask, checkpoint_dir=tmp_path / "a")
    before = {k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}
    for name, p in straight.unet.named_parameters():
        m = mask.masks[name]
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach()[~m], before[name][~m]), f"frozen entries of {name} moved"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in straight.unet.named_parameters())
    pipe = build_tiny_pipeline(0)
    handle = _hook_on_call(pipe.unet, 5, lambda out: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        train_unet(pipe, forget, retain, cfg, mask=mask, checkpoint_dir=tmp_path / "b")
    handle.remove()
    resumed = train_unet(build_tiny_pipeline(0), forget, retain, cfg, mask=mask, checkpoint_dir=tmp_path / "b",
                         resume="latest")
    assert resumed.resumed_from == 2
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConceptEraseError, match=f"--master-weights {master} .* needs --mixed-precision bf16, not no"):
        train_unet(build_tiny_pipeline(0), forget, retain, replace(cfg, mixed_precision="no"), mask=mask)
