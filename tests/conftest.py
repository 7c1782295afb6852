"""Shared fixtures: tiny real pipelines built offline. No test may touch the network or ../shared."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 processes on 2 cores spin otherwise (docs/MINISD.md)

import socket
import sys

import pytest


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """`accelerate launch` for N CPU processes on this machine: its torchrun-backed launcher (`--multi_gpu`,
    which on a machine without CUDA gives gloo CPU processes; `--cpu` alone would start only one)."""
    with socket.socket() as sock:  # a free port, so parallel test runs never collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline saved as a diffusers folder (read-only use: copy to modify)."""
    from concept_erase.diffusion.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def tiny_pipeline():
    """A fresh tiny pipeline object (seed 0), built in memory."""
    from concept_erase.diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def other_pipeline():
    """A pipeline with the tiny architecture but other weights (seed 1) than `tiny_pipeline_dir` (seed 0)."""
    from concept_erase.diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline (SDXL's structure: two text encoders, `text_time` UNet, two
    layers per block with 1 and 2 transformer blocks) saved as a diffusers folder (read-only use)."""
    from concept_erase.diffusion.tiny import build_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl") / "pipe"
    build_tiny_sdxl_pipeline(seed=0, layers_per_block=2, transformer_layers=(1, 2)).save_pretrained(path)
    return path


@pytest.fixture
def tiny_sdxl_pipeline():
    """A fresh tiny SDXL pipeline object (seed 0), built in memory."""
    from concept_erase.diffusion.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0)
