"""The memory plan against what a run really takes: `concept-erase plan` vs the measured peak.

Builds a small SD-1.5-shaped pipeline (the skeleton's text encoder, VAE and tokenizer; its UNet at a fraction
of the channel width, random weights) into a temporary diffusers folder. Then, for each setting, a fresh
process loads it and does what `erase` does after its images exist: the mask pass (SalUn without a mask
file) and --steps training steps through `train_unet`, while a thread samples its resident set every 2 ms.
The plan is made in a fresh process of its own, as `concept-erase plan` makes it (its process term is
measured there).

On the CPU (the default) two comparisons are reported:
- the whole process: the plan's resident total (tensors + the process itself) against the measured peak RSS;
- what the settings add (gradients, optimizer state, mask, activations): the plan's tensors beyond the
  weights against the measured peak RSS growth above the RSS once the model is loaded.

With `--device cuda` the plan for a GPU run is compared with `torch.cuda.max_memory_allocated` (tensors
only; the pipeline moved to the GPU, as `erase` does). For the 16 GB target (SalUn, SD 1.5, 512 px, batch
8 + 8):

    python benchmarks/plan_vs_rss.py --skeleton PATH --device cuda --width 1 --resolution 512 --batch-size 8 \
        --forget-images 8 --settings "salun + bf16 + checkpointing + 8 micro-batches"

    python benchmarks/plan_vs_rss.py --skeleton PATH/TO/sd15-skeleton

With `--mask` the run is given a mask made beforehand (as `erase --mask`), so the training step is the peak,
and a second table isolates what each memory setting (gradient release, bf16 weights with fp32 salient
entries, bf16 with stochastic rounding) adds or saves against plain salun, planned and measured:

    python benchmarks/plan_vs_rss.py --skeleton PATH/TO/sd15-skeleton --mask

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

from concept_erase.runtime import resident_memory as rss  # noqa: E402  (after the allocator setting)

SETTINGS = {  # name -> PlanConfig / TrainConfig fields
    "salun": {"method": "salun"},
    "salun + checkpointing": {"method": "salun", "gradient_checkpointing": True},
    "salun + 2 micro-batches": {"method": "salun", "gradient_accumulation_steps": 2},
    "rl": {"method": "rl"},
    "esd-x": {"method": "esd-x", "esd_ddim_steps": 2},
    "salun + bf16 autocast": {"method": "salun", "mixed_precision": "bf16"},
    "salun + bf16 + checkpointing + 8 micro-batches": {"method": "salun", "mixed_precision": "bf16",
                                                        "gradient_checkpointing": True,
                                                        "gradient_accumulation_steps": 8},
    # the two halves of the one above, to tell bf16's share from checkpointing's (batch 8)
    "salun + checkpointing + 8 micro-batches": {"method": "salun", "gradient_checkpointing": True,
                                                 "gradient_accumulation_steps": 8},
    "salun + bf16 + 8 micro-batches": {"method": "salun", "mixed_precision": "bf16", "gradient_accumulation_steps": 8},
    # the memory settings of layout.py: what each one adds or saves against "salun"
    "salun + grad release": {"method": "salun", "grad_release": True},
    "salun + bf16 weights + fp32 salient": {"method": "salun", "mixed_precision": "bf16",
                                            "master_weights": "salient-fp32"},
    "salun + bf16 weights + stochastic rounding": {"method": "salun", "mixed_precision": "bf16",
                                                   "master_weights": "bf16-stochastic"},
}
BATCH_OF_8 = [name for name in SETTINGS if "8 micro-batches" in name]
DEFAULT_SETTINGS = [name for name in SETTINGS if name not in BATCH_OF_8]
# --mask: the training step is the peak, so each memory setting's bytes show against plain salun
MASK_SETTINGS = ["salun", "salun + grad release", "salun + bf16 weights + fp32 salient",
                 "salun + bf16 weights + stochastic rounding"]


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


def plan_all(folder: str, names: list[str], batch: int, resolution: int, n_forget: int, device: str, given_mask: bool,
             queue) -> None:
    """In a fresh process, as `concept-erase plan` runs: every setting's plan, the process term measured once."""
    from concept_erase.diffusion.memory import load_counts, measure_process
    from concept_erase.diffusion.plan import PlanConfig, estimate

    counts = load_counts(folder)
    measure_process(counts, folder)
    plans = [estimate(PlanConfig(model=folder, batch_size=batch, resolution=resolution, num_forget_images=n_forget,
                                 device=device, mask="given" if given_mask else None, **SETTINGS[name]), counts)
             for name in names]
    weights = 4 * sum(counts.components.values())
    queue.put(([(p.peak, p.process, p.peak_phase) for p in plans], dict(counts.components), weights))


