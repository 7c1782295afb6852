"""Concept erasure for Stable Diffusion: the training loop and the `erase` job (docs/ALGORITHMS.md 2).

Read top to bottom:
1. `TrainConfig`: the optimisation settings (method, steps, batch, lr, alpha, ...).
2. `LatentSet`: forget/retain data as VAE latents + prompts (encoded once, kept in memory).
3. `train_unet(...)`: the loop. The method (`methods.py`: SalUn, RL, ESD-x/u, CA) is chosen once before it
   and gives the trained weights, the per-step batch and loss. Shuffled, cycled forget batches; accelerate
   for devices, processes and mixed precision; `checkpoint-<step>` folders and exact resume; stop on a
   non-finite loss. Used in memory by benchmarks and the MiniSD demo, and by `run_erase`.
4. `EraseConfig` / `run_erase(config)`: the `concept-erase erase` job (load a checkpoint, make or reuse the
   forget/retain images, compute or load the mask, train, save the model + card + mask, JSON summary).

Reproducibility: every random draw of step `s` (which forget/retain items, their noise and timesteps) comes
from a generator seeded with (seed, s), and the item order is a per-epoch permutation seeded with
(seed, epoch). So a run resumed from `checkpoint-<s>` repeats exactly what the uninterrupted run would have
done, and N processes draw the same GLOBAL batch and each take their slice of it: with the same global batch
size the gradients (hence the weights) are the same as in one process, up to float summation order.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..cli_args import check_fields, resume_free
from ..errors import ConceptEraseError
from ..io_utils import atomic_dir
from ..runtime import resident_memory
from .families import Conditioning, family_field, family_of
from .guard import DivergenceGuard, checkpoints_in
from .losses import SALIENCY_GUIDANCE, denoising_loss, noise_batch, sample_noise, training_scheduler
from .methods import CA_PARAMS, get_method, method_names
from .adversarial import ADVERSARIAL_VARIANTS  # registers salun-adv
from .trained import TRAINED, trained_module
from ..saliency import SaliencyMask, build_optimizer, optimizer_class

# The methods --method names; adversarial variants are chosen with --adversarial instead.
METHODS = tuple(name for name in method_names() if name not in ADVERSARIAL_VARIANTS.values())
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adam", "adam8bit")
# The computed mask, kept beside the checkpoints so a resumed run trains the same weights (a name of our own,
# so a --checkpoint-dir that holds a user's mask.safetensors is never touched).
RESUME_MASK = "resume-mask.safetensors"


# ------------------------------------------------------------------------------------------------ configs

@dataclass
class TrainConfig:
    """Optimisation settings of the erasure loop (defaults: the reference's, docs/ALGORITHMS.md 2)."""

    method: str = field(default="salun", metadata={
        "help": "; ".join(f"{name}: {get_method(name).help}" for name in METHODS)
                + " (a --mask narrows esd-x, esd-u and ca)",
        "choices": METHODS})
    steps: int = field(default=100, metadata={"help": "optimizer steps", "min": 1, "resume_free": True})
    batch_size: int = field(default=8, metadata={
        "help": "GLOBAL forget batch per optimizer step (the retain batch has the same size); split evenly "
                "across processes and gradient-accumulation micro-batches", "min": 1})
    # lr=1e30 is allowed on purpose: the non-finite-loss guard is what stops it.
    lr: float = field(default=1e-5, metadata={"help": "learning rate (Adam)", "above": 0})
    alpha: float | None = field(default=None, metadata={
        "help": "weight of the retain loss: loss = loss_f + alpha * loss_r (default: the method's own, 0.5 for "
                "salun/rl as the reference README or the preset's recipe; 0 for esd-x/esd-u/ca, which have no "
                "retain term unless asked for)", "min": 0})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay (0: plain Adam, the reference)", "min": 0})
    optimizer: str = field(default="adam", metadata={
        "help": "adam: torch Adam/AdamW (state only for the salient weights under a mask); adam8bit: "
                "bitsandbytes' 8-bit Adam (optional dependency, a quarter of Adam's state)",
        "choices": OPTIMIZERS})
    seed: int = field(default=0, metadata={"help": "seed of the data order, noise and timesteps", "seed": True})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step (same global batch, less memory)", "min": 1})
    mixed_precision: str = field(default="no", metadata={
        "help": "accelerate mixed precision (fp16 needs CUDA)", "choices": MIXED_PRECISION})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute UNet activations in the backward pass (less memory, slower)"})
    enable_xformers: bool = field(default=False, metadata={
        "help": "xformers memory-efficient attention (CUDA only; PyTorch SDPA is the default)"})
    esd_eta: float = field(default=1.0, metadata={"help": "ESD negative guidance eta", "min": 0})
    esd_ddim_steps: int = field(default=50, metadata={
        "help": "ESD: DDIM steps of the partial sampling that gives z_t", "min": 1})
    esd_start_guidance: float = field(default=3.0, metadata={
        "help": "ESD: guidance scale of that partial sampling", "min": 0})
    ca_params: str = field(default="kv", metadata={
        "help": "CA: which weights train: kv (cross-attention key/value projections) or unet (all)",
        "choices": CA_PARAMS})
    uce_erase_scale: float = field(default=1.0, metadata={"help": "UCE: erase scale s_e", "min": 0})
    uce_preserve_scale: float | None = field(default=None, metadata={
        "help": "UCE: preserve scale s_p (default: max(0.1, 1 / number of retain prompts))", "min": 0})
    uce_lambda: float = field(default=0.1, metadata={
        "help": "UCE: ridge lambda that keeps the inverse stable (the edit stays near the original weights)",
        "min": 0})
    adversarial: bool = field(default=False, metadata={
        "help": "SalUn-Adv: every --adv-every steps an inner attack finds adversarial conditionings for half the "
                "forget items against the current model, and the step remaps them to the surrogate as well "
                "(AdvUnlearn-style; --method salun only)"})
    adv_every: int = field(default=1, metadata={
        "help": "adversarial: run the inner attack every this many steps", "min": 1})
    adv_steps: int = field(default=5, metadata={
        "help": "adversarial: inner attack steps (Adam on the conditioning)", "min": 1})
    adv_lr: float = field(default=0.02, metadata={"help": "adversarial: the inner attack's learning rate", "above": 0})
    train: str = field(default="unet", metadata={
        "help": "the module that trains: unet, or text-encoder (AdvUnlearn's plug-in robust text encoder, UNet "
                "frozen; salun only; the saliency mask is over the encoder's weights; the inner attack of "
                "--adversarial perturbs the input token embeddings)", "choices": TRAINED})
    checkpointing_steps: int = field(default=0, metadata={
        "help": "save checkpoint-<step> every this many steps (0: never)", "min": 0, "resume_free": True})
    checkpoints_total_limit: int = field(default=2, metadata={
        "help": "keep only the newest N checkpoints (0: all)", "min": 0, "resume_free": True})

    def __post_init__(self):
        check_fields(self)
        if self.adversarial and self.method not in ADVERSARIAL_VARIANTS.values():
            if self.method not in ADVERSARIAL_VARIANTS:
                raise ConceptEraseError(f"--adversarial works with --method {', '.join(ADVERSARIAL_VARIANTS)}, "
                                        f"not {self.method!r}")
            self.method = ADVERSARIAL_VARIANTS[self.method]  # the variant is a method of its own from here on
        method = get_method(self.method)
        if self.train != "unet":
            if self.method not in ADVERSARIAL_VARIANTS.values():
                raise ConceptEraseError(f"--train {self.train} needs --adversarial (AdvUnlearn, with --method salun)")
            if self.gradient_checkpointing:
                raise ConceptEraseError(f"--gradient-checkpointing is for the UNet, not --train {self.train}")
        if self.alpha is None:
            self.alpha = method.default_alpha

    def check_launch(self, num_processes: int) -> None:
        """What depends on this machine and launch, checked before any expensive work (and again by
        `train_unet` for direct callers)."""
        if self.enable_xformers and not torch.cuda.is_available():
            raise ConceptEraseError("--enable-xformers needs a CUDA GPU (xformers has no CPU kernels); "
                                    "PyTorch SDPA attention is used by default")
        optimizer_class(self.optimizer)  # bitsandbytes for adam8bit: a clear error now, not after the mask pass
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConceptEraseError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
        if self.train != "unet" and num_processes > 1:
            raise ConceptEraseError(f"--train {self.train} runs in one process (got {num_processes})")
        if self.batch_size % (num_processes * self.gradient_accumulation_steps):
            raise ConceptEraseError(
                f"batch_size {self.batch_size} must be divisible by processes x gradient_accumulation_steps "
                f"= {num_processes} x {self.gradient_accumulation_steps}")

    def resume_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run that wrote the checkpoint: every field of this
        config (a subclass's too: the model, the concept, the mask settings) except those marked resume_free."""
        free = resume_free(type(self))
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in free}


@dataclass
class LatentSet:
    """Training items: VAE latents (already multiplied by vae.config.scaling_factor) and, per item, its
    prompt; for a forget set also its surrogate prompt (the SalUn / CA target).

    A method that samples its own z_t (ESD) has no images: `LatentSet.prompts_only(prompts, shape)` holds
    its prompts and the shape of one latent, and `latents` is None."""

    latents: Tensor | None
    prompts: list[str]
    surrogates: list[str] | None = None
    latent_shape: tuple[int, ...] | None = None  # (C, h, w); taken from `latents` when they are given

    def __post_init__(self):
        if self.latents is not None:
            self.latent_shape = tuple(self.latents.shape[1:])
        elif self.latent_shape is None:
            raise ConceptEraseError("a latent set needs latents or the shape of one latent")
        n = len(self.prompts) if self.latents is None else self.latents.shape[0]
        if n == 0:
            raise ConceptEraseError("a latent set is empty")
        if len(self.prompts) != n or (self.surrogates is not None and len(self.surrogates) != n):
            raise ConceptEraseError(f"a latent set has {n} latents but {len(self.prompts)} prompts")

    @classmethod
    def prompts_only(cls, prompts: Sequence[str], latent_shape: tuple[int, ...],
                     surrogates: Sequence[str] | None = None) -> "LatentSet":
        return cls(None, list(prompts), list(surrogates) if surrogates is not None else None, tuple(latent_shape))

    def __len__(self) -> int:
        return len(self.prompts)

    def batch_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.latent_shape)

    def take(self, index: Tensor, device) -> Tensor | None:
        """The latents of items `index` on `device` (None for a prompts-only set)."""
        return None if self.latents is None else self.latents[index].to(device)


