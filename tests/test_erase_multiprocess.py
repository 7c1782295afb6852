"""`concept-erase erase` under `accelerate launch` with 2 CPU processes (gloo) gives the weights of one process with the
same global batch: every process draws the same global batch and trains on its half (erase.py docstring)."""

import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from concept_erase.cli import main
from concept_erase.saliency import SaliencyMask
from helpers import accelerate_launch, assert_same_training


def test_two_processes_match_one(tiny_pipeline_dir, tmp_path):
    args = ["erase", "--model", str(tiny_pipeline_dir), "--forget", "a nude", "--surrogate", "a dressed",
            "--num-forget-images", "4", "--num-retain-images", "4", "--image-steps", "2",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--steps", "2", "--lr", "1e-3",
            "--no-progress", "--json"]
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


# Run under `accelerate launch`: the erase command, which also saves every process's trained weights (the
# command saves the main process's only), so the test sees that the gathered weights are the same everywhere.
_EVERY_PROCESS = """
import sys
from accelerate import PartialState
from safetensors.torch import save_file
from concept_erase.cli import main
from concept_erase.diffusion.training import job

train = job.train_unet
def train_and_keep(*args, **kwargs):
    result = train(*args, **kwargs)
    weights = {k: v.contiguous() for k, v in result.unet.state_dict().items()}
    save_file(weights, f"{sys.argv[1]}/rank{PartialState().process_index}.safetensors")
    return result
job.train_unet = train_and_keep
sys.exit(main(sys.argv[2:]))
"""


def test_fsdp_two_processes_match_one(tiny_pipeline_dir, tmp_path):
    """configs/accelerate/fsdp.yaml on 2 CPU processes (gloo): the UNet is sharded (torch's FSDP2), the masked
    optimizer steps each shard's salient entries, and the gathered weights are those of one process."""
    args = ["erase", "--model", str(tiny_pipeline_dir), "--forget", "a nude", "--surrogate", "a dressed",
            "--num-forget-images", "4", "--num-retain-images", "4", "--image-steps", "2",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--steps", "2", "--lr", "1e-3",
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    mask = tmp_path / "one" / "mask.safetensors"  # the same mask: frozen entries are known exactly
    script = tmp_path / "every_process.py"
    script.write_text(_EVERY_PROCESS)
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([*accelerate_launch(2, config), str(script), str(tmp_path),
                          *args, "--mask", str(mask), "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FSDP: the unet is sharded over 2 processes" in run.stderr

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    saved = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    for k in saved:  # (a) every process ends with the same whole weights, which are the ones saved
        assert torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], saved[k]), k
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    masks = SaliencyMask.load(mask).masks
    for k, m in masks.items():  # (b) frozen means frozen, shard by shard
        assert torch.equal(saved[k][~m], base[k][~m]), k
    assert any(not torch.equal(saved[k][m], base[k][m]) for k, m in masks.items())
    one = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_same_training(one, saved, base, lr=1e-3)  # (c) the reduce-scatter may sum in another order


def test_deepspeed_without_cuda_is_refused(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """A DeepSpeed config (what `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` sets
    in each process) on a machine without CUDA: one line, before the mask pass and images, nothing written. accelerate itself
    would silently run plain data parallel instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal is checked on any machine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    code = main(["erase", "--model", str(tiny_pipeline_dir), "--forget", "a nude", "--surrogate", "a dressed",
                 "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "DeepSpeed" in err[0] and "ZeRO stage 2" in err[0] and "CUDA" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
