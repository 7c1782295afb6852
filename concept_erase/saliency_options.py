"""The choices the saliency-mask engine (`saliency.py`, SalUn: Fan et al., arXiv 2310.12508) takes, with no
torch, so the parsers offer them and refuse a bad one before `import torch` (docs/ARCHITECTURE.md); and how
many entries a keep ratio keeps, which a command checks against the model's parameter count before it loads."""

import math

from .errors import ConceptEraseError

# What ranks the weights (`saliency.compute_saliency`; docs/ALGORITHMS.md 1 and 4): SalUn's |gradient|, SNIP's
# |weight x gradient| (ScissorHands) and ANT's augmentation-enhanced map.
SCORES = ("salun", "snip", "ant")
# The optimizers `saliency.optimizer_class` builds.
OPTIMIZERS = ("adam", "adam8bit", "sgd")
# Where the trained weights' full-precision values live (docs/ALGORITHMS.md 1, "Memory of the masked step"):
# "fp32": the weights themselves are fp32; "salient-fp32": the weights are bf16 and the optimizer keeps fp32
# copies of the salient entries only; "bf16-stochastic": bf16 weights and no fp32 copy, the salient update
# rounded stochastically to bf16 (unbiased, so updates far below bf16's resolution still move the weight on
# average; Zamirai et al., arXiv 2010.06192).
MASTER_WEIGHTS = ("fp32", "salient-fp32", "bf16-stochastic")


def check_keep(keep: float) -> None:
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1) or math.isnan(keep):
        raise ConceptEraseError(f"keep must be in (0, 1], got {keep!r}")


def kept_count(keep: float, total: int) -> int:
    """How many of `total` ranked entries `keep` keeps: round(keep * total). A keep that rounds to none is
    refused (training one weight instead, as a floor of 1 would, is not what a user asking for 1e-12 expects)."""
    check_keep(keep)
    k = min(total, int(round(keep * total)))
    if k < 1:
        raise ConceptEraseError(f"keep {keep!r} keeps none of the {total:,} weights it ranks; the smallest keep "
                                f"that keeps one is {1 / total:.3g}")
    return k