@dataclass
class TrainResult:
    unet: nn.Module                     # the trained UNet (also left in pipe.unet)
    losses: list[dict[str, float]]      # one entry per step: step, loss, loss_forget, loss_retain
    seconds_per_step: float             # mean wall time of the steps run in this call
    peak_memory: int                    # bytes: CUDA max allocated, or the process's peak RSS on CPU
    steps: int                          # steps done in total (including those before a resume)
    resumed_from: int = 0               # the step the run resumed from (0: a fresh run)
    forget_per_concept: dict[str, float] | None = None  # the method's forget loss per concept, after training
    retain_loss: float | None = None    # the retain denoising loss after training (None: no retain set)


# ------------------------------------------------------------------------------------------------ the loop

def train_unet(
    pipe,
    forget: LatentSet,
    retain: LatentSet | None,
    config: TrainConfig,
    mask=None,
    frozen_unet: nn.Module | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | None = None,
    progress: bool = False,
    concept_of: dict[str, str] | None = None,
) -> TrainResult:
    """Erase in memory: train `pipe.unet` in place with `config.method` and return a TrainResult.

    pipe:         a StableDiffusionPipeline (its text encoder encodes the prompts once; VAE unused).
    forget:       LatentSet (with `surrogates` for methods that steer to a surrogate: salun, rl, ca; ESD needs
                  only prompts: `LatentSet.prompts_only`).
    retain:       LatentSet or None (None or alpha=0: no retain loss).
    config:       TrainConfig (an EraseConfig works too).
    mask:         concept_erase.saliency.SaliencyMask on the UNet's parameters; required by "salun", refused by
                  "rl"; with the other methods it is intersected with the method's layer scope.
    frozen_unet:  ESD's frozen original UNet; default: a copy of pipe.unet taken before training.
    checkpoint_dir, resume: write checkpoint-<step> folders there every config.checkpointing_steps; resume
                  "latest" (the newest one, or a fresh start if none) or a checkpoint folder path.
    concept_of:   forget prompt -> concept name: after training, the method's forget loss per concept and the
                  retain loss on one fixed draw (`TrainResult.forget_per_concept`, `retain_loss`).
    Works under `accelerate launch` / `torchrun` (each process calls it with the same arguments).
    Raises ConceptEraseError on bad input and on a non-finite loss (checkpoints already written are kept).
    """
    from accelerate import Accelerator

    method = get_method(config.method)(config)  # chosen once: everything method-specific is behind it
    if method.closed_form:
        raise ConceptEraseError(f"method {config.method!r} is a closed-form edit, not a training loop "
                                "(use run_erase or its own edit function)")
    config.check_launch(1)  # xformers / fp16 before Accelerator fails on them less clearly

    _reset_accelerate_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    config.check_launch(world)  # and the batch split, now that the process count is known
    micro_batches = world * config.gradient_accumulation_steps
    device = accelerator.device
    pipe.unet.to(device)
    # THE trained module (trained.py): the UNet, or the text encoder with the UNet frozen; it also encodes prompts
    trained = method.trained = trained_module(config.train)(
        pipe, device, family_of(pipe).latents_image_size(pipe, forget.latent_shape))
    model = trained.module
    model.to(device)
    if model.dtype != torch.float32:
        model.to(dtype=torch.float32)  # fp32 master weights; mixed precision autocasts the forward
    method.prepare(pipe.unet, pipe, frozen_unet, device)

    # -- which weights train (the method's mask or scope; None: every weight), and THE optimizer over them:
    # masked, it keeps optimizer state for the salient entries only and never writes frozen ones (saliency.py)
    trainable = method.trainable(model, family_of(pipe), mask)
    optimizer = build_optimizer(model, trainable, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)

    # -- resume: weights, optimizer state and the step counter (the data order is a function of the step)
    start_step, losses = 0, []
    ckpt = _find_checkpoint(checkpoint_dir, resume)
    if ckpt is not None:
        start_step, losses = _load_checkpoint(ckpt, model, optimizer, config)
        from accelerate.logging import get_logger

        get_logger(__name__).info("resuming from %s (step %d)", ckpt, start_step)  # main process only

    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()  # (refused with --train text-encoder)
    if config.enable_xformers:
        pipe.unet.enable_xformers_memory_efficient_attention()
    model.train()
    # blow-ups, finite ones included, stop the run; only checkpoints that passed are kept as good (guard.py)
    guard = DivergenceGuard(list(model.parameters()), checkpoint_dir, start_step=start_step,
                            keep=config.checkpoints_total_limit, main=accelerator.is_main_process)
    model, optimizer = accelerator.prepare(model, optimizer)  # after build_optimizer: DDP sees only trainable params
    unet = trained.unet(model)  # the UNet the losses call (the prepared module when it is the one training)

    # -- per item, the prompts its conditionings come from (`trained.encode`: cached, or through the encoder)
    targets = method.target_prompts(forget.prompts, forget.surrogates)
    use_retain = retain is not None and config.alpha > 0
    T = pipe.scheduler.config.num_train_timesteps
    scheduler = training_scheduler(pipe.scheduler)  # q_sample, whatever sampler the pipeline ships with
    # The VAE is done (latents cached), and so is a frozen text encoder (prompts cached): off the GPU.
    parked = [m for m in (pipe.text_encoder, pipe.vae)
              if device.type == "cuda" and m is not None and m is not trained.module]
    for module in parked:
        module.to("cpu")

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    bar = _progress(range(start_step, config.steps), progress and accelerator.is_local_main_process, start_step,
                    config.steps)
    step_times = []
    for step in bar:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        # The GLOBAL batch of this step: items, noise, timesteps, the method's own draws (same on every process) ...
        f_idx = _epoch_indices(len(forget), config.seed, step, config.batch_size)
        f_noise, f_t = sample_noise(forget.batch_shape(len(f_idx)), T, gen)
        if use_retain:
            r_idx = _epoch_indices(len(retain), config.seed + 1, step, config.batch_size)
            r_noise, r_t = sample_noise(retain.batch_shape(len(r_idx)), T, gen)
        draws = method.draw(gen)
        # ... of which this process takes micro-batches rank*G .. rank*G + G-1.
        per = config.batch_size // micro_batches
        step_loss = torch.zeros(3, device=device)
        for k in range(config.gradient_accumulation_steps):
            lo = (rank * config.gradient_accumulation_steps + k) * per
            sl = slice(lo, lo + per)
            ix = f_idx[sl]
            prompts = [forget.prompts[i] for i in ix]
            fb = method.forget_batch(accelerator.unwrap_model(unet), scheduler, forget.take(ix, device),
                                     method.condition(trained.encode(prompts), step, prompts),
                                     trained.target([targets[i] for i in ix]), f_noise[sl].to(device),
                                     f_t[sl].to(device), draws)
            rb = None
            if use_retain:
                rix = r_idx[sl]
                rb = noise_batch(scheduler, retain.take(rix, device), trained.encode([retain.prompts[i] for i in rix]),
                                 r_noise[sl].to(device), r_t[sl].to(device))
            last = k == config.gradient_accumulation_steps - 1
            # Gradients are all-reduced only on the last micro-batch (DDP no_sync covers forward + backward).
            with nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, loss_f, loss_r = method.loss(unet, fb, rb)
                accelerator.backward(loss / config.gradient_accumulation_steps)
            step_loss += torch.stack([loss.detach(), loss_f, loss_r]).float() / config.gradient_accumulation_steps
        # Every process must agree before stepping: a NaN on one rank would poison all of them via all-reduce.
        step_loss = accelerator.reduce(step_loss, reduction="mean")
        guard.check_loss(step, step_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        guard.check_weights(step + 1)
        record = {"step": step + 1, "loss": step_loss[0].item(), "loss_forget": step_loss[1].item(),
                  "loss_retain": step_loss[2].item()}
        losses.append(record)
        step_times.append(time.perf_counter() - t0)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['loss']:.4g}", forget=f"{record['loss_forget']:.4g}",
                            retain=f"{record['loss_retain']:.4g}")
        if checkpoint_dir and config.checkpointing_steps and (step + 1) % config.checkpointing_steps == 0:
            _save_checkpoint(accelerator, Path(checkpoint_dir), step + 1, model, optimizer, config, losses)
    guard.finish(config.steps)

    # -- hand back plain modules: no DDP wrapper, no hooks, no checkpointing, frozen
    setattr(pipe, trained.attr, accelerator.unwrap_model(model, keep_fp32_wrapper=False))
    unet = pipe.unet
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    for module in (unet, trained.module):
        module.requires_grad_(False).eval()
    for module in parked:
        module.to(device)
    per_concept, retain_loss = None, None
    if concept_of:
        with torch.no_grad():  # with the trained weights
            f_cond, f_target = trained.target(forget.prompts), trained.target(targets)
            r_cond = trained.target(retain.prompts) if use_retain else None
        per_concept, retain_loss = _final_losses(method, unet, scheduler, T, forget, f_cond, f_target, concept_of,
                                                 retain if use_retain else None, r_cond, config, device)
    accelerator.wait_for_everyone()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else (resident_memory(peak=True) or 0)
    return TrainResult(unet, losses, sum(step_times) / max(1, len(step_times)), peak, len(losses), start_step,
                       per_concept, retain_loss)


