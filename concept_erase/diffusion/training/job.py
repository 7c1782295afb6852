"""`concept-erase mask` and `concept-erase erase`: the jobs around the loop (docs/ALGORITHMS.md 2).

`run_erase(config)`: load the checkpoint, resolve the method once, make or reuse the data it asks for,
compute or load the mask, train (or edit in closed form), and save the model + card + mask + JSON summary,
all or nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ...errors import ConceptEraseError
from ...saliency import SaliencyMask, check_keep_for
from ..data.latents import ImageSource, LatentSet
from ..models.families import family_of
from .checkpoints import RESUME_MASK, find_checkpoint, latest_checkpoint, remove_resume_mask, write_checkpoint
from .config import EraseConfig
from .loop import train_unet
from .mask_pass import compute_mask, mask_batch
from .trained import trained_module


def build_latent_sets(pipe, concept, method, state, *,
                      with_retain: bool | None = None) -> tuple[LatentSet, LatentSet | None]:
    """The data `method` asks for (its `forget_set`), and retain images when it has a retain term
    (`with_retain` overrides: the `mask` command wants none), as latents encoded once. Every sampling setting
    is checked before the first image is generated (the counts before the model loads:
    `EraseConfig.check_before_load`)."""
    from ..data.generate import check_sampling

    config = method.config
    check_sampling(pipe, config.image_steps, config.resolution, config.resolution,
                   size_flags=("--resolution", "--resolution"))
    method.check_pipeline(pipe)
    wants_retain = method.needs_retain if with_retain is None else with_retain
    images = ImageSource(pipe, config, state)
    forget = method.forget_set(concept, images)
    retain = None
    if wants_retain:
        found = (images.from_folder(config.retain_images, concept.retain_prompts[0]) if config.retain_images
                 else images.generated(concept.retain_prompts, config.num_retain_images, "retain images"))
        retain = LatentSet(images.encoded(found), found.prompts)
    return forget, retain


def _prepare(config: EraseConfig):
    """Shared start of `mask` and `erase`: the process state, the concept and the pipeline on its device."""
    from ...logs import hide_library_bars
    from ...runtime import process_state
    from ..models.loading import load_pipeline

    concept = config.get_concept()
    state = process_state()
    if not config.progress:
        hide_library_bars()
    pipe = load_pipeline(config.model, config=config.model_config, family=config.family)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    return state, concept, pipe


def run_mask(config: EraseConfig) -> dict[str, Any]:
    """`concept-erase mask`: compute the saliency mask of config.concept and write it to config.output."""
    config.check_before_load("mask")
    state, concept, pipe = _prepare(config)
    check_keep_for(trained_module(config.train).of(pipe), config.keep, config.mask_scope)  # before any image
    forget, _ = build_latent_sets(pipe, concept, config.build_method(), state, with_retain=False)
    t0 = time.perf_counter()
    mask = compute_mask(pipe, forget, config.keep, include=config.mask_scope, batch_size=mask_batch(config),
                        seed=config.seed, concept=concept.name, progress=config.progress,
                        gradient_checkpointing=config.gradient_checkpointing, train=config.train,
                        score=config.score, ant=config)
    seconds = time.perf_counter() - t0
    if state.is_main_process:
        mask.save(config.output, overwrite=config.overwrite)
    return {"output": str(config.output), "concept": concept.name, "keep": config.keep,
            "score": mask.score, "kept_fraction": mask.kept_fraction, "forget_images": int(forget.latents.shape[0]),
            "seconds": round(seconds, 3), "fingerprint": mask.fingerprint}


def run_erase(config: EraseConfig, *, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """`concept-erase erase`: the whole job. Returns the summary (also written as OUTPUT/erase_summary.json).

    Fails before any work if an output exists (without overwrite) or the mask does not fit the model; on a
    non-finite loss it raises ConceptEraseError and the checkpoints written so far stay in place. One run at a
    time writes an --output: a second is refused here, before any work (`io_utils.destination_lock`).
    `on_step(done, total)`: the training loop's progress (`train_unet`); what it raises stops the run unsaved."""
    from ...io_utils import destination_lock
    from ...runtime import process_state

    config.check_before_load("erase")
    with destination_lock(config.output, "--output", take=process_state().is_main_process):
        return _erase(config, on_step)


