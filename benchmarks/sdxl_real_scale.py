"""SDXL at real scale: the released architecture (2.57B UNet parameters) built from its config folder with
random weights (nothing downloaded), measured where a shared 24 GB CPU machine allows.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/sdxl_real_scale.py --skeleton PATH/TO/sdxl-skeleton \
        --resolution 128 --out benchmarks/results/sdxl_real_scale.md

The skeleton is a diffusers folder with SDXL base's configs and tokenizers and no weights (model_index.json,
unet/, vae/, text_encoder/, text_encoder_2/, scheduler/).

Measured:
  - parameter counts of every component, on the meta device (no memory);
  - the saliency mask file of the whole UNet, written by `SaliencyMask.save` (bit-packed), its size on disk;
  - in bf16 on the CPU (fp32 weights alone are 10.3 GB): one mask pass (the guided saliency loss's forward +
    backward over one forget latent: the UNet runs twice, conditional and unconditional) and, side by side on
    the same latents, one SalUn step against one RL step (surrogate target under no_grad, forget + alpha *
    retain loss, backward, then SGD on the salient entries only vs on every weight). The optimizer is SGD so
    that no optimizer state has to fit beside the model; the masks are kept bit-packed and unpacked one
    tensor at a time (as the mask file stores them). The conditioning is random tensors of SDXL's shapes (77 x
    2048 hidden states, 1280 pooled, six size ids of --resolution): the text encoders run once per prompt in
    an erasure and are not what is measured.

Estimated (from the measured parts, printed as estimates): fp32 + Adam at 1024 px, per UNet parameter and in
GB, for RL (every weight) and SalUn (masked Adam state on the salient entries only), and the step time.

Not measured here: the global threshold over fp32 scores (10.3 GB of scores beside the 5.1 GB model does not fit
in what this machine had free); `benchmarks/salun_step_sd15.py` measures the whole mask pass on SD 1.5.
Timings are wall clock on whatever else the machine is running: the report says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from concept_erase.runtime import resident_memory  # noqa: E402

GB = 1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skeleton", type=Path, required=True, help="the SDXL base config folder (no weights needed)")
    p.add_argument("--resolution", type=int, default=128, help="image side in pixels for the timed passes")
    p.add_argument("--keep", type=float, default=0.5, help="mask keep ratio (random mask for the SalUn step)")
    p.add_argument("--alpha", type=float, default=0.5, help="retain loss weight")
    p.add_argument("--min-free-gb", type=float, default=13.0,
                   help="refuse to build the bf16 UNet unless this much memory is available (shared machine)")
    p.add_argument("--out", type=Path, default=None, help="write the table here (Markdown) as well as stdout")
    return p.parse_args(argv)


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def rss_gb() -> float:
    return resident_memory() / GB


def peak_rss_gb() -> float:
    return resident_memory(peak=True) / GB


def count_on_meta(skeleton: Path) -> dict[str, int]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(skeleton / "unet")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(skeleton / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(skeleton / "text_encoder_2")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(skeleton / "vae")),
        }
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in parts.items()}
    counts["unet_shapes"] = [(n, tuple(p.shape)) for n, p in parts["unet"].named_parameters()]
    return counts


def mask_file_size(shapes, keep: float, folder: Path) -> tuple[int, float]:
    """Write a whole-UNet mask with the library's own writer; return its size and the seconds it took."""
    from concept_erase.saliency import SaliencyMask

    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(s, generator=gen) < keep for n, s in shapes}
    mask = SaliencyMask(masks, keep, shapes, "all", "benchmark: random")
    t0 = time.perf_counter()
    path = mask.save(folder / "sdxl-mask.safetensors")
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    del masks, mask
    gc.collect()
    return size, seconds


def packed_random_masks(unet, keep: float) -> dict[str, tuple[np.ndarray, tuple]]:
    gen = torch.Generator().manual_seed(1)
    return {n: (np.packbits((torch.rand(p.shape, generator=gen) < keep).reshape(-1).numpy()), tuple(p.shape))
            for n, p in unet.named_parameters()}


def measure_sizes(skeleton: Path, keep: float) -> tuple[list[tuple[str, str]], int]:
    """Rows: every component's parameter count and the whole-UNet mask file's size; and the UNet's count."""
    counts = count_on_meta(skeleton)
    n = counts["unet"]
    rows = [(f"parameters: {name}", f"{counts[name]:,}") for name in ("unet", "text_encoder", "text_encoder_2", "vae")]
    with tempfile.TemporaryDirectory() as tmp:
        size, seconds = mask_file_size(counts["unet_shapes"], keep, Path(tmp))
    rows.append(("mask file (whole UNet, bit-packed safetensors)", f"{size / 1e6:,.1f} MB ({size * 8 / n:.3f} bits "
                 f"per parameter), written in {seconds:.1f} s"))
    return rows, n


