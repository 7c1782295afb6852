"""The divergence guard of the erasure loop: stop at a blow-up, and keep only checkpoints that passed.

A too-large learning rate does not always give a NaN: with `--lr 1e6` the weights after one Adam step are
finite but ruined (every image comes out black). So the guard has three rules (docs/ALGORITHMS.md, "The
divergence guard"):

1. Loss. Every step's loss (already averaged over processes, so every process reaches the same verdict)
   must be finite and at most `LOSS_JUMP` times its running value (an exponential average, factor
   `SMOOTHING`, of the losses that passed; floored at `LOSS_FLOOR` so a loss near zero cannot make noise
   look like a jump).
2. Weights. After every optimizer step, the norm of the trained weights must be finite and at most
   `NORM_GROWTH` times what it was when this run (or resumed run) started.
3. Checkpoints. `checkpoint-<s>` holds the weights after s steps. It is written once they pass rule 2, and
   it has passed only when the loss those weights give at step s + 1 passes rule 1 (the last checkpoint of a
   run, which no later loss tests, passes on rule 2). Older checkpoints are pruned (`--checkpoints-total-limit`)
   only when a newer one has passed. When a rule fires, the checkpoint of the weights that failed is renamed
   `checkpoint-<s>.diverged` (kept for inspection; `--resume latest` never picks it), the run stops, and the
   error names the newest checkpoint that passed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from .checkpoints import last_at_or_before, prune, set_aside

LOSS_JUMP = 100.0    # a step's loss above this many times its running value is a blow-up
NORM_GROWTH = 10.0   # trained weights whose norm grew this many times since the start have exploded
SMOOTHING = 0.9      # weight of the running value in its exponential average
LOSS_FLOOR = 1e-4    # the running value used for rule 1 is at least this


class DivergenceGuard:
    """Rules 1-3 above for one call of the loop. `params`: the weights that train; `start_step`: the steps
    already done (a resumed run); `keep`: how many passed checkpoints to keep (0: all); `main`: whether this
    process manages the checkpoint folder."""

    def __init__(self, params: list[nn.Parameter], checkpoint_dir=None, *, start_step: int = 0, keep: int = 0,
                 main: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.keep, self.main = keep, main
        self.running: float | None = None
        self.passed_step = start_step  # the weights after this many steps have passed
        self.start_norm = self._norm()

    @torch.no_grad()
    def _norm(self) -> float:
        if not self.params:
            return 0.0
        norms = torch.stack([torch.linalg.vector_norm(p.detach().float()).cpu() for p in self.params])
        return float(torch.linalg.vector_norm(norms))

    def check_loss(self, step: int, loss: Tensor) -> None:
        """Rule 1 for the loss of loop step `step` (0-based), computed from the weights after `step` steps;
        when it passes, their checkpoint has passed too and older ones may be pruned."""
        value = float(loss.reshape(-1)[0])
        if not math.isfinite(value):
            self._stop(f"non-finite loss {value} at step {step + 1}", failed_step=step)
        if self.running is not None and value > LOSS_JUMP * max(self.running, LOSS_FLOOR):
            self._stop(f"the loss {value:.4g} at step {step + 1} is {value / self.running:.3g}x its running value "
                       f"{self.running:.4g} (the limit is {LOSS_JUMP:g}x)", failed_step=step)
        self.running = value if self.running is None else SMOOTHING * self.running + (1 - SMOOTHING) * value
        self._passed(step)

    def check_weights(self, steps_done: int) -> None:
        """Rule 2 for the weights after `steps_done` steps (call it before they are checkpointed)."""
        norm = self._norm()
        if not math.isfinite(norm):
            self._stop(f"the trained weights have a non-finite norm after step {steps_done}", failed_step=steps_done)
        if self.start_norm > 0 and norm > NORM_GROWTH * self.start_norm:
            self._stop(f"the trained weights' norm grew {norm / self.start_norm:.3g}x after step {steps_done} "
                       f"({self.start_norm:.4g} -> {norm:.4g}; the limit is {NORM_GROWTH:g}x)", failed_step=steps_done)

    def finish(self, steps_done: int) -> None:
        """The end of the run: the last weights passed rule 2, which is all a last checkpoint can pass."""
        self._passed(steps_done)

    # -- checkpoints -----------------------------------------------------------------------------------

    def _passed(self, steps_done: int) -> None:
        self.passed_step = steps_done
        if self.main:
            prune(self.checkpoint_dir, steps_done, self.keep)

    def last_passed(self) -> Path | None:
        return last_at_or_before(self.checkpoint_dir, self.passed_step)

    def _stop(self, reason: str, failed_step: int):
        """Set aside the checkpoints of weights that did not pass, and stop naming the last one that did."""
        if self.main:
            set_aside(self.checkpoint_dir, failed_step)
        good = self.last_passed()
        where = (f"last checkpoint that passed: {good} (resume from it with a lower --lr)" if good
                 else "no checkpoint passed")
        raise ConceptEraseError(f"divergence: {reason}; stopping; {where}")
