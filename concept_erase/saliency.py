"""The weight-saliency mask engine of SalUn (Fan et al., arXiv 2310.12508, Sec. 4, Eq. 6), shared by
diffusion and classification unlearning.

    s = | sum over forget batches of grad_theta loss_f |        (signed sum first, then the absolute value)
    mask = 1[s >= gamma], gamma chosen so that the top `keep` fraction of ALL included weights is kept

Three things the reference implementations got wrong and this file does not (docs/ALGORITHMS.md 1):
- one global ranking over every included parameter (not per layer), keeping the LARGEST scores;
- no optimizer step while collecting gradients (model in eval mode, gradients only);
- "masked" means frozen: zeroing gradients is not enough once AdamW's decoupled weight decay or SGD's
  momentum/weight decay touch every parameter, so `MaskedOptimizer` steps the salient entries only (with
  optimizer state for them only) and never writes a frozen one.

Three scores rank the weights (`saliency_options.SCORES`; docs/ALGORITHMS.md 1 and 4), all from the same accumulated gradients:
- "salun": |sum_b grad_b| (SalUn Eq. 5-6);
- "snip": |theta * sum_b grad_b|, connection sensitivity (SNIP, Lee et al. 2019), ScissorHands' score (Wu &
  Harandi 2024): the first-order change of the loss when a weight is removed (set to zero);
- "ant": sum_r |sum_{b in round r} grad_b|, ANT's augmentation-enhanced map (arXiv 2504.12782): the batches
  come in rounds (augmented copies of the forget set: other noise draws and prompt variants), each round's
  gradient is made absolute on its own and the rounds are summed, so a weight scores only if it matters
  under every augmentation and not through one draw's sign.

The threshold is found by an exact radix select over the fp32 bit patterns (two 16-bit passes), one tensor at a time, so it never
needs a flat copy of all scores (SD's UNet has 860M of them) nor an argsort.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import torch
from torch import nn

from .errors import ConceptEraseError
from .fingerprints import DIGEST_KEY, parameter_shapes, shapes_fingerprint, state_digest
from .io_utils import atomic_file
from .saliency_options import MASTER_WEIGHTS, OPTIMIZERS, SCORES, check_keep, kept_count

MASK_FORMAT = "concept-erase-saliency-mask"
MASK_FORMAT_VERSION = "1"

Include = Union[None, str, Callable[[str], bool]]


# ----------------------------------------------------------------------------------------------------------
# Which parameters, and which model
# ----------------------------------------------------------------------------------------------------------

def _include_predicate(include: Include) -> Callable[[str], bool]:
    if include is None:
        return lambda name: True
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda name: pattern.search(name) is not None
    return include


def select_parameters(model: nn.Module, include: Include = None) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs `include` selects: None = all, a regex searched in the name, or a callable."""
    keep = _include_predicate(include)
    selected = [(name, p) for name, p in model.named_parameters() if keep(name)]
    if not selected:
        raise ConceptEraseError(f"no parameter of the model matches include={include!r}")
    return selected


# ----------------------------------------------------------------------------------------------------------
# Scores and threshold
# ----------------------------------------------------------------------------------------------------------

