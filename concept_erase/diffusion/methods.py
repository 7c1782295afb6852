"""The erasure methods: one object per method, chosen once before the erasure loop (`erase.train_unet`).

A `Method` says
- what it trains: `trainable(unet, family, mask)` gives a `SaliencyMask` over the UNet's parameters (its
  saliency mask, or its layer scope intersected with a user's mask), or None for every weight;
- what data it needs: `forget_data` ("forget": images of the forget prompts; "anchor": images of the
  surrogate (anchor) prompts; "none": prompts only, it samples its own z_t) and `needs_retain` (the
  retain denoising term, i.e. retain images, whenever its alpha > 0);
- its default retain weight `default_alpha` (a preset's alpha applies only to methods whose default has a
  retain term: ESD and CA keep theirs unless the user passes --alpha);
- which method-specific `EraseConfig` fields it reads (`fields`): a field it does not read, set by the user,
  is refused with one line naming the flag and the method (`check_fields`);
- its loss for one step: `loss(unet, forget_batch, retain_batch)` -> (loss, loss_forget, loss_retain).
A closed-form method (UCE) has `closed_form = True` and `edit(pipe, concept, config)` instead of a loop.

Seams for other layers (keep them in these single places):
- the optimizer is built in ONE place: `train_unet` calls `saliency.build_optimizer(unet, trainable, ...)`
  once, on what the method's `trainable` returns (masked: state for the salient entries only);
- each step's (all-reduced) loss and the weights after each step are checked in ONE place,
  `guard.DivergenceGuard` (finite blow-ups too; only checkpoints that passed are kept as good);
- `Method.condition(cond, step, prompts)` may replace the forget conditioning of each step (adversarial prompt
  embeddings: subclass `SalUn`, override `condition`, and `register_method` the subclass under a new name).
"""

from __future__ import annotations

import copy
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConceptEraseError
from .families import Conditioning
from .losses import NoisedBatch, esd_loss, esd_partial_sample, esd_scheduler, noise_batch, salun_loss

# Fields of the erasure loop: read by every method that trains, meaningless for a closed-form edit.
LOOP_FIELDS = frozenset({
    "steps", "batch_size", "lr", "weight_decay", "optimizer", "seed", "gradient_accumulation_steps", "mixed_precision",
    "gradient_checkpointing", "enable_xformers", "checkpointing_steps", "checkpoints_total_limit",
    "checkpoint_dir", "resume", "image_steps", "image_guidance", "resolution", "cache_dir"})
# Fields of the retain term (loss_f + alpha * loss_r); the retain images/prompts only matter when alpha > 0.
RETAIN_FIELDS = frozenset({"alpha", "num_retain_images", "retain_images", "retain_prompts"})
RETAIN_DATA = RETAIN_FIELDS - {"alpha"}
FORGET_IMAGE_FIELDS = frozenset({"num_forget_images", "forget_images"})
MASK_FIELDS = frozenset({"mask", "keep", "mask_scope"})
ESD_FIELDS = frozenset({"esd_eta", "esd_ddim_steps", "esd_start_guidance"})
CA_FIELDS = frozenset({"ca_params"})
UCE_FIELDS = frozenset({"uce_erase_scale", "uce_preserve_scale", "uce_lambda", "retain_prompts"})
CA_PARAMS = ("kv", "unet")


