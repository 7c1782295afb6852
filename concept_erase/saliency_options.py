"""The choices the saliency-mask engine (`saliency.py`, SalUn: Fan et al., arXiv 2310.12508) takes, with no
torch, so the parsers offer them and refuse a bad one before `import torch` (docs/ARCHITECTURE.md)."""

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
