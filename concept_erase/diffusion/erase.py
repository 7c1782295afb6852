"""SalUn concept erasure for Stable Diffusion: the training loop and the `erase` job (docs/ALGORITHMS.md 2).

Read top to bottom:
1. `TrainConfig`: the optimisation settings (method, steps, batch, lr, alpha, ...).
2. `LatentSet`: forget/retain data as VAE latents + prompts (encoded once, kept in memory).
3. `train_unet(...)`: the loop. Shuffled, cycled forget batches; surrogate target under no_grad; accelerate
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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConceptEraseError
from ..io_utils import atomic_dir
from .families import Conditioning
from ..saliency import optimizer_class
from .losses import (
    SALIENCY_GUIDANCE,
    NoisedBatch,
    esd_loss,
    esd_partial_sample,
    esd_scheduler,
    noise_batch,
    salun_loss,
    sample_noise,
    saliency_loss_fn,
    training_scheduler,
)

METHODS = ("salun", "rl", "esd-x", "esd-u")
# ESD-x fine-tunes the cross-attention layers only (attn2 in diffusers' UNet), ESD-u everything else.
ESD_SCOPES = {"esd-x": lambda name: "attn2" in name, "esd-u": lambda name: "attn2" not in name}
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adam", "adam8bit")
# Settings a resumed run may change: how long it runs, where things are written, how it is shown.
RESUME_FREE = {"steps", "checkpointing_steps", "checkpoints_total_limit", "output", "cache_dir", "checkpoint_dir",
               "resume", "export_single_file", "save_delta", "overwrite", "progress"}
# The computed mask, kept beside the checkpoints so a resumed run trains the same weights (a name of our own,
# so a --checkpoint-dir that holds a user's mask.safetensors is never touched).
RESUME_MASK = "resume-mask.safetensors"


# ------------------------------------------------------------------------------------------------ configs

@dataclass
class TrainConfig:
    """Optimisation settings of the erasure loop (defaults: the reference's, docs/ALGORITHMS.md 2)."""

    method: str = field(default="salun", metadata={
        "help": "salun: SalUn objective on the masked weights; rl: the same objective on all weights (no mask, "
                "to measure the mask's effect); esd-x / esd-u: ESD's negative-guidance target on "
                "cross-attention / non-cross-attention weights (a --mask narrows any of them)",
        "choices": METHODS})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={
        "help": "GLOBAL forget batch per optimizer step (the retain batch has the same size); split evenly "
                "across processes and gradient-accumulation micro-batches"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (Adam)"})
    alpha: float | None = field(default=None, metadata={
        "help": "weight of the retain loss: loss = loss_f + alpha * loss_r (default: 0.5 for salun/rl as the "
                "reference README; 0 for esd-x/esd-u, which have no retain term)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (0: plain Adam, the reference)"})
    optimizer: str = field(default="adam", metadata={
        "help": "adam: torch Adam/AdamW (state only for the salient weights under a mask); adam8bit: "
                "bitsandbytes' 8-bit Adam (optional dependency, a quarter of Adam's state)",
        "choices": OPTIMIZERS})
    seed: int = field(default=0, metadata={"help": "seed of the data order, noise and timesteps"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step (same global batch, less memory)"})
    mixed_precision: str = field(default="no", metadata={
        "help": "accelerate mixed precision (fp16 needs CUDA)", "choices": MIXED_PRECISION})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute UNet activations in the backward pass (less memory, slower)"})
    enable_xformers: bool = field(default=False, metadata={
        "help": "xformers memory-efficient attention (CUDA only; PyTorch SDPA is the default)"})
    esd_eta: float = field(default=1.0, metadata={"help": "ESD negative guidance eta"})
    esd_ddim_steps: int = field(default=50, metadata={"help": "ESD: DDIM steps of the partial sampling that gives z_t"})
    esd_start_guidance: float = field(default=3.0, metadata={"help": "ESD: guidance scale of that partial sampling"})
    checkpointing_steps: int = field(default=0, metadata={
        "help": "save checkpoint-<step> every this many steps (0: never)"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "keep only the newest N checkpoints (0: all)"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConceptEraseError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.alpha is None:
            self.alpha = 0.0 if self.method in ESD_SCOPES else 0.5
        if self.optimizer not in OPTIMIZERS:
            raise ConceptEraseError(f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConceptEraseError(f"unknown mixed precision {self.mixed_precision!r} ({', '.join(MIXED_PRECISION)})")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "esd_ddim_steps"):
            if int(getattr(self, name)) < 1:
                raise ConceptEraseError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("checkpointing_steps", "checkpoints_total_limit"):
            if int(getattr(self, name)) < 0:
                raise ConceptEraseError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            # lr=1e30 is allowed on purpose: the non-finite-loss guard is what stops it.
            raise ConceptEraseError(f"lr must be a positive number, got {self.lr!r}")
        if self.alpha < 0 or self.weight_decay < 0:
            raise ConceptEraseError(f"alpha and weight_decay must be >= 0, got {self.alpha!r}, {self.weight_decay!r}")

    def check_launch(self, num_processes: int) -> None:
        """What depends on this machine and launch, checked before any expensive work (and again by
        `train_unet` for direct callers)."""
        if self.enable_xformers and not torch.cuda.is_available():
            raise ConceptEraseError("--enable-xformers needs a CUDA GPU (xformers has no CPU kernels); "
                                    "PyTorch SDPA attention is used by default")
        optimizer_class(self.optimizer)  # bitsandbytes for adam8bit: a clear error now, not after the mask pass
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConceptEraseError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
        if self.batch_size % (num_processes * self.gradient_accumulation_steps):
            raise ConceptEraseError(
                f"batch_size {self.batch_size} must be divisible by processes x gradient_accumulation_steps "
                f"= {num_processes} x {self.gradient_accumulation_steps}")

    def resume_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run that wrote the checkpoint: every field of this
        config (a subclass's too: the model, the concept, the mask settings) except `RESUME_FREE`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RESUME_FREE}


@dataclass
class LatentSet:
    """Training items: VAE latents (already multiplied by vae.config.scaling_factor) and, per item, its
    prompt; for a forget set also its surrogate prompt (the SalUn target; ESD ignores it)."""

    latents: Tensor
    prompts: list[str]
    surrogates: list[str] | None = None

    def __post_init__(self):
        n = self.latents.shape[0]
        if n == 0:
            raise ConceptEraseError("a latent set is empty")
        if len(self.prompts) != n or (self.surrogates is not None and len(self.surrogates) != n):
            raise ConceptEraseError(f"a latent set has {n} latents but {len(self.prompts)} prompts")


@dataclass
class TrainResult:
    unet: nn.Module                     # the trained UNet (also left in pipe.unet)
    losses: list[dict[str, float]]      # one entry per step: step, loss, loss_forget, loss_retain
    seconds_per_step: float             # mean wall time of the steps run in this call
    peak_memory: int                    # bytes: CUDA max allocated, or the process's peak RSS on CPU
    steps: int                          # steps done in total (including those before a resume)
    resumed_from: int = 0               # the step the run resumed from (0: a fresh run)


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
) -> TrainResult:
    """Erase in memory: train `pipe.unet` in place and return a TrainResult.

    pipe:         a StableDiffusionPipeline (its text encoder encodes the prompts once; VAE unused).
    forget:       LatentSet with `surrogates` (needed by salun / rl).
    retain:       LatentSet or None (None or alpha=0: no retain loss).
    config:       TrainConfig (an EraseConfig works too).
    mask:         concept_erase.saliency.SaliencyMask on the UNet's parameters; required by "salun", refused by
                  "rl"; with "esd-x"/"esd-u" it is intersected with the method's layer scope.
    frozen_unet:  ESD's frozen original UNet; default: a copy of pipe.unet taken before training.
    checkpoint_dir, resume: write checkpoint-<step> folders there every config.checkpointing_steps; resume
                  "latest" (the newest one, or a fresh start if none) or a checkpoint folder path.
    Works under `accelerate launch` / `torchrun` (each process calls it with the same arguments).
    Raises ConceptEraseError on bad input and on a non-finite loss (checkpoints already written are kept).
    """
    from accelerate import Accelerator

    from ..saliency import SaliencyMask, build_optimizer

    if config.method == "salun" and mask is None:
        raise ConceptEraseError("method 'salun' needs a saliency mask (--mask FILE, or let erase compute one)")
    if config.method == "rl" and mask is not None:
        raise ConceptEraseError("method 'rl' trains every weight; drop --mask or use --method salun")
    if config.method in ("salun", "rl") and forget.surrogates is None:
        raise ConceptEraseError(f"method {config.method!r} needs a surrogate prompt for every forget item")
    config.check_launch(1)  # xformers / fp16 before Accelerator fails on them less clearly

    _reset_accelerate_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    config.check_launch(world)  # and the batch split, now that the process count is known
    micro_batches = world * config.gradient_accumulation_steps
    device = accelerator.device
    unet = pipe.unet
    unet.to(device)
    if unet.dtype != torch.float32:
        unet.to(dtype=torch.float32)  # fp32 master weights; mixed precision autocasts the forward

    # ESD's frozen eps0 is the model BEFORE any update (also before a resumed checkpoint is loaded).
    if frozen_unet is not None and config.method not in ESD_SCOPES:
        raise ValueError(f"frozen_unet is ESD's reference model; method {config.method!r} does not use one")
    if config.method in ESD_SCOPES and frozen_unet is None:
        frozen_unet = copy.deepcopy(unet)
    if frozen_unet is not None:
        frozen_unet.requires_grad_(False).eval().to(device)

    # -- which weights train: the mask, the ESD layer scope, or everything (rl)
    if config.method in ESD_SCOPES:
        scope = SaliencyMask.from_names(unet, ESD_SCOPES[config.method], concept=config.method)
        if mask is not None:
            mask.check_compatible(unet)
            scope.masks = {n: m & mask.masks.get(n, torch.zeros_like(m)) for n, m in scope.masks.items()}
        mask = scope
    # Masked: optimizer state for the salient entries only, frozen entries never written (saliency.py).
    optimizer = build_optimizer(unet, mask, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)

    # -- resume: weights, optimizer state and the step counter (the data order is a function of the step)
    start_step, losses = 0, []
    ckpt = _find_checkpoint(checkpoint_dir, resume)
    if ckpt is not None:
        start_step, losses = _load_checkpoint(ckpt, unet, optimizer, config)
        if accelerator.is_main_process:
            print(f"resuming from {ckpt} (step {start_step})", file=sys.stderr)

    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers:
        unet.enable_xformers_memory_efficient_attention()
    unet.train()
    unet, optimizer = accelerator.prepare(unet, optimizer)  # after build_optimizer: DDP sees only trainable params

    # -- prompts -> embeddings, once (the text encoder is frozen)
    embed = PromptEmbeddings(pipe, device)
    f_cond = embed(forget.prompts)
    f_target = embed(forget.surrogates) if forget.surrogates is not None else None
    r_cond = embed(retain.prompts) if retain is not None else None
    uncond = embed([""])
    use_retain = retain is not None and config.alpha > 0
    T = pipe.scheduler.config.num_train_timesteps
    scheduler = training_scheduler(pipe.scheduler)  # q_sample, whatever sampler the pipeline ships with
    is_esd = config.method in ESD_SCOPES
    esd_sampler = esd_scheduler(pipe.scheduler) if is_esd else None  # private: set_timesteps mutates it

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    bar = _progress(range(start_step, config.steps), progress and accelerator.is_local_main_process, start_step,
                    config.steps)
    step_times = []
    for step in bar:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        # The GLOBAL batch of this step: items, noise, timesteps (identical on every process) ...
        f_idx = _epoch_indices(forget.latents.shape[0], config.seed, step, config.batch_size)
        f_noise, f_t = sample_noise(forget.latents[f_idx], T, gen)
        if use_retain:
            r_idx = _epoch_indices(retain.latents.shape[0], config.seed + 1, step, config.batch_size)
            r_noise, r_t = sample_noise(retain.latents[r_idx], T, gen)
        esd_stop = int(torch.randint(0, config.esd_ddim_steps, (1,), generator=gen)) if is_esd else 0
        # ... of which this process takes micro-batches rank*G .. rank*G + G-1.
        per = config.batch_size // micro_batches
        step_loss = torch.zeros(3, device=device)
        for k in range(config.gradient_accumulation_steps):
            lo = (rank * config.gradient_accumulation_steps + k) * per
            sl = slice(lo, lo + per)
            ix = f_idx[sl]
            fb = noise_batch(scheduler, forget.latents[ix].to(device), f_cond[ix], f_noise[sl].to(device),
                             f_t[sl].to(device), f_target[ix] if f_target is not None else None)
            rb = None
            if use_retain:
                rix = r_idx[sl]
                rb = noise_batch(scheduler, retain.latents[rix].to(device), r_cond[rix], r_noise[sl].to(device),
                                 r_t[sl].to(device))
            last = k == config.gradient_accumulation_steps - 1
            # Gradients are all-reduced only on the last micro-batch (DDP no_sync covers forward + backward).
            with nullcontext() if last else accelerator.no_sync(unet):
                with accelerator.autocast():
                    if is_esd:
                        z_t, t_esd = esd_partial_sample(accelerator.unwrap_model(unet), esd_sampler, fb.noise,
                                                        fb.cond, uncond.expand(len(fb.cond)), config.esd_ddim_steps,
                                                        esd_stop, config.esd_start_guidance)
                        fb = NoisedBatch(z_t, fb.noise, fb.noise, t_esd, fb.cond, uncond.expand(len(fb.cond)))
                        loss, loss_f, loss_r = esd_loss(unet, frozen_unet, fb, config.esd_eta, rb, config.alpha)
                    else:
                        loss, loss_f, loss_r = salun_loss(unet, fb, rb, config.alpha)
                accelerator.backward(loss / config.gradient_accumulation_steps)
            step_loss += torch.stack([loss.detach(), loss_f, loss_r]).float() / config.gradient_accumulation_steps
        # Every process must agree before stepping: a NaN on one rank would poison all of them via all-reduce.
        step_loss = accelerator.reduce(step_loss, reduction="mean")
        if not torch.isfinite(step_loss).all():
            optimizer.zero_grad(set_to_none=True)
            last_ckpt = _latest_checkpoint(checkpoint_dir)
            kept = f"; last good checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was written"
            raise ConceptEraseError(f"non-finite loss {step_loss[0].item()} at step {step}, stopping{kept}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": step_loss[0].item(), "loss_forget": step_loss[1].item(),
                  "loss_retain": step_loss[2].item()}
        losses.append(record)
        step_times.append(time.perf_counter() - t0)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['loss']:.4g}", forget=f"{record['loss_forget']:.4g}",
                            retain=f"{record['loss_retain']:.4g}")
        if checkpoint_dir and config.checkpointing_steps and (step + 1) % config.checkpointing_steps == 0:
            _save_checkpoint(accelerator, Path(checkpoint_dir), step + 1, unet, optimizer, config, losses)

    # -- hand back a plain module: no DDP wrapper, no hooks, no checkpointing, frozen
    unet = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.requires_grad_(False).eval()
    pipe.unet = unet
    accelerator.wait_for_everyone()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss()
    return TrainResult(unet, losses, sum(step_times) / max(1, len(step_times)), peak, len(losses), start_step)


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
        from .families import family_of

        self.pipe, self.device, self.size, self.cache = pipe, device, size, {}
        self.family = family_of(pipe)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)

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


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------ checkpoints

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _latest_checkpoint(checkpoint_dir) -> Path | None:
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(checkpoint_dir).iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / "state.json").is_file()]
    return max(found)[1] if found else None


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
    """checkpoint-<step>/: unet.safetensors (all UNet weights), optimizer.pt (tensors only, loaded with
    weights_only=True), rng.safetensors, state.json (step, losses, the settings that must match on resume).
    The data order needs no file: it is a function of (seed, step). Written atomically by the main process."""
    from safetensors.torch import save_file

    model = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Every process holds the same weights, so every process reaches the same verdict (no one waits forever).
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ConceptEraseError(f"non-finite weights at step {step}, stopping; last good checkpoint: "
                                f"{_latest_checkpoint(checkpoint_dir)}")
    if accelerator.is_main_process:
        with atomic_dir(checkpoint_dir / f"checkpoint-{step}", overwrite=True) as tmp:
            save_file(state, str(tmp / "unet.safetensors"))
            torch.save(getattr(optimizer, "optimizer", optimizer).state_dict(), tmp / "optimizer.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps(
                {"step": step, "config": config.resume_key(), "losses": losses}, indent=1))
        if config.checkpoints_total_limit:
            done = sorted((int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
            for _, old in done[: -config.checkpoints_total_limit]:
                import shutil

                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, unet, optimizer, config: TrainConfig) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "unet.safetensors"))
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
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
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConceptEraseError(f"checkpoint {str(path)!r} does not fit this UNet "
                                f"(first mismatch: {(missing or unexpected)[0]!r})")
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
    embed = PromptEmbeddings(pipe, device)
    cond, uncond = embed(forget.prompts), embed([""])
    T = pipe.scheduler.config.num_train_timesteps
    scheduler = training_scheduler(pipe.scheduler)
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, forget.latents.shape[0], batch_size):
        z = forget.latents[lo: lo + batch_size]
        noise, t = sample_noise(z, T, gen)
        c = cond[lo: lo + batch_size]
        yield noise_batch(scheduler, z.to(device), c, noise.to(device), t.to(device), uncond.expand(len(c)))


