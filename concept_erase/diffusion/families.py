"""Model families: everything that differs between SD 1.x, SD 2.x and SDXL, in one place.

Every part of the library that turns prompts into UNet conditioning, picks a default resolution or names
the cross-attention weights asks the pipeline's `Family` (`family_of(pipe)`), never the pipeline class.

`Conditioning` is what the UNet is conditioned on for a batch of prompts: the text encoder's hidden states
(`encoder_hidden_states`) and, for SDXL, the `added_cond_kwargs` (the pooled text embedding and the six size
ids). It indexes, concatenates and moves like a tensor, so the losses and the erasure loop handle every
family the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConceptEraseError


@dataclass
class Conditioning:
    """UNet conditioning for B prompts: `hidden` (B, L, D) and per-item extras (B, ...) such as SDXL's
    `text_embeds` and `time_ids`."""

    hidden: Tensor
    added: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        if isinstance(index, int):
            index = slice(index, index + 1)  # keep the batch axis: one item is a batch of one
        return Conditioning(self.hidden[index], {k: v[index] for k, v in self.added.items()})

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.hidden.to(*args, **kwargs), {k: v.to(*args, **kwargs) for k, v in self.added.items()})

    def expand(self, n: int) -> "Conditioning":
        """A batch of one repeated n times (the empty prompt beside a batch, as classifier-free guidance)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch of one, got {len(self)}")
        return Conditioning(self.hidden.expand(n, *self.hidden.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    @classmethod
    def cat(cls, items: Sequence["Conditioning | Tensor"]) -> "Conditioning":
        items = [as_conditioning(c) for c in items]
        keys = set(items[0].added)
        if any(set(c.added) != keys for c in items):
            raise ValueError("cannot concatenate conditionings of different families")
        return cls(torch.cat([c.hidden for c in items]), {k: torch.cat([c.added[k] for c in items]) for k in keys})

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` (added_cond_kwargs only where there are any)."""
        cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
        kwargs = {"encoder_hidden_states": cast(self.hidden)}
        if self.added:
            kwargs["added_cond_kwargs"] = {k: cast(v) for k, v in self.added.items()}
        return kwargs


def as_conditioning(cond: "Conditioning | Tensor") -> Conditioning:
    """A bare hidden-state tensor (SD 1.x/2.x callers, tests) is a Conditioning without extras."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


@dataclass(frozen=True)
class Family:
    """What a model family means for the rest of the library."""

    name: str                   # "sd1", "sd2", "sdxl"
    description: str            # printed when a model is loaded
    default_resolution: int     # the family's native image size in pixels

    def encode(self, pipe, prompts: Sequence[str], device, size: tuple[int, int] | None = None) -> Conditioning:
        """The UNet conditioning of `prompts` (no classifier-free guidance batch), in fp32 on `device`.
        `size` (height, width) is the image size the conditioning is for (SDXL's size ids); SD 1.x/2.x
        ignore it."""
        hidden = pipe.encode_prompt(list(prompts), device, 1, False)[0]
        return Conditioning(hidden.float())

    def is_cross_attention(self, name: str) -> bool:
        """Is UNet parameter `name` a cross-attention (text) weight: ESD-x's scope, UCE's edit."""
        return "attn2" in name


SD1 = Family("sd1", "Stable Diffusion 1.x (CLIP ViT-L text encoder, 768-d)", 512)
SD2 = Family("sd2", "Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, 1024-d)", 768)
FAMILIES = {f.name: f for f in (SD1, SD2)}


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, from its components (not its class name)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ConceptEraseError("SDXL pipelines are not supported yet")
    width = getattr(getattr(pipe.text_encoder, "config", None), "hidden_size", 768)
    return SD2 if width == 1024 else SD1