def measure(folder: str, settings: dict, batch: int, resolution: int, steps: int, n_forget: int, device: str,
            given_mask: bool, queue) -> None:
    """In a fresh process: the peak over loading the model, the mask pass and training. CPU: (peak RSS, peak
    RSS growth above the RSS once the weights are loaded); CUDA: (max allocated, the same above the weights)."""
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import torch

    from concept_erase.diffusion.data.latents import LatentSet

    from concept_erase.diffusion.training.config import TrainConfig

    from concept_erase.diffusion.training.loop import train_unet

    from concept_erase.diffusion.training.mask_pass import compute_mask, mask_batch
    from concept_erase.diffusion.models.loading import load_pipeline

    top = rss()
    running = True

    def sample():
        nonlocal top
        while running:
            top = max(top, rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    pipe = load_pipeline(folder)
    if device == "cuda":
        pipe.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # safetensors maps the files: a weight never read (most of CLIP's token-embedding table) is not
        # resident. Copy every weight into the process's own memory, as moving the pipeline to a GPU does.
        for module in (pipe.unet, pipe.text_encoder, pipe.vae):
            for param in module.parameters():
                param.data = param.data.clone()
    loaded = torch.cuda.memory_allocated() if device == "cuda" else rss()
    config = TrainConfig(steps=steps, batch_size=batch, **settings)
    g = torch.Generator().manual_seed(0)
    size = resolution // 8
    forget = LatentSet(torch.randn(n_forget, 4, size, size, generator=g), ["a photo of a nude person"] * n_forget,
                       ["a photo of a person wearing clothes"] * n_forget)
    retain = LatentSet(torch.randn(n_forget, 4, size, size, generator=g), ["a photo of a person"] * n_forget)
    mask = None
    if config.method == "salun" and given_mask:  # as erase --mask: a mask file's bool tensors, no mask pass
        from concept_erase.saliency import SaliencyMask

        mask = SaliencyMask.random(pipe.unet, 0.5, seed=0)
    elif config.method == "salun":
        mask = compute_mask(pipe, forget, 0.5, batch_size=mask_batch(config),
                            gradient_checkpointing=config.gradient_checkpointing)
    train_unet(pipe, forget, retain if config.alpha > 0 else None, config, mask=mask)
    running = False
    thread.join()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else max(top, rss())
    queue.put((peak, peak - loaded))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skeleton", type=Path, required=True, help="an SD 1.x diffusers config folder (no weights needed)")
    p.add_argument("--width", type=float, default=0.25, help="UNet channel width as a fraction of SD 1.5's")
    p.add_argument("--resolution", type=int, default=256, help="image size in pixels")
    p.add_argument("--batch-size", type=int, default=2, help="forget batch (and retain batch)")
    p.add_argument("--steps", type=int, default=2, help="training steps")
    p.add_argument("--forget-images", type=int, default=4, help="forget set of the mask pass")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: against peak RSS; cuda: against torch.cuda.max_memory_allocated")
    p.add_argument("--settings", default=None,
                   help="comma-separated subset of: " + ", ".join(SETTINGS) + " (default: all but the batch-of-8 "
                        "ones; with --mask: " + ", ".join(MASK_SETTINGS) + ")")
    p.add_argument("--mask", action="store_true",
                   help="a mask made beforehand (as erase --mask): no mask pass, the training step is the peak, and "
                        "a second table shows what each setting adds or saves against plain salun")
    args = p.parse_args(argv)
    args.settings = args.settings or ",".join(MASK_SETTINGS if args.mask else DEFAULT_SETTINGS)
    names = [s.strip() for s in args.settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting {unknown[0]!r}; choose from: {', '.join(SETTINGS)}")
    ctx = multiprocessing.get_context("spawn")

    def in_fresh_process(target, *target_args):
        queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(*target_args, queue))
        proc.start()
        result = queue.get()
        proc.join()
        return result

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "sd")
        build = ctx.Process(target=build_folder, args=(args.skeleton, args.width, Path(folder)))
        build.start()
        build.join()
        plans, components, weights = in_fresh_process(plan_all, folder, names, args.batch_size, args.resolution,
                                                      args.forget_images, args.device, args.mask)
        for name, (peak, process, phase) in zip(names, plans):
            measured, beyond = in_fresh_process(measure, folder, SETTINGS[name], args.batch_size, args.resolution,
                                                args.steps, args.forget_images, args.device, args.mask)
            plan = peak + (process if args.device == "cpu" else 0)
            rows.append((name, peak, process, plan, measured, peak - weights, beyond, phase))
            print(json.dumps({"setting": name, "plan": plan, "measured": measured, "beyond": beyond}), flush=True)
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    print(f"\nSD-1.5-shaped pipeline, UNet at {args.width:g} of SD 1.5's width ({components['unet'] / 1e6:.1f}M "
          f"parameters; {sum(components.values()) / 1e6:.1f}M in all, {weights / 2**30:.2f} GiB of fp32 weights), "
          f"{args.resolution} px, batch {args.batch_size}, mask pass over {args.forget_images} images + {args.steps} "
          f"steps, {args.device}" + (", a mask made beforehand (no mask pass)" if args.mask else "") + "\n")
    what = "peak RSS" if args.device == "cpu" else "max allocated"
    print(f"| setting | plan: tensors + process = total (MiB) | measured {what} (MiB) | plan / measured | beyond "
          f"the weights: plan / measured (MiB) | ratio | plan's peak phase |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, peak, process, plan, measured, plan_beyond, beyond, phase in rows:
        print(f"| {name} | {mib(peak)} + {mib(process if args.device == 'cpu' else 0)} = {mib(plan)} | "
              f"{mib(measured)} | {plan / measured:.3f} | {mib(plan_beyond)} / {mib(beyond)} | "
              f"{plan_beyond / max(1, beyond):.3f} | {phase} |")
    base = next((r for r in rows if r[0] == "salun"), None)
    if base is not None and len(rows) > 1:  # what each setting adds (+) or saves (-) against plain salun
        print("\n| setting | vs salun: plan (MiB) | vs salun: measured (MiB) | plan / measured | plan - measured, "
              "share of salun's measured growth |\n| --- | ---: | ---: | ---: | ---: |")
        for name, _, _, _, _, plan_beyond, beyond, _ in rows:
            if name != "salun":
                d_plan, d_measured = plan_beyond - base[5], beyond - base[6]
                print(f"| {name} | {d_plan / 2**20:+.0f} | {d_measured / 2**20:+.0f} | "
                      f"{d_plan / d_measured if d_measured else float('nan'):.3f} | "
                      f"{(d_plan - d_measured) / max(1, base[6]):+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