def _erase(config: EraseConfig, on_step=None) -> dict[str, Any]:
    t_start = time.perf_counter()
    state, concept, pipe = _prepare(config)
    method = config.build_method()  # once: everything after asks this object
    family_of(pipe).check_erase(config, method)  # before any work: what this family cannot do is one line
    if method.closed_form:
        base_unet = copy.deepcopy(pipe.unet).cpu() if config.save_delta else None
        t0 = time.perf_counter()
        report = method.edit(pipe, concept)  # deterministic: every process computes the same edit
        summary = {**_summary_head(config, concept, state), **report,
                   "seconds_total": round(time.perf_counter() - t_start, 3),
                   "seconds_edit": round(time.perf_counter() - t0, 3)}
        if state.is_main_process:
            _save_outputs(pipe, method, concept, None, base_unet, summary)
        state.wait_for_everyone()
        return summary

    config.check_launch(state.num_processes)
    module = trained_module(config.train).of(pipe)  # the module the mask covers and training changes
    mask, mask_seconds = None, 0.0
    ckpt_dir = config.checkpoints()
    resumed_mask = ckpt_dir / RESUME_MASK
    computes_mask = method.computes_mask and not config.mask
    if computes_mask:
        check_keep_for(module, config.keep, config.mask_scope)  # before any image
    if config.mask:
        mask = SaliencyMask.load(config.mask)
        family_of(pipe).check_mask(mask, config.mask)  # SDXL's mask on SD 1.5 (or back) is named as such
        mask.check_compatible(module)  # a mask for another model fails here, early
    elif computes_mask and find_checkpoint(ckpt_dir, config.resume) and resumed_mask.is_file():
        mask = SaliencyMask.load(resumed_mask, model=module)  # the mask the interrupted run computed
        made_for = (mask.keep, mask.scope, mask.concept, mask.score)
        now = (config.keep, config.mask_scope or "all", concept.name, config.score)
        if made_for != now:
            raise ConceptEraseError(f"cannot resume: {str(resumed_mask)!r} was computed for another job "
                                    f"(keep, scope, concept, score: {made_for}; now {now})")
    forget, retain = build_latent_sets(pipe, concept, method, state)
    if computes_mask and mask is None:
        t0 = time.perf_counter()
        # One process computes it and the others read it, so every process trains the same weights even
        # where GPU gradients are not bit-reproducible. Kept beside the checkpoints for --resume. Several
        # concepts: one mask over the union forget set (its gradient sums every concept's).
        if state.is_main_process:
            mask = compute_mask(pipe, forget, config.keep, include=config.mask_scope, batch_size=mask_batch(config),
                                seed=config.seed, concept=concept.name, progress=config.progress,
                                gradient_checkpointing=config.gradient_checkpointing, train=config.train,
                                score=config.score, ant=config)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            mask.save(resumed_mask, overwrite=True)
        state.wait_for_everyone()
        if not state.is_main_process:
            mask = SaliencyMask.load(resumed_mask, model=module)
        mask_seconds = time.perf_counter() - t0
    base_unet = copy.deepcopy(pipe.unet).cpu() if config.save_delta else None

    try:
        result = train_unet(pipe, forget, retain, method, mask=mask, checkpoint_dir=ckpt_dir,
                            resume=config.resume, progress=config.progress, concept_of=_concept_of(concept),
                            on_step=on_step)
    except BaseException:
        if state.is_main_process and latest_checkpoint(ckpt_dir) is None:
            remove_resume_mask(ckpt_dir)  # nothing to resume: leave nothing behind
        raise
    summary = {
        **_summary_head(config, concept, state),
        "steps": result.steps, "resumed_from": result.resumed_from, "batch_size": config.batch_size,
        "lr": config.lr, "alpha": config.alpha, "trained": config.train,
        "keep": None if mask is None else float(f"{mask.kept_fraction:.6g}"),  # 1e-6 is not 0.0
        "forget_images": 0 if forget.latents is None else int(forget.latents.shape[0]),
        "retain_images": 0 if retain is None else int(retain.latents.shape[0]),
        "seconds_total": round(time.perf_counter() - t_start, 3), "seconds_mask": round(mask_seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4), "peak_memory_bytes": result.peak_memory,
        "forget_per_concept": result.forget_per_concept,
        "forget_measure": f"the {config.method} forget loss after training, on up to {config.batch_size} forget "
                          "items of each concept (one fixed draw)",
        "retain": result.retain_loss,
        "retain_measure": f"the retain denoising loss after training, on up to {config.batch_size} retain items "
                          "(one fixed draw; null: no retain set)",
        "final_loss": result.losses[-1] if result.losses else None, "losses": result.losses,
    }
    if state.is_main_process:
        try:
            _save_outputs(pipe, method, concept, mask, base_unet, summary)
        except (ConceptEraseError, OSError) as err:
            _keep_trained_weights(err, trained_module(config.train).of(pipe), ckpt_dir, config, result.losses)
        if not config.checkpointing_steps:  # nothing to resume from: do not leave the shared mask behind
            remove_resume_mask(ckpt_dir)
    state.wait_for_everyone()
    return summary


