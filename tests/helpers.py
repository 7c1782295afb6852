"""Helpers shared by several test modules (fixtures live in conftest.py). Tests import these; no test
imports another test module."""

import socket
import sys
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


def assert_same_training(a, b, base, lr):
    """State dicts `a` and `b`, both trained from `base`, are the same run up to float summation order.
    Adam divides by sqrt(v): where a gradient is ~0, rounding noise becomes an update of up to lr, so compare
    totals: the runs may differ by 2% of the distance they moved (a different batch or noise draw differs by
    about 100%), and no entry by more than the two steps' largest update."""
    moved = diff = 0.0
    for k in base:
        assert (a[k] - b[k]).abs().max() <= 2 * lr, k
        diff += float((a[k] - b[k]).abs().sum())
        moved += float((a[k] - base[k]).abs().sum())
    assert moved > 0 and diff <= 0.02 * moved, f"runs differ by {diff / moved:.2%} of the update"


def accelerate_launch(num_processes: int = 2, config_file=None) -> list[str]:
    """`accelerate launch` for N CPU processes on this machine: its torchrun-backed launcher (`--multi_gpu`,
    which on a machine without CUDA gives gloo CPU processes; `--cpu` alone would start only one), or the
    engine a `config_file` selects (`--multi_gpu` would override it)."""
    with socket.socket() as sock:  # a free port, so parallel test runs never collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = ["--multi_gpu"] if config_file is None else ["--config_file", str(config_file)]
    return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


def weights_copy(module) -> dict:
    """A detached copy of a module's state dict (to compare against after training)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def saved_bytes(model, forward) -> int:
    """What autograd keeps for the backward pass while `forward()` runs `model` for real: the bytes of the
    distinct storages it saves, the parameters' excepted (to check the plan's meta-device traces against)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())
