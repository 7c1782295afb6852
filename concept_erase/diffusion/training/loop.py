"""The erasure loop (docs/ALGORITHMS.md 2): train a pipeline's module in place with a method object.

The method (`methods/`) is resolved once before the loop and gives the trained weights, the per-step batch and
loss; the loop owns what every method shares: shuffled, cycled forget batches; accelerate for devices,
processes, mixed precision and gradient accumulation; the divergence guard; `checkpoint-<step>` folders and
exact resume (`checkpoints.py`). Used in memory by benchmarks and the MiniSD demo, and by the `erase` job.

Reproducibility: every random draw of step `s` (which forget/retain items, their noise and timesteps) comes
from a generator seeded with (seed, s), and the item order is a per-epoch permutation seeded with
(seed, epoch). So a run resumed from `checkpoint-<s>` repeats exactly what the uninterrupted run would have
done, and N processes draw the same GLOBAL batch and each take their slice of it: with the same global batch
size the gradients (hence the weights) are the same as in one process, up to float summation order.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ...runtime import resident_memory
from ...saliency import build_optimizer
from ..data.latents import LatentSet
from ..losses import denoising_loss, noise_batch, sample_noise, training_scheduler
from ..methods.base import Method
from ..models.families import family_of
from .checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .guard import DivergenceGuard
from .trained import trained_module

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


def train_unet(
    pipe,
    forget: LatentSet,
    retain: LatentSet | None,
    method: Method | TrainConfig,
    mask=None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | None = None,
    progress: bool = False,
    concept_of: dict[str, str] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Erase in memory: train `pipe.unet` (or the trained module) in place with `method` and return a TrainResult.

    pipe:         a StableDiffusionPipeline (its text encoder encodes the prompts once; VAE unused).
    forget:       LatentSet (with `surrogates` for methods that steer to a surrogate: salun, rl, ca; ESD needs
                  only prompts: `LatentSet.prompts_only`).
    retain:       LatentSet or None (None or alpha=0: no retain loss).
    method:       the run's Method object (`config.build_method()`, built once by the caller); a TrainConfig
                  (or EraseConfig) is taken as the method it names, built here.
    mask:         concept_erase.saliency.SaliencyMask on the UNet's parameters; required by "salun", refused by
                  "rl"; with the other methods it is intersected with the method's layer scope.
    checkpoint_dir, resume: write checkpoint-<step> folders there every config.checkpointing_steps; resume
                  "latest" (the newest one, or a fresh start if none) or a checkpoint folder path.
    concept_of:   forget prompt -> concept name: after training, the method's forget loss per concept and the
                  retain loss on one fixed draw (`TrainResult.forget_per_concept`, `retain_loss`).
    on_step:      called with (steps done, total steps) before the first step and after each one (the app's
                  progress); an exception it raises stops the run there, before anything is saved.
    Works under `accelerate launch` / `torchrun` (each process calls it with the same arguments).
    Raises ConceptEraseError on bad input and on a non-finite loss (checkpoints already written are kept).
    """
    from accelerate import Accelerator

    if isinstance(method, TrainConfig):
        method = method.build_method()
    config = method.config  # everything method-specific is behind `method`; the loop's settings are here
    if method.closed_form:
        raise ConceptEraseError(f"method {method.name!r} is a closed-form edit, not a training loop "
                                "(use run_erase or its own edit function)")
    config.check_launch(1)  # xformers / fp16 before Accelerator fails on them less clearly

    _reset_accelerate_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    world, rank = accelerator.num_processes, accelerator.process_index
    config.check_launch(world)  # and the batch split, now that the process count is known
    micro_batches = world * config.gradient_accumulation_steps
    device = accelerator.device
    family = family_of(pipe)
    family.check_method(method)  # a method with no form for this denoiser (a diffusion transformer) is refused
    family.denoiser(pipe).to(device)
    # THE trained module (trained.py): the UNet, or the text encoder with the UNet frozen; it also encodes prompts
    trained = trained_module(config.train)(pipe, device, family.latents_image_size(pipe, forget.latent_shape))
    model = trained.module
    model.to(device)
    weights_dtype = torch.float32 if config.master_weights == "fp32" else torch.bfloat16
    if model.dtype != weights_dtype:
        model.to(dtype=weights_dtype)  # fp32 master weights, or bf16 (the optimizer holds any fp32 copies)
    method.prepare(trained, pipe, device)
    if fsdp_selected():
        _check_sharded(config, checkpoint_dir)
    sharded = fsdp_selected() and world > 1
    if sharded:  # before the optimizer, which then holds each process's shards (docs/ALGORITHMS.md, "Sharding")
        plain_class, model = type(model), _fully_shard(model)  # (fully_shard changes its class)
        from accelerate.logging import get_logger

        get_logger(__name__).info("FSDP: the %s is sharded over %d processes (torch fully_shard)", config.train,
                                  world)

    # -- which weights train (the method's mask or scope; None: every weight), and THE optimizer over them:
    # masked, it keeps optimizer state for the salient entries only and never writes frozen ones (saliency.py)
    trainable = method.trainable(model, family, mask)
    optimizer = build_optimizer(model, trainable, config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                grad_release=config.grad_release, master_weights=config.master_weights,
                                seed=config.seed)
    released = getattr(optimizer, "remove_hooks", None)  # grad release's hooks: gone however the run ends
    try:
        # -- resume: weights, optimizer state and the step counter (the data order is a function of the step)
        start_step, losses = 0, []
        ckpt = find_checkpoint(checkpoint_dir, resume)
        if ckpt is not None:
            start_step, losses = load_checkpoint(ckpt, model, optimizer, config)
            from accelerate.logging import get_logger

            get_logger(__name__).info("resuming from %s (step %d)", ckpt, start_step)  # main process only

        if config.gradient_checkpointing:
            family.denoiser(pipe).enable_gradient_checkpointing()  # (refused with --train text-encoder)
        if config.enable_xformers:
            family.denoiser(pipe).enable_xformers_memory_efficient_attention()
        model.train()
        # blow-ups, finite ones included, stop the run; only checkpoints that passed are kept as good (guard.py)
        guard = DivergenceGuard(list(model.parameters()), checkpoint_dir, start_step=start_step,
                                keep=config.checkpoints_total_limit, main=accelerator.is_main_process)
        # after build_optimizer: DDP sees only trainable params. Sharded, the model is FSDP2's already and
        # the optimizer steps local shards: accelerate's own FSDP would re-wrap both (docs/ALGORITHMS.md)
        if not sharded:
            model, optimizer = accelerator.prepare(model, optimizer)
        unet = trained.unet(model)  # the UNet the losses call (the prepared module when it is the one training)

        # -- per item, the prompts its conditionings come from (`trained.encode`: cached, or through the encoder)
        targets = method.target_prompts(forget.prompts, forget.surrogates)
        use_retain = retain is not None and config.alpha > 0
        T = pipe.scheduler.config.num_train_timesteps
        scheduler = training_scheduler(pipe.scheduler)  # q_sample, whatever sampler the pipeline ships with
        # The VAE is done (latents cached), and so are frozen text encoders (prompts cached): off the GPU.
        parked = [m for m in (*family.text_modules(pipe).values(), pipe.vae)
                  if device.type == "cuda" and m is not None and m is not trained.module]
        for module in parked:
            module.to("cpu")

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        bar = _progress(range(start_step, config.steps), progress and accelerator.is_local_main_process, start_step,
                        config.steps)
        step_times = []
        if on_step is not None:
            on_step(start_step, config.steps)
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
                                         trained.encode(prompts), trained.target([targets[i] for i in ix]),
                                         f_noise[sl].to(device), f_t[sl].to(device), draws, step=step, prompts=prompts)
                rb = None
                if use_retain:
                    rix = r_idx[sl]
                    rb = noise_batch(scheduler, retain.take(rix, device),
                                     trained.encode([retain.prompts[i] for i in rix]),
                                     r_noise[sl].to(device), r_t[sl].to(device))
                # accelerate's accumulation: gradients are all-reduced only on the last micro-batch, the loss is
                # divided by the number of micro-batches, and the optimizer steps only once they are all in
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, loss_f, loss_r = method.loss(unet, fb, rb)
                    step_loss += (torch.stack([loss.detach(), loss_f, loss_r]).float()
                                  / config.gradient_accumulation_steps)
                    if config.grad_release:  # the backward pass steps the weights: the loss is checked before it
                        guard.check_loss(step, step_loss)  # (one process, one micro-batch: the whole step's loss)
                    accelerator.backward(loss)
            if not config.grad_release:
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
                save_checkpoint(accelerator, Path(checkpoint_dir), step + 1, model, optimizer, config, losses)
            if on_step is not None:
                on_step(step + 1, config.steps)
        guard.finish(config.steps)
    finally:
        if released is not None:
            released()

    # -- hand back plain modules: no DDP wrapper or shards, no hooks, no checkpointing, frozen
    plain = _gathered(plain_class, model) if sharded else accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    setattr(pipe, trained.attr, plain)
    unet = family.denoiser(pipe)
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