def compute_saliency(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    include: Include = None,
    progress: bool = False,
    score: str = "salun",
) -> dict[str, torch.Tensor]:
    """The `score` of every included parameter, as fp32 (see the module docstring): s = |sum_b grad
    loss_fn(model, batch_b)| (SalUn Eq. 6), its product with the weights (snip), or, with `batches` an
    iterable of rounds of batches, the sum over rounds of each round's |sum_b grad| (ant).

    Gradients accumulate in `.grad` across batches, which is exactly the signed sum: no per-batch copy. The
    absolute value is then taken in place and the gradient tensors themselves become the scores (on the
    model's device), so the pass needs the loss's own memory plus one fp32 copy of the included weights
    (ant: two, the running sum of rounds beside the round being accumulated).
    The model is put in eval mode, only included parameters require grad while collecting, and everything
    is restored afterwards.
    """
    if score not in SCORES:
        raise ConceptEraseError(f"unknown saliency score {score!r} (choose from {', '.join(SCORES)})")
    params = select_parameters(model, include)
    included = {name for name, _ in params}
    # One walk of the module tree for the set-up and the restore (a diffusers UNet has ~1,700 modules: on a
    # small model each walk is a visible share of the pass).
    named = list(model.named_parameters())
    requires_grad = {name: p.requires_grad for name, p in named}
    was_training = model.training
    model.eval()
    for name, p in named:
        p.requires_grad_(name in included)
        p.grad = None
    rounds = batches if score == "ant" else [batches]
    try:
        n_batches, scores = 0, None
        for round_batches in rounds:
            if progress:
                from tqdm.auto import tqdm

                round_batches = tqdm(round_batches, desc="saliency", unit="batch")
            for batch in round_batches:
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise ConceptEraseError(f"the forget loss is {loss.item()} at saliency batch {n_batches}")
                loss.backward()
                n_batches += 1
            this = _round_scores(params, score)
            scores = this if scores is None else {name: scores[name].add_(s) for name, s in this.items()}
        if n_batches == 0:
            raise ConceptEraseError("the forget set is empty: no batch to compute saliency on")
        for name, s in scores.items():
            # |x| of a finite float has the bit pattern <= the largest finite one; inf and NaN lie above it.
            if int(s.view(torch.int32).max()) > _MAX_FINITE_BITS:
                raise ConceptEraseError(f"non-finite saliency scores in parameter {name!r}")
    finally:
        for name, p in named:
            p.grad = None
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
    return scores


def _round_scores(params: list[tuple[str, nn.Parameter]], score: str) -> dict[str, torch.Tensor]:
    """The scores of the gradients accumulated so far, which are consumed (`.grad` is None afterwards)."""
    scores = {}
    for name, p in params:
        s = p.grad if p.grad is not None else torch.zeros(p.shape, device=p.device)
        p.grad = None
        s = s.detach().float()
        if score == "snip":  # |theta * g|: the loss's first-order change when the weight is set to zero
            s = s.mul_(p.detach())
        scores[name] = s.abs_()  # in place when the gradient is fp32 already
    return scores


# Non-negative finite fp32 values order like their bit patterns read as int32 (so the threshold is found on
# exact integer keys, with no rounding); the largest finite one is 0x7F7FFFFF.
_MAX_FINITE_BITS = 0x7F7FFFFF
_BINS = 1 << 16


def _kth_largest_key(keys: list[torch.Tensor], k: int) -> tuple[int, int, int]:
    """The k-th largest value (1-based) over several non-negative int32 tensors, with how many keys are
    strictly above it and how many equal it: (value, above, equal).

    A radix select: a histogram of the high 16 bits finds the value's high half, a histogram of the keys
    inside that bucket (shifted and clamped into 65,536 bins plus two overflow bins) its low half. Two
    passes, per-tensor temporaries only, and the counts come from the histograms.
    """
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for key in keys:
        hist += torch.bincount((key.reshape(-1) >> 16).cpu(), minlength=_BINS)[:_BINS]
    above = torch.flip(hist, [0]).cumsum(0)  # above[i] = count of keys whose high half >= 65535 - i
    i = int(torch.searchsorted(above, torch.tensor(k)))
    high = _BINS - 1 - i
    n_above = int(above[i - 1]) if i > 0 else 0
    base = high << 16
    hist = torch.zeros(_BINS + 2, dtype=torch.int64)
    for key in keys:
        low = (key.reshape(-1) - (base - 1)).clamp_(0, _BINS + 1)  # bin 0: below the bucket, last: above it
        hist += torch.bincount(low.cpu(), minlength=_BINS + 2)
    inside = hist[1:_BINS + 1]
    above = torch.flip(inside, [0]).cumsum(0)
    j = int(torch.searchsorted(above, torch.tensor(k - n_above)))
    value = base | (_BINS - 1 - j)
    n_above += int(above[j - 1]) if j > 0 else 0
    return value, n_above, int(inside[_BINS - 1 - j])


