"""Shared fixtures: tiny real pipelines built offline. No test may touch the network or ../shared."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 processes on 2 cores spin otherwise (docs/MINISD.md)

import pytest  # noqa: E402 (after the environment above)

from concept_erase.logs import show_logs

show_logs()  # library code's log records on stderr, as the CLI shows them


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline saved as a diffusers folder (read-only use: copy to modify)."""
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def tiny_pipeline():
    """A fresh tiny pipeline object (seed 0), built in memory."""
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def other_pipeline():
    """A pipeline with the tiny architecture but other weights (seed 1) than `tiny_pipeline_dir` (seed 0)."""
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline (SDXL's structure: two text encoders, `text_time` UNet, two
    layers per block with 1 and 2 transformer blocks) saved as a diffusers folder (read-only use)."""
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl") / "pipe"
    build_tiny_sdxl_pipeline(seed=0, layers_per_block=2, transformer_layers=(1, 2)).save_pretrained(path)
    return path


@pytest.fixture
def tiny_sdxl_pipeline():
    """A fresh tiny SDXL pipeline object (seed 0), built in memory."""
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(tmp_path_factory):
    """A tiny random FluxPipeline (FLUX.1 dev's structure: guidance embedding) saved as a diffusers folder
    (read-only use)."""
    from concept_erase.diffusion.models.tiny import build_tiny_flux_pipeline

    path = tmp_path_factory.mktemp("tiny-flux") / "pipe"
    build_tiny_flux_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_dir(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline saved as a diffusers folder (read-only use)."""
    from concept_erase.diffusion.models.tiny import build_tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3") / "pipe"
    build_tiny_sd3_pipeline(seed=0).save_pretrained(path)
    return path
