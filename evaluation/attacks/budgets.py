"""Each attack's budget: a dataclass of the settings that fix how hard it tries, printed before it runs and
saved with what it learned. The same budget is used for every model a comparison attacks.

Every setting is a flag `--<attack>-<setting>` and is checked by the rules every command follows
(`concept_erase.cli_args.check_fields`): finite numbers within their bounds. A zero or infinite budget would
report the model as robust without attacking it (an infinite learning rate optimises NaN conditionings)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from concept_erase.cli_args import check_fields
from concept_erase.errors import ConceptEraseError

VARIANTS = ("discrete", "soft")
COSINE_HELP = "decay the learning rate to 0 on a cosine over the steps (the last steps settle instead of wandering)"
TIMESTEPS_HELP = ("noise and timestep draws per prompt per step, the timesteps stratified over [0, T) and the errors "
                  "averaged (core.attack_denoising_error): a less noisy gradient at that many times the cost per step")


class Budget:
    """What every budget shares: the attack it belongs to (its flags' prefix) and its checks."""

    attack: ClassVar[str]

    def __post_init__(self):
        check_fields(self, prefix=self.attack)


@dataclass
class InversionBudget(Budget):
    """Concept inversion (Pham et al., ICLR 2024): textual inversion of k new tokens on the erased model."""

    attack: ClassVar[str] = "inversion"

    steps: int = field(default=300, metadata={"help": "optimisation steps (textual inversion's, all weights frozen)",
                                                   "min": 1})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate of the token embeddings", "above": 0})
    tokens: int = field(default=1, metadata={"help": "learned tokens (placed in front of each prompt)", "min": 1})
    images: int = field(default=16, metadata={
        "help": "concept images learned from (the base model's, or --images)", "min": 1})
    batch_size: int = field(default=4, metadata={"help": "images per step", "min": 1})

@dataclass
class UnlearnDiffAtkBudget(Budget):
    """UnlearnDiffAtk (Zhang et al., ECCV 2024): k adversarial prefix tokens per prompt, optimised so the
    erased model denoises the original model's image of that prompt; discrete tokens by projection."""

    attack: ClassVar[str] = "unlearndiffatk"

    # Raised on the remap control (benchmarks/results/attack_calibration_minisd.md): the paper's 40 steps at lr
    # 0.01, one timestep per step, recover MiniSD's control on 7 of 15 rows (soft variant); 200 steps at lr 0.005
    # with 4 stratified timesteps per step on 14 of 15 (400 steps, or 2 restarts: still 14); with 8 timesteps per
    # step on all 15. The gradient's noise was the limit, not the step count.
    steps: int = field(default=200, metadata={"help": "attack steps per prompt (the paper's 40 do not recover the "
                                                      "remap control)", "min": 1})
    lr: float = field(default=0.005, metadata={
        "help": "Adam learning rate of the prefix embeddings (the paper's 0.01 is too coarse to converge)",
        "above": 0})
    tokens: int = field(default=5, metadata={
        "help": "adversarial prefix tokens per prompt (the paper's k = 5)", "min": 1})
    variant: str = field(default="discrete", metadata={
        "help": "discrete: tokens of the vocabulary (each step projects to the nearest one, PEZ-style "
                "straight-through, as the paper); soft: free embeddings (no prompt can type them)",
        "choices": VARIANTS})
    timesteps: int = field(default=8, metadata={"help": TIMESTEPS_HELP, "min": 1})
    cosine: bool = field(default=False, metadata={"help": COSINE_HELP})
    restarts: int = field(default=1, metadata={
        "help": "independent runs per prompt from other random initial tokens; each prompt keeps the run whose prefix "
                "denoises its target best on fresh draws (the attack's own objective)", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "prompts attacked together (does not change what each learns)",
                                      "min": 1})

@dataclass
class RingABellBudget(Budget):
    """Ring-A-Bell (Tsai et al., ICLR 2024): a concept vector from paired prompts, added with strength eta."""

    attack: ClassVar[str] = "ringabell"

    eta: float = field(default=3.0, metadata={
        "help": "strength of the concept vector (the paper's 3 for nudity)", "above": 0})
    pairs: int = field(default=0, metadata={
        "help": "prompt pairs (forget prompt, surrogate prompt) averaged into the vector (0: all the concept has)",
        "min": 0})

@dataclass
class EmbeddingBudget(Budget):
    """The conditioning-space upper bound: the text encoder's output for each prompt, optimised directly."""

    attack: ClassVar[str] = "embedding"

    # Calibrated on the remap control (benchmarks/results/attack_calibration_minisd.md): 100 steps at lr 0.01 with
    # one timestep per step recover MiniSD's control on 11 of 15 rows, at lr 0.05 on 13; with 4 stratified
    # timesteps per step and a cosine decay, on all 15. The optimiser was fixed, not the step count raised.
    steps: int = field(default=100, metadata={"help": "optimisation steps per prompt", "min": 1})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate of the conditioning", "above": 0})
    timesteps: int = field(default=4, metadata={"help": TIMESTEPS_HELP, "min": 1})
    cosine: bool = field(default=True, metadata={"help": COSINE_HELP})
    batch_size: int = field(default=8, metadata={"help": "prompts attacked together (does not change what each learns)",
                                      "min": 1})

@dataclass
class TextFreeBudget(Budget):
    """The text-free attack, TINA-style (arXiv 2603.17828): each row's concept image DDIM-inverted on the erased
    model under the empty prompt, regenerated from its noise (textfree.py). No optimisation: the inversion runs
    the protocol's own steps, which is what makes inversion and regeneration an exact pair."""

    attack: ClassVar[str] = "textfree"

    prompt: str = field(default="", metadata={
        "help": "the prompt the image is inverted and regenerated under: empty (text-free, the default) or a "
                "neutral one such as 'a photo'"})


@dataclass
class RelearnBudget(Budget):
    """The relearning attack (SPQR, arXiv 2511.19558): the erased model fine-tuned with the plain diffusion loss
    on a few images, then its plain prompts judged again (relearn.py)."""

    attack: ClassVar[str] = "relearn"

    # Calibrated on the remap control (benchmarks/results/attack_calibration_minisd.md): 20 steps bring MiniSD's
    # control back on 11 of 15 rows, 60 on all 15.
    steps: int = field(default=60, metadata={"help": "fine-tuning steps", "min": 1})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the fine-tuning (every UNet weight)",
                                              "above": 0})
    images: int = field(default=8, metadata={"help": "images fine-tuned on (the original model's drawings)",
                                             "min": 1})
    data: str = field(default="concept", metadata={
        "help": "concept: images of the concept with their prompts; unrelated: images of its retain prompts only "
                "(benign fine-tuning: does the concept come back by itself?)", "choices": ("concept", "unrelated")})
    batch_size: int = field(default=4, metadata={"help": "images per fine-tuning step", "min": 1})


BUDGETS = {"inversion": InversionBudget, "unlearndiffatk": UnlearnDiffAtkBudget, "ringabell": RingABellBudget,
           "embedding": EmbeddingBudget, "textfree": TextFreeBudget, "relearn": RelearnBudget}
# A budget small enough for CI and the audit's quick mode: every attack still runs end to end.
TINY = {"inversion": {"steps": 4, "images": 4, "batch_size": 2},
        "unlearndiffatk": {"steps": 3, "tokens": 2, "timesteps": 2}, "ringabell": {}, "embedding": {"steps": 4},
        "textfree": {}, "relearn": {"steps": 2, "images": 2, "batch_size": 2}}


def make_budget(attack: str, **values):
    """The budget of `attack` with `values` replacing defaults (None: keep the default)."""
    if attack not in BUDGETS:
        raise ConceptEraseError(f"unknown attack {attack!r} (choose from {', '.join(BUDGETS)})")
    cls = BUDGETS[attack]
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k, v in values.items() if v is not None and k not in names)
    if unknown:
        raise ConceptEraseError(f"attack {attack!r} has no budget setting {unknown[0]!r} ({', '.join(sorted(names))})")
    return cls(**{k: v for k, v in values.items() if v is not None})
