"""FLUX.1-dev and SD 3 medium at real scale: the released transformers built from their config folders with random
weights (nothing downloaded), measured where a shared 24 GB CPU machine allows. The diffusion-transformer
counterpart of `sdxl_real_scale.py`, whose measuring parts it imports.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/dit_real_scale.py \\
        --skeleton PATH/TO/dit-skeleton --flux-blocks 2,4 --resolution 128 --out benchmarks/results/dit_real_scale.md

The skeleton holds one diffusers folder per model (`flux1-dev/`, `sd3-medium/`) with its configs and no weights.
Each model is measured in a fresh process (its peak memory is its own):
  - parameter counts of every component, on the meta device (`concept-erase plan`'s counting);
  - the saliency mask file of the transformer as built, written by `SaliencyMask.save` (bit-packed), its size;
  - in bf16 on the CPU: one mask pass (the guided saliency loss, docs/ALGORITHMS.md 1, through the family's own
    conditioning and rectified flow, docs/ALGORITHMS.md 5: the transformer runs on the forget latent with its
    prompt and the empty one) and, alternately on the same latents, SalUn steps against RL steps (masked SGD
    vs SGD on every weight: no optimizer state has to fit), the bytes per parameter of the tensors a step
    holds, and the peak resident memory.
SD 3 medium's transformer (2.03B parameters, 4 GB in bf16) is built whole. FLUX.1-dev's (11.9B, 23.8 GB in
bf16) does not fit beside its gradients here: it is built with its real widths (hidden 3072, 24 heads x 128, the
real embedders) and `--flux-blocks DOUBLE,SINGLE` of its 19 + 38 blocks, and every such row says so. The
conditioning is random tensors of the real shapes (FLUX: T5 states 512 x 4096, pooled CLIP 768, guidance 3.5;
SD 3: joint states 333 x 4096, pooled 2048): the text encoders run once per prompt and are not what is measured.

Estimated (printed as ESTIMATE, from the measured rows): the full depth and 1024 px. The forward + backward
scales by the ratio of forward FLOPs (torch's FlopCounterMode on the meta device, built vs full, at the measured
size vs 1024 px), the per-weight update by the ratio of parameters; the activations are the bytes autograd saves
(`concept-erase plan`'s trace, fused attention), beside the trace and the measured peak as built; fp32 + Adam
bytes per parameter as `sdxl_real_scale.py` counts them. Not measured: the global threshold over fp32 scores,
and the VAE and text encoders (they run once per image and prompt). Timings are wall clock on whatever else the
machine is running.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# benchmarks/ is the script's folder
from sdxl_real_scale import (GB, adam_rows, add_run_args, available_gb, build_bf16, mask_file_size,  # noqa: E402
                             measure_passes, measured_rows, noised_batches, rss_gb, write_report)

FOLDERS = {"flux": "flux1-dev", "sd3": "sd3-medium"}  # family name -> its folder in the skeleton
EMPTY_FLUX_BLOCKS = (0, 0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skeleton", type=Path, required=True,
                   help="the folder holding flux1-dev/ and sd3-medium/ (configs, no weights needed)")
    p.add_argument("--models", default="flux,sd3", help="which to measure, comma-separated: flux, sd3")
    p.add_argument("--flux-blocks", default="2,4",
                   help="FLUX.1-dev's DOUBLE,SINGLE stream blocks to build (of 19,38: all of them need 48 GB)")
    p.add_argument("--sd3-blocks", type=int, default=None,
                   help="SD 3's joint blocks to build (default: all 24, the whole transformer)")
    add_run_args(p, min_free_gb=14.0)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in FOLDERS for m in args.models):
        p.error(f"--models {','.join(args.models)!r}: choose from {', '.join(FOLDERS)}")
    try:
        args.flux_blocks = tuple(int(x) for x in args.flux_blocks.split(","))
    except ValueError:
        args.flux_blocks = ()
    if len(args.flux_blocks) != 2 or min(args.flux_blocks) < 0 or args.flux_blocks == EMPTY_FLUX_BLOCKS:
        p.error(f"--flux-blocks {args.flux_blocks!r}: give DOUBLE,SINGLE, e.g. 2,4 (not both 0)")
    if args.sd3_blocks is not None and args.sd3_blocks < 1:
        p.error(f"--sd3-blocks {args.sd3_blocks}: give at least 1")
    if args.resolution % 16:
        p.error(f"--resolution {args.resolution}: must be a multiple of 16 (8x VAE, 2x2 patches)")
    return args


def depth(family_name: str, config: dict, args) -> tuple[dict, str]:
    """The transformer config to build and, where it is not the whole depth, the words every row carries."""
    if family_name == "flux":
        double, single = args.flux_blocks
        built = {**config, "num_layers": double, "num_single_layers": single}
        whole = (double, single) == (config["num_layers"], config["num_single_layers"])
        words = f"{double} double + {single} single of {config['num_layers']} + {config['num_single_layers']} blocks"
    else:
        n = args.sd3_blocks or config["num_layers"]
        built, whole = {**config, "num_layers": n}, n == config["num_layers"]
        words = f"{n} of {config['num_layers']} joint blocks"
    return built, ("" if whole else f" [{words}]")


def make_batches(family, folder: Path, config: dict, resolution: int):
    """`noised_batches` (rectified flow, through the family's scheduler) of random latents and random
    conditionings of the family's real shapes."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from concept_erase.diffusion.models.family import Conditioning

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    side, channels = resolution // 8, family.latent_channels(argparse.Namespace(**config))
    gen = torch.Generator().manual_seed(0)

    def cond(make) -> Conditioning:
        added = {"pooled_projections": make(1, config["pooled_projection_dim"])}
        if config.get("guidance_embeds"):  # FLUX.1-dev is guidance-distilled: its guidance is an input
            added["guidance"] = torch.full((1,), family.training_guidance)
        return Conditioning(make(1, family.text_tokens, config["joint_attention_dim"]), added, family)

    def random(*shape):
        return torch.randn(*shape, generator=gen)

    c_forget, c_surrogate, c_retain, c_empty = cond(random), cond(random), cond(random), cond(torch.zeros)
    z_f, z_r = random(1, channels, side, side), random(1, channels, side, side)
    return noised_batches(scheduler, z_f, z_r, c_forget, c_surrogate, c_retain, c_empty)


def forward_flops(model, family, latent: int) -> int:
    """FLOPs of one forward at batch 2 (the mask pass's and the steps' batch), counted on the meta device; the
    backward's are about twice these, so their ratio between two models is the forward + backward's too."""
    from torch.utils.flop_counter import FlopCounterMode

    from concept_erase.diffusion.memory import _meta_inputs

    x, t, cond = _meta_inputs(family, model.config, 2, latent, torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cond.predict(model, x, t)
    return counter.get_total_flops()


def saved_bytes(model, family, latent: int) -> int:
    """Bytes autograd saves for the backward of one bf16 forward at batch 2, as `concept-erase plan` traces it."""
    from concept_erase.diffusion.memory import trace_activations

    return trace_activations(model, 2, latent, torch.bfloat16, False, family).total


def estimate_rows(args, built_meta, full_meta, family, m: dict, info: dict, base_rss: float,
                  scope: str) -> list[tuple[str, str]]:
    """Full depth (where built shallower) and 1024 px, from the measured rows scaled by traced ratios."""
    n_built = sum(p.numel() for p in built_meta.parameters())
    n_full = sum(p.numel() for p in full_meta.parameters())
    latent = args.resolution // 8
    flops_built = forward_flops(built_meta, family, latent)
    flops = {size: forward_flops(full_meta, family, size // 8) for size in (args.resolution, 1024)}
    saved_built = saved_bytes(built_meta, family, latent)
    saved = {size: saved_bytes(full_meta, family, size // 8) for size in (args.resolution, 1024)}
    info["forward GFLOPs"] = {"built": flops_built / 1e9, **{f"full, {k} px": v / 1e9 for k, v in flops.items()}}
    info["saved GB"] = {"built": saved_built / GB, **{f"full, {k} px": v / GB for k, v in saved.items()}}
    b = m["bytes_per_param"]
    # the activations: the process's peak beyond what it held before the build and the step's measured tensors
    activations = max(0.0, m["peak_gb"] - base_rss - sum(b.values()) * n_built / GB)
    params = n_full / n_built
    rows = []
    if scope:
        rows.append(("ESTIMATE full depth, bf16: weights + gradients + bit-packed mask",
                     f"{sum(b.values()):.3f} bytes per parameter (measured{scope}) x {n_full:,} -> "
                     f"{sum(b.values()) * n_full / GB:.1f} GB + activations"))
    rows += adam_rows(n_full, args.keep, "transformer")

    def step_s(update_s: float, size: int) -> float:
        return m["rl_forward_backward_s"] * flops[size] / flops_built + update_s * params

    for size in dict.fromkeys((args.resolution, 1024)):
        if size == args.resolution and not scope:
            continue  # measured as built
        rl, salun = step_s(m["rl_update_s"], size), step_s(m["salun_update_s"], size)
        where = f"full depth, {size} px"
        rows += [
            (f"ESTIMATE activations, {where}, bf16, batch 2",
             f"{saved[size] / GB:.1f} GB saved for the backward (traced as `concept-erase plan` does; fp32: x 2); "
             f"as built{scope} at {args.resolution} px the trace gives {saved_built / GB:.2f} GB and the measured "
             f"peak beyond weights, gradients and mask was {activations:.2f} GB"),
            (f"ESTIMATE RL step, {where}, on this CPU",
             f"{rl / 60:.1f} min (forward + backward {m['rl_forward_backward_s']:.1f} s x "
             f"{flops[size] / flops_built:.1f} FLOPs, update {m['rl_update_s']:.2f} s x {params:.1f} parameters)"),
            (f"ESTIMATE SalUn / RL step time, {where}",
             f"{salun / rl:.2f}x (the masked update's measured {m['salun_update_s']:.2f} s against RL's "
             f"{m['rl_update_s']:.2f} s, x {params:.1f} parameters; the forward + backward is the same)"),
        ]
    return rows


def measure_model(args, family_name: str) -> tuple[list[tuple[str, str]], dict]:
    """One model's rows and raw figures (run in a fresh process: its peak memory is its own)."""
    import diffusers

    from concept_erase.diffusion.memory import load_counts

    folder = args.skeleton / FOLDERS[family_name]
    counts = load_counts(str(folder))
    family, full_meta = counts.family, counts.unet
    cls = getattr(diffusers, type(full_meta).__name__)
    built_config, scope = depth(family_name, dict(full_meta.config), args)
    info = {"load average at start": os.getloadavg()[0]}
    rows = [(f"parameters: {name}", f"{n:,}") for name, n in counts.components.items()]
    with torch.device("meta"):  # buffers too, as `load_counts` builds the whole-depth one
        built_meta = cls.from_config(built_config)
    n_built = sum(p.numel() for p in built_meta.parameters())
    if scope:
        rows.append((f"parameters: transformer as built{scope}", f"{n_built:,}"))
    with tempfile.TemporaryDirectory() as tmp:
        size, seconds = mask_file_size([(n, tuple(p.shape)) for n, p in built_meta.named_parameters()],
                                       args.keep, Path(tmp))
    rows.append((f"mask file (transformer as built, bit-packed safetensors){scope}",
                 f"{size / 1e6:,.1f} MB ({size * 8 / n_built:.3f} bits per parameter), written in {seconds:.1f} s"))
    if scope:
        full_mb = size * 8 / n_built * counts.components["transformer"] / 8e6
        rows.append(("ESTIMATE mask file, full depth", f"{full_mb:,.0f} MB (the bits per parameter measured{scope})"))
    free = available_gb()
    if free < args.min_free_gb:
        raise SystemExit(f"only {free:.1f} GB available (< --min-free-gb {args.min_free_gb}): stopping before "
                         f"the bf16 {family_name} transformer")
    base_rss = rss_gb()
    model, build_s = build_bf16(cls, built_config)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
    rows.append((f"bf16 transformer built with random weights{scope}", f"{weights_gb:.2f} GB in {build_s:.0f} s"))
    measured = measure_passes(model, make_batches(family, folder, built_config, args.resolution), args.keep,
                              args.alpha, info)
    del model
    rows += measured_rows(args.resolution, measured, weights_gb, base_rss, scope)
    rows += estimate_rows(args, built_meta, full_meta, family, measured, info, base_rss, scope)
    return [(f"{family.name}: {a}", b) for a, b in rows], info


def main(argv=None) -> int:
    args = parse_args(argv)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "resolution": args.resolution,
            "flux blocks": list(args.flux_blocks), "load average at start": os.getloadavg()[0]}
    rows = []
    for name in args.models:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            model_rows, info[name] = pool.apply(measure_model, (args, name))
        rows += model_rows
    double, single = args.flux_blocks
    command = (f"python benchmarks/dit_real_scale.py --skeleton <dit-skeleton> --models {','.join(args.models)} "
               f"--flux-blocks {double},{single} --resolution {args.resolution}"
               + (f" --sd3-blocks {args.sd3_blocks}" if args.sd3_blocks else ""))
    write_report(args.out, "FLUX.1-dev and SD 3 medium at real scale (random weights from their configs)", command,
                 info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
