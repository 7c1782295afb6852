"""What `concept-erase plan` answers for a --memory-budget: the settings that make the run fit, or why none do.

The search tries the memory settings erase has (gradient checkpointing, bf16, 8-bit Adam, gradient release,
bf16 weights, gradient accumulation, a mask made beforehand) in every runnable combination, fewest changes
first, and stops at the first number of changes that has enough answers: a combination with more changes
is never shown before one with fewer. Every estimate shares the model's activation traces (`ModelCounts`
traces each resolution, dtype, checkpointing and scope at two or three batches and extends them linearly),
so a 12B transformer is traced a handful of times, not once per combination.

The mask pass holds every fp32 weight and its gradient (the scores are a signed fp32 sum over the forget set,
SalUn Eq. 6), whatever the training settings: when only a mask made beforehand fits, the answer is two
commands, `concept-erase mask` with the lightest settings that pass honours (its batch, gradient
checkpointing) and where it fits, then `erase --mask`.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from .memory import ModelCounts, load_counts, measure_process
from .plan import CUDA_RESERVE, GiB, Plan, check_built, estimate, mask_pass
from .plan_config import PlanConfig, check_like_erase, parse_bytes, runnable
from .training.mask_pass import mask_batch


def _options(config: PlanConfig) -> dict[str, list]:
    """Each setting's values: the user's first. The global batch stays (gradient accumulation splits it), so do
    the method, its keep ratio, the processes and the engine."""
    options = {
        "gradient_checkpointing": [config.gradient_checkpointing, True],
        "mixed_precision": [config.mixed_precision, "bf16"],
        "optimizer": [config.optimizer, "adam8bit"],
        "grad_release": [config.grad_release, True],
        "master_weights": [config.master_weights, "salient-fp32", "bf16-stochastic"],
        "gradient_accumulation_steps": [config.gradient_accumulation_steps] + [
            g for g in (2, 4, 8, 16) if g > config.gradient_accumulation_steps
            and config.batch_size % (g * config.num_processes) == 0],
        "mask": [config.mask] + (["MASK"] if config.method_class.computes_mask and not config.mask else []),
    }
    return {k: list(dict.fromkeys(v)) for k, v in options.items()}


def search(config: PlanConfig, budget: int, counts: ModelCounts, limit: int = 3
           ) -> tuple[list[tuple[dict, Plan]], tuple[dict, Plan] | None]:
    """(Up to `limit` changes that fit, fewest changes first, then smallest peak; the lightest combination
    tried, for the answer when none fits)."""
    options, base = _options(config), asdict(config)
    changes = []
    for combo in itertools.product(*options.values()):
        change = {k: v for k, v in zip(options, combo) if v != base[k]}
        if change and runnable({**base, **change}):
            changes.append(change)
    found, lightest = [], None
    for _, level in itertools.groupby(sorted(changes, key=len), key=len):
        if len(found) >= limit:  # every combination left changes more than each one found
            break
        for change in level:
            plan = estimate(PlanConfig(**{**base, **change}), counts)
            if plan.fits(budget):
                found.append((change, plan))
            if lightest is None or plan.resident < lightest[1].resident:
                lightest = (change, plan)
    found.sort(key=lambda f: (len(f[0]), f[1].peak))
    return found[:limit], lightest


def suggestions(config: PlanConfig, budget: int, counts: ModelCounts, limit: int = 3) -> list[tuple[dict, Plan]]:
    """Settings that make the run fit `budget`, fewest changes first, then smallest peak (`search`)."""
    return search(config, budget, counts, limit)[0]


@dataclass
class MaskStep:
    """`concept-erase mask` for a run that fits only with a mask made beforehand."""

    batch: int                 # the pass's batch (`concept-erase mask --batch-size`)
    checkpointing: bool
    need: int                  # on this device: tensors (+ the CUDA reserve on a GPU)
    fits: bool                 # within the budget on this device
    cpu_need: int              # on a CPU: tensors + the process itself, measured


def mask_step(config: PlanConfig, budget: int, counts: ModelCounts) -> MaskStep:
    """The mask pass's settings for this budget: the fewest changes from the run's own (its micro-batch and
    checkpointing) that fit, then the largest batch (fewest passes); where none fits, the lightest (batch 1,
    checkpointing) and what it needs on a CPU."""
    latent = max(1, (config.resolution or counts.default_resolution) // counts.vae_scale)
    own = mask_batch(config)
    reserve = CUDA_RESERVE if config.device == "cuda" else counts.process

    def need(batch: int, checkpointing: bool, device: str) -> int:
        return sum(mask_pass(counts, latent, batch, checkpointing, config.num_forget_images, device).values())

    tries = [(b, ckpt) for ckpt in dict.fromkeys((config.gradient_checkpointing, True))
             for b in sorted({own, *(b for b in (1, 2, 4, 8) if b < own)}, reverse=True)]
    fitting = [(b, ckpt) for b, ckpt in tries if need(b, ckpt, config.device) + reserve <= budget]
    fitting.sort(key=lambda t: ((t[0] != own) + (t[1] != config.gradient_checkpointing), -t[0]))
    batch, checkpointing = fitting[0] if fitting else (1, True)
    return MaskStep(batch, checkpointing, need(batch, checkpointing, config.device) + reserve, bool(fitting),
                    need(batch, checkpointing, "cpu") + counts.process)


def describe(plan: Plan, budget: int | None = None, counts: ModelCounts | None = None) -> str:
    """The plan as the `plan` command prints it."""
    c = plan.config
    resolution = c.resolution or (counts.default_resolution if counts else "model's")
    lines = [f"Memory plan: {c.method} on {c.model}" + (f" for {c.concept}" if c.concept else "")
             + f" ({', '.join(f'{k} {v / 1e6:.4g}M' for k, v in plan.components.items())} "
             f"parameters), {resolution} px, batch {c.batch_size} forget"
             + (f" + {c.batch_size} retain" if c.alpha > 0 else "")
             + f", {c.gradient_accumulation_steps} micro-batch(es)"
             + (f", {c.num_processes} processes" if c.num_processes > 1 else "")
             + (f" sharded with {c.sharding}" if c.sharding != "none" else "")
             + (" (optimizer state offloaded to the CPU)" if c.offload_optimizer else "")
             + f"; precision {c.mixed_precision} ({c.master_weights} weights)"
             + (", gradient release" if c.grad_release else "")
             + f", gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}, optimizer {c.optimizer}"
             + (f", keep {c.keep}" if c.method_class.computes_mask else "")
             + f"; device {c.device}", ""]
    for phase, parts in plan.phases.items():
        lines.append(f"{phase}: {_gib(sum(parts.values()))}" + ("   <- peak" if phase == plan.peak_phase else ""))
        lines += [f"  {name}: {_gib(b)}" for name, b in parts.items()]
    for name, b in plan.host.items():
        lines.append(f"host memory during training, not on the GPU: {name}: {_gib(b)}")
    what = ("the process itself (Python, PyTorch, the libraries and model classes, the tokenizers; measured in this "
            "process)")
    if c.device == "cuda":
        if plan.process:
            lines.append(f"host memory, not on the GPU: {what}: {_gib(plan.process)}")
        lines.append(f"\nestimated peak: {_gib(plan.peak)} of tensors (+ about {_gib(CUDA_RESERVE)} for the CUDA "
                     "context and allocator)")
    elif plan.process:
        lines.append(f"\nestimated peak: {_gib(plan.peak)} of tensors + {_gib(plan.process)} for {what} = "
                     f"{_gib(plan.resident)} resident")
    else:
        lines.append(f"\nestimated peak: {_gib(plan.peak)} of tensors")
    if budget is not None:
        verdict = "fits" if plan.fits(budget) else "does NOT fit"
        lines.append(f"budget {_as_written(c.memory_budget, budget)}: {verdict} (the run needs "
                     f"{_gib(plan.resident)})")
        if not plan.fits(budget) and counts is not None:
            lines += _answer(c, budget, counts)
    return "\n".join(lines)


def _answer(c: PlanConfig, budget: int, counts: ModelCounts) -> list[str]:
    """The settings that fit, as flags; with a mask made beforehand, the two commands in order."""
    fixes, lightest = search(c, budget, counts)
    if not fixes:
        lines = ["no combination of gradient checkpointing, bf16, 8-bit Adam, gradient release, bf16 weights, "
                 "gradient accumulation and a mask made beforehand fits; lower --resolution or --batch-size, or "
                 "shard over more GPUs (--num-processes with --sharding)"]
        if lightest:
            lines.append(f"  the lightest, {_flags(lightest[0])}, needs {_gib(lightest[1].resident)}")
        return lines
    lines = [f"  fits with {_flags(change)}: {_gib(fixed.peak)}" for change, fixed in fixes]
    if not any("mask" in change for change, _ in fixes):
        return lines
    step = mask_step(c, budget, counts)
    where = (f"fits this budget on this {'GPU' if c.device == 'cuda' else 'CPU'}" if step.fits else
             f"does NOT fit this budget: run it where it fits, on a larger GPU or on a CPU "
             f"({_gib(step.cpu_need)} of host memory; CUDA_VISIBLE_DEVICES= hides the GPU)")
    source = f"--concept {shlex.quote(c.concept)}" if c.concept else "--forget PROMPT --surrogate PROMPT"
    mask_flags = (f"--model {shlex.quote(c.model)} {source} --keep {c.keep}"
                  + (f" --resolution {c.resolution}" if c.resolution else "")
                  + f" --num-forget-images {c.num_forget_images} --batch-size {step.batch}"
                  + (" --gradient-checkpointing" if step.checkpointing else ""))
    return lines + [
        "  --mask MASK is two commands: the mask pass holds every fp32 weight and its gradient (the scores), "
        "whatever the training settings",
        f"  1. concept-erase mask {mask_flags} --output MASK",
        f"     needs {_gib(step.need)}: {where}",
        "  2. concept-erase erase with the flags above, --mask MASK and one of the settings that fit"]


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"


def _as_written(text: str | None, budget: int) -> str:
    """The budget as the user wrote it and in GiB, every figure of the plan's unit: "16GB" is 14.90 GiB."""
    if not text:
        return _gib(budget)
    if re.search(r"[KMGT]iB", text, flags=re.I):
        return f"{text.strip()} ({_gib(budget)})"
    return f"{text.strip()} = {_gib(budget)} (GB: 10^9 bytes; GiB, the plan's unit: 2^30)"


def _flags(change: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in change.items())


def run_plan(config: PlanConfig) -> tuple[Plan, str]:
    check_like_erase(config)  # the CLI has asked it before torch loaded; again for the Python API
    config.on_device()
    counts = load_counts(config.model, config.model_config)
    check_built(config, counts)
    measure_process(counts, config.model, config.model_config)
    plan = estimate(config, counts)
    budget = parse_bytes(config.memory_budget) if config.memory_budget else None
    return plan, describe(plan, budget, counts)
