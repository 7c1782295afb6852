"""What an erasure run's memory is made of, measured on PyTorch's meta device (for `plan.py`).

`load_counts` builds every component of a pipeline from its config on the meta device (exact parameter counts,
no weights read); `trace_activations` runs the UNet's forward there with a hook on what autograd saves for the
backward pass (the exact activation memory of this architecture at a batch and resolution); `no_grad_peak`
counts a forward under no_grad op by op; `backward_peak` walks the backward pass; `measure_process` reads the
resident memory of a process with the libraries and tokenizers loaded. See `plan.py` for how they combine.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConceptEraseError, first_line

logger = logging.getLogger(__name__)


@dataclass
class ModelCounts:
    """Parameter counts per component, and the denoiser (UNet or transformer) on the meta device (for tracing)."""

    unet: nn.Module                    # the denoiser (`Family.denoiser_name`)
    components: dict[str, int]         # component name -> parameter count (unet, text_encoder, vae, ...)
    vae_scale: int                     # pixels per latent pixel
    family: Any                        # family.Family: which weights are cross-attention, ...
    traces: dict = field(default_factory=dict)  # (latent, dtype, checkpointing, scope) -> {batch: Activations}
    process: int = 0                   # bytes resident in a process with the libraries and tokenizers loaded
                                       # (`measure_process`; 0: not measured)
    vae_sample_size: int | None = None  # the VAE config's image size (FLUX's native size: its transformer has none)

    def activations(self, batch: int, latent: int, dtype: torch.dtype, checkpointing: bool,
                    trainable: set[str]) -> "Activations":
        """The activations at `batch`. Every saved tensor's size is affine in the batch once the graph no
        longer depends on it, so two traces at consecutive batches extend linearly to any larger one: the
        suggestions then trace each (resolution, dtype, checkpointing, scope) two or three times, not once per
        batch they try. Batch 1 may take another graph (a reshape that is a view at batch 1 and a copy above:
        FLUX), so the pair is (1, 2) where their graphs agree, else (2, 3); a batch below the pair is traced."""
        traced = self.traces.setdefault((latent, dtype, checkpointing, frozenset(trainable)), {})

        def at(b: int) -> Activations:
            if b not in traced:
                for name, p in self.unet.named_parameters():
                    p.requires_grad_(name in trainable)
                traced[b] = trace_activations(self.unet, b, latent, dtype, checkpointing, self.family)
            return traced[b]

        if batch <= 2:
            return at(batch)
        lo = 1 if len(at(1).saved) == len(at(2).saved) else 2
        one, two = at(lo), at(lo + 1)
        if len(one.saved) != len(two.saved):  # no batch-independent graph from here: trace this batch itself
            return at(batch)
        grow = lambda a, b: a + (b - a) * (batch - lo)  # noqa: E731
        saved = [(pos, grow(a, b)) for (pos, a), (_, b) in zip(one.saved, two.saved)]
        return Activations(saved, one.param_position, grow(one.recompute, two.recompute),
                           grow(one.largest, two.largest))

    @property
    def largest_block(self) -> int:
        """Entries of the denoiser's largest block that is never split (`_no_split_modules`: a transformer block,
        a ResNet, an up block), which is what FSDP's and ZeRO-3's auto-wrap gather whole; without that list, the
        largest element of a ModuleList."""
        kinds = set(getattr(self.unet, "_no_split_modules", None) or ())
        blocks = [m for m in self.unet.modules() if type(m).__name__ in kinds] or [
            m for seq in self.unet.modules() if isinstance(seq, nn.ModuleList) for m in seq]
        return max((sum(p.numel() for p in m.parameters()) for m in blocks), default=0)

    @property
    def default_resolution(self) -> int:
        size = self.unet.config.get("sample_size")  # FLUX's transformer has none: the VAE's, as `FluxFamily`
        return size * self.vae_scale if size else self.vae_sample_size or self.family.default_resolution


def config_folder(model: str, model_config: str | None) -> Path:
    """The diffusers folder holding `model`'s component configs (`facts.configs_folder`; a single file's:
    `model_config`), or a one-line error saying what is missing."""
    from .models.facts import configs_folder

    folder = configs_folder(model, model_config or None)
    if folder is not None:
        return folder
    path = Path(model).expanduser()
    if path.is_file():
        if not model_config:
            raise ConceptEraseError(f"model {model!r} is a single file: give --config, a diffusers folder "
                                    "with its component configs")
        return config_folder(model_config, None)
    raise ConceptEraseError(f"model {model!r} is not a diffusers folder, a file or 'minisd'")


def load_counts(model: str, model_config: str | None = None) -> ModelCounts:
    """Every component of the pipeline built from its config on the meta device (no weights read)."""
    import diffusers
    import transformers

    from .models.families import family_from_config

    folder = config_folder(model, model_config)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConceptEraseError(f"{str(folder)!r} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    family = family_from_config(folder)
    counts, unet = {}, None
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or name in ("safety_checker", "feature_extractor"):
            continue
        library, cls_name = spec
        sub = folder / name
        if library not in ("diffusers", "transformers") or not (sub / "config.json").is_file():
            continue  # schedulers and tokenizers have no parameters
        try:
            with torch.device("meta"):
                if library == "diffusers":
                    cls = getattr(diffusers, cls_name)
                    module = cls.from_config(cls.load_config(sub))
                else:
                    cls = getattr(transformers, cls_name)
                    module = cls(transformers.AutoConfig.from_pretrained(sub))
        except Exception as err:  # a config this diffusers/transformers cannot build
            raise ConceptEraseError(f"cannot build {name} ({cls_name}) from {str(sub)!r}: "
                                    f"{str(err).splitlines()[0]}") from None
        counts[name] = sum(p.numel() for p in module.parameters())
        if name == family.denoiser_name:
            unet = module
    if unet is None:
        raise ConceptEraseError(f"{str(folder)!r} has no {family.denoiser_name}/config.json")
    vae = json.loads((folder / "vae" / "config.json").read_text()) if (folder / "vae" / "config.json").is_file() else {}
    scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
    return ModelCounts(unet, counts, scale, family, vae_sample_size=vae.get("sample_size"))


def measure_process(counts: ModelCounts, model: str, model_config: str | None = None) -> int:
    """The resident memory of a process that runs this pipeline's code, before any weight: this one, which has
    imported the libraries and built every component's class (`load_counts`), once it has loaded the
    pipeline's tokenizers too (their vocabularies are tens of MiB of Python objects). Stored on `counts`."""
    import transformers

    from ..runtime import resident_memory

    folder = config_folder(model, model_config)
    tokenizers = []
    for name, spec in json.loads((folder / "model_index.json").read_text()).items():
        if isinstance(spec, list) and spec[0] == "transformers" and "Tokenizer" in str(spec[1]):
            if not (folder / name).exists():  # a configs-only folder without it (dit-skeleton's T5): not counted
                logger.warning("%s has no %s folder: the process measure leaves that tokenizer out", folder, name)
                continue
            try:
                tokenizers.append(getattr(transformers, spec[1]).from_pretrained(folder / name))
            except Exception as err:  # missing or broken vocabulary files: erase could not run either
                raise ConceptEraseError(f"cannot load {name} ({spec[1]}) from {str(folder / name)!r}: "
                                        f"{first_line(err)}") from None
    counts.process = resident_memory() or 0
    return counts.process


