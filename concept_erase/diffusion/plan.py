"""`concept-erase plan`: the peak memory of an erasure run, estimated before anything runs.

Nothing is loaded or computed: every component of the pipeline is built from its config on PyTorch's meta
device (shapes and dtypes, no storage), which gives the exact parameter counts, and the UNet's forward pass is
run there once with a hook on what autograd saves for the backward pass, which gives the exact activation
memory of this architecture at this batch and resolution. The estimate then follows the run's timeline:

- the mask pass (SalUn without --mask): fp32 weights, the fp32 gradients it accumulates (they become the
  scores), and the guided saliency loss's activations (the UNet runs on the conditional and the unconditional
  micro-batch, so twice the micro-batch);
- a training step: the fp32 master UNet (on a GPU the loop parks the text encoders and the VAE on the CPU;
  on a CPU run they count), the frozen original UNet (ESD), optimizer state
  (Adam: 8 bytes per trainable entry; 8-bit Adam: about 2; under a SalUn mask only the salient entries have
  state, plus a 4-byte index per salient entry; a layer scope such as ESD-x's cross-attention is a bool per UNet
  weight, held all run), and during the backward pass the activations not yet
  consumed plus the gradients already made (walked in the forward's order, position by position);
- ESD's sampling: its z_t and target come from UNet forwards under no_grad (cond + uncond), whose peak is the
  skip connections still live plus the running op's tensors (counted op by op on the meta device).

Attention is counted as the fused SDPA / xformers kernels store it (queries, keys, values, output and the
log-sum-exp; never the full attention matrix). Gradient checkpointing keeps the inputs of each checkpointed
block and recomputes one block at a time. Mixed precision is traced in half precision plus the half-precision
copies of the trainable weights that autocast keeps for the backward pass: an approximation (autocast runs
normalisations in fp32). On a GPU the figure is tensor memory, what `torch.cuda.max_memory_allocated`
reports; the CUDA context and the allocator's cache come on top, so the budget check keeps a reserve.

A CPU run's resident memory is those tensors plus the process itself: Python, PyTorch, diffusers,
transformers and accelerate with the model's classes imported, and the tokenizers (about half a GiB, more
than the tensors of a small model). That part is not estimated but measured: `run_plan` imports the same
libraries and classes, loads the tokenizers, and reads its own resident memory.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..errors import ConceptEraseError
from .memory import ModelCounts, backward_peak, load_counts, measure_process, no_grad_peak
from .training.config import TrainConfig
from .training.mask_pass import mask_batch

GiB = 2**30
# CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack, beyond allocated tensors.
CUDA_RESERVE = 1 * GiB
# bitsandbytes' 8-bit Adam: two uint8 states, a float32 absmax per 256-entry block for each; tensors under
# 4096 entries keep 32-bit states (its min_8bit_size).
BNB_BLOCK, BNB_MIN_SIZE = 256, 4096


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
    memory_budget: str | None = field(default=None, metadata={
        "help": 'memory available, e.g. "16GB" (10^9 bytes) or "24GiB"; says whether the run fits and which '
                "settings would make it fit"})

    def __post_init__(self):
        if self.device is None:  # as erase's accelerate run: the GPU when there is one (no CUDA context made)
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__post_init__()
        self.check_batch(1)  # erase's own check (with its processes, at launch)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)

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


# ------------------------------------------------------------------------------------------ the model


# ------------------------------------------------------------------------------------------ the estimate

@dataclass
class Plan:
    """The estimate of one configuration: bytes per part at the peak of each phase."""

    config: PlanConfig
    components: dict[str, int]
    phases: dict[str, dict[str, int]]   # phase -> part -> bytes
    host: dict[str, int]                # what stays in host memory on a GPU run (the bool mask)
    process: int = 0                    # the process itself, measured (`measure_process`); 0: not measured

    @property
    def peak(self) -> int:
        """Tensor memory at the peak phase."""
        return max(sum(parts.values()) for parts in self.phases.values())

    @property
    def resident(self) -> int:
        """What the run needs of the device's memory: on a CPU the tensors plus the process itself (its peak
        resident set), on a GPU the tensors plus the reserve for the CUDA context and allocator."""
        return self.peak + (CUDA_RESERVE if self.config.device == "cuda" else self.process)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    def fits(self, budget: int) -> bool:
        return self.resident <= budget


def _trainable_names(method, named: dict[str, nn.Parameter], family) -> tuple[set[str], bool]:
    """The UNet parameters the method trains (without a user's mask), asked of the method itself on a stand-in
    that has the UNet's parameter names and one entry each; and whether the method gives a layer scope (ESD,
    Concept Ablation's K/V): the loop then holds that scope as a bool mask over every UNet weight."""

    class Names:
        def named_parameters(self):
            return ((name, torch.zeros(1)) for name in named)

    scope = method.trainable(Names(), family, None)
    if scope is None:
        return set(named), False
    return {name for name, m in scope.masks.items() if bool(m.any())}, True


def _optimizer_state(numels: list[int], kind: str) -> int:
    if kind == "adam8bit":
        return sum(2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) if n >= BNB_MIN_SIZE else 8 * n for n in numels)
    return sum(8 * n for n in numels)