def threshold_scores(scores: dict[str, torch.Tensor], keep: float, lowest: bool = False) -> dict[str, torch.Tensor]:
    """Bool masks (on the CPU) keeping exactly round(keep * total) entries with the largest scores (or the
    smallest, for the inverted-mask control). Ties at the threshold go to the earliest entries in parameter
    order, then element order, so the kept set is deterministic."""
    total = sum(s.numel() for s in scores.values())
    k = kept_count(keep, total)
    keys = [s.float().contiguous().view(torch.int32) for s in scores.values()]  # scores are finite and >= 0
    if lowest:  # the k smallest: everything below the (total - k + 1)-th largest, plus ties at it
        t, n_above, n_equal = _kth_largest_key(keys, total - k + 1)
        ties_left = k - (total - n_above - n_equal)
    else:
        t, n_above, n_equal = _kth_largest_key(keys, k)
        ties_left = k - n_above
    every_tie = ties_left == n_equal  # the usual case: one comparison per entry, no tie bookkeeping
    masks = {}
    for name, key in zip(scores, keys):
        if every_tie:
            m = key <= t if lowest else key >= t
        else:
            m = key < t if lowest else key > t
            if ties_left > 0:
                idx = (key == t).reshape(-1).nonzero().squeeze(1)[:ties_left]
                m.view(-1)[idx] = True
                ties_left -= idx.numel()
        masks[name] = m.cpu()
    return masks


def check_keep_for(model: nn.Module, keep: float, include: Include = None) -> int:
    """`kept_count` over the parameters `include` selects in `model`: a run checks its keep before the mask pass."""
    return kept_count(keep, sum(p.numel() for _, p in select_parameters(model, include)))


