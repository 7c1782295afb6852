"""Diffusion losses (docs/ALGORITHMS.md 1-2) checked against their formulas on a small stand-in UNet."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from concept_erase.diffusion.losses import (
    NoisedBatch,
    RectifiedFlow,
    esd_loss,
    esd_partial_sample,
    esd_scheduler,
    esd_target,
    noise_batch,
    saliency_loss,
    saliency_loss_fn,
    salun_loss,
    sample_noise,
    training_scheduler,
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


def test_rectified_flow_noising_target_and_timestep_sampling():
    """SD 3 and FLUX noise by rectified flow (docs/ALGORITHMS.md 5); sigma follows their schedulers' configs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD 3's
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)  # FLUX.1's
    flow = training_scheduler(sd3)
    assert isinstance(flow, RectifiedFlow) and training_scheduler(flow) is flow
    z = torch.randn(3, 16, 8, 8)
    noise, t = sample_noise(z, 1000, torch.Generator().manual_seed(0))
    batch = noise_batch(sd3, z, torch.zeros(3, 4, 8), noise, t)
    sigma = batch.timesteps / 1000
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, (1 - s) * z + s * noise)
    torch.testing.assert_close(batch.target, noise - z)
    # SD 3: logit-normal (median u = 0.5 -> 0.5), then the shift 3: sigma = 3 s / (1 + 2 s) -> 0.75
    draws = torch.arange(1000)
    sig = flow.sigmas(draws, (16, 64, 64))
    assert sig.median().item() == pytest.approx(0.75, abs=2e-3) and bool((sig > 0).all() and (sig < 1).all())
    assert bool((sig[1:] > sig[:-1]).all())  # monotone in the draw: t keeps meaning "more noise"
    unshifted = sig.double() / (3 - 2 * sig.double())
    logit = torch.log(unshifted / (1 - unshifted))  # logit-normal(0, 1): its logit is standard normal
    assert logit.mean().item() == pytest.approx(0, abs=1e-3) and logit.std().item() == pytest.approx(1, abs=0.02)
    # FLUX: uniform, shifted by the sequence length: more tokens, more noise (mu from 0.5 at 256 to 1.15 at 4096)
    small, large = (training_scheduler(flux).sigmas(draws, (16, n, n)) for n in (32, 128))
    mu = 1.15  # 64 x 64 packed tokens = 4096: the maximum shift
    u = (draws.double() + 0.5) / 1000
    torch.testing.assert_close(large, (torch.e ** mu / (torch.e ** mu + 1 / u - 1)).float())
    assert bool((large > small).all()) and small.mean() > 0.5
