"""The run config of an erasure (docs/ALGORITHMS.md 2).

`TrainConfig` holds the loop's settings and, inherited from each method's options dataclass
(`methods/options.py`), the method's own; `EraseConfig` adds what the `erase` job reads and writes (the model,
the concept, the data, the outputs). Both resolve the method once (`spec`) and refuse, with one line, a flag the
method does not read; `plan`'s config inherits the same check. Nothing here imports torch: the parsers build
these configs, and every check that needs no tensors runs before torch loads (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ...cli_args import check_fields, flag_name, resume_free
from ...concepts import recipe_default
from ...errors import ConceptEraseError
from ...logs import progress_field
from ...saliency_options import MASTER_WEIGHTS, SCORES
from ..methods import ADVERSARIAL_VARIANTS, ALL_METHOD_FIELDS, METHOD_CHOICES, METHODS, get_method, method_spec
from ..methods.options import OPTIONS
from ..methods.spec import RETAIN_DATA, SAMPLING_FIELDS, MethodSpec
from ..models.families import family_field

MIXED_PRECISION = ("no", "fp16", "bf16")
ERASE_OPTIMIZERS = ("adam", "adam8bit")

@dataclass
class TrainConfig(*OPTIONS):
    """Optimisation settings of the erasure loop (defaults: the reference's, docs/ALGORITHMS.md 2), and the
    options of every method (each defined in its method's module)."""

    method: str = field(default="salun", metadata={
        "help": "; ".join(f"{name}: {METHODS[name].help}" for name in METHOD_CHOICES)
                + " (a --mask narrows esd-x, esd-u and ca)",
        "choices": METHOD_CHOICES})
    steps: int = field(default=100, metadata={"help": "optimizer steps", "min": 1, "resume_free": True,
                                              "default_from": recipe_default})
    batch_size: int = field(default=8, metadata={
        "help": "GLOBAL forget batch per optimizer step (the retain batch has the same size); split evenly "
                "across processes and gradient-accumulation micro-batches", "min": 1, "default_from": recipe_default})
    # lr=1e30 is allowed on purpose: the non-finite-loss guard is what stops it.
    lr: float = field(default=1e-5, metadata={"help": "learning rate (Adam)", "above": 0,
                                              "default_from": recipe_default})
    alpha: float | None = field(default=None, metadata={
        "help": "weight of the retain loss: loss = loss_f + alpha * loss_r (default: the method's own, 0.5 for "
                "salun/rl as the reference README or the preset's recipe; 0 for esd-x/esd-u/ca, which have no "
                "retain term unless asked for)", "min": 0})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay (0: plain Adam, the reference)", "min": 0})
    optimizer: str = field(default="adam", metadata={
        "help": "adam: torch Adam/AdamW (state only for the salient weights under a mask); adam8bit: "
                "bitsandbytes' 8-bit Adam (optional dependency, a quarter of Adam's state)",
        "choices": ERASE_OPTIMIZERS})
    seed: int = field(default=0, metadata={"help": "seed of the data order, noise and timesteps", "seed": True})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step (same global batch, less memory)", "min": 1})
    mixed_precision: str = field(default="no", metadata={
        "help": "accelerate mixed precision (fp16 needs CUDA)", "choices": MIXED_PRECISION})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute UNet activations in the backward pass (less memory, slower)"})
    grad_release: bool = field(default=False, metadata={
        "help": "step each weight in the backward pass as soon as its gradient is complete, so the full gradient "
                "is never held (one process, no gradient accumulation, no fp16)", "resume_free": True})
    master_weights: str = field(default="fp32", metadata={
        "help": "fp32: fp32 weights; salient-fp32: bf16 weights, fp32 copies of the salient entries only; "
                "bf16-stochastic: bf16 weights, the salient update stochastically rounded (both bf16 modes need "
                "--mixed-precision bf16)", "choices": MASTER_WEIGHTS})
    enable_xformers: bool = field(default=False, metadata={
        "help": "xformers memory-efficient attention (CUDA only; PyTorch SDPA is the default)"})
    checkpointing_steps: int = field(default=0, metadata={
        "help": "save checkpoint-<step> every this many steps (0: never)", "min": 0, "resume_free": True})
    checkpoints_total_limit: int = field(default=2, metadata={
        "help": "keep only the newest N checkpoints (0: all)", "min": 0, "resume_free": True})

    def __post_init__(self):
        check_fields(self)
        # What the user chose (values off their default), before the method's own default alpha fills in.
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.default is not MISSING and getattr(self, f.name) != f.default}
        if self.adversarial and self.method not in ADVERSARIAL_VARIANTS.values():
            if self.method not in ADVERSARIAL_VARIANTS:
                raise ConceptEraseError(f"--adversarial works with --method {', '.join(ADVERSARIAL_VARIANTS)}, "
                                        f"not {self.method!r}")
            self.method = ADVERSARIAL_VARIANTS[self.method]  # the variant is a method of its own from here on
        if self.train != "unet":
            if self.method not in ADVERSARIAL_VARIANTS.values():
                raise ConceptEraseError(f"--train {self.train} needs --adversarial (AdvUnlearn, with --method salun)")
            if self.gradient_checkpointing:
                raise ConceptEraseError(f"--gradient-checkpointing is for the UNet, not --train {self.train}")
        # THE place a run resolves its method's name; everything after asks `spec` or the method object
        self.spec: type[MethodSpec] = method_spec(self.method)
        self.spec.check_fields(given, self.flag, ALL_METHOD_FIELDS)
        if self.alpha is None:
            self.alpha = self.spec.default_alpha

    @property
    def method_class(self):
        """The class that runs the method (its module imports torch; `spec` holds the same facts without)."""
        return get_method(self.method)

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of field `name` (its own spelling, e.g. --num-inference-steps)."""
        by_name = {f.name: f for f in fields(cls)}
        return flag_name(by_name[name]) if name in by_name else "--" + name.replace("_", "-")

    def build_method(self):
        """The method object of this run, a `methods.base.Method` (build it once and pass it on)."""
        return self.method_class(self)

    def check_launch(self, num_processes: int) -> None:
        """What depends on this machine and launch, checked before any expensive work (and again by
        `train_unet` for direct callers)."""
        import os

        import torch  # here, at run time: this module imports none for the parsers that build the config

        from ...saliency import optimizer_class

        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
            # accelerate would silently run plain data parallel on CPU instead (README, "Several GPUs")
            raise ConceptEraseError(
                "the accelerate config selects DeepSpeed (distributed_type: DEEPSPEED, ZeRO stage "
                f"{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}), which needs a CUDA GPU; on CPU "
                "use configs/accelerate/fsdp.yaml")
        if self.enable_xformers and not torch.cuda.is_available():
            raise ConceptEraseError("--enable-xformers needs a CUDA GPU (xformers has no CPU kernels); "
                                    "PyTorch SDPA attention is used by default")
        optimizer_class(self.optimizer)  # bitsandbytes for adam8bit: a clear error now, not after the mask pass
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConceptEraseError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
        if self.master_weights != "fp32" and self.mixed_precision != "bf16":
            raise ConceptEraseError(f"--master-weights {self.master_weights} keeps the weights in bf16: it needs "
                                    f"--mixed-precision bf16, not {self.mixed_precision}")
        if self.grad_release and (self.gradient_accumulation_steps > 1 or num_processes > 1
                                  or self.mixed_precision == "fp16"):
            raise ConceptEraseError(
                "--grad-release steps each weight during the backward pass, so it needs one micro-batch "
                f"(--gradient-accumulation-steps {self.gradient_accumulation_steps}), one process (got "
                f"{num_processes}: data parallel averages gradients after the hooks) and no fp16 loss scaling")
        if self.train != "unet" and num_processes > 1:
            raise ConceptEraseError(f"--train {self.train} runs in one process (got {num_processes})")
        self.check_batch(num_processes)

    def check_batch(self, num_processes: int) -> None:
        """The global batch splits evenly over processes and micro-batches (`plan` asks it for one process)."""
        if self.batch_size % (num_processes * self.gradient_accumulation_steps):
            raise ConceptEraseError(
                f"batch_size {self.batch_size} must be divisible by processes x gradient_accumulation_steps "
                f"= {num_processes} x {self.gradient_accumulation_steps}")

    def resume_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run that wrote the checkpoint: every field of this
        config (a subclass's too: the model, the concept, the mask settings) except those marked resume_free."""
        free = resume_free(type(self))
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in free}