# ----------------------------------------------------------------------------------------------------------
# The mask
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SaliencyMask:
    """Bool masks (True = salient = trainable) over the included parameters of one model architecture."""

    masks: dict[str, torch.Tensor]
    keep: float = field(metadata={"help": "Requested fraction of the included weights that are trainable."})
    model_shapes: list[tuple[str, tuple[int, ...]]] = field(
        metadata={"help": "Names and shapes of ALL the model's parameters (the fingerprint's source)."})
    scope: str = field(default="all", metadata={"help": "Which parameters were ranked: 'all' or a regex."})
    concept: str = field(default="", metadata={"help": "What the mask was computed for (free text)."})
    score: str = field(default="salun", metadata={"help": "What ranked the weights: one of SCORES, or a control."})

    def __post_init__(self):
        check_keep(self.keep)
        self.model_shapes = [(n, tuple(s)) for n, s in self.model_shapes]

    @property
    def fingerprint(self) -> str:
        return shapes_fingerprint(self.model_shapes)

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_scores(cls, scores: dict[str, torch.Tensor], keep: float = 0.5, *, model: nn.Module,
                    scope: str = "all", concept: str = "", lowest: bool = False,
                    score: str = "salun") -> "SaliencyMask":
        return cls(threshold_scores(scores, keep, lowest=lowest), keep, parameter_shapes(model), scope, concept,
                   f"{score}-inverted" if lowest else score)

    @classmethod
    def compute(cls, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                keep: float = 0.5, include: Include = None, concept: str = "", lowest: bool = False,
                progress: bool = False, score: str = "salun") -> "SaliencyMask":
        """`score`: see `compute_saliency` ("ant" takes `batches` as rounds of batches)."""
        check_keep_for(model, keep, include)  # fail before the expensive pass
        scores = compute_saliency(model, batches, loss_fn, include=include, progress=progress, score=score)
        scope = include if isinstance(include, str) else ("all" if include is None else "custom")
        return cls.from_scores(scores, keep, model=model, scope=scope, concept=concept, lowest=lowest, score=score)

    @classmethod
    def random(cls, model: nn.Module, keep: float = 0.5, seed: int = 0, include: Include = None,
               concept: str = "") -> "SaliencyMask":
        """A control: the same keep ratio, weights chosen uniformly at random."""
        gen = torch.Generator().manual_seed(seed)
        scores = {name: torch.rand(p.shape, generator=gen) for name, p in select_parameters(model, include)}
        scope = include if isinstance(include, str) else "all"
        return cls.from_scores(scores, keep, model=model, scope=scope, concept=f"random(seed={seed}) {concept}".strip(),
                               score="random")

    @classmethod
    def from_names(cls, model: nn.Module, include: Include, concept: str = "") -> "SaliencyMask":
        """All weights of the matching parameters trainable, the rest frozen (e.g. ESD-x: include=r"attn2")."""
        keep_name = _include_predicate(include)
        masks = {name: torch.full(p.shape, keep_name(name), dtype=torch.bool) for name, p in model.named_parameters()}
        kept = sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
        if kept == 0:
            raise ConceptEraseError(f"no parameter of the model matches include={include!r}")
        scope = include if isinstance(include, str) else "custom"
        return cls(masks, kept, parameter_shapes(model), scope, concept, score="names")

    # -- queries -----------------------------------------------------------------------------------------

    @property
    def kept_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(1, total)

    def layer_stats(self, depth: int = 2) -> dict[str, float]:
        """Kept fraction per module, grouping parameter names by their first `depth` dotted components
        (e.g. depth 2 on a UNet: down_blocks.0, mid_block.attentions, up_blocks.3, conv_in.weight...)."""
        kept: dict[str, int] = {}
        total: dict[str, int] = {}
        for name, m in self.masks.items():
            key = ".".join(name.split(".")[:depth])
            kept[key] = kept.get(key, 0) + int(m.sum())
            total[key] = total.get(key, 0) + m.numel()
        return {key: kept[key] / total[key] for key in total}

    def check_compatible(self, model: nn.Module) -> None:
        """Raise a ConceptEraseError naming the first parameter where the model and the mask disagree."""
        shapes = dict(parameter_shapes(model))
        for name, m in self.masks.items():
            if name not in shapes:
                raise ConceptEraseError(f"mask parameter {name!r} does not exist in this model (mask made for another model)")
            if tuple(m.shape) != shapes[name]:
                raise ConceptEraseError(
                    f"mask parameter {name!r} has shape {tuple(m.shape)} but the model's is {shapes[name]}")
        if shapes_fingerprint(list(shapes.items())) != self.fingerprint:
            mine = dict(self.model_shapes)
            first = next((n for n in list(shapes) + list(mine) if shapes.get(n) != mine.get(n)), "?")
            raise ConceptEraseError(
                f"mask made for another model: parameter {first!r} differs (model fingerprint "
                f"{shapes_fingerprint(list(shapes.items()))}, mask's {self.fingerprint})")

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters with at least one salient entry: the ones to hand to the optimizer."""
        params = dict(model.named_parameters())
        return [params[name] for name, m in self.masks.items() if bool(m.any())]

    # -- files -------------------------------------------------------------------------------------------

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Bit-packed masks in safetensors (8x smaller than bool; the reference's int64 pickles cost ~7 GB
        for SD), with keep, scope, concept, the model's fingerprint and shapes, and the format version."""
        import numpy as np
        from safetensors.torch import save_file

        from . import __version__

        tensors = {name: torch.from_numpy(np.packbits(m.reshape(-1).numpy())) for name, m in self.masks.items()}
        metadata = {
            "format": MASK_FORMAT, "format_version": MASK_FORMAT_VERSION, "tool_version": __version__,
            "packed": "bits", "keep": repr(self.keep), "scope": self.scope, "concept": self.concept, "score": self.score,
            "fingerprint": self.fingerprint, "kept_fraction": f"{self.kept_fraction:.6g}",
            "mask_shapes": json.dumps({name: list(m.shape) for name, m in self.masks.items()}),
            "model_shapes": json.dumps([[n, list(s)] for n, s in self.model_shapes]),
            DIGEST_KEY: state_digest(tensors),
        }
        path = Path(path)
        with atomic_file(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> "SaliencyMask":
        """Read a mask file (bit-packed or bool); with `model`, also check that it was made for it."""
        import numpy as np
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ConceptEraseError(f"mask file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                raw = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises several types for truncated/garbage files
            raise ConceptEraseError(f"cannot read mask file {str(path)!r}: {str(err).splitlines()[0]}") from None
        if meta.get("format") != MASK_FORMAT:
            raise ConceptEraseError(f"{str(path)!r} is not a concept-erase mask file (format={meta.get('format')!r})")
        if DIGEST_KEY in meta and state_digest(raw) != meta[DIGEST_KEY]:  # masks written before it lack one
            raise ConceptEraseError(f"mask file {str(path)!r} is damaged: its content digest differs from the one "
                                    "recorded when it was written")
        try:
            shapes = json.loads(meta["mask_shapes"])
            masks = {}
            for name, shape in shapes.items():
                t = raw[name]
                if t.dtype == torch.bool:
                    masks[name] = t.reshape(shape)
                else:
                    n = math.prod(shape)
                    masks[name] = torch.from_numpy(np.unpackbits(t.numpy())[:n].astype(bool)).reshape(shape)
            mask = cls(masks, float(meta["keep"]), [(n, tuple(s)) for n, s in json.loads(meta["model_shapes"])],
                       meta.get("scope", "all"), meta.get("concept", ""), meta.get("score", "salun"))
        except (KeyError, ValueError, RuntimeError) as err:
            raise ConceptEraseError(f"mask file {str(path)!r} is damaged: {err}") from None
        if model is not None:
            mask.check_compatible(model)
        return mask


# ----------------------------------------------------------------------------------------------------------
# Frozen means frozen: the optimizer steps the salient entries only
# ----------------------------------------------------------------------------------------------------------

def optimizer_class(kind: str, weight_decay: float = 0.0) -> type[torch.optim.Optimizer]:
    """The torch optimizer class for `kind`: "adam" (torch Adam; AdamW, decoupled, when weight_decay > 0),
    "adam8bit" (bitsandbytes' 8-bit Adam/AdamW, an optional dependency) or "sgd"."""
    if kind == "adam":
        return torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    if kind == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConceptEraseError("--optimizer adam8bit needs bitsandbytes (pip install bitsandbytes); "
                                    "use --optimizer adam") from None
        return bnb.optim.AdamW8bit if weight_decay > 0 else bnb.optim.Adam8bit
    if kind == "sgd":
        return torch.optim.SGD
    raise ConceptEraseError(f"unknown optimizer {kind!r} (choose from {', '.join(OPTIMIZERS)})")


def build_optimizer(model: nn.Module, mask: SaliencyMask | None, kind: str = "adam", *, lr: float,
                    weight_decay: float = 0.0, grad_release: bool = False, master_weights: str = "fp32",
                    seed: int = 0, **options) -> torch.optim.Optimizer:
    """The optimizer of an unlearning run: over every parameter of `model` (mask None), or over the salient
    entries of `mask` only (a `MaskedOptimizer`). Sets requires_grad to match: parameters without a salient
    entry get no gradient at all. `kind`: see `optimizer_class`; `options`: e.g. SGD's momentum.
    `grad_release`, `master_weights` and `seed` (of the stochastic rounding): see `MaskedOptimizer`; either
    setting makes the optimizer a `MaskedOptimizer`, with or without a mask.
    """
    cls = optimizer_class(kind, weight_decay)
    hyper = {"lr": lr, "weight_decay": weight_decay, **options}
    if master_weights not in MASTER_WEIGHTS:
        raise ConceptEraseError(f"unknown master weights {master_weights!r} (choose from {', '.join(MASTER_WEIGHTS)})")
    plain = not grad_release and master_weights == "fp32"
    if mask is None:
        model.requires_grad_(True)
        if plain:
            return cls(list(model.parameters()), **hyper)
        targets = [(p, None) for p in model.parameters()]
    else:
        mask.check_compatible(model)
        targets = []
        for name, p in model.named_parameters():
            m = mask.masks.get(name)
            salient = m is not None and bool(m.any())
            p.requires_grad_(salient)
            p.grad = None
            if salient:  # (decided on the whole mask, so every process of a sharded run agrees)
                m = shard_rows(m, p)
                targets.append((p, None if bool(m.all()) else m))
        if not targets:
            raise ConceptEraseError("the mask leaves no trainable weight")
        if plain and all(m is None for _, m in targets):  # whole tensors only (ESD's layer scopes): nothing to pack
            return cls([p for p, _ in targets], **hyper)
    return MaskedOptimizer(targets, cls, grad_release=grad_release, master_weights=master_weights, seed=seed,
                           **hyper)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of `t`: a DTensor's local shard (FSDP2's parameters and their gradients), or
    `t` itself. Writing into it writes the shard."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_rows(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The rows of a whole parameter's mask that this process's shard of `param` holds: all of it for a plain
    tensor; for FSDP2's `Shard(0)` placement, `torch.chunk`'s rows for this rank (how `fully_shard` splits
    dim 0; a rank past the last chunk holds none). So each shard steps its own salient entries."""
    if not _is_dtensor(param):
        return mask
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise ConceptEraseError(f"a masked optimizer steps parameters sharded on dim 0 (FSDP2), not "
                                f"{tuple(param.placements)}")
    rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
    chunks = torch.chunk(mask, world, dim=0)
    rows = chunks[rank] if rank < len(chunks) else mask[:0]
    if rows.shape != param.to_local().shape:  # torch changed how it shards: never step the wrong entries
        raise ConceptEraseError(f"a shard of shape {tuple(param.to_local().shape)} does not match its mask rows "
                                f"{tuple(rows.shape)}")
    return rows


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a flat uint8 tensor of its bits, 8 entries a byte, most significant bit first
    (numpy's packbits, the layout of the mask files)."""
    import numpy as np

    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy()))


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
# Entries per slice of a tensor whose salient positions are rebuilt at once (a multiple of 8: whole bytes of
# the bitmask). A slice's int64 positions take at most 16 MiB, under the mmap threshold of glibc's malloc, so
# on a CPU they reuse heap instead of faulting fresh pages in at every step (SD 1.5 has 29M-entry tensors).
INDEX_SLICE = 1 << 21


