"""What every erasure method declares to the run config, with no torch: the field groups of the run config a
method may read, and `MethodSpec`, the base of each method's spec in `options.py` (its name, help, fields,
defaults and checks; docs/ALGORITHMS.md 2)."""

from __future__ import annotations

from typing import Callable, ClassVar

from ...errors import ConceptEraseError

# ----------------------------------------------------------------------------------------------------------
# The field groups of the run config a method may read (training/config.py)
# ----------------------------------------------------------------------------------------------------------

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


class MethodSpec:
    """What a method is before it runs. Class attributes: the registry's facts; an instance (built with the run
    config, as the running `Method` is) also says which prompts its data come from, so image counts are checked
    before any model loads."""

    name: ClassVar[str]
    help: ClassVar[str]
    fields: ClassVar[frozenset[str]]
    default_alpha: ClassVar[float] = 0.0
    needs_surrogate: ClassVar[bool] = True     # a surrogate (target) prompt per forget item
    closed_form: ClassVar[bool] = False
    computes_mask: ClassVar[bool] = False      # without --mask, erase computes the saliency mask first
    default_keep: ClassVar[float] = 0.5        # --keep when not given: the computed mask's fraction
    default_score: ClassVar[str] = "salun"     # --score when not given: what ranks the weights (saliency_options.SCORES)
    default_mask_scope: ClassVar[str | None] = None  # --mask-scope when not given (None: every weight)
    samples_latents: ClassVar[bool] = False    # it makes its own z_t (no forget images; plan: a no-grad phase)
    frozen_copy: ClassVar[bool] = False        # it keeps a frozen copy of the original UNet (plan counts it)
    transformer_form: ClassVar[bool] = False   # it runs on diffusion transformers (SD 3, FLUX: Family.check_method)

    def __init__(self, config):
        self.config = config

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

    def forget_image_prompts(self, concept) -> list[str]:
        """The prompts its forget images are generated from (checked for counts before any image is made)."""
        return list(concept.forget_prompts)


def unused_outputs(cls, given: dict, flag: Callable[[str], str], names: tuple[str, ...], why: str) -> None:
    """A method that changes no UNet weight refuses the outputs made of them."""
    for name in names:
        if given.get(name):
            raise ConceptEraseError(f"{flag(name)} is not used by --method {cls.name}: {why}")
