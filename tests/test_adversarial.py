"""SalUn-Adv (`concept_erase.diffusion.adversarial`): the inner attack, the method through the loop, its flags."""

import pytest
import torch

from concept_erase.diffusion.adversarial import adversarial_conditioning
from concept_erase.diffusion.erase import METHODS, EraseConfig, LatentSet, TrainConfig, train_unet
from concept_erase.diffusion.families import family_of
from concept_erase.diffusion.losses import noise_batch, sample_noise, training_scheduler
from concept_erase.diffusion.tiny import build_tiny_pipeline
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


def _train(adversarial: bool, steps: int = 3):
    pipe = build_tiny_pipeline(seed=0)
    g = torch.Generator().manual_seed(0)
    forget = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a cat"] * 4, ["a dog"] * 4)
    retain = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a bird"] * 4)
    mask = SaliencyMask.random(pipe.unet, keep=0.5, seed=0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = TrainConfig(method="salun", adversarial=adversarial, steps=steps, batch_size=4, lr=1e-3, adv_steps=2)
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
    assert "salun-adv" not in METHODS  # chosen with --adversarial, not by name
    assert TrainConfig(method="salun", adversarial=True).method == "salun-adv"
    with pytest.raises(ConceptEraseError, match="--adversarial works with --method salun, not 'esd-x'"):
        TrainConfig(method="esd-x", adversarial=True)
    with pytest.raises(ConceptEraseError, match="--adv-steps must be >= 1, got 0"):
        TrainConfig(adversarial=True, adv_steps=0)
    with pytest.raises(ConceptEraseError, match="--adv-steps is not used by --method salun"):
        EraseConfig(model="m", output="o", forget=["x"], surrogate=["y"], adv_steps=3)
