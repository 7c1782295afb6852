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
    add_run_args(p, min_free_gb=13.0)
    return p.parse_args(argv)


def add_run_args(p: argparse.ArgumentParser, min_free_gb: float) -> None:
    """The flags every real-scale benchmark shares: the size of the timed passes, the mask and loss, the memory
    it waits for and where the table goes."""
    p.add_argument("--resolution", type=int, default=128, help="image side in pixels for the timed passes")
    p.add_argument("--keep", type=float, default=0.5, help="mask keep ratio (random mask for the SalUn step)")
    p.add_argument("--alpha", type=float, default=0.5, help="retain loss weight")
    p.add_argument("--min-free-gb", type=float, default=min_free_gb,
                   help="refuse to build the bf16 model unless this much memory is available (shared machine)")
    p.add_argument("--out", type=Path, default=None, help="write the table here (Markdown) as well as stdout")


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
    """Write a random mask over `shapes` (name, shape) with the library's own writer; return its size and the
    seconds it took."""
    from concept_erase.saliency import SaliencyMask

    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(s, generator=gen) < keep for n, s in shapes}
    mask = SaliencyMask(masks, keep, shapes, "all", "benchmark: random")
    t0 = time.perf_counter()
    path = mask.save(folder / "mask.safetensors")
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


def build_bf16(cls, config: dict):
    """A diffusers model of class `cls` with random weights, built directly in bf16 (never its fp32 copy); and
    the seconds it took."""
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    try:
        model = cls.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model, time.perf_counter() - t0


def make_batches(skeleton: Path, resolution: int):
    """bf16 NoisedBatches at t = 500 of random latents and random conditionings of SDXL's shapes: the mask pass's
    forget batch (target: the empty prompt), then the steps' forget batch (target: a surrogate) and retain batch."""
    from diffusers import DDPMScheduler

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
    return noised_batches(scheduler, z_f, z_r, c_forget, c_surrogate, c_retain, c_empty)


def noised_batches(scheduler, z_forget, z_retain, forget, surrogate, retain, empty):
    """bf16 NoisedBatches at t = 500 (of U{0..999}) with the same noise: the mask pass's forget batch (target:
    the empty prompt), then the steps' forget batch (target: the surrogate) and retain batch."""
    from concept_erase.diffusion.losses import noise_batch

    t = torch.tensor([500])

    def batch(z, c, target=None):
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        return noise_batch(scheduler, z.bfloat16(), c.to(torch.bfloat16), noise.bfloat16(), t,
                           None if target is None else target.to(torch.bfloat16))

    return batch(z_forget, forget, empty), batch(z_forget, forget, surrogate), batch(z_retain, retain)


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


