"""What an erasure method is: one object per run, built once from the run's config, that owns everything
method-specific (docs/ALGORITHMS.md 2). The training loop (`training/loop.py`), the job (`training/job.py`)
and `plan` ask it and never test its name.

A `Method` says
- which fields of the run config it reads (`fields`): the shared groups below plus its own options dataclass,
  defined in its own module; a field it does not read, set by the user, is refused with one line naming the
  flag and the method (`check_fields`, called by the run config for `erase` and `plan` alike);
- what data it needs (`forget_set`: images of the forget prompts, images of the anchors paired with forget
  prompts, or prompts only; `needs_retain`: the retain denoising term, whenever its alpha > 0);
- what it trains: `trainable(module, family, mask)` gives a `SaliencyMask` over the trained module's
  parameters (its saliency mask, or its layer scope narrowed by a user's mask), or None for every weight;
- its loss for one step: `loss(unet, forget_batch, retain_batch)` -> (loss, loss_forget, loss_retain);
- or, for a closed-form method (UCE), `edit(pipe, concept)` instead of a loop.

Seams kept in single places elsewhere: the optimizer is built once by the loop from `trainable`
(`saliency.build_optimizer`: state for the salient entries only), and each step's loss and weights are checked
by `training/guard.py`.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ..losses import NoisedBatch, noise_batch

# Fields of the erasure loop: read by every method that trains, meaningless for a closed-form edit.
LOOP_FIELDS = frozenset({
    "steps", "batch_size", "lr", "weight_decay", "optimizer", "seed", "gradient_accumulation_steps", "mixed_precision",
    "gradient_checkpointing", "enable_xformers", "checkpointing_steps", "checkpoints_total_limit",
    "checkpoint_dir", "resume", "resolution", "cache_dir"})
# How the forget/retain images are sampled: read only by a method that generates images.
SAMPLING_FIELDS = frozenset({"image_steps", "image_guidance"})
# Fields of the retain term (loss_f + alpha * loss_r); the retain images/prompts only matter when alpha > 0.
RETAIN_FIELDS = frozenset({"alpha", "num_retain_images", "retain_images", "retain_prompts"})
RETAIN_DATA = RETAIN_FIELDS - {"alpha"}
FORGET_IMAGE_FIELDS = frozenset({"num_forget_images", "forget_images"})
# The saliency mask a method computes or is given (docs/ALGORITHMS.md 1).
SALIENCY_FIELDS = frozenset({"mask", "keep", "mask_scope", "score"})


def option_names(options: type) -> frozenset[str]:
    """The field names of a method's options dataclass."""
    return frozenset(options.__dataclass_fields__)


