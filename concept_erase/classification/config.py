"""Configuration of the classification benchmark: plain dataclasses with no torch import, so the
`classify` parser builds its flags from them cheaply (cli.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..cli_args import check_fields
from ..errors import ConceptEraseError

MODEL_CHOICES = ("cnn", "resnet18")

# method key -> name in tables (the paper's spelling). Retrain first: it is the reference row.
METHOD_NAMES: dict[str, str] = {
    "retrain": "Retrain",
    "ft": "FT",
    "ga": "GA",
    "rl": "RL",
    "l1": "l1-sparse",
    "salun": "SalUn",
}


@dataclass
class SGDConfig:
    """One SGD recipe, used for the Original, Retrain and every unlearning run (only lr and epochs differ)."""

    epochs: int = field(default=20, metadata={"help": "Passes over the training data.", "min": 1})
    lr: float = field(default=0.05, metadata={"help": "Peak learning rate (cosine decay to 0 over the run).", "above": 0})
    batch_size: int = field(default=64, metadata={"help": "Images per step.", "min": 1})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum.", "min": 0})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay.", "min": 0})

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ForgetSpec:
    """What to forget: one whole class (`class:N`) or a random fraction of the training set (`random:F`)."""

    kind: str = field(default="class", metadata={"help": "'class' or 'random'"})
    value: float = field(default=0, metadata={"help": "the class index, or the fraction in (0, 1)"})

    def __post_init__(self):
        if not math.isfinite(self.value):
            raise ConceptEraseError(f"forget {self.kind} must be a finite number, got {self.value!r}")
        if self.kind == "class":
            if self.value != int(self.value) or self.value < 0:
                raise ConceptEraseError(f"forget class must be a non-negative integer, got {self.value!r}")
        elif self.kind == "random":
            if not 0 < self.value < 1:
                raise ConceptEraseError(f"forget fraction must be in (0, 1), got {self.value!r}")
        else:
            raise ConceptEraseError(f"forget kind must be 'class' or 'random', got {self.kind!r}")

    @classmethod
    def parse(cls, text: str) -> "ForgetSpec":
        """`class:3` or `random:0.1`."""
        kind, sep, value = str(text).partition(":")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or number is None:
            raise ConceptEraseError(f"--forget must look like 'class:N' or 'random:F', got {text!r}")
        try:
            return cls(kind, number)
        except ConceptEraseError as err:
            raise ConceptEraseError(f"--forget {text!r}: {err}") from None

    def __str__(self) -> str:
        return f"class:{int(self.value)}" if self.kind == "class" else f"random:{self.value:g}"


ALL_METHODS = tuple(METHOD_NAMES)


def parse_methods(text: str) -> tuple[str, ...]:
    """`all` or a comma list of method keys; Retrain is always added (it is every gap's reference)."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        names = list(ALL_METHODS)
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise ConceptEraseError(
            f"unknown method {(unknown or [text])[0]!r} (choose from all, {', '.join(ALL_METHODS)})")
    return tuple(m for m in ALL_METHODS if m in names or m == "retrain")


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConceptEraseError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ConceptEraseError(f"{what} must be positive numbers, got {text!r}")
    return values


@dataclass
class ClassifyConfig:
    """One benchmark run. Every field is a `concept-erase classify` flag of the same name."""

    dataset: str = field(default="digits", metadata={
        "help": "digits (bundled with scikit-learn, offline), cifar10, cifar100, svhn (Hugging Face hub, online), "
                "or a folder saved with datasets' save_to_disk holding train and test splits."})
    forget: str = field(default="class:0", metadata={
        "help": "What to forget: class:N (one whole class) or random:F (a random fraction F of the training set)."})
    methods: str = field(default="all", metadata={
        "help": f"'all' or a comma list of {', '.join(ALL_METHODS)}; retrain always runs (the reference row)."})
    seeds: int = field(default=5, metadata={"help": "Number of seeds (0..N-1): model init and batch order.", "min": 1,
                                            "flag": "num-seeds", "aliases": ("--seeds",)})
    model: str = field(default="auto", metadata={
        "help": "cnn (small CNN), resnet18 (CIFAR ResNet-18), or auto: cnn for digits, resnet18 otherwise.",
        "choices": ("auto", *MODEL_CHOICES)})
    epochs: int = field(default=20, metadata={"help": "Training epochs of the Original and of Retrain.", "min": 1})
    lr: float = field(default=0.05, metadata={
        "help": "Learning rate of the Original and of Retrain (SGD, cosine).", "above": 0})
    unlearn_epochs: int = field(default=5, metadata={
        "help": "Epochs of every unlearning method (the same for all).", "min": 1})
    lr_grid: str = field(default="0.01,0.03,0.1", metadata={
        "help": "Comma list of learning rates tried for every unlearning method; the best on validation is kept."})
    batch_size: int = field(default=64, metadata={"help": "Images per SGD step, for every run.", "min": 1})
    keep: float | None = field(default=None, metadata={
        "help": "SalUn: fraction of weights the saliency mask keeps trainable, in (0, 1]; unset means 0.5 "
                "(leave it unset with --mask, whose file has its own ratio).", "above": 0, "max": 1})
    mask: str | None = field(default=None, metadata={
        "help": "SalUn: a mask file (concept-erase mask format) to use instead of computing one per seed, "
                "e.g. a random-mask control; it must match the model's parameters."})
    l1_alpha: float = field(default=5e-4, metadata={
        "help": "l1-sparse: initial l1 weight (decays linearly to 0).", "min": 0})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when available)."})
    threads: int = field(default=0, metadata={
        "help": "CPU threads for torch; 0 = auto: 1 for the small CNN (its tiny convolutions ran 4x slower with "
                "2 threads on 2 shared cores), torch's default otherwise.", "min": 0})

    def __post_init__(self):
        check_fields(self)
        self.forget_spec = ForgetSpec.parse(self.forget)
        self.method_keys = parse_methods(self.methods)
        self.lrs = parse_floats(self.lr_grid, "--lr-grid")
        if self.mask is not None and "salun" not in self.method_keys:
            raise ConceptEraseError(f"--mask {self.mask!r} is only used by salun, which is not in --methods")
        if self.mask is not None and self.keep is not None:
            raise ConceptEraseError("--keep and --mask exclude each other: a mask file has its own keep ratio")
        if self.keep is None:
            self.keep = 0.5
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConceptEraseError(f"--device must be cpu, cuda[:N] or auto, got {self.device!r}")
        # The SGD recipes are validated here too, so bad numbers fail before any training.
        self.train_sgd = SGDConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)
        self.unlearn_sgd = [SGDConfig(epochs=self.unlearn_epochs, lr=lr, batch_size=self.batch_size) for lr in self.lrs]