# ------------------------------------------------------------------------------------------ activations

class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while tracing: what the fused kernels (flash, memory-
    efficient, xformers) keep for the backward pass (q, k, v, output, per-row log-sum-exp), not the L x L
    matrix the meta device's reference implementation would keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        # the kernels write (batch, length, heads, dim) memory and return it as (batch, heads, length, dim):
        # diffusers' transpose back to (batch, length, heads * dim) is then a view, not a copy
        b, h, n = q.shape[:-1]
        out = q.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace stops after the forward
        raise NotImplementedError


@contextmanager
def _fused_attention():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def fused(*args, **kwargs):  # diffusers' attention dispatch (the transformers) passes query/key/value by name
        q, k, v = (*args, *(kwargs[n] for n in ("query", "key", "value") if n in kwargs))[:3]
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class Activations:
    """One with-grad forward of the UNet, as the backward pass will meet it."""

    saved: list[tuple[int, int]]     # (position in the forward, bytes) of each tensor kept for backward
    param_position: dict[int, int]   # id(parameter) -> position of its first use
    recompute: int                   # gradient checkpointing: the largest block's saved bytes (recomputed)
    largest: int                     # the largest single saved tensor (the backward's transient gradients)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.saved) + self.recompute


def _meta_inputs(family, cfg, batch: int, latent: int, dtype: torch.dtype):
    """The denoiser's inputs for a batch, on the meta device: latents, timesteps and the conditioning the family
    gives it (text states of `family.text_tokens` tokens; SDXL's pooled text and size ids; a transformer's
    pooled projection and guidance), to run as training does (`Conditioning.predict`). `family` None: SD 1.x."""
    from .models.family import Conditioning
    from .models.families import SD1

    family = family or SD1
    with torch.device("meta"):
        x = torch.empty(batch, family.latent_channels(cfg), latent, latent, dtype=dtype)
        if "joint_attention_dim" in cfg:  # a diffusion transformer (SD 3, FLUX): t = sigma * 1000
            t = torch.zeros(batch, dtype=dtype)
            hidden = torch.empty(batch, family.text_tokens, cfg.joint_attention_dim, dtype=dtype)
            added = {"pooled_projections": torch.empty(batch, cfg.pooled_projection_dim, dtype=dtype)}
            if cfg.get("guidance_embeds"):
                added["guidance"] = torch.empty(batch, dtype=dtype)
            return x, t, Conditioning(hidden, added, family)
        t = torch.zeros(batch, dtype=torch.long)
        hidden = torch.empty(batch, family.text_tokens, cfg.cross_attention_dim, dtype=dtype)
        added = {}
        if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + six size ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {"text_embeds": torch.empty(batch, pooled, dtype=dtype), "time_ids": torch.empty(batch, 6, dtype=dtype)}
    return x, t, Conditioning(hidden, added)