class Method:
    """Base class: see the module docstring. One instance per run, holding the run's config."""

    name: ClassVar[str]
    help: ClassVar[str]
    fields: ClassVar[frozenset[str]]
    default_alpha: ClassVar[float] = 0.0
    needs_surrogate: ClassVar[bool] = True     # a surrogate (target) prompt per forget item
    closed_form: ClassVar[bool] = False
    computes_mask: ClassVar[bool] = False      # without --mask, erase computes the saliency mask first
    default_keep: ClassVar[float] = 0.5        # --keep when not given: the computed mask's fraction
    default_score: ClassVar[str] = "salun"     # --score when not given: what ranks the weights (saliency.SCORES)
    samples_latents: ClassVar[bool] = False    # it makes its own z_t (no forget images; plan: a no-grad phase)
    frozen_copy: ClassVar[bool] = False        # it keeps a frozen copy of the original UNet (plan counts it)
    transformer_form: ClassVar[bool] = False   # it runs on diffusion transformers (SD 3, FLUX: Family.check_method)

    def __init__(self, config):
        self.config = config

    # -- what it reads and needs -------------------------------------------------------------------------

    @property
    def needs_retain(self) -> bool:
        return not self.closed_form and self.config.alpha > 0

    @classmethod
    def generates_images(cls, alpha: float) -> bool:
        """Whether a run with this retain weight samples images from the base model."""
        return not cls.closed_form and (not cls.samples_latents or alpha > 0)

    @classmethod
    def check_fields(cls, given: dict, flag: Callable[[str], str], all_fields: frozenset[str]) -> None:
        """Refuse a method field the user set that this method does not read. `given`: field name -> value,
        only the fields the user chose; `flag`: a field's command-line spelling; `all_fields`: every field
        some method reads (the others are the run's own: model, output, ...)."""
        alpha = given.get("alpha", cls.default_alpha) or 0
        for name in given:
            if name in all_fields and name not in cls.fields:
                raise ConceptEraseError(f"{flag(name)} is not used by --method {cls.name}")
            without_retain = name in RETAIN_DATA and not cls.closed_form
            without_images = name in SAMPLING_FIELDS and not cls.generates_images(alpha)
            if alpha == 0 and (without_retain or without_images):
                raise ConceptEraseError(f"{flag(name)} is not used by --method {cls.name} without a retain term "
                                        "(pass --alpha > 0 to add one)")

    def forget_set(self, concept, images):
        """The forget items this method trains on, as a `LatentSet` (`images`: a `data.latents.ImageSource`).
        Default: images of the forget prompts (or the user's folder), each with its surrogate prompt."""
        from ..data.latents import LatentSet

        c = self.config
        found = (images.from_folder(c.forget_images, concept.forget_prompts[0]) if c.forget_images
                 else images.generated(concept.forget_prompts, c.num_forget_images, "forget images"))
        return LatentSet(images.encoded(found), found.prompts, [concept.surrogate_for(p) for p in found.prompts])

    def check_pipeline(self, pipe) -> None:
        """Refuse, before any image is generated, a setting of this method the pipeline cannot run."""

    def forget_image_prompts(self, concept) -> list[str]:
        """The prompts its forget images are generated from (checked for counts before any image is made)."""
        return list(concept.forget_prompts)

    # -- what it trains ----------------------------------------------------------------------------------

    def trainable(self, module: nn.Module, family, mask):
        """The SaliencyMask of the weights that train (None: all of them). Default: the user's mask, if any."""
        return mask

    def _scope(self, unet: nn.Module, keep_name: Callable[[str], bool], mask):
        """Every weight of the parameters `keep_name` selects, narrowed by a user's mask if one is given."""
        from ...saliency import SaliencyMask

        scope = SaliencyMask.from_names(unet, keep_name, concept=self.name)
        if mask is not None:
            mask.check_compatible(unet)
            scope.masks = {n: m & mask.masks.get(n, torch.zeros_like(m)) for n, m in scope.masks.items()}
        return scope

    # -- one step ----------------------------------------------------------------------------------------

    def prepare(self, trained, pipe, device) -> None:
        """Once, before any update (and before a resumed checkpoint is loaded). `trained`: the run's trained
        module (`training/trained.py`), which also encodes prompts."""

    def target_prompts(self, prompts: list[str], surrogates: list[str] | None) -> list[str]:
        """Per forget item, the prompt its target is computed from (`NoisedBatch.target_cond`)."""
        if surrogates is None:
            raise ConceptEraseError(f"method {self.name!r} needs a surrogate prompt for every forget item")
        return surrogates

    def draw(self, gen: torch.Generator) -> dict:
        """Extra random draws of a step's GLOBAL batch, after its noise and timesteps (same on every process)."""
        return {}

    def forget_batch(self, model: nn.Module, scheduler, latents: Tensor | None, cond, target_cond, noise: Tensor,
                     timesteps: Tensor, draws: dict, *, step: int | None = None,
                     prompts: list[str] | None = None) -> NoisedBatch:
        """The forget items of a micro-batch, noised: z_t = q_sample(z, t, eps). `model` is the unwrapped UNet;
        `step` and `prompts` are given inside the loop (None: a measurement after training)."""
        return noise_batch(scheduler, latents, cond, noise, timesteps, target_cond)

    def loss(self, unet: nn.Module, forget: NoisedBatch, retain: NoisedBatch | None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def card_entries(self, summary: dict) -> dict:
        """What the model card records of how this method ran (`summary`: the job's)."""
        c = self.config
        return {"steps": summary["steps"],
                "training": {"trained": summary["trained"], "lr": c.lr, "alpha": c.alpha, "batch_size": c.batch_size,
                             "seed": c.seed, "forget_images": summary["forget_images"],
                             "retain_images": summary["retain_images"]}}

    def edit(self, pipe, concept) -> dict:
        """A closed-form method's edit of `pipe` in place; returns its report."""
        raise NotImplementedError

    def write_files(self, folder) -> None:
        """Files this method adds to the output folder beside the pipeline (SAFREE: its safree.json)."""