def salient_index(bits: torch.Tensor, numel: int, count: int) -> torch.Tensor:
    """The int64 flat positions of the `count` set bits among the first `numel` of `bits` (`pack_bits`), on
    bits' device. On a CPU numpy's unpackbits and flatnonzero are several times faster than torch's nonzero
    (28 ms against 190 ms for 29M entries, one thread); on a GPU nonzero_static knows its size, so nothing
    waits for the device."""
    if bits.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.flatnonzero(np.unpackbits(bits.numpy(), count=numel).view(bool)))
    unpacked = (bits.unsqueeze(1) >> _BIT_SHIFTS.to(bits.device)).bitwise_and_(1).view(-1)[:numel]
    return torch.nonzero_static(unpacked, size=count).squeeze(1)


def stochastic_round_(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounded stochastically: a uniform draw below bf16's last bit is added to the fp32 bit
    pattern's 16 low bits, which are then dropped (up with probability equal to the distance from the lower
    bf16 neighbour). `value` (fp32) is overwritten."""
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    bits.add_(noise).bitwise_and_(-(1 << 16))
    return value.to(torch.bfloat16)  # exact: the dropped bits are zero


class _Target:
    """One trained parameter as the masked optimizer holds it, with its own inner optimizer."""

    def __init__(self, position: int, param: nn.Parameter, mask: torch.Tensor | None, master_weights: str,
                 optimizer_cls, hyper: dict):
        # a sharded parameter (FSDP2) is stepped through its local shard, and `mask` is that shard's (`shard_rows`)
        self.position, self.param, self.numel = position, param, local_tensor(param).numel()
        # the salient set as a packed 1-bit mask on the device (None: every entry salient), and its count in
        # each INDEX_SLICE of entries: where each slice's values go in the packed tensor
        self.bits = None if mask is None else pack_bits(mask).to(param.device)
        self.counts = None if mask is None else [int(c.sum()) for c in mask.reshape(-1).split(INDEX_SLICE)]
        self.count = self.numel if mask is None else sum(self.counts)
        self.updates = 0  # write-backs so far: with the seed, what the stochastic rounding draws from
        # What the inner optimizer steps: the param itself (a whole fp32 one), or a 1-D tensor of its salient
        # entries, fp32 in the bf16 modes; persistent only where it is the fp32 master copy ("salient-fp32").
        if mask is None and master_weights == "fp32" and not _is_dtensor(param):
            self.proxy = param
        elif master_weights == "salient-fp32":
            self.proxy = self.gather(param.detach(), self.index(), torch.float32)
        else:
            dtype = param.dtype if master_weights == "fp32" else torch.float32
            self.proxy = torch.empty(0, dtype=dtype, device=param.device)
        self.optimizer = optimizer_cls([self.proxy], **hyper)

    def index(self) -> list[tuple[slice, torch.Tensor, slice]] | None:
        """The salient positions, slice by slice: (the slice's entries, the int64 positions of its salient
        ones within it, where they sit in the packed tensor). None: every entry."""
        if self.bits is None:
            return None
        index, packed = [], 0
        for i, count in enumerate(self.counts):
            lo, hi = i * INDEX_SLICE, min((i + 1) * INDEX_SLICE, self.numel)
            positions = salient_index(self.bits[lo // 8: -(-hi // 8)], hi - lo, count)
            index.append((slice(lo, hi), positions, slice(packed, packed + count)))
            packed += count
        return index

    def gather(self, full: torch.Tensor, index, dtype: torch.dtype) -> torch.Tensor:
        """full's salient entries as a 1-D `dtype` tensor, in packed order."""
        flat = local_tensor(full).reshape(-1)
        if index is None:
            return flat.to(dtype)
        out = torch.empty(self.count, dtype=dtype, device=flat.device)
        for entries, positions, packed in index:
            if dtype == flat.dtype:
                torch.index_select(flat[entries], 0, positions, out=out[packed])
            else:
                out[packed] = flat[entries].index_select(0, positions)
        return out

    def scatter(self, value: torch.Tensor, index) -> None:
        """Write `value` (packed order) to the salient entries of the parameter only: frozen ones are never
        written. index_copy_ with an int64 index is faster on a CPU than index_put_."""
        flat = local_tensor(self.param.detach()).view(-1)
        if index is None:
            flat.copy_(value)  # a whole tensor (a bf16 mode): cast on the copy
            return
        value = value.to(flat.dtype)
        for entries, positions, packed in index:
            flat[entries].index_copy_(0, positions, value[packed])