def fsdp_selected() -> bool:
    """Whether the `accelerate launch` config selects FSDP (its launcher sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _fully_shard(model: nn.Module) -> nn.Module:
    """torch's FSDP2 on the trained denoiser: each block of its block lists (a UNet's down and up blocks, a
    transformer's blocks) and its mid block are one all-gather unit, the root holds the rest. Every parameter
    becomes a DTensor sharded on dim 0 over the processes, and its gradient is reduce-scattered to the same
    rows: the masked optimizer steps the salient entries of its shard (`saliency.shard_rows`).
    accelerate 1.15 runs FSDP only on accelerators (on CPU it silently falls back to DDP), and its FSDP2
    prepare rebinds an optimizer's parameter groups only, not a masked optimizer's packed shards: so the loop
    shards with torch itself and accelerate stays the launcher and process-group owner."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        for block in (child if isinstance(child, nn.ModuleList) else ()):
            fully_shard(block)
    if isinstance(getattr(model, "mid_block", None), nn.Module):
        fully_shard(model.mid_block)
    return fully_shard(model)


def _check_sharded(config: TrainConfig, checkpoint_dir) -> None:
    """What the sharded loop does not do (yet): each refused in one line before any work."""
    refused = {"--train text-encoder (FSDP shards the denoiser)": config.train != "unet",
               "--grad-release (its hooks step whole tensors)": config.grad_release,
               "--mixed-precision fp16 (no loss scaler on sharded gradients)": config.mixed_precision == "fp16",
               "checkpoints (they hold whole tensors; run without --checkpointing-steps)":
                   bool(checkpoint_dir and config.checkpointing_steps)}
    for what, bad in refused.items():
        if bad:
            raise ConceptEraseError(f"the accelerate config selects FSDP, which the erase loop runs without {what}")


def _gathered(plain_class: type, model: nn.Module) -> nn.Module:
    """The sharded `model`'s full weights (all-gathered: the same on every process) in a new plain module of
    its own class, built on the meta device and given the gathered tensors and the buffers (never sharded)."""
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    with torch.device("meta"):
        plain = plain_class.from_config(model.config)
    plain.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():  # the non-persistent ones too
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner)._buffers[attr] = buffer
    return plain


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


def _progress(iterable, enabled: bool, initial: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, initial=initial, total=total, desc="erase", unit="step")