def build_bf16_unet(skeleton: Path):
    """The UNet with random weights, built directly in bf16 (5.1 GB, never 10.3 GB of fp32); and the seconds."""
    from diffusers import UNet2DConditionModel

    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(skeleton / "unet"))
    torch.set_default_dtype(torch.float32)
    return unet, time.perf_counter() - t0


def make_batches(skeleton: Path, resolution: int):
    """bf16 NoisedBatches at t = 500 of random latents and random conditionings of SDXL's shapes: the mask pass's
    forget batch (target: the empty prompt), then the steps' forget batch (target: a surrogate) and retain batch."""
    from diffusers import DDPMScheduler

    from concept_erase.diffusion.losses import noise_batch
    from concept_erase.diffusion.models.family import Conditioning

    scheduler = DDPMScheduler.from_pretrained(skeleton / "scheduler")
    side = resolution // 8
    gen = torch.Generator().manual_seed(0)

    def cond() -> Conditioning:
        return Conditioning(torch.randn(1, 77, 2048, generator=gen),
                            {"text_embeds": torch.randn(1, 1280, generator=gen),
                             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                                      dtype=torch.float32)})

    c_forget, c_surrogate, c_retain = cond(), cond(), cond()
    c_empty = Conditioning(torch.zeros(1, 77, 2048), {"text_embeds": torch.zeros(1, 1280),
                                                      "time_ids": c_forget.added["time_ids"]})
    z_f, z_r = torch.randn(1, 4, side, side, generator=gen), torch.randn(1, 4, side, side, generator=gen)
    t = torch.tensor([500])

    def batch(z, c, target=None):
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        return noise_batch(scheduler, z.bfloat16(), c.to(torch.bfloat16), noise.bfloat16(), t,
                           None if target is None else target.to(torch.bfloat16))

    return batch(z_f, c_forget, c_empty), batch(z_f, c_forget, c_surrogate), batch(z_r, c_retain)


def timed(info: dict, label: str, fn) -> float:
    """fn's wall time, printed and recorded in info[label] with the process's RSS after it and its growth."""
    gc.collect()
    start_rss = rss_gb()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    info[label] = {"seconds": round(seconds, 1), "rss_gb_after": round(rss_gb(), 2),
                   "rss_growth_gb": round(rss_gb() - start_rss, 2)}
    print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def measure_passes(unet, args, info: dict) -> dict:
    """One mask pass, then SalUn and RL steps alternately, twice each, on the same batches (SGD, lr 1e-5): the
    seconds of the mask pass and of each kind's fastest step, and the process's peak RSS after them."""
    from concept_erase.diffusion.losses import saliency_loss, salun_loss

    forget_for_mask, forget, retain = make_batches(args.skeleton, args.resolution)
    unet.train()

    def mask_pass():
        saliency_loss(unet, forget_for_mask).backward()
        for p in unet.parameters():
            p.grad = None

    masks = packed_random_masks(unet, args.keep)

    def step(masked: bool):
        loss, _, _ = salun_loss(unet, forget, retain, args.alpha)
        loss.backward()
        with torch.no_grad():
            for name, p in unet.named_parameters():
                g = p.grad
                if masked:  # SalUn Eq. 7: theta <- theta - eta * (m . g), the mask unpacked one tensor at a time
                    packed, shape = masks[name]
                    m = torch.from_numpy(np.unpackbits(packed)[: p.numel()].astype(bool)).reshape(shape)
                    g.mul_(m)
                p.sub_(g, alpha=1e-5)
                p.grad = None

    mask_s = timed(info, "mask pass (1 forget latent)", mask_pass)
    salun_s = timed(info, "SalUn step", lambda: step(True))
    rl_s = timed(info, "RL step", lambda: step(False))
    salun2_s = timed(info, "SalUn step (again)", lambda: step(True))
    rl2_s = timed(info, "RL step (again)", lambda: step(False))
    return {"mask_s": mask_s, "salun_s": min(salun_s, salun2_s), "rl_s": min(rl_s, rl2_s), "peak_gb": peak_rss_gb()}