@dataclass(kw_only=True)
class EraseConfig(TrainConfig):
    """Everything `concept-erase erase` needs. A preset concept's `recipe` supplies defaults for the fields
    the user did not set and the method reads (see `EraseConfig.for_concept`)."""

    model: str = field(metadata={
        "help": 'the model to erase from: a diffusers folder, a .safetensors/.ckpt file, a hub id, "minisd" or '
                '"minisd-xl"'})
    output: str = field(metadata={"help": "output folder: the erased diffusers pipeline, its model card and mask",
                                  "aliases": ("--out",), "resume_free": True})
    model_config: str | None = field(default=None, metadata={
        "help": "local diffusers folder with the component configs of a single-file --model (offline)",
        "flag": "config", "aliases": ("--model-config",)})
    family: str | None = family_field()
    concept: str | None = field(default=None, metadata={
        "help": "a preset concept (nudity, imagenette-<class>, style-<artist>, minisd-...), or several "
                "separated by commas, erased together in one run (groups: imagenette-all, style-all)"})
    concepts_file: str | None = field(default=None, metadata={
        "help": "a file of preset concept names, one per line, erased together in one run"})
    forget: list[str] | None = field(default=None, metadata={
        "help": "custom concept: a forget prompt (repeat the flag for several)", "metavar": "PROMPT"})
    surrogate: list[str] | None = field(default=None, metadata={
        "help": "custom concept: the surrogate prompt (one, or one per --forget)", "metavar": "PROMPT"})
    retain_prompts: str | None = field(default=None, metadata={
        "help": "file of retain prompts, one per line (default: the preset's, or the surrogate)"})
    mask: str | None = field(default=None, metadata={
        "help": "saliency mask file (from `concept-erase mask`); salun computes one when it is not given"})
    keep: float | None = field(default=None, metadata={
        "help": "fraction of UNet weights the computed mask selects (default: the method's: 0.5, the weights "
                "salun trains; scissorhands: the weights it re-initialises)", "above": 0, "max": 1})
    score: str | None = field(default=None, metadata={
        "help": "what ranks the weights of the computed mask: salun (|gradient|), snip (|weight x gradient|, "
                "ScissorHands) or ant (ANT's augmented map) (default: the method's)", "choices": SCORES})
    mask_scope: str | None = field(default=None, metadata={
        "help": "regex on UNet parameter names the computed mask ranks (default: the method's; every "
                "parameter, but scissorhands: the up-blocks' self-attention weights)"})
    num_forget_images: int = field(default=64, metadata={
        "help": "forget images generated by the base model (ca: images of the anchor, i.e. surrogate, prompts; "
                "several presets: the recipe's count times their number)", "min": 1, "default_from": recipe_default})
    num_retain_images: int = field(default=64, metadata={"help": "retain images generated by the base model", "min": 1,
                                                         "default_from": recipe_default})
    forget_images: str | None = field(default=None, metadata={
        "help": "use this folder of forget images instead of generating them (prompts: its manifest.jsonl, "
                "or the first forget prompt)"})
    retain_images: str | None = field(default=None, metadata={
        "help": "use this folder of retain images (e.g. real photos) instead of generating them (prompts: its "
                "manifest.jsonl, or the first retain prompt)"})
    image_steps: int = field(default=25, metadata={
        "help": "denoising steps when generating forget/retain images", "min": 1,
        "flag": "num-inference-steps", "aliases": ("--image-steps",)})
    image_guidance: float = field(default=7.5, metadata={
        "help": "guidance scale when generating them", "min": 0,
        "flag": "guidance-scale", "aliases": ("--image-guidance",)})
    resolution: int | None = field(default=None, metadata={
        "help": "image size in pixels (default: the model's)", "min": 8})
    cache_dir: str | None = field(default=None, metadata={
        "help": "image/latent cache (default: $CONCEPT_ERASE_CACHE or ~/.cache/concept-erase)", "resume_free": True})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "where checkpoint-<step> folders go (default: OUTPUT.checkpoints)", "resume_free": True})
    resume: str | None = field(default=None, metadata={
        "help": 'resume from "latest" (the newest checkpoint in --checkpoint-dir, if any) or a checkpoint folder',
        "resume_free": True})
    export_single_file: str | None = field(default=None, metadata={
        "help": "also write the erased model as one original-layout .safetensors file here", "resume_free": True})
    save_delta: str | None = field(default=None, metadata={
        "help": "also write only the changed UNet weights (+ mask) here, to apply onto the base model",
        "resume_free": True})
    overwrite: bool = field(default=False, metadata={"help": "replace existing outputs", "resume_free": True})
    progress: bool = progress_field()

    def __post_init__(self):
        super().__post_init__()
        self.keep = self.spec.default_keep if self.keep is None else self.keep
        self.score = self.spec.default_score if self.score is None else self.score
        self.mask_scope = self.spec.default_mask_scope if self.mask_scope is None else self.mask_scope
        if self.concept is None and not self.forget and not self.concepts_file:
            raise ConceptEraseError("name a --concept preset (or --concepts-file) or give --forget and --surrogate")
        if self.train != "unet" and self.save_delta:
            raise ConceptEraseError(f"--save-delta writes UNet weights; with --train {self.train} the UNet is unchanged")
        if self.mask_scope is not None:
            try:
                re.compile(self.mask_scope)
            except re.error as err:
                raise ConceptEraseError(f"--mask-scope {self.mask_scope!r} is not a valid regex ({err})") from None

    @classmethod
    def for_concept(cls, **values) -> "EraseConfig":
        """Build a config: the preset concept's recipe first, then `values` (the user's choices) on top.

        The recipe is the reference SalUn recipe of the preset: only the fields the chosen method reads are
        taken from it, and its alpha only for a method whose own default has a retain term (ESD and CA keep
        theirs, 0, unless the user passes alpha)."""
        name = values.get("method", cls.method)
        if values.get("adversarial"):  # --adversarial selects the method's adversarial variant
            name = ADVERSARIAL_VARIANTS.get(name, name)
        method = method_spec(name)  # the recipe is filtered before the config exists; __post_init__ resolves it too
        method.check_fields(values, cls.flag, ALL_METHOD_FIELDS)  # what the user typed, even at a default
        recipe = _concept_set(values).recipe if (values.get("concept") or values.get("concepts_file")) else {}
        names = {f.name for f in fields(cls)}
        recipe = {k: v for k, v in recipe.items()
                  if k in names and (k not in ALL_METHOD_FIELDS or k in method.fields)}
        if method.default_alpha == 0:
            recipe.pop("alpha", None)
        alpha = values.get("alpha", recipe.get("alpha", method.default_alpha))
        if not alpha:
            recipe = {k: v for k, v in recipe.items() if k not in RETAIN_DATA}  # no retain term: no retain images
        if not method.generates_images(alpha or 0):
            recipe = {k: v for k, v in recipe.items() if k not in SAMPLING_FIELDS}
        return cls(**{**recipe, **values})

    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.output}.checkpoints")

    def check_before_load(self, command: str = "erase") -> None:
        """What `command` ("erase" or "mask") can refuse before the model loads, and from the CLI before torch
        does: the places it writes and the image counts (the job checks again, for the Python API)."""
        self._check_destinations(command)
        self._check_image_counts(with_retain=None if command == "erase" else False)
        self._check_model(computes_mask=command == "mask" or (self.spec.computes_mask and not self.mask))

    def _check_model(self, computes_mask: bool) -> None:
        """What the model's configs and safetensors headers say (`models/facts.py`, no weights read): the
        sampling steps against the scheduler's timesteps, --resolution against the VAE's factor, and a --keep
        that keeps a weight of the UNet. The job checks them again on the loaded model (and a hub id only there)."""
        from ...saliency_options import kept_count
        from ..data.generate import check_sampling
        from ..models.facts import model_facts

        facts = model_facts(self.model, self.model_config)
        check_sampling(facts, self.image_steps, self.resolution, self.resolution,
                       size_flags=("--resolution", "--resolution"))
        for name in sorted(self.spec.fields & {"esd_ddim_steps", "ant_ddim_steps"}):  # their partial sampling
            check_sampling(facts, getattr(self, name), steps_flag=self.flag(name))
        total = facts.parameters(self.mask_scope) if computes_mask and self.train == "unet" else None
        if total:
            kept_count(self.keep, total)

    def _check_destinations(self, command: str) -> None:
        """Every place the command writes: free (or --overwrite), of the right kind and suffix, writable, and no
        two the same (hours of training must not end in a refused write). `mask` writes one mask file."""
        from ...io_utils import check_unlocked, check_writable

        if command == "mask":
            check_writable(self.output, self.overwrite, kind="file", suffix=".safetensors", flag="--output")
            return
        places = {"--output": self.output, "--export-single-file": self.export_single_file,
                  "--save-delta": self.save_delta}
        check_writable(self.output, self.overwrite, flag="--output")
        check_unlocked(self.output, "--output")  # another run's (the job takes the lock itself)
        if self.export_single_file:
            check_writable(self.export_single_file, self.overwrite, kind="file", suffix=".safetensors",
                           flag="--export-single-file")
        if self.save_delta:
            check_writable(self.save_delta, self.overwrite, flag="--save-delta")
        if not self.spec.closed_form:  # a closed-form edit writes no checkpoints
            places["--checkpoint-dir"] = self.checkpoints()
            check_writable(self.checkpoints(), flag="--checkpoint-dir", into=True)
        seen: dict[Path, str] = {}
        for flag, path in places.items():
            if path:
                key = Path(path).absolute()
                if key in seen:
                    raise ConceptEraseError(f"{flag} and {seen[key]} are the same path {str(path)!r}")
                seen[key] = flag

    def _check_image_counts(self, with_retain: bool | None) -> None:
        """Each generated image set has at least one image per prompt; the prompts come from the concept and the
        method's spec, not the model. `with_retain` overrides whether a retain set is made."""
        from ..data.images import images_per_prompt

        if not self.spec.generates_images(self.alpha):
            return
        method, concept = self.spec(self), self.get_concept()
        forget_prompts = method.forget_image_prompts(concept)
        if forget_prompts and not self.forget_images:
            images_per_prompt(self.num_forget_images, len(forget_prompts), "--num-forget-images")
        if (method.needs_retain if with_retain is None else with_retain) and not self.retain_images:
            images_per_prompt(self.num_retain_images, len(concept.retain_prompts), "--num-retain-images")

    def get_concept(self):
        """The concept to erase: one preset or custom concept, or several presets as one `Concept` whose
        `members` are the individual concepts (see `concepts.combine_concepts`)."""
        return _concept_set(vars(self))


def _concept_set(values: dict):
    from ...concepts import get_concepts

    return get_concepts(values.get("concept"), concepts_file=values.get("concepts_file"),
                        forget=values.get("forget"), surrogate=values.get("surrogate"),
                        retain_prompts=values.get("retain_prompts"))