def estimate(config: PlanConfig, counts: ModelCounts | None = None) -> Plan:
    """The peak memory of `concept-erase erase` with these settings (see the module docstring)."""
    counts = counts or load_counts(config.model, config.model_config)
    unet = counts.unet
    resolution = config.resolution or counts.default_resolution
    latent = max(1, resolution // counts.vae_scale)
    micro = max(1, config.batch_size // config.gradient_accumulation_steps)
    half = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
    denoiser = counts.family.denoiser_name  # the UNet, or a diffusion transformer (SD 3, FLUX)
    n_unet = counts.components[denoiser]
    others = sum(n for name, n in counts.components.items() if name != denoiser)
    named = dict(unet.named_parameters())
    method = config.build_method()
    counts.family.check_method(method)  # as erase: a method with no form for a transformer is refused
    if method.closed_form:
        raise ConceptEraseError(f"--method {config.method} is a closed-form edit with no training loop: its memory "
                                "is the pipeline's weights plus a few matrices per layer; plan covers the training "
                                "methods")

    # which UNet weights train, and how many entries of each (a SalUn mask: `keep` of every tensor, on average)
    masked = method.computes_mask
    trainable, scoped = (set(named), False) if masked else _trainable_names(method, named, counts.family)
    entries = [round(config.keep * named[n].numel()) if masked else named[n].numel() for n in trainable]
    grad_bytes = {id(named[n]): 4 * named[n].numel() for n in trainable}

    if config.device == "cuda":  # the loop parks the text encoders and the VAE on the CPU while it trains
        weights = {"weights (fp32 UNet master)": 4 * n_unet}
        host = {"text encoders + VAE (parked while training)": 4 * others}
    else:
        weights = {"weights (fp32: UNet master + text encoders + VAE)": 4 * (n_unet + others)}
        host = {}
    if method.frozen_copy:
        weights["frozen original UNet (ESD)"] = 4 * n_unet
    state = {"optimizer state": _optimizer_state(entries, config.optimizer)}
    if masked:
        state["mask indices (int32 per salient entry)"] = 4 * sum(entries)
    if masked and config.device == "cpu":
        state["mask (bool, 1 byte per UNet weight)"] = n_unet
    elif masked:
        host["mask (bool, 1 byte per UNet weight)"] = n_unet
    # A layer scope is a SaliencyMask too (`SaliencyMask.from_names`: a bool per UNet weight, True in the
    # trained layers), built on the host and held for the whole run; its tensors are stepped whole (no indices).
    if scoped and config.device == "cpu":
        state["layer scope (bool, 1 byte per UNet weight)"] = n_unet
    elif scoped:
        host["layer scope (bool, 1 byte per UNet weight)"] = n_unet

    rows = 2 * micro if config.alpha > 0 else micro  # the forget (+ retain) batch of one UNet forward
    acts = counts.activations(rows, latent, half, config.gradient_checkpointing, trainable)
    autocast_copies = 2 * sum(named[n].numel() for n in trainable) if half != torch.float32 else 0
    first = backward_peak(acts, grad_bytes, grads_exist=False)
    later = backward_peak(acts, grad_bytes, grads_exist=True) if config.gradient_accumulation_steps > 1 else 0
    train = {**weights, **state,
             "activations + gradients during backward": max(first, later) + 2 * acts.largest,
             **({"half-precision weight copies (autocast)": autocast_copies} if autocast_copies else {})}
    phases = {"training step": train}
    # The optimizer step: every gradient, then (masked) the packed values and gradients of the salient entries
    # while the full gradients are let go; on CUDA torch's foreach Adam adds one temporary per state entry.
    k = sum(entries)
    foreach = 4 * k if config.device == "cuda" and config.optimizer == "adam" else 0
    grads = sum(grad_bytes.values())
    phases["optimizer step"] = {**weights, **state,
                                "gradients and step temporaries": max(grads, 8 * k + foreach) if masked else grads + foreach}

    if method.samples_latents:
        # ESD's z_t (partial DDIM sampling with the model being trained) and its target (the frozen UNet) come
        # from forwards under no_grad with classifier-free guidance (cond + uncond: twice the micro-batch),
        # before the training forward; under gradient accumulation later micro-batches sample while the
        # gradients exist. Nothing is saved for a backward pass: the peak is the live skip connections.
        key = ("no grad", 2 * micro, latent, half)
        if key not in counts.traces:
            counts.traces[key] = no_grad_peak(unet, 2 * micro, latent, half)
        phases["sampling (no grad)"] = {
            **weights, **state, "no-grad forward (skip connections + the running op)": counts.traces[key],
            **({"gradients (accumulating)": grads} if config.gradient_accumulation_steps > 1 else {})}

    if masked and not config.mask:
        # The mask pass: the guided loss on cond + uncond, fp32, every weight; its gradients become the scores.
        # It honours gradient checkpointing (the recomputation gives the same gradients). The first batch's
        # backward makes the gradients as it goes; later batches add to gradients that are all there.
        all_grads = {id(p): 4 * p.numel() for p in unet.parameters()}
        first_batch = min(config.num_forget_images, mask_batch(config))

        def pass_peak(rows: int, grads_exist: bool) -> int:
            guided = counts.activations(2 * rows, latent, torch.float32, config.gradient_checkpointing, set(named))
            return backward_peak(guided, all_grads, grads_exist) + 2 * guided.largest

        scores_peak = pass_peak(first_batch, grads_exist=False)
        if config.num_forget_images > first_batch:
            scores_peak = max(scores_peak, pass_peak(first_batch, grads_exist=True))
        largest = max(p.numel() for p in unet.parameters())
        phases["mask pass"] = {
            "weights (fp32: UNet + text encoders + VAE)": 4 * (n_unet + others),
            "activations + gradients (the scores) during backward": scores_peak,
            "threshold temporaries (largest tensor)": 12 * largest,
            **({"mask (bool)": n_unet} if config.device == "cpu" else {})}
    return Plan(config, counts.components, phases, host, counts.process)


def suggestions(config: PlanConfig, budget: int, counts: ModelCounts, limit: int = 3) -> list[tuple[dict, Plan]]:
    """Settings that make the run fit `budget`, fewest changes first, then smallest peak. The global batch
    stays (gradient accumulation splits it), so does the method and its keep ratio."""
    from dataclasses import asdict

    options = {
        "gradient_checkpointing": list(dict.fromkeys([config.gradient_checkpointing, True])),
        "mixed_precision": [config.mixed_precision] + (["bf16"] if config.mixed_precision == "no" else []),
        "optimizer": list(dict.fromkeys([config.optimizer, "adam8bit"])),
        "gradient_accumulation_steps": [config.gradient_accumulation_steps] + [
            g for g in (2, 4, 8, 16) if g > config.gradient_accumulation_steps and config.batch_size % g == 0],
    }
    base = asdict(config)
    found = []
    for combo in itertools.product(*options.values()):
        change = {k: v for k, v in zip(options, combo) if v != base[k]}
        if not change:
            continue
        plan = estimate(PlanConfig(**{**base, **change}), counts)
        if plan.fits(budget):
            found.append((len(change), plan.peak, change, plan))
    found.sort(key=lambda f: (f[0], f[1]))
    return [(change, plan) for _, _, change, plan in found[:limit]]


def describe(plan: Plan, budget: int | None = None, counts: ModelCounts | None = None) -> str:
    """The plan as the `plan` command prints it."""
    c = plan.config
    gib = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"  # noqa: E731
    resolution = c.resolution or (counts.default_resolution if counts else "model's")
    lines = [f"Memory plan: {c.method} on {c.model}" + (f" for {c.concept}" if c.concept else "")
             + f" ({', '.join(f'{k} {v / 1e6:.4g}M' for k, v in plan.components.items())} "
             f"parameters), {resolution} px, batch {c.batch_size} forget"
             + (f" + {c.batch_size} retain" if c.alpha > 0 else "")
             + f", {c.gradient_accumulation_steps} micro-batch(es); precision {c.mixed_precision} (fp32 master "
             f"weights), gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}, optimizer "
             f"{c.optimizer}" + (f", keep {c.keep}" if c.method_class.computes_mask else "")
             + f"; device {c.device}", ""]
    for phase, parts in plan.phases.items():
        lines.append(f"{phase}: {gib(sum(parts.values()))}" + ("   <- peak" if phase == plan.peak_phase else ""))
        lines += [f"  {name}: {gib(b)}" for name, b in parts.items()]
    for name, b in plan.host.items():
        lines.append(f"host memory during training, not on the GPU: {name}: {gib(b)}")
    what = ("the process itself (Python, PyTorch, the libraries and model classes, the tokenizers; measured in this "
            "process)")
    if c.device == "cuda":
        if plan.process:
            lines.append(f"host memory, not on the GPU: {what}: {gib(plan.process)}")
        lines.append(f"\nestimated peak: {gib(plan.peak)} of tensors (+ about {gib(CUDA_RESERVE)} for the CUDA "
                     "context and allocator)")
    elif plan.process:
        lines.append(f"\nestimated peak: {gib(plan.peak)} of tensors + {gib(plan.process)} for {what} = "
                     f"{gib(plan.resident)} resident")
    else:
        lines.append(f"\nestimated peak: {gib(plan.peak)} of tensors")
    if budget is not None:
        verdict = "fits" if plan.fits(budget) else "does NOT fit"
        lines.append(f"budget {_as_written(c.memory_budget, budget, gib)}: {verdict} (the run needs "
                     f"{gib(plan.resident)})")
        if not plan.fits(budget) and counts is not None:
            fixes = suggestions(c, budget, counts)
            if not fixes:
                lines.append("no combination of gradient checkpointing, bf16, 8-bit Adam and gradient accumulation "
                             "fits; lower --resolution or --batch-size")
            for change, fixed in fixes:
                flags = " ".join(_flag(k, v) for k, v in change.items())
                lines.append(f"  fits with {flags}: {gib(fixed.peak)}")
    return "\n".join(lines)


def _as_written(text: str | None, budget: int, gib) -> str:
    """The budget as the user wrote it and in GiB, every figure of the plan's unit: "16GB" is 14.90 GiB."""
    if not text:
        return gib(budget)
    if re.search(r"[KMGT]iB", text, flags=re.I):
        return f"{text.strip()} ({gib(budget)})"
    return f"{text.strip()} = {gib(budget)} (GB: 10^9 bytes; GiB, the plan's unit: 2^30)"


def _flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"


def check_like_erase(config: PlanConfig) -> None:
    """What erase checks, from the model's config files, before the pipeline is built on the meta device (that
    imports diffusers: seconds): a preset for this kind of model (`defaults.check_concept_fits`), --resolution
    near the size the model draws (`defaults.check_resolution`) and a multiple of 8 (`generate.check_image_size`;
    `check_built` adds the VAE's own factor)."""
    from ..concepts import get_concepts
    from .data.generate import check_image_size
    from .models.defaults import check_concept_fits, check_resolution, model_defaults

    defaults = model_defaults(config.model, config.model_config)
    if config.concept:  # a preset for the other world (Stable Diffusion's nudity on MiniSD), as erase refuses it
        check_concept_fits(get_concepts(config.concept), defaults)
    check_resolution(config.resolution, defaults)
    check_image_size({"--resolution": config.resolution}, 8)


def check_built(config: PlanConfig, counts: ModelCounts) -> None:
    """What erase checks once it has the model, here from the meta-device build: a whole latent grid for the
    VAE's factor (`generate.check_image_size`) and a --keep that keeps at least one weight (`saliency.kept_count`)."""
    from ..saliency import kept_count
    from .data.generate import check_image_size

    check_image_size({"--resolution": config.resolution}, counts.vae_scale)
    if config.method_class.computes_mask and not config.mask:
        kept_count(config.keep, counts.components[counts.family.denoiser_name])


def run_plan(config: PlanConfig) -> tuple[Plan, str]:
    check_like_erase(config)
    counts = load_counts(config.model, config.model_config)
    check_built(config, counts)
    measure_process(counts, config.model, config.model_config)
    plan = estimate(config, counts)
    budget = parse_bytes(config.memory_budget) if config.memory_budget else None
    return plan, describe(plan, budget, counts)