class MaskedOptimizer(torch.optim.Optimizer):
    """Any torch optimizer, run on the salient entries only (SalUn Eq. 7: theta <- theta - eta * m . g).

    Each partially salient parameter is represented to its inner optimizer by a 1-D "packed" tensor of its k
    salient entries, so the optimizer state (Adam's exp_avg and exp_avg_sq, SGD's momentum) has k entries, not
    numel: keep 0.5 means half of Adam's state. The salient set itself is a packed bitmask on the device (1 bit
    per entry); a step turns it into the int64 positions of one tensor at a time, gathers that tensor's salient
    values and gradients, steps them and writes the results back to the salient entries only, so the only index
    ever resident is one tensor's. Frozen entries are never written, so weight decay and momentum cannot move
    them: they stay bit-identical by construction, with no gradient hook and no snapshot to restore.

    Each parameter has its own inner optimizer (Adam is elementwise, so stepping tensors one at a time is the
    same computation as one step over all of them), which is what lets `grad_release` step a parameter by a
    post-accumulate-grad hook as soon as its gradient is complete in the backward pass and free that gradient:
    the full gradient is never resident, and `step()` finds nothing left to do. Call `remove_hooks()` when
    training ends. `master_weights`: see `MASTER_WEIGHTS` (the bf16 modes expect bf16 parameters; the inner
    optimizers and their state are fp32). `seed`: the stochastic rounding's, drawn per (seed, parameter,
    update), so a resumed run and a grad-release run round exactly as the uninterrupted one.

    `param_groups` hold the real parameters (what GradScaler unscales, what lr schedulers and accelerate see);
    hyperparameters set on them are copied to the inner optimizers before each step. `state_dict` has the
    format of one torch optimizer over the packed tensors, plus the fp32 master copies and update counts where a
    bf16 mode has them. A step consumes the gradients: `p.grad` is None afterwards.
    """

    def __init__(self, targets: list[tuple[nn.Parameter, torch.Tensor | None]], optimizer_cls, *,
                 grad_release: bool = False, master_weights: str = "fp32", seed: int = 0, **hyper):
        if master_weights != "fp32":
            wrong = next((p for p, _ in targets if p.dtype != torch.bfloat16), None)
            if wrong is not None:
                raise ConceptEraseError(f"master weights {master_weights!r} train bf16 weights, not {wrong.dtype}")
        self.master_weights, self.seed = master_weights, seed
        self._targets = [_Target(i, p, m, master_weights, optimizer_cls, hyper) for i, (p, m) in enumerate(targets)]
        super().__init__([p for p, _ in targets], hyper)
        self._hooks = [t.param.register_post_accumulate_grad_hook(lambda p, t=t: self._step_one(t))
                       for t in self._targets] if grad_release else []

    @torch.no_grad()
    def _step_one(self, t: _Target) -> None:
        """Gather t's salient values (unless they are its master copy) and gradients, step, write back."""
        p = t.param
        if p.grad is None:
            return
        t.optimizer.param_groups[0].update({k: v for k, v in self.param_groups[0].items() if k != "params"})
        if t.proxy is p:
            t.optimizer.step()
            p.grad = None
            return
        index = t.index()  # this tensor's positions only, freed when it is written back
        if self.master_weights != "salient-fp32":
            t.proxy.data = t.gather(p.detach(), index, t.proxy.dtype)
        t.proxy.grad = t.gather(p.grad, index, t.proxy.dtype)
        p.grad = None  # the packed copy replaces the full one
        t.optimizer.step()
        value = t.proxy.detach()
        if self.master_weights == "bf16-stochastic":
            seed = hash((self.seed, t.position, t.updates)) % 2**63
            value = stochastic_round_(value, torch.Generator(device=value.device).manual_seed(seed))
        t.scatter(value, index)
        t.updates += 1
        t.proxy.grad = None
        if self.master_weights != "salient-fp32":
            t.proxy.data = t.proxy.data.new_empty(0)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MaskedOptimizer.step takes no closure")
        for t in self._targets:
            self._step_one(t)
        return None

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def packed_state(self) -> list[dict]:
        """Each packed tensor's optimizer state (what a benchmark counts)."""
        return [t.optimizer.state[t.proxy] for t in self._targets if t.proxy in t.optimizer.state]

    def state_dict(self):
        """One torch optimizer's format over the packed tensors, in parameter order (plus "masked")."""
        group = {k: v for k, v in self._targets[0].optimizer.state_dict()["param_groups"][0].items() if k != "params"}
        state = {"state": {}, "param_groups": [{**group, "params": list(range(len(self._targets)))}]}
        for t in self._targets:
            own = t.optimizer.state_dict()["state"]
            if 0 in own:
                state["state"][t.position] = own[0]
        if self.master_weights != "fp32":
            state["masked"] = {"updates": [t.updates for t in self._targets],
                               "master": [t.proxy.detach() for t in self._targets]
                               if self.master_weights == "salient-fp32" else []}
        return state

    def load_state_dict(self, state_dict) -> None:
        group = {k: v for k, v in state_dict["param_groups"][0].items() if k != "params"}
        for t in self._targets:
            own = state_dict["state"].get(t.position, state_dict["state"].get(str(t.position)))
            t.optimizer.load_state_dict({"state": {} if own is None else {0: own},
                                         "param_groups": [{**group, "params": [0]}]})
        self.param_groups[0].update(group)
        masked = state_dict.get("masked")
        if masked is not None:
            for t, updates in zip(self._targets, masked["updates"]):
                t.updates = updates
            for t, master in zip(self._targets, masked["master"]):
                t.proxy.data.copy_(master)