def measure_passes(model, batches, keep: float, alpha: float, info: dict) -> dict:
    """One mask pass, then SalUn and RL steps alternately, twice each, on the same `batches` (mask pass's forget,
    steps' forget, retain; SGD, lr 1e-5): the seconds of the mask pass and of each kind's fastest step (and of
    that step's forward + backward and update apart), the bytes per parameter of the tensors a masked step
    holds (weights, gradients, the bit-packed mask), and the process's peak RSS after them."""
    from concept_erase.diffusion.losses import saliency_loss, salun_loss

    forget_for_mask, forget, retain = batches
    model.train()

    def mask_pass():
        saliency_loss(model, forget_for_mask).backward()
        for p in model.parameters():
            p.grad = None

    masks = packed_random_masks(model, keep)
    held = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "mask": sum(packed.nbytes for packed, _ in masks.values())}
    split = {}  # label -> (forward + backward seconds, update seconds)

    def step(label: str, masked: bool):
        t0 = time.perf_counter()
        loss, _, _ = salun_loss(model, forget, retain, alpha)
        loss.backward()
        t1 = time.perf_counter()
        held["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = p.grad
                if masked:  # SalUn Eq. 7: theta <- theta - eta * (m . g), the mask unpacked one tensor at a time
                    packed, shape = masks[name]
                    m = torch.from_numpy(np.unpackbits(packed)[: p.numel()].astype(bool)).reshape(shape)
                    g.mul_(m)
                p.sub_(g, alpha=1e-5)
                p.grad = None
        split[label] = (t1 - t0, time.perf_counter() - t1)

    mask_s = timed(info, "mask pass (1 forget latent)", mask_pass)
    for label, masked in (("SalUn step", True), ("RL step", False), ("SalUn step (again)", True),
                          ("RL step (again)", False)):
        timed(info, label, lambda label=label, masked=masked: step(label, masked))
        info[label]["forward + backward s"], info[label]["update s"] = (round(x, 1) for x in split[label])
    salun = min(("SalUn step", "SalUn step (again)"), key=lambda k: info[k]["seconds"])
    rl = min(("RL step", "RL step (again)"), key=lambda k: info[k]["seconds"])
    n = sum(p.numel() for p in model.parameters())
    return {"mask_s": mask_s, "salun_s": info[salun]["seconds"], "rl_s": info[rl]["seconds"],
            "rl_forward_backward_s": split[rl][0], "rl_update_s": split[rl][1], "salun_update_s": split[salun][1],
            "bytes_per_param": {k: v / n for k, v in held.items()}, "peak_gb": peak_rss_gb()}


def measured_rows(resolution: int, m: dict, weights_gb: float, base_rss: float,
                  scope: str = "") -> list[tuple[str, str]]:
    """The measured rows; `scope` (e.g. a reduced depth) is said in each."""
    b = m["bytes_per_param"]
    return [
        (f"mask pass, 1 forget latent, {resolution} px, bf16{scope}", f"{m['mask_s']:.1f} s"),
        (f"SalUn step, batch 1 + 1, {resolution} px, bf16, masked SGD{scope}", f"{m['salun_s']:.1f} s (fastest of 2)"),
        (f"RL step, same batches, SGD on every weight{scope}", f"{m['rl_s']:.1f} s (fastest of 2)"),
        (f"SalUn / RL step time{scope}", f"{m['salun_s'] / m['rl_s']:.2f}x (here the bit-packed mask is unpacked with "
                                         f"numpy, tensor by tensor, every step: a fixed cost per weight)"),
        (f"bytes per parameter held by a SalUn step, bf16{scope}",
         f"{sum(b.values()):.3f} (weights {b['weights']:.3f} + gradients {b['grads']:.3f} + bit-packed mask "
         f"{b['mask']:.3f}; summed over the tensors)"),
        (f"peak resident memory of this process{scope}", f"{m['peak_gb']:.1f} GB (model {weights_gb:.1f} GB + bf16 "
                                                          f"grads {weights_gb:.1f} GB + activations; started at "
                                                          f"{base_rss:.1f} GB)"),
    ]


def adam_rows(n: int, keep: float, what: str) -> list[tuple[str, str]]:
    """ESTIMATE rows: fp32 weights + gradients + Adam's moments for `n` parameters, on every weight (RL) or on
    the salient ones only (SalUn: masked Adam state plus the bit-packed mask)."""
    rl_bytes = 4 + 4 + 8  # fp32 weights, fp32 grads, Adam's two fp32 moments
    salun_bytes = 4 + 4 + 8 * keep + 1 / 8
    return [(f"ESTIMATE fp32 + Adam, RL: bytes per {what} parameter", f"{rl_bytes} -> {rl_bytes * n / GB:.1f} GB "
                                                                      f"+ activations"),
            (f"ESTIMATE fp32 + Adam, SalUn (keep {keep}): bytes per {what} parameter",
             f"{salun_bytes:.3f} -> {salun_bytes * n / GB:.1f} GB + activations")]


def estimate_rows(args, n: int, m: dict, info: dict, weights_gb: float) -> list[tuple[str, str]]:
    """Not measured: fp32 + Adam at 1024 px, from the measured rows."""
    # The mask pass's RSS growth is its bf16 gradients plus the activations of its two UNet runs (batch 2).
    activations = max(0.0, info["mask pass (1 forget latent)"]["rss_growth_gb"] - weights_gb)
    rl_best, update_s = m["rl_s"], max(0.0, m["salun_s"] - m["rl_s"])  # the masked update: per weight, not per pixel
    scale = (1024 / args.resolution) ** 2  # activations and convolution FLOPs grow with the pixel count
    act_1024 = activations * scale * 2  # x pixels, x 2 for fp32 over the measured bf16
    return adam_rows(n, args.keep, "UNet") + [
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


def write_report(out: Path | None, title: str, command: str, info: dict, rows: list[tuple[str, str]]) -> None:
    """The table under `title` with the `command` that made it, to stdout, and to `out` if given."""
    header = ("| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows))
    text = (f"# {title}\n\n"
            f"`{command}`; "
            f"torch {info['torch']}, {info['threads']} threads, CPU. Wall-clock timings on a machine shared with "
            f"other jobs (load average {info['load average at start']:.1f} at the start): compare the SalUn and RL "
            f"rows with each other (run alternately on the same batches), not with other machines. Rows marked "
            f"ESTIMATE are computed from the measured ones, not measured.\n\n{header}\n"
            f"Raw: `{json.dumps(info)}`\n")
    print(text)
    if out:
        from concept_erase.io_utils import atomic_file

        with atomic_file(out, overwrite=True) as tmp:
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
    from diffusers import UNet2DConditionModel

    unet, build_s = build_bf16(UNet2DConditionModel, UNet2DConditionModel.load_config(args.skeleton / "unet"))
    weights_gb = sum(p.numel() * p.element_size() for p in unet.parameters()) / GB
    rows.append(("bf16 UNet built with random weights", f"{weights_gb:.2f} GB in {build_s:.0f} s"))
    measured = measure_passes(unet, make_batches(args.skeleton, args.resolution), args.keep, args.alpha, info)
    rows += measured_rows(args.resolution, measured, weights_gb, base_rss)
    rows += estimate_rows(args, n, measured, info, weights_gb)
    write_report(args.out, "SDXL at real scale (random weights from the SDXL base configs)",
                 f"python benchmarks/sdxl_real_scale.py --skeleton <sdxl-skeleton> --resolution {args.resolution}",
                 info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