class Method:
    """Base class: see the module docstring. One instance per run, holding the run's config."""

    name: ClassVar[str]
    help: ClassVar[str]
    fields: ClassVar[frozenset[str]]
    default_alpha: ClassVar[float] = 0.0
    forget_data: ClassVar[str] = "forget"      # "forget" | "anchor" | "none"
    needs_surrogate: ClassVar[bool] = True     # a surrogate (target) prompt per forget item
    closed_form: ClassVar[bool] = False
    computes_mask: ClassVar[bool] = False      # without --mask, erase computes the saliency mask first

    def __init__(self, config):
        self.config = config

    # -- what it needs -----------------------------------------------------------------------------------

    @property
    def needs_retain(self) -> bool:
        return not self.closed_form and self.config.alpha > 0

    @classmethod
    def check_fields(cls, given: dict) -> None:
        """Refuse a method-specific field the user set that this method does not read. `given`: field name
        -> value, only the fields the user chose (CLI flags typed, or Python values off their default)."""
        for name, value in given.items():
            if name in ALL_METHOD_FIELDS and name not in cls.fields:
                raise ConceptEraseError(f"{_flag(name)} is not used by --method {cls.name}")
            if (name in RETAIN_DATA and name in cls.fields and not cls.closed_form
                    and (given.get("alpha", cls.default_alpha) or 0) == 0):
                raise ConceptEraseError(f"{_flag(name)} is not used by --method {cls.name} without a retain term "
                                        "(pass --alpha > 0 to add one)")

    # -- what it trains ----------------------------------------------------------------------------------

    def trainable(self, unet: nn.Module, family, mask):
        """The SaliencyMask of the weights that train (None: all of them). Default: the user's mask, if any."""
        return mask

    def _scope(self, unet: nn.Module, keep_name: Callable[[str], bool], mask):
        """Every weight of the parameters `keep_name` selects, narrowed by a user's mask if one is given."""
        from ..saliency import SaliencyMask

        scope = SaliencyMask.from_names(unet, keep_name, concept=self.name)
        if mask is not None:
            mask.check_compatible(unet)
            scope.masks = {n: m & mask.masks.get(n, torch.zeros_like(m)) for n, m in scope.masks.items()}
        return scope

    # -- one step ----------------------------------------------------------------------------------------

    def prepare(self, unet: nn.Module, pipe, frozen_unet: nn.Module | None, device) -> None:
        """Once, before any update (and before a resumed checkpoint is loaded)."""
        if frozen_unet is not None:
            raise ValueError(f"frozen_unet is ESD's reference model; method {self.name!r} does not use one")

    def target_prompts(self, prompts: list[str], surrogates: list[str] | None) -> list[str]:
        """Per forget item, the prompt its target is computed from (`NoisedBatch.target_cond`)."""
        if surrogates is None:
            raise ConceptEraseError(f"method {self.name!r} needs a surrogate prompt for every forget item")
        return surrogates

    def draw(self, gen: torch.Generator) -> dict:
        """Extra random draws of a step's GLOBAL batch, after its noise and timesteps (same on every process)."""
        return {}

    def condition(self, cond: Conditioning, step: int, prompts: list[str]) -> Conditioning:
        """The forget conditioning of this step, of `prompts` (hook: adversarial prompt embeddings). The loop
        sets `self.trained` (`trained.py`: the trained module, which also encodes prompts) before step one."""
        return cond

    def forget_batch(self, model: nn.Module, scheduler, latents: Tensor | None, cond, target_cond, noise: Tensor,
                     timesteps: Tensor, draws: dict) -> NoisedBatch:
        """The forget items of a micro-batch, noised: z_t = q_sample(z, t, eps). `model` is the unwrapped UNet."""
        return noise_batch(scheduler, latents, cond, noise, timesteps, target_cond)

    def loss(self, unet: nn.Module, forget: NoisedBatch, retain: NoisedBatch | None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError


def _flag(name: str) -> str:
    """The command-line flag of EraseConfig field `name` (its own spelling, e.g. --num-inference-steps)."""
    from dataclasses import fields

    from ..cli_args import flag_name
    from .erase import EraseConfig

    by_name = {f.name: f for f in fields(EraseConfig)}
    return flag_name(by_name[name]) if name in by_name else "--" + name.replace("_", "-")


class SalUn(Method):
    name = "salun"
    help = ("SalUn (arXiv 2310.12508): the forget prompt's prediction steered to the surrogate's (stop-gradient), "
            "plus alpha x the retain denoising loss, on the saliency mask's weights")
    fields = LOOP_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS | MASK_FIELDS
    default_alpha = 0.5  # the reference README's class command (docs/ALGORITHMS.md 2); a preset may set its own
    computes_mask = True

    def trainable(self, unet, family, mask):
        if mask is None:
            raise ConceptEraseError("method 'salun' needs a saliency mask (--mask FILE, or let erase compute one)")
        return mask

    def loss(self, unet, forget, retain):
        return salun_loss(unet, forget, retain, self.config.alpha)


class RL(SalUn):
    name = "rl"
    help = "SalUn's objective on every weight (no mask): measures what the mask buys"
    fields = LOOP_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS
    computes_mask = False

    def trainable(self, unet, family, mask):
        if mask is not None:
            raise ConceptEraseError("method 'rl' trains every weight; drop --mask or use --method salun")
        return None


class ESD(Method):
    """ESD (Gandikota et al., ICCV 2023): target eps0(z_t, "") - eta (eps0(z_t, c) - eps0(z_t, "")), eps0 the
    frozen original UNet, z_t from partial DDIM sampling with the model being trained (docs/ALGORITHMS.md 2). It needs
    no images: the forget "data" are its prompts."""

    fields = LOOP_FIELDS | RETAIN_FIELDS | ESD_FIELDS | {"mask"}
    forget_data = "none"
    needs_surrogate = False
    cross_attention: ClassVar[bool]

    def trainable(self, unet, family, mask):
        return self._scope(unet, lambda n: family.is_cross_attention(n) == self.cross_attention, mask)

    def prepare(self, unet, pipe, frozen_unet, device):
        # eps0 is the model BEFORE any update (also before a resumed checkpoint is loaded)
        self.frozen = frozen_unet if frozen_unet is not None else copy.deepcopy(unet)
        self.frozen.requires_grad_(False).eval().to(device)
        self.sampler = esd_scheduler(pipe.scheduler)  # private: set_timesteps mutates it
        self.uncond = None

    def target_prompts(self, prompts, surrogates):
        return [""] * len(prompts)  # the empty prompt: eps0(z_t, "")

    def draw(self, gen):
        return {"stop": int(torch.randint(0, self.config.esd_ddim_steps, (1,), generator=gen))}

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws):
        c = self.config
        z_t, t = esd_partial_sample(model, self.sampler, noise, cond, target_cond, c.esd_ddim_steps, draws["stop"],
                                    c.esd_start_guidance)
        return NoisedBatch(z_t, noise, noise, t, cond, target_cond)

    def loss(self, unet, forget, retain):
        return esd_loss(unet, self.frozen, forget, self.config.esd_eta, retain, self.config.alpha)


