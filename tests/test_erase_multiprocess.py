"""`concept-erase erase` under `accelerate launch` with 2 CPU processes (gloo) gives the weights of one process with the
same global batch: every process draws the same global batch and trains on its half (erase.py docstring)."""

import os
import subprocess

from safetensors.torch import load_file

from concept_erase.cli import main
from concept_erase.saliency import SaliencyMask
from helpers import accelerate_launch, assert_same_training


def test_two_processes_match_one(tiny_pipeline_dir, tmp_path):
    args = ["erase", "--model", str(tiny_pipeline_dir), "--forget", "a nude", "--surrogate", "a dressed",
            "--num-forget-images", "4", "--num-retain-images", "4", "--image-steps", "2",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--steps", "2", "--lr", "1e-3",
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0  # also fills the image cache

    # OpenMP spin-waiting makes 2 processes on 2 cores 10-30x slower (docs/MINISD.md); gloo is the CPU backend.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [*accelerate_launch(2), "-m", "concept_erase", *args, "--output", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"processes": 2' in run.stdout

    one = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert one.keys() == two.keys()
    assert_same_training(one, two, base, lr=1e-3)
    # The mask: computed by the main process and shared. The single run used more threads, so scores right at
    # the threshold may round the other way; anything beyond that would be a different mask.
    one_mask, two_mask = (SaliencyMask.load(tmp_path / d / "mask.safetensors").masks for d in ("one", "two"))
    differing = sum(int((one_mask[k] != two_mask[k]).sum()) for k in one_mask)
    assert differing <= 1e-3 * sum(m.numel() for m in one_mask.values())


def test_two_processes_match_one_for_esd(tiny_pipeline_dir, tmp_path):
    """ESD (prompts only, the frozen reference model beside the DDP-wrapped one, a partial-sampling stop index
    per step): 2 processes give the weights of one."""
    args = ["erase", "--model", str(tiny_pipeline_dir), "--forget", "a nude", "--surrogate", "a dressed",
            "--method", "esd-u", "--esd-ddim-steps", "2", "--batch-size", "2", "--steps", "2", "--lr", "1e-3",
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([*accelerate_launch(2), "-m", "concept_erase", *args, "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (load_file(str(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors")) for d in ("one", "two"))
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_same_training(one, two, base, lr=1e-3)
