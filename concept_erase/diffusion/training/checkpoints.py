"""The erasure loop's checkpoints: `checkpoint-<step>/` folders, written, found, read, pruned and set aside.

Why not accelerate's `save_state` / `load_state`: the run's own state (the computed mask, the divergence
guard's verdicts, the settings a resume must share) would go through `register_for_checkpointing`, which
accelerate reloads with `torch.load(weights_only=False)`, i.e. by executing pickled code from the checkpoint
folder. This project loads checkpoints without executing pickled code, so the format is its own and lives
in this one file (docs/ALGORITHMS.md, "Checkpoints and resume"):

    checkpoint-<step>/
      unet.safetensors        every weight of the trained module (text-encoder.safetensors with
                              --train text-encoder)
      optimizer.pt            the optimizer state, tensors only (read with weights_only=True); absent in a
                              run's kept final weights, which take no more step
      rng.safetensors         torch's CPU (and CUDA) RNG state
      state.json              the step, the losses so far, the settings a resume must share

The data order needs no file: it is a function of (seed, step). A computed mask is kept beside the
checkpoints (`RESUME_MASK`) so a resumed run trains the same weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import ConceptEraseError
from ...io_utils import atomic_dir

if TYPE_CHECKING:
    from .config import TrainConfig

# A name of our own, so a --checkpoint-dir that holds a user's mask.safetensors is never touched.
RESUME_MASK = "resume-mask.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_in(checkpoint_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every complete `checkpoint-<step>` in `checkpoint_dir`, oldest first."""
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in Path(checkpoint_dir).iterdir()
                  if (m := CHECKPOINT_RE.match(p.name)) and (p / "state.json").is_file())


def prune(checkpoint_dir, passed_step: int, keep: int) -> None:
    """Keep only the newest `keep` checkpoints among those at or before `passed_step` (0: keep all)."""
    if keep:
        passed = [p for s, p in checkpoints_in(checkpoint_dir) if s <= passed_step]
        for old in passed[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def set_aside(checkpoint_dir, failed_step: int) -> None:
    """Rename the checkpoints from `failed_step` on to `checkpoint-<s>.diverged` (`--resume latest` skips them)."""
    for s, path in checkpoints_in(checkpoint_dir):
        if s >= failed_step:
            target = path.with_name(f"{path.name}.diverged")
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)


def last_at_or_before(checkpoint_dir, step: int) -> Path | None:
    return next((p for s, p in reversed(checkpoints_in(checkpoint_dir)) if s <= step), None)


def latest_checkpoint(checkpoint_dir) -> Path | None:
    found = checkpoints_in(checkpoint_dir)
    return found[-1][1] if found else None


def find_checkpoint(checkpoint_dir, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoint_dir)  # none yet: a fresh start, as diffusers' scripts do
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConceptEraseError(f"--resume {resume!r} is not a checkpoint folder (no state.json)")
    return path


def save_checkpoint(accelerator, checkpoint_dir: Path, step: int, unet, optimizer, config: TrainConfig,
                    losses: list[dict]) -> None:
    """checkpoint-<step>/ of a running loop (see `write_checkpoint`), written by the main process once the
    weights passed the divergence guard; older checkpoints are pruned by the guard once a newer one passed."""
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
        write_checkpoint(checkpoint_dir, step, model.state_dict(),
                         getattr(optimizer, "optimizer", optimizer).state_dict(), config, losses)
    accelerator.wait_for_everyone()


def write_checkpoint(checkpoint_dir: Path, step: int, weights: dict, optimizer_state: dict | None,
                     config: TrainConfig, losses: list[dict]) -> Path:
    """checkpoint-<step>/ in the layout of the module docstring, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    path = Path(checkpoint_dir) / f"checkpoint-{step}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(state, str(tmp / f"{config.train}.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "config": config.resume_key(), "losses": losses}, indent=1))
    return path


def load_checkpoint(path: Path, unet, optimizer, config: TrainConfig) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    from ..models.loading import safe_torch_load

    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / f"{config.train}.safetensors"))
        has_optimizer = (path / "optimizer.pt").exists()  # a run's kept final weights have none (no step left)
        # never runs pickled code, and a refusal never quotes torch's advice to retry with weights_only=False
        opt_state = safe_torch_load(path / "optimizer.pt") if has_optimizer else None
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as err:  # truncated / foreign files: one line naming the folder
        raise ConceptEraseError(f"cannot read checkpoint {str(path)!r}: {str(err).splitlines()[0]}") from None
    saved = state.get("config", {})
    diff = [k for k, v in config.resume_key().items() if k in saved and saved[k] != v]
    if diff:
        raise ConceptEraseError(f"checkpoint {str(path)!r} was made with other settings ({diff[0]}="
                                f"{saved[diff[0]]!r}, now {getattr(config, diff[0])!r})")
    if int(state["step"]) > config.steps:
        raise ConceptEraseError(f"checkpoint {str(path)!r} is at step {state['step']}, past --steps {config.steps}")
    if opt_state is None and int(state["step"]) < config.steps:
        raise ConceptEraseError(f"checkpoint {str(path)!r} holds final weights without optimizer state: it cannot "
                                f"continue to --steps {config.steps}")
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConceptEraseError(f"checkpoint {str(path)!r} does not fit this {config.train} "
                                f"(first mismatch: {(missing or unexpected)[0]!r})")
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"]), list(state.get("losses", []))


def remove_resume_mask(ckpt_dir: Path) -> None:
    """Drop the mask kept for --resume, and the checkpoint folder if that leaves it empty."""
    (ckpt_dir / RESUME_MASK).unlink(missing_ok=True)
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
