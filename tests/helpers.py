"""Helpers shared by several test modules (fixtures live in conftest.py). Tests import these; no test
imports another test module."""

from pathlib import Path

import torch

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(a, b):
    """Every tensor of every component identical (SDXL's text_encoder_2 too, where there is one)."""
    for name in COMPONENTS:
        if getattr(a, name, None) is None and getattr(b, name, None) is None:
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]
