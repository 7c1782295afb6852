"""Cost of SalUn on the real Stable Diffusion 1.5 architecture (random weights), measured side by side.

Builds SD 1.5 from a config folder (UNet ~860M parameters, CLIP text encoder, VAE, the real tokenizer; no
weights are downloaded) and times, in one run, on the same batches:

  - one SalUn step (surrogate target under no_grad + forget/retain loss, Adam on the masked weights,
    frozen entries restored) vs one plain fine-tuning step (denoising loss on the same forget + retain
    latents, Adam on every weight) vs one RL step (the SalUn objective, no mask);
  - the mask pass (saliency loss w = 7.5 over the forget set, then the global top-keep threshold) vs one
    plain forward + backward pass over the same forget latents.

Training rows run interleaved for --repeats rounds and report their fastest round. Peak memory is the
largest resident-set growth during each row above the RSS the row started from (CUDA: max
allocated), sampled every 5 ms; it includes gradients, Adam states and the mask's frozen-entry snapshot.

    .venv/bin/python benchmarks/salun_step_sd15.py --resolution 256 --batch-size 1   # CPU: ~4 min of CPU time

Run it with nothing else busy: timings are wall clock.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1].parent / "shared" / "sd15-skeleton"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"SD 1.5 diffusers config folder, no weights needed (default: {DEFAULT_CONFIG})")
    p.add_argument("--resolution", type=int, default=256, help="image size in pixels (latents are 1/8)")
    p.add_argument("--batch-size", type=int, default=1, help="forget batch per step (the retain batch is the same)")
    p.add_argument("--forget-images", type=int, default=2, help="forget set size for the mask pass")
    p.add_argument("--steps", type=int, default=1, help="measured steps per row, after one warm-up step")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of the three training rows, interleaved; each row reports its fastest round "
                        "and largest memory (robust to other load on the machine)")
    p.add_argument("--keep", type=float, default=0.5, help="mask keep ratio")
    p.add_argument("--alpha", type=float, default=0.5, help="retain loss weight")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p.parse_args()


def build_pipeline(config: Path, device: str):
    """SD 1.5 from its config files with random weights (fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if not (config / "unet" / "config.json").is_file():
        raise SystemExit(f"no SD config folder at {config} (pass --config)")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(config / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(config / "scheduler")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device)


class PeakMemory:
    """Peak growth of memory during a `with` block: CUDA max allocated, or RSS sampled by a thread."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:  # hand freed heap back to the OS so the next row starts from a true baseline
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.top = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.top = max(self.top, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, self.rss()) - self.start


def main():
    args = parse_args()
    from concept_erase.diffusion.erase import LatentSet, compute_mask
    from concept_erase.diffusion.losses import _joint_loss, noise_batch, salun_loss, sample_noise

    t0 = time.perf_counter()
    pipe = build_pipeline(args.config, args.device)
    unet, dev = pipe.unet, args.device
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"built SD 1.5 (random weights) in {time.perf_counter() - t0:.0f} s: UNet {n_params / 1e6:.0f}M parameters; "
          f"device {dev}, {torch.get_num_threads()} threads, {args.resolution}px, batch {args.batch_size}+"
          f"{args.batch_size}")

    size = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    B, T = args.batch_size, pipe.scheduler.config.num_train_timesteps
    with torch.no_grad():
        emb = {p: pipe.encode_prompt(p, dev, 1, False)[0] for p in
               ("a photo of a nude person", "a photo of a person wearing clothes", "")}
    forget_z = torch.randn(max(B, args.forget_images), 4, size, size, generator=g)
    retain_z = torch.randn(B, 4, size, size, generator=g)

    def batches():
        fz = forget_z[:B].to(dev)
        f_noise, f_t = sample_noise(fz, T, torch.Generator().manual_seed(1))
        r_noise, r_t = sample_noise(retain_z, T, torch.Generator().manual_seed(2))
        c_f = emb["a photo of a nude person"].expand(B, -1, -1)
        c_s = emb["a photo of a person wearing clothes"].expand(B, -1, -1)
        fb = noise_batch(pipe.scheduler, fz, c_f, f_noise.to(dev), f_t.to(dev), c_s)
        rb = noise_batch(pipe.scheduler, retain_z.to(dev), c_s, r_noise.to(dev), r_t.to(dev))
        return fb, rb

    forget = LatentSet(forget_z[:args.forget_images], ["a photo of a nude person"] * args.forget_images,
                       ["a photo of a person wearing clothes"] * args.forget_images)
    rows = []

    # ---- the mask pass vs one plain forward + backward over the same forget latents
    with PeakMemory(dev) as mem:
        t = time.perf_counter()
        mask = compute_mask(pipe, forget, args.keep, batch_size=B, seed=0)
        seconds = time.perf_counter() - t
    rows.append(("mask pass (saliency loss w=7.5 + threshold)", seconds, mem.peak))
    print(f"  {rows[-1][0]}: {seconds:.1f} s", flush=True)

    unet.train()
    unet.requires_grad_(True)
    with PeakMemory(dev) as mem:
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        for lo in range(0, args.forget_images, B):
            z = forget_z[lo: lo + B].to(dev)
            noise, ts = sample_noise(z, T, gen)
            fb = noise_batch(pipe.scheduler, z, emb["a photo of a nude person"].expand(len(z), -1, -1),
                             noise.to(dev), ts.to(dev))
            _joint_loss(unet, fb, fb.target, None, 0.0)[0].backward()
        seconds = time.perf_counter() - t
    unet.zero_grad(set_to_none=True)
    rows.append(("plain forward+backward over the same forget set", seconds, mem.peak))
    print(f"  {rows[-1][0]}: {seconds:.1f} s", flush=True)

    # ---- one training step: SalUn vs plain fine-tuning vs RL (no mask), same batches
    def train_row(kind: str):
        unet.requires_grad_(True)
        params = mask.trainable_parameters(unet) if kind == "salun" else list(unet.parameters())
        with PeakMemory(dev) as mem:
            opt = torch.optim.Adam(params, lr=1e-5)
            handle = mask.attach(unet, opt) if kind == "salun" else None
            times = []
            for i in range(1 + args.steps):  # step 0 allocates Adam's states: a warm-up, not timed
                fb, rb = batches()
                if dev == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                if kind == "finetune":  # the ordinary denoising loss on forget + retain latents
                    loss = _joint_loss(unet, fb, fb.target, rb, 1.0)[0]
                else:
                    loss = salun_loss(unet, fb, rb, args.alpha)[0]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if dev == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t)
            if handle is not None:
                handle.remove()
            del opt
        return sum(times) / len(times), mem.peak

    names = {"finetune": "plain fine-tuning step (Adam, all weights)",
             "salun": f"SalUn step (mask keep {args.keep}, Adam)", "rl": "RL step (SalUn objective, no mask)"}
    kinds = ("finetune", "salun", "rl")
    best = {kind: (float("inf"), 0) for kind in kinds}
    for rep in range(args.repeats):
        for kind in kinds:
            seconds, peak = train_row(kind)
            print(f"  round {rep + 1}: {names[kind]}: {seconds:.1f} s, {peak / 2**30:.2f} GB", flush=True)
            best[kind] = (min(best[kind][0], seconds), max(best[kind][1], peak))
    rows += [(names[kind], *best[kind]) for kind in kinds]

    print(f"\nSD 1.5 architecture, random weights, {dev.upper()}, {args.resolution}x{args.resolution} px, "
          f"forget batch {B} + retain batch {B}, {args.forget_images} forget images, keep {args.keep}")
    print(f"| {'what':<48} | {'seconds':>8} | {'peak memory (GB)':>16} |")
    print(f"| {'-' * 48} | {'-' * 8} | {'-' * 16} |")
    for name, seconds, peak in rows:
        print(f"| {name:<48} | {seconds:8.2f} | {peak / 2**30:16.2f} |")
    base_t, base_m = rows[2][1], rows[2][2]
    print(f"\nSalUn step / plain step: time x{rows[3][1] / base_t:.2f}, memory x{rows[3][2] / max(base_m, 1):.2f}; "
          f"mask pass / plain fwd+bwd pass: time x{rows[0][1] / rows[1][1]:.2f}, "
          f"memory x{rows[0][2] / max(rows[1][2], 1):.2f}")


if __name__ == "__main__":
    main()
