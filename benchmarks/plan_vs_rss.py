"""The memory plan against what a run really takes: `concept-erase plan --device cpu` vs measured peak RSS.

Builds a small SD-1.5-shaped pipeline (the skeleton's text encoder, VAE and tokenizer; its UNet at a fraction
of the channel width, random weights) into a temporary diffusers folder. Then, for each setting, a fresh
process loads it and does what `erase` does after its images exist: the mask pass (SalUn without a mask
file) and --steps training steps through `train_unet`, while a thread samples its resident set every 2 ms.
Reported: the plan's peak beside the measured peak RSS growth above the process's RSS before loading the
model (torch, diffusers and accelerate already imported), and the part beyond the weights (what the
settings add: gradients, optimizer state, mask, activations) beside the growth above the RSS once the model
is loaded.

    python benchmarks/plan_vs_rss.py --skeleton PATH/TO/sd15-skeleton

Run it with nothing else busy (other processes do not change RSS, but they make it slow).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# glibc keeps freed heap memory for reuse (its mmap threshold rises after each large free), so the resident set
# would show the allocator's high-water mark rather than the tensors'. A fixed threshold makes every block
# above 64 KiB its own mapping, returned on free; the measuring processes inherit it.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

SETTINGS = {  # name -> PlanConfig / TrainConfig fields
    "salun": {"method": "salun"},
    "salun + checkpointing": {"method": "salun", "gradient_checkpointing": True},
    "salun + 2 micro-batches": {"method": "salun", "gradient_accumulation_steps": 2},
    "rl": {"method": "rl"},
    "esd-x": {"method": "esd-x", "esd_ddim_steps": 2},
    "salun + bf16 autocast": {"method": "salun", "mixed_precision": "bf16"},
}


def build_folder(skeleton: Path, width: float, out: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import torch

    torch.manual_seed(0)
    cfg = dict(UNet2DConditionModel.load_config(skeleton / "unet"))
    cfg["block_out_channels"] = [int(c * width) // 32 * 32 for c in cfg["block_out_channels"]]
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(cfg),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(skeleton / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(skeleton / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(skeleton / "tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(skeleton / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(folder: str, settings: dict, batch: int, resolution: int, steps: int, n_forget: int, queue) -> None:
    """In a fresh process: peak RSS growth over loading the model, the mask pass and training."""
    import accelerate  # noqa: F401  (imported before the baseline: modules are not the run's memory)
    import diffusers  # noqa: F401
    import torch

    from concept_erase.diffusion.erase import LatentSet, TrainConfig, compute_mask, mask_batch, train_unet
    from concept_erase.diffusion.loading import load_pipeline

    start = top = rss()
    running = True

    def sample():
        nonlocal top
        while running:
            top = max(top, rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    pipe = load_pipeline(folder)
    # safetensors maps the files: a weight never read (most of CLIP's token-embedding table) is not resident.
    # Copy every weight into the process's own memory, as moving the pipeline to a GPU does.
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        for param in module.parameters():
            param.data = param.data.clone()
    loaded = rss()
    config = TrainConfig(steps=steps, batch_size=batch, **settings)
    g = torch.Generator().manual_seed(0)
    size = resolution // 8
    forget = LatentSet(torch.randn(n_forget, 4, size, size, generator=g), ["a photo of a nude person"] * n_forget,
                       ["a photo of a person wearing clothes"] * n_forget)
    retain = LatentSet(torch.randn(n_forget, 4, size, size, generator=g), ["a photo of a person"] * n_forget)
    mask = None
    if config.method == "salun":
        mask = compute_mask(pipe, forget, 0.5, batch_size=mask_batch(config),
                            gradient_checkpointing=config.gradient_checkpointing)
    train_unet(pipe, forget, retain if config.alpha > 0 else None, config, mask=mask)
    running = False
    thread.join()
    queue.put((max(top, rss()) - start, max(top, rss()) - loaded))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skeleton", type=Path, required=True, help="an SD 1.x diffusers config folder (no weights needed)")
    p.add_argument("--width", type=float, default=0.25, help="UNet channel width as a fraction of SD 1.5's")
    p.add_argument("--resolution", type=int, default=256, help="image size in pixels")
    p.add_argument("--batch-size", type=int, default=2, help="forget batch (and retain batch)")
    p.add_argument("--steps", type=int, default=2, help="training steps")
    p.add_argument("--forget-images", type=int, default=4, help="forget set of the mask pass")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of: " + ", ".join(SETTINGS))
    args = p.parse_args(argv)
    from concept_erase.diffusion.plan import GiB, PlanConfig, estimate, load_counts

    names = [s.strip() for s in args.settings.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd"
        build_folder(args.skeleton, args.width, folder)
        counts = load_counts(str(folder))
        weights = 4 * sum(counts.components.values())
        ctx = multiprocessing.get_context("spawn")
        for name in names:
            plan = estimate(PlanConfig(model=str(folder), batch_size=args.batch_size, resolution=args.resolution,
                                       device="cpu", **SETTINGS[name]), counts)
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(str(folder), SETTINGS[name], args.batch_size, args.resolution,
                                                     args.steps, args.forget_images, queue))
            proc.start()
            measured, beyond = queue.get()
            proc.join()
            rows.append((name, plan.peak, measured, beyond, plan.peak_phase))
            print(json.dumps({"setting": name, "plan": plan.peak, "measured": measured, "beyond": beyond}), flush=True)
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    print(f"\nSD-1.5-shaped pipeline, UNet at {args.width:g} of SD 1.5's width ({counts.components['unet'] / 1e6:.1f}M "
          f"parameters; {sum(counts.components.values()) / 1e6:.1f}M in all, {weights / GiB:.2f} GiB of fp32 weights), "
          f"{args.resolution} px, batch {args.batch_size}, mask pass over {args.forget_images} images + {args.steps} "
          "steps, CPU\n")
    print("| setting | plan peak (MiB) | measured peak RSS growth (MiB) | plan / measured | beyond the loaded weights: "
          "plan / measured (MiB) | ratio | plan's peak phase |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, plan, measured, beyond, phase in rows:
        print(f"| {name} | {mib(plan)} | {mib(measured)} | {plan / measured:.3f} | {mib(plan - weights)} / "
              f"{mib(beyond)} | {(plan - weights) / max(1, beyond):.3f} | {phase} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
