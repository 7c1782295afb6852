"""The trained module of an erasure: the denoiser (SalUn and every other method; the UNet, or the family's
diffusion transformer: `Family.denoiser`) or the text encoder (AdvUnlearn, Zhang et al., NeurIPS 2024: a plug-in
robust text encoder, the UNet frozen).

`erase.train_unet` and the mask pass see only this interface, so the loop has no branch per module:
- `module`: the nn.Module whose weights the mask ranks, the optimizer steps and checkpoints hold;
- `encode(prompts)`: the UNet conditioning of prompts, with gradients through the text encoder when it is the
  trained module (recomputed every step), from a once-encoded cache when it is not;
- `target(prompts)`: the same under no_grad (the surrogate's stop-gradient target);
- `adversarial(...)`: the inner attack of SalUn-Adv on what the trained module can defend: the conditioning
  for the UNet, the INPUT token embeddings for the text encoder (an attack on the conditioning would bypass the
  encoder being trained);
- `saliency_loss_fn(guidance)`: the saliency loss of the mask pass, differentiating through the module.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ..conditioning import PromptEmbeddings, adversarial_conditioning, edited_token_embeddings, minimise_denoising_error
from ..losses import saliency_loss
from ..models.family import Conditioning
from ..models.families import family_of


class TrainedUNet:
    """The denoiser trains (the UNet, or a diffusion transformer: `--train unet` names both); the text encoders
    are frozen, so each prompt is encoded once."""

    name = "unet"

    def __init__(self, pipe, device, size: tuple[int, int] | None = None):
        self.pipe, self.module = pipe, self.of(pipe)
        self.attr = family_of(pipe).denoiser_name  # the pipeline component it is
        self._cache = PromptEmbeddings(pipe, device, size=size)

    @classmethod
    def of(cls, pipe) -> nn.Module:
        """This pipeline's module of this kind; refuses a pipeline it cannot train (before any work)."""
        return family_of(pipe).denoiser(pipe)

    def unet(self, prepared: nn.Module) -> nn.Module:
        """The UNet the losses call, given the trained module as accelerate prepared it."""
        return prepared

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self._cache(prompts)

    def target(self, prompts: Sequence[str]) -> Conditioning:
        return self._cache(prompts)

    def adversarial(self, unet, scheduler, latents, prompts, cond, *, steps, lr, generator) -> Conditioning:
        return adversarial_conditioning(unet, scheduler, latents, cond, steps=steps, lr=lr, generator=generator)

    def saliency_loss_fn(self, guidance: float):
        return lambda unet, item: saliency_loss(unet, item[0], guidance)


class TrainedTextEncoder(TrainedUNet):
    """The text encoder trains (the UNet frozen): every conditioning is recomputed through it, with grad."""

    name = "text-encoder"
    attr = "text_encoder"

    def __init__(self, pipe, device, size: tuple[int, int] | None = None):
        self.pipe, self.module, self.device, self.size = pipe, self.of(pipe), device, size
        self.family = family_of(pipe)
        self.family.denoiser(pipe).requires_grad_(False)

    @classmethod
    def of(cls, pipe) -> nn.Module:
        family = family_of(pipe)
        if len(family.text_modules(pipe)) != 1:  # SDXL: AdvUnlearn's recipe is for one encoder
            raise ConceptEraseError(f"--train text-encoder handles one text encoder; this {family.name} model has "
                                    f"{len(family.text_modules(pipe))}")
        return pipe.text_encoder

    def unet(self, prepared: nn.Module) -> nn.Module:
        return self.family.denoiser(self.pipe)

    def encode(self, prompts: Sequence[str], offset: Tensor | None = None) -> Conditioning:
        """The conditioning of `prompts` through the current encoder; `offset` (B, L, D) is added to the input
        token embeddings (the inner attack's perturbation)."""
        with self._offset(offset):
            return self.family.encode(self.pipe, list(prompts), self.device, self.size)

    @torch.no_grad()
    def target(self, prompts: Sequence[str]) -> Conditioning:
        return self.encode(prompts)

    def _offset(self, offset: Tensor | None):
        return edited_token_embeddings({} if offset is None else {self.module: lambda ids, emb: emb + offset})

    def adversarial(self, unet, scheduler, latents, prompts, cond, *, steps, lr, generator) -> Conditioning:
        """AdvUnlearn's inner attack on the input token embeddings: Adam on a perturbation delta (from 0) of
        the forget prompts' token embeddings minimising the current models' denoising error on `latents`
        (gradients on delta only), then the prompts re-encoded with delta, with grad through the encoder so
        the outer step teaches the encoder to map them to the surrogate."""
        width = self.module.get_input_embeddings().embedding_dim
        delta = torch.zeros(len(prompts), self.pipe.tokenizer.model_max_length, width, device=latents.device,
                            requires_grad=True)
        minimise_denoising_error(unet, scheduler, latents, lambda: self.encode(prompts, delta), [delta], steps=steps,
                                 lr=lr, generator=generator)
        return self.encode(prompts, delta.detach())

    def saliency_loss_fn(self, guidance: float):
        """SalUn's saliency loss with both conditionings (forget prompt and the empty one) re-encoded with grad."""
        def loss(text_encoder, item):
            batch, prompts = item
            cond = self.encode(list(prompts) + [""])
            return saliency_loss(self.family.denoiser(self.pipe), replace(batch, cond=cond[:-1], target_cond=cond[-1:].expand(
                len(prompts))), guidance)
        return loss


def trained_module(name: str):
    return {c.name: c for c in (TrainedUNet, TrainedTextEncoder)}[name]
