"""`concept-erase plan`: the peak memory of an erasure run, estimated before anything runs.

Nothing is loaded or computed: every component of the pipeline is built from its config on PyTorch's meta
device (shapes and dtypes, no storage), which gives the exact parameter counts, and the UNet's forward pass is
run there once with a hook on what autograd saves for the backward pass, which gives the exact activation
memory of this architecture at this batch and resolution. The estimate then follows the run's timeline:

- the mask pass (SalUn without --mask): fp32 weights, the fp32 gradients it accumulates (they become the
  scores), and the guided saliency loss's activations (the UNet runs on the conditional and the unconditional
  micro-batch, so twice the micro-batch);
- a training step: the UNet's weights (on a GPU the loop parks the text encoders and the VAE on the CPU), the
  frozen original UNet (ESD), optimizer state (Adam: 8 bytes per trainable entry, 8-bit Adam about 2; under a
  SalUn mask for the salient entries only, plus the salient set's bitmask; a layer scope is a bool per UNet
  weight), and during the backward pass the activations not yet consumed plus the gradients already made
  (walked in the forward's order); `layout.py` has what bf16 weights, gradient release and sharding change;
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
than the tensors of a small model). That part is not estimated but measured: `plan_search.run_plan` imports
the same libraries and classes, loads the tokenizers, and reads its own resident memory. `plan_search.py` is
what the command answers for a --memory-budget: the settings that fit, or why none do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConceptEraseError
from .layout import Layout, bitmask_bytes, optimizer_state
from .memory import ModelCounts, backward_peak, load_counts, no_grad_peak
from .plan_config import PlanConfig
from .training.mask_pass import mask_batch

GiB = 2**30
# CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack, beyond allocated tensors.
CUDA_RESERVE = 1 * GiB
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


def estimate(config: PlanConfig, counts: ModelCounts | None = None) -> Plan:
    """The peak memory of `concept-erase erase` with these settings (see the module docstring)."""
    config = config.on_device()
    counts = counts or load_counts(config.model, config.model_config)
    unet = counts.unet
    resolution = config.resolution or counts.default_resolution
    latent = max(1, resolution // counts.vae_scale)
    micro = max(1, config.batch_size // (config.gradient_accumulation_steps * config.num_processes))
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
    k = sum(entries)
    at = Layout.of(config)  # bytes per entry and shards of the memory settings (layout.py)
    grad_bytes = {id(named[n]): at.sharded(at.weight_bytes * named[n].numel()) for n in trainable}
    # the step gathers one tensor's salient entries at a time: fp32 values and gradients and an int64 index,
    # plus on CUDA the temporary torch's foreach Adam makes per entry it steps
    largest = max(trainable, key=lambda n: named[n].numel())
    foreach = 4 if config.device == "cuda" and config.optimizer == "adam" else 0
    one_tensor = (16 + foreach) * (round(config.keep * named[largest].numel()) if masked else 0)

    shard = f", 1/{at.weight_shards} of the UNet per process" if at.weight_shards > 1 else ""
    if config.device == "cuda":  # the loop parks the text encoders and the VAE on the CPU while it trains
        weights = {f"weights ({'bf16 UNet' if at.half_weights else 'fp32 UNet master'}{shard})": at.weights(n_unet)}
        host = {"text encoders + VAE (parked while training)": 4 * others}
    else:
        weights = {f"weights ({'bf16 UNet, fp32' if at.half_weights else 'fp32: UNet master'} + text encoders + "
                   f"VAE{shard})": at.weights(n_unet) + 4 * others}
        host = {}
    weights.update({"fp32 master of the salient entries": at.sharded(4 * k)} if at.salient_master else {})
    if at.weight_shards > 1:  # FSDP / ZeRO-3 gather one wrapped block whole at a time, and prefetch the next
        weights["gathered blocks (the largest, twice)"] = 2 * at.weight_bytes * counts.largest_block
    if method.frozen_copy:
        weights["frozen original UNet (ESD)"] = at.weights(n_unet)
    state_bytes = at.sharded(optimizer_state(entries, config.optimizer))
    state = {} if at.offload else {"optimizer state": state_bytes}
    host.update({"optimizer state (ZeRO CPU offload)": state_bytes} if at.offload else {})
    if masked:
        state["mask (1 bit per entry of a partially salient weight)"] = at.sharded(
            bitmask_bytes([named[n].numel() for n in trainable]) if config.keep < 1 else 0)
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
    # bf16 weights run the forward in bf16 whatever autocast says; fp32 ones in autocast's precision
    acts = counts.activations(rows, latent, torch.bfloat16 if at.half_weights else half,
                              config.gradient_checkpointing, trainable)
    autocast = half != torch.float32 and not at.half_weights
    autocast_copies = 2 * sum(named[n].numel() for n in trainable) if autocast else 0
    if at.release:  # each gradient is stepped and freed as soon as it is complete (one tensor's step at most)
        backward = backward_peak(acts, grad_bytes, grads_exist=False, step_bytes=one_tensor)
    else:
        backward = max(backward_peak(acts, grad_bytes, grads_exist=False),
                       backward_peak(acts, grad_bytes, grads_exist=True) if config.gradient_accumulation_steps > 1
                       else 0)
    train = {**weights, **state,
             "activations + gradients during backward": backward + 2 * acts.largest,
             **({"half-precision weight copies (autocast)": autocast_copies} if autocast_copies else {})}
    phases = {"training step": train}
    # The optimizer step: every gradient, then (masked) one tensor at a time its salient values and gradients
    # gathered and stepped while its full gradient is let go (`MaskedOptimizer`): at most every gradient plus
    # one tensor's packed copies; unmasked, torch's foreach Adam steps every entry at once. Under gradient
    # release the step runs inside the backward pass, one parameter at a time.
    if not at.release:
        phases["optimizer step"] = {**weights, **state, "gradients and step temporaries": sum(grad_bytes.values())
                                    + (one_tensor if masked else foreach * at.sharded(k))}

    if method.samples_latents:
        # ESD's z_t (partial DDIM sampling with the model being trained) and its target (the frozen UNet) come
        # from forwards under no_grad with classifier-free guidance (cond + uncond: twice the micro-batch),
        # before the training forward; under gradient accumulation later micro-batches sample while the
        # gradients exist. Nothing is saved for a backward pass: the peak is the live skip connections.
        key = ("no grad", 2 * micro, latent, half)
        if key not in counts.traces:
            counts.traces[key] = no_grad_peak(unet, 2 * micro, latent, half, counts.family)
        phases["sampling (no grad)"] = {
            **weights, **state, "no-grad forward (skip connections + the running op)": counts.traces[key],
            **({"gradients (accumulating)": sum(grad_bytes.values())}
               if config.gradient_accumulation_steps > 1 else {})}

    if masked and not config.mask:
        phases["mask pass"] = mask_pass(counts, latent, mask_batch(config), config.gradient_checkpointing,
                                        config.num_forget_images, config.device)
    return Plan(config, counts.components, phases, host, counts.process)


def mask_pass(counts: ModelCounts, latent: int, batch: int, checkpointing: bool, num_forget_images: int,
              device: str) -> dict[str, int]:
    """The mask pass (`training/mask_pass.py`): the guided saliency loss on cond + uncond rows, fp32, every
    weight of the pipeline on the device; its gradients accumulate in fp32 and become the scores, a signed sum
    over the whole forget set (SalUn Eq. 6), so neither gradient release nor bf16 weights apply to it. It
    honours gradient checkpointing (the recomputation gives the same gradients) and its batch. The first
    batch's backward makes the gradients as it goes; later batches add to gradients that are all there."""
    unet = counts.unet
    names = {name for name, _ in unet.named_parameters()}
    all_grads = {id(p): 4 * p.numel() for p in unet.parameters()}
    first_batch = min(num_forget_images, batch)

    def pass_peak(rows: int, grads_exist: bool) -> int:
        guided = counts.activations(2 * rows, latent, torch.float32, checkpointing, names)
        return backward_peak(guided, all_grads, grads_exist) + 2 * guided.largest

    scores_peak = pass_peak(first_batch, grads_exist=False)
    if num_forget_images > first_batch:
        scores_peak = max(scores_peak, pass_peak(first_batch, grads_exist=True))
    largest = max(p.numel() for p in unet.parameters())
    return {"weights (fp32: UNet + text encoders + VAE)": 4 * sum(counts.components.values()),
            "activations + gradients (the scores) during backward": scores_peak,
            "threshold temporaries (largest tensor)": 12 * largest,
            **({"mask (bool)": counts.components[counts.family.denoiser_name]} if device == "cpu" else {})}


def check_built(config: PlanConfig, counts: ModelCounts) -> None:
    """What erase checks once it has the model, here from the meta-device build: a whole latent grid for the
    VAE's factor (`generate.check_image_size`) and a --keep that keeps at least one weight (`saliency_options.kept_count`)."""
    from ..saliency_options import kept_count
    from .data.generate import check_image_size

    check_image_size({"--resolution": config.resolution}, counts.vae_scale)
    if config.method_class.computes_mask and not config.mask:
        kept_count(config.keep, counts.components[counts.family.denoiser_name])