def measured_rows(args, m: dict, weights_gb: float, base_rss: float) -> list[tuple[str, str]]:
    return [
        (f"mask pass, 1 forget latent, {args.resolution} px, bf16", f"{m['mask_s']:.1f} s"),
        (f"SalUn step, batch 1 + 1, {args.resolution} px, bf16, masked SGD", f"{m['salun_s']:.1f} s (fastest of 2)"),
        ("RL step, same batches, SGD on every weight", f"{m['rl_s']:.1f} s (fastest of 2)"),
        ("SalUn / RL step time", f"{m['salun_s'] / m['rl_s']:.2f}x (here the bit-packed mask is unpacked with numpy, "
                                 f"tensor by tensor, every step: a fixed cost per weight)"),
        ("peak resident memory of this process", f"{m['peak_gb']:.1f} GB (model {weights_gb:.1f} GB + bf16 grads "
                                                  f"{weights_gb:.1f} GB + activations; started at {base_rss:.1f} GB)"),
    ]


def estimate_rows(args, n: int, m: dict, info: dict, weights_gb: float) -> list[tuple[str, str]]:
    """Not measured: fp32 + Adam at 1024 px, from the measured rows."""
    # The mask pass's RSS growth is its bf16 gradients plus the activations of its two UNet runs (batch 2).
    activations = max(0.0, info["mask pass (1 forget latent)"]["rss_growth_gb"] - weights_gb)
    rl_best, update_s = m["rl_s"], max(0.0, m["salun_s"] - m["rl_s"])  # the masked update: per weight, not per pixel
    scale = (1024 / args.resolution) ** 2  # activations and convolution FLOPs grow with the pixel count
    rl_bytes = 4 + 4 + 8  # fp32 weights, fp32 grads, Adam's two fp32 moments
    salun_bytes = 4 + 4 + 8 * args.keep + 1 / 8  # Adam state on the salient entries only, + the bit-packed mask
    act_1024 = activations * scale * 2  # x pixels, x 2 for fp32 over the measured bf16
    return [
        ("ESTIMATE fp32 + Adam, RL: bytes per UNet parameter", f"{rl_bytes} -> {rl_bytes * n / GB:.1f} GB "
                                                               f"+ activations"),
        (f"ESTIMATE fp32 + Adam, SalUn (keep {args.keep}): bytes per UNet parameter",
         f"{salun_bytes:.3f} -> {salun_bytes * n / GB:.1f} GB + activations"),
        ("ESTIMATE activations at 1024 px, batch 2",
         f"{act_1024:.0f} GB (the mask pass's growth beyond its bf16 gradients, {activations:.2f} GB at "
         f"{args.resolution} px, x {scale:.0f} pixels, x 2 for fp32; without memory-efficient attention the "
         f"4,096-token level adds more)"),
        ("ESTIMATE step time at 1024 px on this CPU", f"{rl_best * scale / 3600:.1f} h per step (x{scale:.0f} "
                                                       f"pixels, a lower bound: attention grows faster)"),
        ("ESTIMATE SalUn / RL step time at 1024 px",
         f"{(rl_best * scale + update_s) / (rl_best * scale):.2f}x (the masked update's measured {update_s:.1f} s "
         f"does not grow with the pixels; the forward + backward does)"),
    ]


def write_report(args, info: dict, rows: list[tuple[str, str]]) -> None:
    """The table with its header to stdout, and to --out if given."""
    header = ("| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows))
    text = (f"# SDXL at real scale (random weights from the SDXL base configs)\n\n"
            f"`python benchmarks/sdxl_real_scale.py --skeleton <sdxl-skeleton> --resolution {args.resolution}`; "
            f"torch {info['torch']}, {info['threads']} threads, CPU. Wall-clock timings on a machine shared with "
            f"other jobs (load average {info['load average at start']:.1f} at the start): compare the SalUn and RL "
            f"rows with each other (run alternately on the same batches), not with other machines. Rows marked "
            f"ESTIMATE are computed from the measured ones, not measured.\n\n{header}\n"
            f"Raw: `{json.dumps(info)}`\n")
    print(text)
    if args.out:
        from concept_erase.io_utils import atomic_file

        with atomic_file(args.out, overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "resolution": args.resolution,
            "load average at start": os.getloadavg()[0]}  # and the raw timings, as they are taken
    rows, n = measure_sizes(args.skeleton, args.keep)
    free = available_gb()
    if free < args.min_free_gb:
        print(f"only {free:.1f} GB available (< --min-free-gb {args.min_free_gb}): stopping before the bf16 UNet",
              file=sys.stderr)
        return 2
    base_rss = rss_gb()
    unet, build_s = build_bf16_unet(args.skeleton)
    weights_gb = sum(p.numel() * p.element_size() for p in unet.parameters()) / GB
    rows.append(("bf16 UNet built with random weights", f"{weights_gb:.2f} GB in {build_s:.0f} s"))
    measured = measure_passes(unet, args, info)
    rows += measured_rows(args, measured, weights_gb, base_rss)
    rows += estimate_rows(args, n, measured, info, weights_gb)
    write_report(args, info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