class ESDX(ESD):
    name = "esd-x"
    help = "ESD-x: ESD's negative-guidance target on the cross-attention weights only"
    cross_attention = True


class ESDU(ESD):
    name = "esd-u"
    help = "ESD-u: ESD's negative-guidance target on every weight except cross-attention"
    cross_attention = False


class ConceptAblation(Method):
    """Concept Ablation, model-based (Kumari et al., ICCV 2023, Eq. 3): on noised images of the ANCHOR concept,
    the target prompt's prediction is matched to the anchor prompt's, stop-gradient:
    MSE(eps_theta(x_t, c_target), sg(eps_theta(x_t, c_anchor))). Here c_target = the forget prompt and the
    anchor = its surrogate. Trains the cross-attention K/V projections (`ca_params kv`, the paper's cheapest
    variant) or the whole UNet."""

    name = "ca"
    help = ("Concept Ablation (Kumari et al. 2023), model-based: on images of the anchor (surrogate), the forget "
            "prompt's prediction matched to the anchor's (stop-gradient); cross-attention K/V or the whole UNet")
    fields = LOOP_FIELDS | RETAIN_FIELDS | CA_FIELDS | {"mask", "num_forget_images"}
    forget_data = "anchor"

    def trainable(self, unet, family, mask):
        if self.config.ca_params == "unet":
            return mask
        return self._scope(unet, lambda n: family.is_cross_attention(n) and (".to_k." in n or ".to_v." in n), mask)

    def loss(self, unet, forget, retain):
        # The same form as SalUn's forget term (target under no_grad), on anchor images instead of forget images.
        return salun_loss(unet, forget, retain, self.config.alpha)


class UCE(Method):
    """UCE (Gandikota et al., WACV 2024): a closed-form edit of the cross-attention key and value projections
    (see `concept_erase.diffusion.uce`). No images, no loop."""

    name = "uce"
    help = ("UCE (Gandikota et al. 2024): closed-form edit of the cross-attention K/V projections mapping each "
            "forget prompt to its surrogate while keeping the retain prompts; seconds, no images")
    fields = UCE_FIELDS
    closed_form = True
    forget_data = "none"

    def edit(self, pipe, concept, config) -> dict:
        from .uce import uce_edit

        return uce_edit(pipe, concept, erase_scale=config.uce_erase_scale, preserve_scale=config.uce_preserve_scale,
                        ridge=config.uce_lambda)


_METHODS: dict[str, type[Method]] = {m.name: m for m in (SalUn, RL, ESDX, ESDU, ConceptAblation, UCE)}
ALL_METHOD_FIELDS = frozenset().union(*(m.fields for m in _METHODS.values()))


def register_method(cls: type[Method], *, overwrite: bool = False) -> None:
    """Add a method (e.g. an adversarial SalUn) under `cls.name`. Its fields must be EraseConfig fields."""
    if cls.name in _METHODS and not overwrite:
        raise ConceptEraseError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    global ALL_METHOD_FIELDS
    ALL_METHOD_FIELDS = ALL_METHOD_FIELDS | cls.fields


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ConceptEraseError(f"unknown method {name!r} (choose from {', '.join(_METHODS)})")
    return _METHODS[name]
