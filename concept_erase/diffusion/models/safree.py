"""SAFREE's inference-time filter (Yoon et al., ICLR 2025; the method and its formulas: `methods/safree.py`,
docs/ALGORITHMS.md 4): `SafreeFilter` (trigger tokens, the selective projection, the self-validating window)
and `SafreeHooks` (a forward hook on the text encoder records each encoded prompt's filtered embedding and
window; a forward pre-hook on the UNet swaps a recorded conditional embedding for its filtered one inside the
window). `load_pipeline` attaches them when a folder has `safree.json` (`attach_safree`); this module lives
beside the loader so loading never imports the method layer.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError

SAFREE_CONFIG = "safree.json"
REFERENCE_STEPS = 50  # the paper's sampling steps, which gamma counts
MASK_TOKEN_ID = 0


def _projection(E: Tensor) -> Tensor:
    """The projection onto the span of E's columns, E (E^T E)^+ E^T."""
    return E @ torch.linalg.pinv(E.T @ E) @ E.T


class SafreeFilter:
    """The filtering of one SD 1.x/2.x pipeline's text encoder (the module docstring), float64."""

    def __init__(self, pipe, settings: dict):
        from .families import family_of

        family = family_of(pipe)
        if len(family.text_encoders) != 1 or getattr(pipe, "unet", None) is None:
            raise ConceptEraseError(f"SAFREE runs on SD 1.x and 2.x (one text encoder and a UNet), not "
                                    f"{family.description}")
        self.pipe, self.encoder, self.tokenizer = pipe, pipe.text_encoder, pipe.tokenizer
        self.alpha, self.gamma = float(settings["alpha"]), int(settings["gamma"])
        self.busy = False
        self.concept = torch.eye(self.encoder.config.hidden_size, dtype=torch.float64) - _projection(
            self._pooled(self._ids(list(settings["keywords"]))).T)

    def _ids(self, prompts: list[str]) -> Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def _pooled(self, ids: Tensor) -> Tensor:
        self.busy = True  # the encoder hook ignores these calls
        try:
            device = next(self.encoder.parameters()).device
            return self.encoder(ids.to(device)).pooler_output.double().cpu()
        finally:
            self.busy = False

    def _words(self, ids: Tensor) -> int:
        """Word tokens of one id row: between the start token and the first end token."""
        eos = self.tokenizer.eos_token_id
        ends = (ids == eos).nonzero()
        return int(ends[0]) - 1 if len(ends) else len(ids) - 1

    def _masked(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(p_i for each word i, the whole prompt's pooled embedding)."""
        n = self._words(ids)
        masked = ids.repeat(n, 1)
        for i in range(n):
            masked[i, i + 1] = MASK_TOKEN_ID
        pooled = self._pooled(torch.cat([masked, ids[None]]))
        return pooled[:n], pooled[n]

    def _detect(self, p: Tensor, whole: Tensor) -> Tensor:
        dist = (p @ self.concept.T).norm(dim=1)
        n = len(dist)
        if n == 1:
            return dist >= (1 + self.alpha) * (whole @ self.concept.T).norm()
        others = (dist.sum() - dist) / (n - 1)
        return dist >= (1 + self.alpha) * others

    def triggers(self, prompt: str) -> Tensor:
        """The trigger flags of `prompt`'s word tokens."""
        ids = self._ids([prompt])[0]
        if self._words(ids) == 0:
            return torch.zeros(0, dtype=torch.bool)
        return self._detect(*self._masked(ids))

    def filtered(self, ids: Tensor, hidden: Tensor) -> tuple[Tensor, int] | None:
        """For one prompt (its id row and (L, d) embedding): the filtered embedding and t', or None when no token
        is a trigger."""
        n = self._words(ids)
        if n == 0:
            return None
        p, whole = self._masked(ids)
        flags = self._detect(p, whole)
        if not flags.any():
            return None
        e = hidden.detach().double().cpu()
        projected = e @ (self.concept @ _projection(p.T)).T
        real = slice(0, n + 2)
        beta = 1 - float(torch.nn.functional.cosine_similarity(projected[real], e[real], dim=1).mean())
        t_prime = round(self.gamma / (1 + math.exp(-5.0 * (10 * beta - 5.333))))
        rows = torch.zeros(len(e), dtype=torch.bool)
        rows[1:n + 1] = flags
        return torch.where(rows[:, None], projected, e).to(hidden), t_prime

    def first_timestep(self, t_prime: int) -> float:
        """The lowest timestep that still uses the filtered embedding: the first t' + 1 of 50 steps' share."""
        return self.pipe.scheduler.config.num_train_timesteps * (1 - (t_prime + 1) / REFERENCE_STEPS)


class SafreeHooks:
    """The two hooks (the module docstring); recorded prompts are kept for the last 256 prompts encoded."""

    KEEP = 256

    def __init__(self, filt: SafreeFilter):
        self.filt = filt
        self.recorded: OrderedDict[bytes, tuple[Tensor, Tensor, float]] = OrderedDict()
        self.handles = [filt.encoder.register_forward_hook(self._encoded, with_kwargs=True),
                        filt.pipe.unet.register_forward_pre_hook(self._denoise, with_kwargs=True)]

    @staticmethod
    def _key(row: Tensor) -> bytes:
        return row.detach().float().cpu().numpy().tobytes()

    def _encoded(self, module: nn.Module, args, kwargs, output):
        if self.filt.busy:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return None
        hidden = output[0]
        for row_ids, row in zip(ids.cpu(), hidden):
            found = self.filt.filtered(row_ids, row.detach())
            if found is not None:
                self.recorded[self._key(row)] = (row.detach(), found[0], self.filt.first_timestep(found[1]))
                self.recorded.move_to_end(self._key(row))
        while len(self.recorded) > self.KEEP:
            self.recorded.popitem(last=False)
        return None

    def _denoise(self, module: nn.Module, args, kwargs):
        if not self.recorded:
            return None
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if hidden is None or timestep is None:
            return None
        t = torch.as_tensor(timestep).reshape(-1).float().cpu().expand(len(hidden))
        new, changed = hidden.clone(), False
        for b, row in enumerate(hidden):
            entry = self.recorded.get(self._key(row))
            if entry is not None and float(t[b]) >= entry[2]:
                new[b] = entry[1].to(new)
                changed = True
        if not changed:
            return None
        if "encoder_hidden_states" in kwargs:
            return args, {**kwargs, "encoder_hidden_states": new}
        return (*args[:2], new, *args[3:]), kwargs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attach_safree(pipe, folder: Path) -> SafreeHooks:
    """Apply `folder`'s safree.json to the loaded `pipe` (called by `load_pipeline`)."""
    path = Path(folder) / SAFREE_CONFIG
    try:
        settings = json.loads(path.read_text())
        hooks = SafreeHooks(SafreeFilter(pipe, {k: settings[k] for k in ("keywords", "alpha", "gamma")}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConceptEraseError(f"cannot apply {str(path)!r}: {err}") from None
    pipe._concept_erase_safree = hooks
    return hooks
