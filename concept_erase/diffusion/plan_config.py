"""What `concept-erase plan` is asked, without torch: its config (`PlanConfig`: erase's memory-deciding flags, where
the run goes, the budget), the budget's units, the launch rules it shares with erase, and the checks erase makes
before the model loads. The parser builds this config and `check_like_erase` runs before `plan.py` (the
estimate, on PyTorch's meta device) is imported, so a bad flag is refused before `import torch` (seconds,
docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from ..errors import ConceptEraseError
from .training.config import TrainConfig

SHARDING = ("none", "fsdp", "zero2", "zero3")


@dataclass(kw_only=True)
class PlanConfig(TrainConfig):
    """What the memory of an erasure run depends on: the model and the training settings. `for_concept` builds
    it as erase builds its run (a preset's recipe under the user's flags)."""

    model: str = field(default="minisd", metadata={
        "help": 'the model: a diffusers folder (configs are enough, weights are not read), "minisd", "minisd-xl", '
                "or a single file with --config"})
    model_config: str | None = field(default=None, metadata={
        "help": "local diffusers folder with the component configs of a single-file --model",
        "flag": "config", "aliases": ("--model-config",)})
    concept: str | None = field(default=None, metadata={
        "help": "the preset concept erase will be given (or several, separated by commas): its recipe's batch "
                "size, image counts and alpha apply where no flag says otherwise, as in erase"})
    keep: float = field(default=0.5, metadata={"help": "SalUn: fraction of UNet weights the mask keeps trainable",
                                                "above": 0, "max": 1})
    mask: str | None = field(default=None, metadata={
        "help": "the saliency mask file erase will be given (SalUn then has no mask pass; the file is not read)"})
    num_forget_images: int = field(default=64, metadata={
        "help": "forget images of the mask pass (erase's default: 64)", "min": 1})
    resolution: int | None = field(default=None, metadata={"help": "image size in pixels (default: the model's)",
                                                           "min": 8})
    device: str | None = field(default=None, metadata={
        "help": "plan for a GPU run (cuda) or a CPU run (cpu: host memory, the bool mask included); default: the "
                "device erase would use here, cuda when PyTorch sees a CUDA GPU, else cpu",
        "choices": ("cuda", "cpu")})
    num_processes: int = field(default=1, metadata={
        "help": "processes (GPUs) of the accelerate launch, each taking batch / N; with --sharding each holds 1/N "
                "of what its engine shards", "min": 1})
    sharding: str = field(default="none", metadata={
        "help": "the engine the accelerate launch config selects (configs/accelerate/): none (one process or DDP: "
                "everything on every GPU), fsdp (FULL_SHARD: weights, gradients, optimizer state), zero2 (DeepSpeed: "
                "gradients, optimizer state) or zero3 (DeepSpeed: all three)", "choices": SHARDING})
    offload_optimizer: bool = field(default=False, metadata={
        "help": "the optimizer state in host memory (DeepSpeed ZeRO's CPU offload: --sharding zero2 or zero3)"})
    memory_budget: str | None = field(default=None, metadata={
        "help": 'memory available, e.g. "16GB" (10^9 bytes) or "24GiB"; says whether the run fits and which '
                "settings would make it fit"})

    def __post_init__(self):
        super().__post_init__()
        self.check_batch(self.num_processes)  # erase's own check (with its processes, at launch)
        if self.offload_optimizer and self.sharding not in ("zero2", "zero3"):
            raise ConceptEraseError(f"--offload-optimizer is DeepSpeed ZeRO's: it needs --sharding zero2 or zero3, "
                                    f"not {self.sharding}")
        if not runnable(vars(self)):  # what erase's launch check refuses (`TrainConfig.check_launch`)
            raise ConceptEraseError(f"--master-weights {self.master_weights} needs --mixed-precision bf16, and "
                                    "--grad-release one micro-batch, one process and no fp16 (erase refuses them)")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)

    def on_device(self) -> "PlanConfig":
        """Choose --device, when not given, as erase's accelerate run does: the GPU when PyTorch sees one (no
        CUDA context made). Imports torch, so the estimate asks it, after the checks; returns this config."""
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return self

    @classmethod
    def for_concept(cls, **values) -> "PlanConfig":
        """The plan of the run erase would make from these flags: with a --concept preset, the settings come from
        the `EraseConfig` that erase builds (`EraseConfig.for_concept`: the recipe's fields the method reads,
        the user's flags on top), so a MiniSD preset plans its batch 16, not the dataclass's 8."""
        if not values.get("concept"):
            return cls(**values)
        from .training.config import EraseConfig

        shared = {f.name for f in fields(EraseConfig) if f.init} & {f.name for f in fields(cls) if f.init}
        typed = {"model": cls.model, **{k: v for k, v in values.items() if k in shared}}
        erase = EraseConfig.for_concept(output="", **typed)
        return cls(**{**{k: getattr(erase, k) for k in shared}, **values})


def parse_bytes(text: str) -> int:
    """ "16GB" -> 16 * 10^9, "24GiB" -> 24 * 2^30 (also B, KB/KiB, MB/MiB, TB/TiB). The unit is required: a
    bare "0.4" could mean bytes or GB, and read as bytes it would be a budget nothing fits."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?))?B\s*", str(text), flags=re.I)
    size = 0
    if m:
        power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
        size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if size < 1:
        raise ConceptEraseError(f"--memory-budget {text!r} is not a size with its unit, like 16GB or 24GiB")
    return size


def runnable(values: dict) -> bool:
    """The loop's own rules on these settings (`TrainConfig.check_launch`)."""
    if values["master_weights"] != "fp32" and values["mixed_precision"] != "bf16":  # bf16 weights: bf16 autocast
        return False
    return not values["grad_release"] or (values["gradient_accumulation_steps"] == 1
                                          and values["num_processes"] == 1 and values["mixed_precision"] != "fp16")


def check_like_erase(config: PlanConfig) -> None:
    """What erase checks before the model loads, here before torch does (`plan.check_built` checks again on the
    meta-device build, and alone for what the files do not say): a preset for this kind of model
    (`defaults.check_concept_fits`), --resolution near the size the model draws (`defaults.check_resolution`)
    and a multiple of the VAE's factor (`generate.check_sampling`), and a --keep that keeps a weight of the UNet
    (`saliency_options.kept_count`), from the model's configs and safetensors headers (`models/facts.py`)."""
    from ..concepts import get_concepts
    from ..saliency_options import kept_count
    from .data.generate import check_sampling
    from .models.defaults import check_concept_fits, check_resolution, model_defaults
    from .models.facts import model_facts

    defaults = model_defaults(config.model, config.model_config)
    if config.concept:  # a preset for the other world (Stable Diffusion's nudity on MiniSD), as erase refuses it
        check_concept_fits(get_concepts(config.concept), defaults)
    check_resolution(config.resolution, defaults)
    facts = model_facts(config.model, config.model_config)
    check_sampling(facts, None, config.resolution, config.resolution, size_flags=("--resolution",) * 2)
    total = facts.parameters() if config.spec.computes_mask and not config.mask else None
    if total:
        kept_count(config.keep, total)
