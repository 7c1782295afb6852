"""SalUn-Adv (`concept_erase.diffusion.methods.salun_adv`): the inner attack, the method through the loop, its flags; and
`--train text-encoder` (`concept_erase.diffusion.training.trained`): the encoder trains on its mask, the UNet stays put."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from concept_erase.diffusion.conditioning import adversarial_conditioning
from concept_erase.diffusion.data.latents import LatentSet
from concept_erase.diffusion.methods import METHOD_CHOICES
from concept_erase.diffusion.training.config import EraseConfig, TrainConfig
from concept_erase.diffusion.training.loop import train_unet
from concept_erase.diffusion.training.mask_pass import compute_mask
from concept_erase.diffusion.models.families import family_of
from concept_erase.diffusion.losses import noise_batch, sample_noise, training_scheduler
from concept_erase.diffusion.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from concept_erase.diffusion.training.trained import TrainedTextEncoder
from concept_erase.errors import ConceptEraseError
from concept_erase.saliency import SaliencyMask


def _error(unet, scheduler, latents, cond):
    gen, total = torch.Generator().manual_seed(99), 0.0
    with torch.no_grad():
        for _ in range(8):
            noise, t = sample_noise(latents, 1000, gen)
            b = noise_batch(scheduler, latents, cond, noise, t)
            total += torch.nn.functional.mse_loss(unet(b.noisy, t, **cond.unet_kwargs()).sample, b.target).item()
    return total


def test_inner_attack_lowers_the_denoising_error_and_leaves_the_weights_alone():
    pipe = build_tiny_pipeline(seed=0)
    scheduler = training_scheduler(pipe.scheduler)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = family_of(pipe).encode(pipe, ["a cat", "a red cat"], "cpu")
    pipe.unet.requires_grad_(True)
    adv = adversarial_conditioning(pipe.unet, scheduler, latents, cond, steps=15, lr=0.05,
                                   generator=torch.Generator().manual_seed(1))
    assert all(p.grad is None for p in pipe.unet.parameters())  # autograd.grad on the perturbation only
    assert not adv.hidden.requires_grad and adv.hidden.shape == cond.hidden.shape
    assert _error(pipe.unet, scheduler, latents, adv) < _error(pipe.unet, scheduler, latents, cond)


def _train(adversarial: bool, steps: int = 3, **options):
    pipe = build_tiny_pipeline(seed=0)
    g = torch.Generator().manual_seed(0)
    forget = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a cat"] * 4, ["a dog"] * 4)
    retain = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a bird"] * 4)
    mask = SaliencyMask.random(pipe.unet, keep=0.5, seed=0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = TrainConfig(method="salun", adversarial=adversarial, steps=steps, batch_size=4, lr=1e-3,
                         **({"adv_steps": 2} if adversarial else {}), **options)
    result = train_unet(pipe, forget, retain, config, mask=mask)
    return pipe, before, mask, result


def test_salun_adv_trains_on_the_mask_deterministically_and_differs_from_salun():
    pipe, before, mask, result = _train(True)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    for name, p in pipe.unet.named_parameters():  # frozen means frozen, as in SalUn
        frozen = ~mask.masks[name] if name in mask.masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
    again, _, _, _ = _train(True)
    plain, _, _, _ = _train(False)
    weights = lambda q: torch.cat([p.detach().flatten() for p in q.unet.parameters()])  # noqa: E731
    assert torch.equal(weights(pipe), weights(again))
    assert not torch.equal(weights(pipe), weights(plain))


def test_adversarial_flags():
    assert "salun-adv" not in METHOD_CHOICES  # chosen with --adversarial, not by name
    assert TrainConfig(method="salun", adversarial=True).method == "salun-adv"
    with pytest.raises(ConceptEraseError, match="--adversarial works with --method salun, not 'esd-x'"):
        TrainConfig(method="esd-x", adversarial=True)
    with pytest.raises(ConceptEraseError, match="--adv-steps must be >= 1, got 0"):
        TrainConfig(adversarial=True, adv_steps=0)
    with pytest.raises(ConceptEraseError, match="--adv-steps is not used by --method salun"):
        EraseConfig(model="m", output="o", forget=["x"], surrogate=["y"], adv_steps=3)


# -- --adv-attack relearn: SalUn's forget loss after simulated fine-tuning (first-order meta-unlearning)

def _weights(pipe):
    return torch.cat([p.detach().flatten() for p in pipe.unet.parameters()])


def test_relearn_inner_attack_trains_the_mask_only_and_with_weight_0_is_salun_bit_for_bit():
    pipe, before, mask, result = _train(True, adv_attack="relearn")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    for name, p in pipe.unet.named_parameters():  # the simulation fine-tunes every weight; only salient ones keep
        frozen = ~mask.masks[name] if name in mask.masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
    plain = _weights(_train(False)[0])
    assert torch.equal(_weights(pipe), _weights(_train(True, adv_attack="relearn")[0]))  # deterministic
    assert not torch.equal(_weights(pipe), plain)
    # the simulated fine-tuning leaves no trace: with its term weighted 0 the run is plain SalUn's
    assert torch.equal(_weights(_train(True, adv_attack="relearn", adv_weight=0.0)[0]), plain)


def test_relearn_inner_attack_gives_the_gradient_at_the_fine_tuned_weights_and_restores_the_model():
    from concept_erase.diffusion.methods.salun_adv import RelearnedBatch

    pipe = build_tiny_pipeline(seed=0)
    unet, scheduler = pipe.unet, training_scheduler(pipe.scheduler)
    method = TrainConfig(method="salun", adversarial=True, adv_attack="relearn", adv_steps=3).build_method()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    embed = family_of(pipe).encode
    cond, target = embed(pipe, ["a cat"] * 2, "cpu"), embed(pipe, ["a dog"] * 2, "cpu")
    noise, t = sample_noise(latents, 1000, g)
    names = [n for n, _ in unet.named_parameters()]
    for i, p in enumerate(unet.parameters()):  # what a loop holds mid-step: flags of what trains, accumulated grads
        p.requires_grad_(i % 2 == 0)
        p.grad = torch.full_like(p, 0.5) if i % 2 == 0 else None
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    batch = method.forget_batch(unet, scheduler, latents, cond, target, noise, t, {}, step=0, prompts=["a cat"] * 2)
    assert isinstance(batch, RelearnedBatch)
    for name, value in unet.state_dict().items():
        assert torch.equal(value, before[name]), name
    for i, p in enumerate(unet.parameters()):
        assert p.requires_grad == (i % 2 == 0) and (p.grad is None) == (i % 2 == 1), names[i]
        if p.grad is not None:
            assert torch.all(p.grad == 0.5), names[i]
    trained = [p for p in unet.parameters() if p.requires_grad]
    assert [id(p) for p, _ in batch.relearned_grads] == [id(p) for p in trained]
    # the gradient is taken at theta' (the fine-tuned weights), not at theta; with a vanishing inner rate theta'
    # is theta and the two agree (the first-order limit)
    at_theta = torch.autograd.grad(method.loss(unet, noise_batch(scheduler, latents, cond, noise, t, target),
                                               None)[0], trained)
    assert not all(torch.allclose(a, b) for a, (_, b) in zip(at_theta, batch.relearned_grads))
    still = TrainConfig(method="salun", adversarial=True, adv_attack="relearn", adv_steps=3,
                        adv_lr=1e-12).build_method()
    limit = still.forget_batch(unet, scheduler, latents, cond, target, noise, t, {}, step=0, prompts=["a cat"] * 2)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, (_, b) in zip(at_theta, limit.relearned_grads))
    # and the outer loss carries it: value + adv_weight x relearned loss, gradient + adv_weight x its gradient
    for p in trained:
        p.grad = None
    loss, loss_f, _ = method.loss(unet, batch, None)
    assert torch.allclose(loss, loss_f + batch.relearned_loss)
    loss.backward()
    for p, a, (_, b) in zip(trained, at_theta, batch.relearned_grads):
        assert torch.allclose(p.grad, a + b, atol=1e-6)


def test_relearn_inner_attack_flags():
    assert TrainConfig(method="salun", adversarial=True, adv_attack="relearn").build_method().inner_lr() == 1e-4
    assert TrainConfig(method="salun", adversarial=True).build_method().inner_lr() == 0.02
    assert TrainConfig(method="salun", adversarial=True, adv_lr=0.1).build_method().inner_lr() == 0.1
    with pytest.raises(ConceptEraseError, match="--adv-attack must be one of conditioning, relearn, got 'weights'"):
        TrainConfig(adversarial=True, adv_attack="weights")
    with pytest.raises(ConceptEraseError, match="--adv-weight is for --adv-attack relearn, not conditioning"):
        TrainConfig(adversarial=True, adv_weight=2.0)
    with pytest.raises(ConceptEraseError, match="--adv-weight must be >= 0, got -1"):
        TrainConfig(adversarial=True, adv_attack="relearn", adv_weight=-1.0)
    with pytest.raises(ConceptEraseError, match="--adv-attack is not used by --method salun"):
        EraseConfig(model="m", output="o", forget=["x"], surrogate=["y"], adv_attack="relearn")
    with pytest.raises(ConceptEraseError, match="--adv-attack relearn fine-tunes the UNet: it does not run with "
                                                "--train text-encoder"):
        TrainConfig(adversarial=True, adv_attack="relearn", train="text-encoder")


# -- --train text-encoder (AdvUnlearn): the encoder trains on its mask, the UNet stays bit-identical

def _train_text_encoder(steps: int = 4, **run):
    pipe = build_tiny_pipeline(seed=0)
    g = torch.Generator().manual_seed(0)
    forget = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a cat"] * 4, ["a dog"] * 4)
    retain = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a bird"] * 4)
    config = TrainConfig(method="salun", adversarial=True, train="text-encoder", steps=steps, batch_size=4, lr=1e-2,
                         adv_steps=2, checkpointing_steps=2, checkpoints_total_limit=0)
    mask = compute_mask(pipe, forget, keep=0.5, batch_size=4, train="text-encoder")
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    encoder = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    embed = lambda p: family_of(pipe).encode(pipe, p, "cpu").hidden  # noqa: E731
    with torch.no_grad():
        gap = (embed(["a cat"]) - embed(["a dog"])).norm()
    result = train_unet(pipe, forget, retain, config, mask=mask, **run)
    with torch.no_grad():
        gap_after = (embed(["a cat"]) - embed(["a dog"])).norm()
    return pipe, unet, encoder, mask, gap, gap_after, result


def test_text_encoder_training_changes_only_its_masked_weights_and_moves_the_forget_prompt_to_the_surrogate():
    pipe, unet, encoder, mask, gap, gap_after, result = _train_text_encoder(concept_of={"a cat": "cat"})
    assert set(mask.masks) <= set(dict(pipe.text_encoder.named_parameters()))  # the mask is over the encoder
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, unet[name]), name
    changed = 0
    for name, p in pipe.text_encoder.named_parameters():
        frozen = ~mask.masks[name] if name in mask.masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[frozen], encoder[name][frozen]), name
        changed += int((p.detach() != encoder[name]).sum())
    assert changed > 0
    assert gap_after < gap  # "a cat"'s conditioning moved towards "a dog"'s
    assert set(result.forget_per_concept) == {"cat"}  # the after-training measure (plain prompts, no attack)


def test_text_encoder_checkpoints_hold_the_encoder_and_resume_exactly(tmp_path):
    whole = _train_text_encoder(checkpoint_dir=tmp_path / "a")[0]
    assert (tmp_path / "a" / "checkpoint-2" / "text-encoder.safetensors").is_file()
    resumed = _train_text_encoder(checkpoint_dir=tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))[0]
    for (name, p), q in zip(whole.text_encoder.named_parameters(), resumed.text_encoder.parameters()):
        assert torch.equal(p, q), name


def test_train_text_encoder_refusals():
    assert EraseConfig.for_concept(model="m", output="o", forget=["x"], surrogate=["y"], adversarial=True,
                                   train="text-encoder").method == "salun-adv"  # what the CLI builds
    assert TrainConfig(method="salun", adversarial=True, train="text-encoder").train == "text-encoder"
    with pytest.raises(ConceptEraseError, match="--train text-encoder needs --adversarial"):
        TrainConfig(method="salun", train="text-encoder")
    with pytest.raises(ConceptEraseError, match="--gradient-checkpointing is for the UNet, not --train text-encoder"):
        TrainConfig(adversarial=True, train="text-encoder", gradient_checkpointing=True)
    with pytest.raises(ConceptEraseError, match="--save-delta writes UNet weights; with --train text-encoder"):
        EraseConfig(model="m", output="o", forget=["x"], surrogate=["y"], adversarial=True, train="text-encoder",
                    save_delta="d")
    with pytest.raises(ConceptEraseError, match="--train text-encoder runs in one process"):
        TrainConfig(adversarial=True, train="text-encoder").check_launch(2)
    with pytest.raises(ConceptEraseError, match="--train text-encoder handles one text encoder; this sdxl model has 2"):
        TrainedTextEncoder.of(build_tiny_sdxl_pipeline(seed=0))  # erase checks it before any image is made


def test_erase_train_text_encoder_writes_the_pipeline_and_says_what_trained(tiny_pipeline_dir, tmp_path):
    from concept_erase.diffusion.training.job import run_erase

    out = tmp_path / "out"
    config = EraseConfig.for_concept(model=str(tiny_pipeline_dir), output=str(out), forget=["a cat"],
                                     surrogate=["a dog"], adversarial=True, train="text-encoder", steps=2,
                                     batch_size=2, num_forget_images=2, num_retain_images=2, image_steps=2,
                                     adv_steps=1, cache_dir=str(tmp_path / "cache"), progress=False)
    summary = run_erase(config)
    assert summary["trained"] == "text-encoder" and summary["method"] == "salun-adv"
    assert "trained: text-encoder" in (out / "README.md").read_text()
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    erased = StableDiffusionPipeline.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(base.unet.parameters(), erased.unet.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(base.text_encoder.parameters(), erased.text_encoder.parameters()))