def _keep_trained_weights(err: BaseException, unet, ckpt_dir: Path, config: EraseConfig, losses: list) -> None:
    """An output write failed after training: keep the trained UNet as the final checkpoint (no optimizer
    state: no step is left to take), so `--resume latest` with a writable destination skips the training,
    and raise the write's error naming where the weights are."""
    from ...io_utils import describe_os_error

    reason = str(err) if isinstance(err, ConceptEraseError) else describe_os_error(err)
    done = latest_checkpoint(ckpt_dir)
    if done is not None and done.name == f"checkpoint-{config.steps}":
        kept = done
    else:
        try:
            kept = write_checkpoint(ckpt_dir, config.steps, unet.state_dict(), None, config, losses)
        except (ConceptEraseError, OSError) as again:
            raise ConceptEraseError(f"{reason}; the trained weights could not be kept either "
                                    f"({again if isinstance(again, ConceptEraseError) else describe_os_error(again)})"
                                    ) from None
    raise ConceptEraseError(f"{reason}; the trained weights are kept in {str(kept)!r}: rerun with --resume latest "
                            "and a writable destination (no training is repeated)") from None


def _concept_of(concept) -> dict[str, str]:
    """Forget prompt -> the name of the concept it belongs to (one run may erase several)."""
    return {p: m.name for m in concept.members for p in m.forget_prompts}


def _summary_head(config: EraseConfig, concept, state) -> dict[str, Any]:
    return {"output": str(config.output), "model": config.model, "concept": concept.name,
            "concepts": [m.name for m in concept.members], "method": config.method,
            "processes": state.num_processes}


def _save_outputs(pipe, method, concept, mask, base_unet, summary: dict) -> None:
    """OUTPUT/: the diffusers pipeline + README.md card (save_pipeline), mask.safetensors, erase_summary.json,
    all in one temporary folder renamed into place; then the optional single file and delta."""
    from ...io_utils import atomic_dir
    from ..models.card import save_pipeline
    from ..models.delta import save_delta
    from ..models.single_file import export_single_file

    config = method.config
    surrogate = concept.surrogate_prompts[0] if len(set(concept.surrogate_prompts)) == 1 else concept.surrogate_prompts
    card = {"base_model": config.model, "concept": concept.name, "forget_prompts": concept.forget_prompts,
            "surrogate": surrogate, "method": config.method,
            "keep": None if mask is None else summary.get("keep")}
    if len(concept.members) > 1:
        card["concepts"] = [m.name for m in concept.members]
    card["erasure_check"] = {k: summary.get(k) for k in ("forget_per_concept", "forget_measure", "retain",
                                                         "retain_measure")}
    card |= method.card_entries(summary)
    # All or nothing: the single file and the delta are written inside OUTPUT's atomic block and removed if
    # anything fails, so a retry finds every destination free.
    extras: list[Path] = []
    try:
        with atomic_dir(config.output, overwrite=config.overwrite) as tmp:
            save_pipeline(pipe, tmp, card=card, overwrite=True)
            if mask is not None:
                mask.save(tmp / "mask.safetensors", overwrite=True)
            (tmp / "erase_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            method.write_files(tmp)
            if config.export_single_file:
                extras.append(export_single_file(pipe, config.export_single_file, overwrite=config.overwrite))
            if config.save_delta:
                extras.append(save_delta(base_unet, pipe.unet.cpu(), mask, config.save_delta,
                                         overwrite=config.overwrite, base_model=config.model))
    except BaseException:
        for path in extras:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