def compute_mask(pipe, forget: LatentSet, keep: float = 0.5, *, include=None, batch_size: int = 8,
                 seed: int = 0, guidance: float = SALIENCY_GUIDANCE, concept: str = "", lowest: bool = False,
                 progress: bool = False):
    """The SalUn mask of `pipe.unet` for a forget set: one pass over it with the diffusion saliency loss
    (docs/ALGORITHMS.md 1-2: MSE(eps, (1 + w) eps(x_t, c_f) - w eps(x_t, "")), w = 7.5, t ~ U{0..999}), noise and
    timesteps from `seed`; `include`: None (every UNet weight) or a regex on parameter names.
    `lowest=True` keeps the LEAST salient weights instead (the inverted-mask control of the benchmark)."""
    from ..saliency import SaliencyMask

    batches = saliency_batches(pipe, forget, batch_size=batch_size, seed=seed)
    return SaliencyMask.compute(pipe.unet, batches, saliency_loss_fn(guidance), keep=keep, include=include,
                                concept=concept, lowest=lowest, progress=progress)


# ------------------------------------------------------------------------------------------------ the job

@dataclass(kw_only=True)
class EraseConfig(TrainConfig):
    """Everything `concept-erase erase` needs. A preset concept's `recipe` supplies defaults for the fields
    the user did not set (see `EraseConfig.for_concept`)."""

    model: str = field(metadata={
        "help": 'the model to erase from: a diffusers folder, a .safetensors/.ckpt file, a hub id or "minisd"'})
    output: str = field(metadata={"help": "output folder: the erased diffusers pipeline, its model card and mask"})
    model_config: str | None = field(default=None, metadata={
        "help": "local diffusers folder with the component configs of a single-file --model (offline)"})
    concept: str | None = field(default=None, metadata={
        "help": "a preset concept (nudity, imagenette-<class>, style-<artist>, minisd-...)"})
    forget: list[str] | None = field(default=None, metadata={
        "help": "custom concept: a forget prompt (repeat the flag for several)"})
    surrogate: list[str] | None = field(default=None, metadata={
        "help": "custom concept: the surrogate prompt (one, or one per --forget)"})
    retain_prompts: str | None = field(default=None, metadata={
        "help": "file of retain prompts, one per line (default: the preset's, or the surrogate)"})
    mask: str | None = field(default=None, metadata={
        "help": "saliency mask file (from `concept-erase mask`); salun computes one when it is not given"})
    keep: float = field(default=0.5, metadata={"help": "fraction of UNet weights the computed mask keeps trainable"})
    mask_scope: str | None = field(default=None, metadata={
        "help": "regex on UNet parameter names the computed mask ranks (default: every parameter)"})
    num_forget_images: int = field(default=64, metadata={"help": "forget images generated by the base model"})
    num_retain_images: int = field(default=64, metadata={"help": "retain images generated by the base model"})
    forget_images: str | None = field(default=None, metadata={
        "help": "use this folder of forget images instead of generating them (prompts: its manifest.jsonl, "
                "or the first forget prompt)"})
    image_steps: int = field(default=25, metadata={"help": "denoising steps when generating forget/retain images"})
    image_guidance: float = field(default=7.5, metadata={"help": "guidance scale when generating them"})
    resolution: int | None = field(default=None, metadata={"help": "image size in pixels (default: the model's)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "image/latent cache (default: $CONCEPT_ERASE_CACHE or ~/.cache/concept-erase)"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "where checkpoint-<step> folders go (default: OUTPUT.checkpoints)"})
    resume: str | None = field(default=None, metadata={
        "help": 'resume from "latest" (the newest checkpoint in --checkpoint-dir, if any) or a checkpoint folder'})
    export_single_file: str | None = field(default=None, metadata={
        "help": "also write the erased model as one original-layout .safetensors file here"})
    save_delta: str | None = field(default=None, metadata={
        "help": "also write only the changed UNet weights (+ mask) here, to apply onto the base model"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing outputs"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.keep <= 1:
            raise ConceptEraseError(f"keep must be in (0, 1], got {self.keep!r}")
        for name in ("num_forget_images", "num_retain_images", "image_steps"):
            if int(getattr(self, name)) < 1:
                raise ConceptEraseError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.method == "rl" and self.mask:
            raise ConceptEraseError(f"--method rl trains every weight; it takes no --mask ({self.mask!r})")
        if self.concept is None and not self.forget:
            raise ConceptEraseError("name a --concept preset or give --forget and --surrogate")
        if self.mask_scope is not None:
            try:
                re.compile(self.mask_scope)
            except re.error as err:
                raise ConceptEraseError(f"--mask-scope {self.mask_scope!r} is not a valid regex ({err})") from None

    @classmethod
    def for_concept(cls, **values) -> "EraseConfig":
        """Build a config: the preset concept's recipe first, then `values` (the user's choices) on top."""
        from ..concepts import get_concept

        recipe = get_concept(values["concept"]).recipe if values.get("concept") else {}
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in recipe.items() if k in names}, **values})

    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.output}.checkpoints")

    def get_concept(self):
        from ..concepts import get_concept

        return get_concept(self.concept, forget=self.forget, surrogate=self.surrogate,
                           retain_prompts=self.retain_prompts)