@torch.no_grad()
def _final_losses(method, unet, scheduler, T, forget: LatentSet, f_cond, f_target, concept_of: dict[str, str],
                  retain: LatentSet | None, r_cond, config: TrainConfig, device) -> tuple[dict, float | None]:
    """After training, on one fixed draw (from the seed): per concept, the method's forget loss on up to batch_size
    of its forget items; and the retain denoising loss on up to batch_size retain items. Every process
    computes the same numbers."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983)
    per_concept = {}
    for name in dict.fromkeys(concept_of.values()):
        idx = torch.tensor([i for i, p in enumerate(forget.prompts) if concept_of.get(p) == name][:config.batch_size],
                           dtype=torch.long)
        if len(idx) == 0:
            continue
        noise, t = sample_noise(forget.batch_shape(len(idx)), T, gen)
        fb = method.forget_batch(unet, scheduler, forget.take(idx, device), f_cond[idx], f_target[idx],
                                 noise.to(device), t.to(device), method.draw(gen))
        per_concept[name] = round(method.loss(unet, fb, None)[1].item(), 6)
    retain_loss = None
    if retain is not None:
        idx = torch.arange(min(len(retain), config.batch_size))
        noise, t = sample_noise(retain.batch_shape(len(idx)), T, gen)
        rb = noise_batch(scheduler, retain.take(idx, device), r_cond[idx], noise.to(device), t.to(device))
        retain_loss = round(denoising_loss(unet, rb).item(), 6)
    return per_concept, retain_loss


def _reset_accelerate_state() -> None:
    """accelerate keeps a process-wide singleton; a second in-process run with other settings (tests,
    benchmarks) must start from a clean one. Under a distributed launch the process group is kept."""
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


def _epoch_indices(n: int, seed: int, step: int, batch_size: int) -> Tensor:
    """Items step*B .. step*B + B-1 of the endless stream "permutation of epoch 0, of epoch 1, ...":
    shuffled and cycled (the reference reused its first forget batch every step: docs/ALGORITHMS.md 2)."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = perm[offset: offset + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return torch.tensor(out, dtype=torch.long)


