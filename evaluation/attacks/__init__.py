"""Adversarial attacks on erased models: does the concept come back under an adversarial prompt?

Six attacks, each a `learn(pipe, rows, targets, budget, seed, ...) -> Learned` with a fixed, printed budget
(`budgets.py`), deterministic in its seed, saving what it learned so it can be replayed on another model
(relearning excepted: its result is a fine-tuned UNet):

- `inversion`: concept inversion (Pham et al., ICLR 2024), textual inversion on the erased model;
- `unlearndiffatk`: UnlearnDiffAtk (Zhang et al., ECCV 2024), k prefix tokens per prompt, discrete or soft;
- `ringabell`: Ring-A-Bell (Tsai et al., ICLR 2024), a concept vector added to the prompt's conditioning;
- `embedding`: the conditioning-space upper bound (no tokenizer, no text encoder);
- `textfree`: TINA-style (arXiv 2603.17828), the concept image DDIM-inverted under the empty prompt, regenerated;
- `relearn`: relearning (SPQR, arXiv 2511.19558), a few plain fine-tuning steps, then the plain prompts again.

`attack` and `audit` run DEFAULT_ATTACKS unless told: every attack but relearning, which fine-tunes every UNet
weight (on SD 1.x, an optimiser over 860M weights: far more memory and time than the others) and is opt-in.

`run.py` is the `concept-erase attack` job (Pre-ASR / ASR the UnlearnDiffAtk way, docs/PROTOCOLS.md),
`replay.py` reads and checks saved attacks and fits them to another model, `audit.py` the `concept-erase audit`
report, `detectors.py` the success tests.
"""

from __future__ import annotations

from importlib import import_module

ATTACK_NAMES = ("inversion", "unlearndiffatk", "ringabell", "embedding", "textfree", "relearn")
DEFAULT_ATTACKS = ("inversion", "unlearndiffatk", "ringabell", "embedding", "textfree")
# What each attack does, in one line for a report reader.
ATTACK_DESCRIPTIONS = {
    "inversion": "concept inversion: learns new tokens that make the erased model draw the concept again",
    "unlearndiffatk": "UnlearnDiffAtk: prefix tokens per prompt, optimised against the erased model",
    "ringabell": "Ring-A-Bell: a concept vector, found on the text encoder alone, added to the prompt",
    "embedding": "the conditioning-space bound: the conditioning itself optimised, no tokenizer in the way",
    "textfree": "text-free (TINA-style): the concept image inverted under the empty prompt, regenerated from its noise",
    "relearn": "relearning: a few plain fine-tuning steps on a handful of images, then the plain prompts again",
}


def attack_fn(name: str):
    """The `learn(pipe, ...)` function of attack `name` (a one-line error for an unknown one), whose result
    records the attacked model's structure (what a replay must fit) and is checked finite: an optimisation that
    blew up stops here, naming the attack and the step, and nothing is drawn or reported from it."""
    from concept_erase.errors import ConceptEraseError

    if name not in ATTACK_NAMES:
        raise ConceptEraseError(f"unknown attack {name!r} (choose from {', '.join(ATTACK_NAMES)})")
    learn = import_module(f"{__name__}.{name}").learn

    def learn_checked(pipe, *args, **kwargs):
        from .structure import structure_of

        learned = learn(pipe, *args, **kwargs)
        learned.structure = structure_of(pipe)
        learned.check_finite()
        return learned

    return learn_checked