def build_latent_sets(pipe, concept, config: EraseConfig, state) -> tuple[LatentSet, LatentSet | None]:
    """Forget and retain images generated by the base model (cached; resumable) or read from a folder, encoded
    to latents once. Under several processes the main one generates and the others then read the cache.
    ESD samples its own z_t from the model, so it needs no forget images: it gets one zero latent per prompt."""
    from .data import ImageSet, SamplingSettings, default_image_size

    settings = SamplingSettings(num_inference_steps=config.image_steps, guidance_scale=config.image_guidance,
                                height=config.resolution, width=config.resolution)
    cache = config.cache_dir

    def generated(prompts: list[str], total: int) -> ImageSet:
        per_prompt = math.ceil(total / len(prompts))
        with state.main_process_first():  # the main process fills the cache; the others find it full
            return ImageSet.generate(pipe, prompts, per_prompt, cache, seed=config.seed, settings=settings,
                                     progress=config.progress and state.is_main_process)

    size = (config.resolution,) * 2 if config.resolution else default_image_size(pipe)  # train at --resolution
    if config.method in ESD_SCOPES:
        h, w = size
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        latents = torch.zeros(len(concept.forget_prompts), pipe.unet.config.in_channels, h // f, w // f)
        forget = LatentSet(latents, list(concept.forget_prompts))
    else:
        if config.forget_images:
            folder = Path(config.forget_images)
            has_prompts = (folder / "manifest.jsonl").is_file() or (folder / "metadata.jsonl").is_file()
            images = ImageSet.from_folder(folder, None if has_prompts else concept.forget_prompts[0],
                                          cache_dir=cache)
        else:
            images = generated(concept.forget_prompts, config.num_forget_images)
        with state.main_process_first():
            latents = images.latents(pipe, batch_size=config.batch_size, size=size)
        surrogates = [concept.surrogate_for(p) for p in images.prompts]
        forget = LatentSet(latents, images.prompts, surrogates)
    retain = None
    if config.alpha > 0:
        images = generated(concept.retain_prompts, config.num_retain_images)
        with state.main_process_first():
            latents = images.latents(pipe, batch_size=config.batch_size, size=size)
        retain = LatentSet(latents, images.prompts)
    return forget, retain


def _prepare(config: EraseConfig):
    """Shared start of `mask` and `erase`: the process state, the concept and the pipeline on its device."""
    from accelerate import PartialState

    from .loading import load_pipeline

    concept = config.get_concept()
    state = PartialState(cpu=not torch.cuda.is_available())
    pipe = load_pipeline(config.model, config=config.model_config)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    return state, concept, pipe


def run_mask(config: EraseConfig) -> dict[str, Any]:
    """`concept-erase mask`: compute the saliency mask of config.concept and write it to config.output."""
    from ..io_utils import check_output_free

    check_output_free(config.output, config.overwrite)
    state, concept, pipe = _prepare(config)
    forget, _ = build_latent_sets(pipe, concept, _without_retain(config), state)
    t0 = time.perf_counter()
    mask = compute_mask(pipe, forget, config.keep, include=config.mask_scope, batch_size=config.batch_size,
                        seed=config.seed, concept=concept.name, progress=config.progress)
    seconds = time.perf_counter() - t0
    if state.is_main_process:
        mask.save(config.output, overwrite=config.overwrite)
    return {"output": str(config.output), "concept": concept.name, "keep": config.keep,
            "kept_fraction": mask.kept_fraction, "forget_images": int(forget.latents.shape[0]),
            "seconds": round(seconds, 3), "fingerprint": mask.fingerprint}


def _without_retain(config: EraseConfig) -> EraseConfig:
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    return EraseConfig(**{**values, "alpha": 0.0, "method": "salun" if config.method in ESD_SCOPES else config.method})


def run_erase(config: EraseConfig) -> dict[str, Any]:
    """`concept-erase erase`: the whole job. Returns the summary (also written as OUTPUT/erase_summary.json).

    Fails before any work if an output exists (without overwrite) or the mask does not fit the model; on a
    non-finite loss it raises ConceptEraseError and the checkpoints written so far stay in place."""
    from ..io_utils import check_output_free
    from ..saliency import SaliencyMask

    for path in (config.output, config.export_single_file, config.save_delta):
        if path:
            check_output_free(path, config.overwrite)
    t_start = time.perf_counter()
    state, concept, pipe = _prepare(config)
    config.check_launch(state.num_processes)

    mask = None
    ckpt_dir = config.checkpoints()
    resumed_mask = ckpt_dir / RESUME_MASK
    if config.mask:
        mask = SaliencyMask.load(config.mask, model=pipe.unet)  # a mask for another model fails here, early
    elif config.method == "salun" and _find_checkpoint(ckpt_dir, config.resume) and resumed_mask.is_file():
        mask = SaliencyMask.load(resumed_mask, model=pipe.unet)  # the mask the interrupted run computed
        made_for, now = (mask.keep, mask.scope, mask.concept), (config.keep, config.mask_scope or "all", concept.name)
        if made_for != now:
            raise ConceptEraseError(f"cannot resume: {str(resumed_mask)!r} was computed for another job "
                                    f"(keep, scope, concept: {made_for}; now {now})")
    forget, retain = build_latent_sets(pipe, concept, config, state)
    mask_seconds = 0.0
    if config.method == "salun" and mask is None:
        t0 = time.perf_counter()
        # One process computes it and the others read it, so every process trains the same weights even
        # where GPU gradients are not bit-reproducible. Kept beside the checkpoints for --resume.
        if state.is_main_process:
            mask = compute_mask(pipe, forget, config.keep, include=config.mask_scope, batch_size=config.batch_size,
                                seed=config.seed, concept=concept.name, progress=config.progress)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            mask.save(resumed_mask, overwrite=True)
        state.wait_for_everyone()
        if not state.is_main_process:
            mask = SaliencyMask.load(resumed_mask, model=pipe.unet)
        mask_seconds = time.perf_counter() - t0
    base_unet = copy.deepcopy(pipe.unet).cpu() if config.save_delta else None

    try:
        result = train_unet(pipe, forget, retain, config, mask=mask, checkpoint_dir=ckpt_dir,
                            resume=config.resume, progress=config.progress)
    except BaseException:
        if state.is_main_process and _latest_checkpoint(ckpt_dir) is None:
            _remove_resume_mask(ckpt_dir)  # nothing to resume: leave nothing behind
        raise
    summary = {
        "output": str(config.output), "model": config.model, "concept": concept.name, "method": config.method,
        "steps": result.steps, "resumed_from": result.resumed_from, "batch_size": config.batch_size,
        "processes": state.num_processes, "lr": config.lr, "alpha": config.alpha,
        "keep": None if mask is None else round(mask.kept_fraction, 6),
        "forget_images": int(forget.latents.shape[0]),
        "retain_images": 0 if retain is None else int(retain.latents.shape[0]),
        "seconds_total": round(time.perf_counter() - t_start, 3), "seconds_mask": round(mask_seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4), "peak_memory_bytes": result.peak_memory,
        "final_loss": result.losses[-1] if result.losses else None, "losses": result.losses,
    }
    if state.is_main_process:
        _save_outputs(pipe, config, concept, mask, base_unet, summary)
        if not config.checkpointing_steps:  # nothing to resume from: do not leave the shared mask behind
            _remove_resume_mask(ckpt_dir)
    state.wait_for_everyone()
    return summary


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

    surrogate = concept.surrogate_prompts[0] if len(concept.surrogate_prompts) == 1 else concept.surrogate_prompts
    card = {"base_model": config.model, "concept": concept.name, "forget_prompts": concept.forget_prompts,
            "surrogate": surrogate, "method": config.method,
            "keep": None if mask is None else summary["keep"], "steps": summary["steps"],
            "training": {"lr": config.lr, "alpha": config.alpha, "batch_size": config.batch_size,
                         "seed": config.seed, "forget_images": summary["forget_images"],
                         "retain_images": summary["retain_images"]}}
    with atomic_dir(config.output, overwrite=config.overwrite) as tmp:
        save_pipeline(pipe, tmp, card=card, overwrite=True)
        if mask is not None:
            mask.save(tmp / "mask.safetensors", overwrite=True)
        (tmp / "erase_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if config.export_single_file:
        export_single_file(pipe, config.export_single_file, overwrite=config.overwrite)
    if config.save_delta:
        save_delta(base_unet, pipe.unet.cpu(), mask, config.save_delta, overwrite=config.overwrite)
