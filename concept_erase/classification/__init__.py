"""Image-classification unlearning (SalUn's other half) on the shared saliency-mask engine.

config.py (flags, no torch) -> data.py (digits, Hugging Face datasets) -> models.py (small CNN, CIFAR
ResNet-18) -> methods.py (Retrain, FT, GA, RL, l1-sparse, SalUn) -> metrics.py (UA, RA, TA, MIA-Efficacy,
Avg. Gap) -> runner.py (seeds, validation-chosen learning rates, the table) -> cli.py (`concept-erase classify`).
"""
