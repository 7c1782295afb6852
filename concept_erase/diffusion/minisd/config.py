"""The settings of `concept-erase minisd train` (`train.py` runs them), without torch: the `minisd` parser
builds this dataclass, so a bad flag is refused before `import torch` (seconds, docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...cli_args import check_fields
from ...errors import ConceptEraseError
from . import DIGITS, digit_index

# The architectures `train.py` builds (`model.BUILDERS` is keyed by these names).
TRAIN_FAMILIES = ("sd1", "sdxl", "flux")


@dataclass
class MiniSDTrainConfig:
    seed: int = field(default=0, metadata={
        "help": "seed for the initial weights, batches, noise and timesteps", "seed": True})
    vae_steps: int = field(default=600, metadata={"help": "VAE optimisation steps", "min": 1})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE Adam learning rate", "above": 0})
    kl_weight: float = field(default=1e-5, metadata={"help": "weight of the VAE's KL term", "min": 0})
    unet_steps: int = field(default=2000, metadata={"help": "UNet optimisation steps", "min": 1})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet AdamW peak learning rate", "above": 0})
    warmup_steps: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps", "min": 0})
    batch_size: int = field(default=64, metadata={"help": "images per step (VAE and UNet)", "min": 1})
    empty_prompt_rate: float = field(default=0.1, metadata={
        "help": "share of empty prompts (classifier-free guidance)", "min": 0, "below": 1})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved UNet weights", "min": 0, "below": 1})
    vae: str = field(default="", metadata={"help": "reuse the trained VAE of this diffusers folder ('minisd': the "
                                                   "shipped MiniSD's; same images) instead of training one"})
    family: str = field(default="sd1", metadata={"help": "architecture: sd1 (MiniSD), sdxl (MiniSD-XL: two text "
                                                          "encoders, pooled embedding, size ids) or flux (MiniSD-Flux: "
                                                          "a FLUX transformer trained with rectified flow)",
                                                  "choices": TRAIN_FAMILIES})
    # The never-knew model (docs/PROTOCOLS.md, "The never-knew floor"): retraining without the forget data is
    # unlearning's gold standard; its prompts stay in the text encoder, never paired with an image.
    exclude: str = field(default="", metadata={
        "help": "digits left out of the training data, comma-separated names (seven): a model that never saw "
                "them, neither in the VAE nor in the UNet"})

    def __post_init__(self):
        check_fields(self)
        if self.warmup_steps >= self.unet_steps:
            raise ConceptEraseError(f"--warmup-steps must be < --unet-steps, got {self.warmup_steps}")
        self.excluded()  # a bad digit name is refused before any training

    def excluded(self) -> list[int]:
        """The indices of the --exclude digits (a one-line error names a bad one, or all ten)."""
        names = [n.strip() for n in self.exclude.split(",") if n.strip()]
        out = sorted({digit_index(n) for n in names})
        if len(out) == len(DIGITS):
            raise ConceptEraseError(f"--exclude {self.exclude!r} leaves no digit to train on")
        return out