def no_grad_peak(unet: nn.Module, batch: int, latent: int, dtype: torch.dtype, family=None) -> int:
    """The most memory a forward of `unet` under torch.no_grad holds at once beyond its weights and inputs
    (ESD's sampling and target forwards, SalUn's target forward): nothing is kept for a backward pass, so what
    is live at its peak is the skip connections still waiting for the up blocks plus the tensors of the op
    running then. Every tensor an op makes is counted while a Python reference to it lives."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    param_ids = {p.untyped_storage()._cdata for p in unet.parameters()}
    live: dict[int, list[int]] = {}   # storage -> [bytes, tensors referring to it]
    held, peak = [0], [0]

    def release(key):
        entry = live[key]
        entry[1] -= 1
        if not entry[1]:
            held[0] -= live.pop(key)[0]

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if torch.is_tensor(t):
                    key = t.untyped_storage()._cdata
                    if key in param_ids:
                        continue
                    if key not in live:
                        live[key] = [t.untyped_storage().nbytes(), 0]
                        held[0] += live[key][0]
                        peak[0] = max(peak[0], held[0])
                    live[key][1] += 1
                    weakref.finalize(t, release, key)
            return out

    for p in unet.parameters():
        p.data = p.data.to(dtype)
    x, t, cond = _meta_inputs(family, unet.config, batch, latent, dtype)
    try:
        with torch.no_grad(), _fused_attention(), Live():
            out = cond.predict(unet, x, t)
        del out
    finally:
        for p in unet.parameters():
            p.data = p.data.to(torch.float32)
    return peak[0]


def trace_activations(unet: nn.Module, batch: int, latent: int, dtype: torch.dtype, checkpointing: bool,
                      family=None) -> Activations:
    """Run `unet` (the denoiser of `family`, on the meta device; its requires_grad flags decide what is
    trainable) on a batch and record what autograd keeps for the backward pass."""
    cfg = unet.config
    for p in unet.parameters():  # on the meta device a cast is free (Module.to would warn about fp32 modules)
        p.data = p.data.to(dtype)
    param_ids = {p.untyped_storage()._cdata for p in unet.parameters()}
    position = [0]
    saved: dict[int, tuple[int, int]] = {}   # storage -> (position, bytes): a tensor saved twice counts once
    param_position: dict[int, int] = {}
    unit = []                                # the checkpointed block being traced, if any
    unit_bytes = [0]

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in param_ids and key not in saved:
            if unit:
                unit[-1][key] = t.untyped_storage().nbytes()
            else:
                saved[key] = (position[0], t.untyped_storage().nbytes())
        position[0] += 1
        return t

    def mark_params(module, args):
        position[0] += 1
        for p in module.parameters(recurse=False):
            param_position.setdefault(id(p), position[0])

    def checkpointed(block, *args, **kwargs):
        """Gradient checkpointing as diffusers calls it: the block's inputs are kept, its insides
        recomputed during the backward pass (one block at a time)."""
        for a in args:
            if torch.is_tensor(a):
                key = a.untyped_storage()._cdata
                if key not in saved and key not in param_ids:
                    saved[key] = (position[0], a.untyped_storage().nbytes())
        unit.append({})
        try:
            return block(*args, **kwargs)
        finally:
            unit_bytes[0] = max(unit_bytes[0], sum(unit.pop().values()))

    handles = [m.register_forward_pre_hook(mark_params) for m in unet.modules()]
    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)
    x, t, cond = _meta_inputs(family, cfg, batch, latent, dtype)
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cond.predict(unet, x, t)
    finally:
        for h in handles:
            h.remove()
        if checkpointing:
            unet.disable_gradient_checkpointing()
        for p in unet.parameters():
            p.data = p.data.to(torch.float32)
    entries = list(saved.values())
    return Activations(entries, param_position, unit_bytes[0], max((b for _, b in entries), default=0))


def backward_peak(acts: Activations, grad_bytes: dict[int, int], grads_exist: bool,
                  step_bytes: int | None = None) -> int:
    """The most memory activations and gradients hold together during the backward pass, which runs the
    forward in reverse: while it is at position s, the activations saved up to s are still held and the
    gradients of the parameters first used from s on are already made. With `grads_exist` (a later
    micro-batch of gradient accumulation, or of the mask pass) every gradient is there from the start. With
    `step_bytes` (gradient release) a gradient is stepped and freed as soon as it is complete, at its
    parameter's first use: only the gradients completed at s are there, with `step_bytes` of the step's own."""
    total_grads = sum(grad_bytes.values())
    if grads_exist:
        return acts.total + total_grads
    saved_at: dict[int, int] = {}
    for pos, b in acts.saved:
        saved_at[pos] = saved_at.get(pos, 0) + b
    grads_at: dict[int, int] = {}
    for pid, b in grad_bytes.items():
        pos = acts.param_position.get(pid, 0)
        grads_at[pos] = grads_at.get(pos, 0) + b
    held, made, peak = acts.total - acts.recompute, 0, 0
    for pos in sorted(set(saved_at) | set(grads_at), reverse=True):
        if step_bytes is None:
            made += grads_at.get(pos, 0)
        else:
            made = grads_at[pos] + step_bytes if pos in grads_at else 0
        peak = max(peak, held + made)
        held -= saved_at.get(pos, 0)
    return peak + acts.recompute
