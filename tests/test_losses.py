"""Diffusion losses (docs/ALGORITHMS.md 1-2) checked against their formulas on a small stand-in UNet."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from concept_erase.diffusion.losses import (
    NoisedBatch,
    esd_loss,
    esd_partial_sample,
    esd_scheduler,
    esd_target,
    noise_batch,
    saliency_loss,
    saliency_loss_fn,
    salun_loss,
    sample_noise,
)


class ToyUNet(nn.Module):
    """eps(z, t, c) = a * z + b * mean(c) per item: cheap, differentiable, conditioning-dependent."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(-0.3))
        self.grad_enabled = []  # torch.is_grad_enabled() at each call

    def forward(self, z, t, encoder_hidden_states):
        self.grad_enabled.append(torch.is_grad_enabled())
        c = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.a * z + self.b * c + 0.001 * t.view(-1, 1, 1, 1))


def _batch(seed=0, n=3, target_cond=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = torch.randn(n, 5, 6, generator=g)
    other = torch.randn(n, 5, 6, generator=g) if target_cond else None
    return NoisedBatch(z, noise, noise, t, cond, other)


def test_saliency_loss_is_the_guided_mse():
    unet, b = ToyUNet(), _batch()
    eps_c = unet(b.noisy, b.timesteps, b.cond).sample
    eps_u = unet(b.noisy, b.timesteps, b.target_cond).sample
    expected = F.mse_loss(8.5 * eps_c - 7.5 * eps_u, b.noise)  # (1 + w) eps_c - w eps_u, w = 7.5
    assert torch.allclose(saliency_loss_fn()(unet, b), expected)
    assert torch.allclose(saliency_loss(unet, b, guidance=0.0), F.mse_loss(eps_c, b.noise))
    saliency_loss(unet, b).backward()  # gradients reach the parameters through both terms
    assert unet.a.grad is not None and unet.b.grad.abs() > 0


def test_salun_loss_target_under_no_grad_and_alpha():
    unet, f, r = ToyUNet(), _batch(0), _batch(1, target_cond=False)
    loss, loss_f, loss_r = salun_loss(unet, f, r, alpha=0.25)
    assert unet.grad_enabled == [False, True]  # surrogate target without a graph, then ONE joint forward
    with torch.no_grad():
        target = unet(f.noisy, f.timesteps, f.target_cond).sample
        exp_f = F.mse_loss(unet(f.noisy, f.timesteps, f.cond).sample, target)
        exp_r = F.mse_loss(unet(r.noisy, r.timesteps, r.cond).sample, r.noise)
    assert torch.allclose(loss_f, exp_f) and torch.allclose(loss_r, exp_r)
    assert torch.allclose(loss, exp_f + 0.25 * exp_r)
    loss.backward()
    assert unet.a.grad is not None
    # no retain set: the forget term alone
    loss_only, _, zero = salun_loss(unet, f, None, alpha=0.5)
    assert torch.allclose(loss_only, exp_f) and zero.item() == 0


def test_esd_target_is_negative_guidance_of_the_frozen_model():
    frozen, unet, b = ToyUNet(), ToyUNet(), _batch()
    with torch.no_grad():
        unet.a.add_(0.1)
        e_c = frozen(b.noisy, b.timesteps, b.cond).sample
        e_u = frozen(b.noisy, b.timesteps, b.target_cond).sample
    target = esd_target(frozen, b, eta=2.0)
    assert torch.allclose(target, e_u - 2.0 * (e_c - e_u))
    loss, loss_f, _ = esd_loss(unet, frozen, b, eta=2.0)
    assert torch.allclose(loss, F.mse_loss(unet(b.noisy, b.timesteps, b.cond).sample, target))
    assert frozen.a.grad is None


def test_esd_partial_sample_is_data_not_a_graph():
    """ESD's z_t comes from sampling with the model being trained, but the loss's gradient must start at z_t:
    backpropagating through the sampling chain would change the objective and multiply memory."""
    from diffusers import DDPMScheduler

    unet, b = ToyUNet(), _batch()
    sampler = esd_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    z_t, t = esd_partial_sample(unet, sampler, b.noise, b.cond, b.target_cond, num_steps=5, stop_index=3, guidance=3.0)
    assert unet.grad_enabled == [False] * 3 and z_t.grad_fn is None and not z_t.requires_grad
    assert t.shape == (3,) and int(t[0]) == int(sampler.timesteps[3])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_batch_uses_the_scheduler(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    z = torch.randn(4, 4, 8, 8)
    noise, t = sample_noise(z, 1000, torch.Generator().manual_seed(0))
    again, t2 = sample_noise(z, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(noise, again) and torch.equal(t, t2) and t.min() >= 0 and t.max() < 1000
    b = noise_batch(sched, z, torch.zeros(4, 2, 3), noise, t)
    assert torch.allclose(b.noisy, sched.add_noise(z, noise, t))
    expected = noise if prediction_type == "epsilon" else sched.get_velocity(z, noise, t)
    assert torch.allclose(b.target, expected)