class PromptEmbeddings:
    """Encode each distinct prompt once with the frozen text encoder(s), the way the pipeline's family
    conditions its UNet (`families.py`); index by item."""

    def __init__(self, pipe, device, size: tuple[int, int] | None = None):
        self.pipe, self.device, self.size, self.cache = pipe, device, size, {}
        self.family = family_of(pipe)
        for encoder in self.family.text_modules(pipe).values():
            encoder.to(device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            cond = self.family.encode(self.pipe, new, self.device, self.size)
            self.cache.update((p, cond[i]) for i, p in enumerate(new))
        return Conditioning.cat([self.cache[p] for p in prompts])


def _progress(iterable, enabled: bool, initial: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, initial=initial, total=total, desc="erase", unit="step")


# ------------------------------------------------------------------------------------------------ checkpoints

def _latest_checkpoint(checkpoint_dir) -> Path | None:
    found = checkpoints_in(checkpoint_dir)
    return found[-1][1] if found else None


def _find_checkpoint(checkpoint_dir, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        return _latest_checkpoint(checkpoint_dir)  # none yet: a fresh start, as diffusers' scripts do
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConceptEraseError(f"--resume {resume!r} is not a checkpoint folder (no state.json)")
    return path


def _save_checkpoint(accelerator, checkpoint_dir: Path, step: int, unet, optimizer, config: TrainConfig,
                     losses: list[dict]) -> None:
    """checkpoint-<step>/ of a running loop (see `_write_checkpoint`), written by the main process once the
    weights passed the divergence guard; older checkpoints are pruned by the guard once a newer one passed."""
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
        _write_checkpoint(checkpoint_dir, step, model.state_dict(),
                          getattr(optimizer, "optimizer", optimizer).state_dict(), config, losses)
    accelerator.wait_for_everyone()


def _write_checkpoint(checkpoint_dir: Path, step: int, weights: dict, optimizer_state: dict | None,
                      config: TrainConfig, losses: list[dict]) -> Path:
    """checkpoint-<step>/: unet.safetensors (all UNet weights; text-encoder.safetensors with --train text-encoder), optimizer.pt (tensors only, loaded with
    weights_only=True; absent in a run's final weights, which take no more step), rng.safetensors, state.json
    (step, losses, the settings that must match on resume). The data order needs no file: it is a function of
    (seed, step). Written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    path = Path(checkpoint_dir) / f"checkpoint-{step}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(state, str(tmp / f"{config.train}.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "config": config.resume_key(), "losses": losses}, indent=1))
    return path


def _load_checkpoint(path: Path, unet, optimizer, config: TrainConfig) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / f"{config.train}.safetensors"))
        has_optimizer = (path / "optimizer.pt").exists()  # a run's kept final weights have none (no step left)
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True) if has_optimizer else None
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as err:  # truncated / foreign files: one line naming the folder
        raise ConceptEraseError(f"cannot read checkpoint {str(path)!r}: {str(err).splitlines()[0]}") from None
    saved = state.get("config", {})
    diff = [k for k, v in config.resume_key().items() if k in saved and saved[k] != v]
    if diff:
        raise ConceptEraseError(f"checkpoint {str(path)!r} was made with other settings ({diff[0]}="
                                f"{saved[diff[0]]!r}, now {getattr(config, diff[0])!r})")
    if int(state["step"]) > config.steps:
        raise ConceptEraseError(f"checkpoint {str(path)!r} is at step {state['step']}, past --steps {config.steps}")
    if opt_state is None and int(state["step"]) < config.steps:
        raise ConceptEraseError(f"checkpoint {str(path)!r} holds final weights without optimizer state: it cannot "
                                f"continue to --steps {config.steps}")
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConceptEraseError(f"checkpoint {str(path)!r} does not fit this {config.train} "
                                f"(first mismatch: {(missing or unexpected)[0]!r})")
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"]), list(state.get("losses", []))


# ------------------------------------------------------------------------------------------------ the mask

def saliency_batches(pipe, forget: LatentSet, *, batch_size: int = 8, seed: int = 0) -> Iterator:
    """One pass over the forget set as `NoisedBatch`es for the saliency loss: noise and t ~ U{0..T-1} drawn
    from `seed`, `target_cond` the empty prompt (docs/ALGORITHMS.md 1)."""
    device = next(pipe.unet.parameters()).device
    embed = PromptEmbeddings(pipe, device, size=family_of(pipe).latents_image_size(pipe, forget.latent_shape))
    cond, uncond = embed(forget.prompts), embed([""])
    T = pipe.scheduler.config.num_train_timesteps
    scheduler = training_scheduler(pipe.scheduler)
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, forget.latents.shape[0], batch_size):
        z = forget.latents[lo: lo + batch_size]
        noise, t = sample_noise(z, T, gen)
        c = cond[lo: lo + batch_size]
        yield noise_batch(scheduler, z.to(device), c, noise.to(device), t.to(device), uncond.expand(len(c)))


def mask_batch(config: TrainConfig) -> int:
    """The mask pass's batch: the training micro-batch (the scores are a sum over the whole forget set, so the
    split changes only their common scale, up to float rounding, and the memory the pass needs)."""
    return max(1, config.batch_size // config.gradient_accumulation_steps)


def compute_mask(pipe, forget: LatentSet, keep: float = 0.5, *, include=None, batch_size: int = 8,
                 seed: int = 0, guidance: float = SALIENCY_GUIDANCE, concept: str = "", lowest: bool = False,
                 progress: bool = False, gradient_checkpointing: bool = False, train: str = "unet"):
    """The SalUn mask of the trained module (`train`: `pipe.unet`, or the text encoder, the loss then
    differentiated through it: `trained.py`) for a forget set: one pass over it with the diffusion saliency loss
    (docs/ALGORITHMS.md 1-2: MSE(eps, (1 + w) eps(x_t, c_f) - w eps(x_t, "")), w = 7.5, t ~ U{0..999}), noise and
    timesteps from `seed`; `include`: None (every UNet weight) or a regex on parameter names.
    `lowest=True` keeps the LEAST salient weights instead (the inverted-mask control of the benchmark).
    `gradient_checkpointing`: recompute activations in the backward pass (the same gradients, less memory)."""
    trained = trained_module(train)(pipe, next(pipe.unet.parameters()).device,
                                    family_of(pipe).latents_image_size(pipe, forget.latent_shape))
    prompts = [forget.prompts[lo: lo + batch_size] for lo in range(0, len(forget), batch_size)]
    batches = zip(saliency_batches(pipe, forget, batch_size=batch_size, seed=seed), prompts)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    try:
        return SaliencyMask.compute(trained.module, batches, trained.saliency_loss_fn(guidance), keep=keep,
                                    include=include, concept=concept, lowest=lowest, progress=progress)
    finally:
        if gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()


# ------------------------------------------------------------------------------------------------ the job

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
    keep: float = field(default=0.5, metadata={
        "help": "fraction of UNet weights the computed mask keeps trainable", "above": 0, "max": 1})
    mask_scope: str | None = field(default=None, metadata={
        "help": "regex on UNet parameter names the computed mask ranks (default: every parameter)"})
    num_forget_images: int = field(default=64, metadata={
        "help": "forget images generated by the base model (ca: images of the anchor, i.e. surrogate, prompts)",
        "min": 1})
    num_retain_images: int = field(default=64, metadata={"help": "retain images generated by the base model", "min": 1})
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
    progress: bool = field(default=True, metadata={"help": "progress bars", "resume_free": True})

    def __post_init__(self):
        # What the user chose (values off their default), before the method's own default alpha fills in.
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.default is not MISSING and getattr(self, f.name) != f.default}
        super().__post_init__()
        get_method(self.method).check_fields(given)
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
        from .methods import ALL_METHOD_FIELDS, RETAIN_DATA

        method = values.get("method", cls.method)
        if values.get("adversarial"):  # --adversarial selects the method's adversarial variant
            method = ADVERSARIAL_VARIANTS.get(method, method)
        method = get_method(method)
        method.check_fields(values)  # what the user typed, even when it equals a default
        recipe = _concept_set(values).recipe if (values.get("concept") or values.get("concepts_file")) else {}
        names = {f.name for f in fields(cls)}
        recipe = {k: v for k, v in recipe.items()
                  if k in names and (k not in ALL_METHOD_FIELDS or k in method.fields)}
        if method.default_alpha == 0:
            recipe.pop("alpha", None)
        if not values.get("alpha", recipe.get("alpha", method.default_alpha)):
            recipe = {k: v for k, v in recipe.items() if k not in RETAIN_DATA}  # no retain term: no retain images
        return cls(**{**recipe, **values})

    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.output}.checkpoints")

    def get_concept(self):
        """The concept to erase: one preset or custom concept, or several presets as one `Concept` whose
        `members` are the individual concepts (see `concepts.combine_concepts`)."""
        return _concept_set(vars(self))


def _concept_set(values: dict):
    from ..concepts import get_concepts

    return get_concepts(values.get("concept"), concepts_file=values.get("concepts_file"),
                        forget=values.get("forget"), surrogate=values.get("surrogate"),
                        retain_prompts=values.get("retain_prompts"))


def build_latent_sets(pipe, concept, config: EraseConfig, state, *,
                      with_retain: bool | None = None) -> tuple[LatentSet, LatentSet | None]:
    """The data the method needs, as latents encoded once (images generated by the base model, cached and
    resumable, or read from a folder). Under several processes the main one generates and the others then
    read the cache. Per the method's `forget_data`: "forget" = images of the forget prompts; "anchor" (CA) =
    images of the surrogate prompts, each paired with a forget prompt steered to it; "none" (ESD samples its
    own z_t) = the forget prompts only. Retain images when the method has a retain term (`with_retain`
    overrides: the `mask` command wants none)."""
    from .data import ImageSet, SamplingSettings, default_image_size, images_per_prompt
    from .generate import check_sampling

    method = get_method(config.method)(config)
    settings = SamplingSettings(num_inference_steps=config.image_steps, guidance_scale=config.image_guidance,
                                height=config.resolution, width=config.resolution)
    cache = config.cache_dir

    def generated(prompts: list[str], total: int, what: str) -> ImageSet:
        # exactly `total` images; the seeds are those of ceil(total / len(prompts)) per prompt, so a cache
        # filled for a larger set serves a smaller one
        per_prompt = math.ceil(total / len(prompts))
        with state.main_process_first():  # the main process fills the cache; the others find it full
            return ImageSet.generate(pipe, prompts, per_prompt, cache, seed=config.seed, settings=settings,
                                     progress=config.progress and state.is_main_process and what, total=total)

    def from_folder(folder: str, default_prompt: str) -> ImageSet:
        folder = Path(folder)
        has_prompts = (folder / "manifest.jsonl").is_file() or (folder / "metadata.jsonl").is_file()
        return ImageSet.from_folder(folder, None if has_prompts else default_prompt, cache_dir=cache)

    def encoded(images: ImageSet) -> Tensor:
        with state.main_process_first():
            return images.latents(pipe, batch_size=config.batch_size, size=size)

    size = (config.resolution,) * 2 if config.resolution else default_image_size(pipe)  # train at --resolution
    check_sampling(pipe, config.image_steps, config.resolution, config.resolution,
                   size_flags=("--resolution", "--resolution"))
    if "esd_ddim_steps" in type(method).fields:
        check_sampling(pipe, config.esd_ddim_steps, steps_flag="--esd-ddim-steps")
    anchors = list(dict.fromkeys(concept.surrogate_for(p) for p in concept.forget_prompts))
    wants_retain = method.needs_retain if with_retain is None else with_retain
    # every count is checked before the first image is generated
    if method.forget_data != "none" and not config.forget_images:
        prompts = anchors if method.forget_data == "anchor" else concept.forget_prompts
        images_per_prompt(config.num_forget_images, len(prompts), "--num-forget-images")
    if wants_retain and not config.retain_images:
        images_per_prompt(config.num_retain_images, len(concept.retain_prompts), "--num-retain-images")
    if method.forget_data == "none":
        f = family_of(pipe).vae_factor(pipe)
        shape = (pipe.unet.config.in_channels, size[0] // f, size[1] // f)
        forget = LatentSet.prompts_only(concept.forget_prompts, shape)
    elif method.forget_data == "anchor":
        # Kumari et al. 2023: images of the anchor concept; each is paired with a forget prompt that has that
        # anchor as its surrogate (cycling, so every forget prompt gets its share).
        targets = {a: [p for p in concept.forget_prompts if concept.surrogate_for(p) == a]
                   for a in dict.fromkeys(concept.surrogate_for(p) for p in concept.forget_prompts)}
        images = generated(list(targets), config.num_forget_images, "anchor images")
        seen: dict[str, int] = {}
        prompts = []
        for anchor in images.prompts:
            k = seen[anchor] = seen.get(anchor, -1) + 1
            prompts.append(targets[anchor][k % len(targets[anchor])])
        forget = LatentSet(encoded(images), prompts, list(images.prompts))
    else:
        images = (from_folder(config.forget_images, concept.forget_prompts[0]) if config.forget_images
                  else generated(concept.forget_prompts, config.num_forget_images, "forget images"))
        forget = LatentSet(encoded(images), images.prompts, [concept.surrogate_for(p) for p in images.prompts])
    retain = None
    if wants_retain:
        images = (from_folder(config.retain_images, concept.retain_prompts[0]) if config.retain_images
                  else generated(concept.retain_prompts, config.num_retain_images, "retain images"))
        retain = LatentSet(encoded(images), images.prompts)
    return forget, retain


def _prepare(config: EraseConfig):
    """Shared start of `mask` and `erase`: the process state, the concept and the pipeline on its device."""
    from ..runtime import process_state
    from .loading import load_pipeline

    concept = config.get_concept()
    state = process_state()
    pipe = load_pipeline(config.model, config=config.model_config, family=config.family)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    return state, concept, pipe


def run_mask(config: EraseConfig) -> dict[str, Any]:
    """`concept-erase mask`: compute the saliency mask of config.concept and write it to config.output."""
    from ..io_utils import check_writable

    check_writable(config.output, config.overwrite, kind="file", suffix=".safetensors", flag="--output")
    state, concept, pipe = _prepare(config)
    forget, _ = build_latent_sets(pipe, concept, config, state, with_retain=False)
    t0 = time.perf_counter()
    mask = compute_mask(pipe, forget, config.keep, include=config.mask_scope, batch_size=mask_batch(config),
                        seed=config.seed, concept=concept.name, progress=config.progress,
                        gradient_checkpointing=config.gradient_checkpointing, train=config.train)
    seconds = time.perf_counter() - t0
    if state.is_main_process:
        mask.save(config.output, overwrite=config.overwrite)
    return {"output": str(config.output), "concept": concept.name, "keep": config.keep,
            "kept_fraction": mask.kept_fraction, "forget_images": int(forget.latents.shape[0]),
            "seconds": round(seconds, 3), "fingerprint": mask.fingerprint}


def run_erase(config: EraseConfig) -> dict[str, Any]:
    """`concept-erase erase`: the whole job. Returns the summary (also written as OUTPUT/erase_summary.json).

    Fails before any work if an output exists (without overwrite) or the mask does not fit the model; on a
    non-finite loss it raises ConceptEraseError and the checkpoints written so far stay in place."""
    check_destinations(config)
    t_start = time.perf_counter()
    state, concept, pipe = _prepare(config)
    method = get_method(config.method)(config)
    if method.closed_form:
        base_unet = copy.deepcopy(pipe.unet).cpu() if config.save_delta else None
        t0 = time.perf_counter()
        report = method.edit(pipe, concept, config)  # deterministic: every process computes the same edit
        summary = {**_summary_head(config, concept, state), **report,
                   "seconds_total": round(time.perf_counter() - t_start, 3),
                   "seconds_edit": round(time.perf_counter() - t0, 3)}
        if state.is_main_process:
            _save_outputs(pipe, config, concept, None, base_unet, summary)
        state.wait_for_everyone()
        return summary

    config.check_launch(state.num_processes)
    module = trained_module(config.train).of(pipe)  # the module the mask covers and training changes
    mask, mask_seconds = None, 0.0
    ckpt_dir = config.checkpoints()
    resumed_mask = ckpt_dir / RESUME_MASK
    computes_mask = method.computes_mask and not config.mask
    if config.mask:
        mask = SaliencyMask.load(config.mask)
        family_of(pipe).check_mask(mask, config.mask)  # SDXL's mask on SD 1.5 (or back) is named as such
        mask.check_compatible(module)  # a mask for another model fails here, early
    elif computes_mask and _find_checkpoint(ckpt_dir, config.resume) and resumed_mask.is_file():
        mask = SaliencyMask.load(resumed_mask, model=module)  # the mask the interrupted run computed
        made_for, now = (mask.keep, mask.scope, mask.concept), (config.keep, config.mask_scope or "all", concept.name)
        if made_for != now:
            raise ConceptEraseError(f"cannot resume: {str(resumed_mask)!r} was computed for another job "
                                    f"(keep, scope, concept: {made_for}; now {now})")
    forget, retain = build_latent_sets(pipe, concept, config, state)
    if computes_mask and mask is None:
        t0 = time.perf_counter()
        # One process computes it and the others read it, so every process trains the same weights even
        # where GPU gradients are not bit-reproducible. Kept beside the checkpoints for --resume. Several
        # concepts: one mask over the union forget set (its gradient sums every concept's).
        if state.is_main_process:
            mask = compute_mask(pipe, forget, config.keep, include=config.mask_scope, batch_size=mask_batch(config),
                                seed=config.seed, concept=concept.name, progress=config.progress,
                                gradient_checkpointing=config.gradient_checkpointing, train=config.train)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            mask.save(resumed_mask, overwrite=True)
        state.wait_for_everyone()
        if not state.is_main_process:
            mask = SaliencyMask.load(resumed_mask, model=module)
        mask_seconds = time.perf_counter() - t0
    base_unet = copy.deepcopy(pipe.unet).cpu() if config.save_delta else None

    try:
        result = train_unet(pipe, forget, retain, config, mask=mask, checkpoint_dir=ckpt_dir,
                            resume=config.resume, progress=config.progress, concept_of=_concept_of(concept))
    except BaseException:
        if state.is_main_process and _latest_checkpoint(ckpt_dir) is None:
            _remove_resume_mask(ckpt_dir)  # nothing to resume: leave nothing behind
        raise
    summary = {
        **_summary_head(config, concept, state),
        "steps": result.steps, "resumed_from": result.resumed_from, "batch_size": config.batch_size,
        "lr": config.lr, "alpha": config.alpha, "trained": config.train,
        "keep": None if mask is None else round(mask.kept_fraction, 6),
        "forget_images": 0 if forget.latents is None else int(forget.latents.shape[0]),
        "retain_images": 0 if retain is None else int(retain.latents.shape[0]),
        "seconds_total": round(time.perf_counter() - t_start, 3), "seconds_mask": round(mask_seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4), "peak_memory_bytes": result.peak_memory,
        "forget_per_concept": result.forget_per_concept,
        "forget_measure": f"the {config.method} forget loss after training, on up to {config.batch_size} forget "
                          "items of each concept (one fixed draw)",
        "retain": result.retain_loss,
        "retain_measure": f"the retain denoising loss after training, on up to {config.batch_size} retain items "
                          "(one fixed draw; null: no retain set)",
        "final_loss": result.losses[-1] if result.losses else None, "losses": result.losses,
    }
    if state.is_main_process:
        try:
            _save_outputs(pipe, config, concept, mask, base_unet, summary)
        except (ConceptEraseError, OSError) as err:
            _keep_trained_weights(err, trained_module(config.train).of(pipe), ckpt_dir, config, result.losses)
        if not config.checkpointing_steps:  # nothing to resume from: do not leave the shared mask behind
            _remove_resume_mask(ckpt_dir)
    state.wait_for_everyone()
    return summary


def check_destinations(config: EraseConfig) -> None:
    """Every place `erase` writes, checked before the model is loaded: free (or --overwrite), of the right
    kind and suffix, writable, and no two the same (hours of training must not end in a refused write)."""
    from ..io_utils import check_writable

    places = {"--output": config.output, "--export-single-file": config.export_single_file,
              "--save-delta": config.save_delta}
    check_writable(config.output, config.overwrite, flag="--output")
    if config.export_single_file:
        check_writable(config.export_single_file, config.overwrite, kind="file", suffix=".safetensors",
                       flag="--export-single-file")
    if config.save_delta:
        check_writable(config.save_delta, config.overwrite, flag="--save-delta")
    if not get_method(config.method).closed_form:  # a closed-form edit writes no checkpoints
        places["--checkpoint-dir"] = config.checkpoints()
        check_writable(config.checkpoints(), flag="--checkpoint-dir", into=True)
    seen: dict[Path, str] = {}
    for flag, path in places.items():
        if path:
            key = Path(path).absolute()
            if key in seen:
                raise ConceptEraseError(f"{flag} and {seen[key]} are the same path {str(path)!r}")
            seen[key] = flag


def _keep_trained_weights(err: BaseException, unet, ckpt_dir: Path, config: EraseConfig, losses: list) -> None:
    """An output write failed after training: keep the trained UNet as the final checkpoint (no optimizer
    state: no step is left to take), so `--resume latest` with a writable destination skips the training,
    and raise the write's error naming where the weights are."""
    from ..io_utils import describe_os_error

    reason = str(err) if isinstance(err, ConceptEraseError) else describe_os_error(err)
    done = _latest_checkpoint(ckpt_dir)
    if done is not None and done.name == f"checkpoint-{config.steps}":
        kept = done
    else:
        try:
            kept = _write_checkpoint(ckpt_dir, config.steps, unet.state_dict(), None, config, losses)
        except (ConceptEraseError, OSError) as again:
            raise ConceptEraseError(f"{reason}; the trained weights could not be kept either "
                                    f"({again if isinstance(again, ConceptEraseError) else describe_os_error(again)})"
                                    ) from None
    raise ConceptEraseError(f"{reason}; the trained weights are kept in {str(kept)!r}: rerun with --resume latest "
                            "and a writable destination (no training is repeated)") from None


def _concept_of(concept) -> dict[str, str]:
    """Forget prompt -> the name of the concept it belongs to (one run may erase several)."""
    return {p: m.name for m in concept.members for p in m.forget_prompts}


def _summary_head(config: EraseConfig, concept, state) -> dict[str, Any]:
    return {"output": str(config.output), "model": config.model, "concept": concept.name,
            "concepts": [m.name for m in concept.members], "method": config.method,
            "processes": state.num_processes}


def _remove_resume_mask(ckpt_dir: Path) -> None:
    """Drop the mask kept for --resume, and the checkpoint folder if that leaves it empty."""
    (ckpt_dir / RESUME_MASK).unlink(missing_ok=True)
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def _save_outputs(pipe, config: EraseConfig, concept, mask, base_unet, summary: dict) -> None:
    """OUTPUT/: the diffusers pipeline + README.md card (save_pipeline), mask.safetensors, erase_summary.json,
    all in one temporary folder renamed into place; then the optional single file and delta."""
    from ..io_utils import atomic_dir
    from .card import save_pipeline
    from .delta import save_delta
    from .single_file import export_single_file

    method = get_method(config.method)
    surrogate = concept.surrogate_prompts[0] if len(set(concept.surrogate_prompts)) == 1 else concept.surrogate_prompts
    card = {"base_model": config.model, "concept": concept.name, "forget_prompts": concept.forget_prompts,
            "surrogate": surrogate, "method": config.method,
            "keep": None if mask is None else summary.get("keep")}
    if len(concept.members) > 1:
        card["concepts"] = [m.name for m in concept.members]
    card["erasure_check"] = {k: summary.get(k) for k in ("forget_per_concept", "forget_measure", "retain",
                                                         "retain_measure")}
    if method.closed_form:
        card["edit"] = {k: summary[k] for k in ("erase_scale", "preserve_scale", "ridge", "edited_parameters",
                                                "preserve_prompts") if k in summary}
    else:
        card["steps"] = summary["steps"]
        card["training"] = {"trained": summary["trained"], "lr": config.lr, "alpha": config.alpha,
                            "batch_size": config.batch_size,
                            "seed": config.seed, "forget_images": summary["forget_images"],
                            "retain_images": summary["retain_images"]}
    # All or nothing: the single file and the delta are written inside OUTPUT's atomic block and removed if
    # anything fails, so a retry finds every destination free.
    extras: list[Path] = []
    try:
        with atomic_dir(config.output, overwrite=config.overwrite) as tmp:
            save_pipeline(pipe, tmp, card=card, overwrite=True)
            if mask is not None:
                mask.save(tmp / "mask.safetensors", overwrite=True)
            (tmp / "erase_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            if config.export_single_file:
                extras.append(export_single_file(pipe, config.export_single_file, overwrite=config.overwrite))
            if config.save_delta:
                extras.append(save_delta(base_unet, pipe.unet.cpu(), mask, config.save_delta,
                                         overwrite=config.overwrite))
    except BaseException:
        for path in extras:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
