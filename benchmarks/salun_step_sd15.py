"""SalUn's cost, measured side by side: the mask's own cost, memory per parameter, and the mask pass.

On the real Stable Diffusion 1.5 architecture built from its config folder (`--skeleton`, random weights:
nothing is downloaded), or on any pipeline `load_pipeline` reads (`--model minisd`, a diffusers folder).
In one run, on the same batches:

  - one SalUn step (surrogate target under no_grad + forget/retain loss, masked Adam on the salient entries)
    vs one RL step (the same objective, Adam on every weight): their ratio is the mask's own cost; and vs one
    plain fine-tuning step (the denoising loss on the same forget + retain latents, Adam on every weight);
  - bytes per UNet parameter of each: weights, gradients, optimizer state, mask (counted from the tensors);
  - the mask pass (guided saliency loss over the forget set, signed gradients summed, then the global
    threshold) vs the guided loss's own forward + backward over the same batches (the UNet runs twice per
    batch: conditional and unconditional), with the threshold's fixed cost apart.

Timed rows run interleaved for --repeats rounds, each training row after --warmup-steps untimed steps, and
report their fastest round: on a CPU in process CPU time (the work done, robust to other load on the
machine), on CUDA in wall time. A training step is timed in two phases, forward + backward and the optimizer
step (where the mask does its work); on a CPU each phase also reports its CPU time in the kernel and its
page faults, since faulting in freshly mapped memory is what varies most between runs. Peak memory is the largest growth above the row's starting point (CUDA: max
allocated; CPU: resident set sampled every 5 ms).

On Linux the benchmark runs itself under a fixed glibc malloc configuration (mmap threshold 32 MiB, no
trimming), so that freed memory is reused as PyTorch's caching allocator reuses it on a GPU. Left to itself,
glibc moves its mmap threshold with the history of frees, and the same forward + backward then spends from
0.2 to 6 CPU s in the kernel faulting pages in, depending on which row ran before: that noise was larger than
the mask's cost. Blocks over 32 MiB (Adam's full-size temporaries) are still mapped and unmapped each time;
that is part of a step's cost. PyTorch is also asked (THP_MEM_ALLOC_ENABLE=1) to back its allocations of
2 MB and more with transparent huge pages where the kernel allows them, which cut the faults of a 512 px SD
1.5 step from about 2 million to 80 thousand. Set MALLOC_MMAP_THRESHOLD_ (and THP_MEM_ALLOC_ENABLE=0) yourself
to measure under another configuration.

    python benchmarks/salun_step_sd15.py --skeleton PATH/TO/sd15-skeleton --resolution 256 --batch-size 1
    python benchmarks/salun_step_sd15.py --model minisd --batch-size 16 --forget-images 64 --steps 10

Run it with nothing else busy.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # glibc reads these once, at start: run again under them (see the module docstring)
    os.environ.update(MALLOC_MMAP_THRESHOLD_=str(32 * 2**20), MALLOC_TRIM_THRESHOLD_=str(2**40))
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # PyTorch asks for huge pages: fewer faults
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from concept_erase.diffusion.conditioning import PromptEmbeddings  # noqa: E402
from concept_erase.diffusion.losses import (  # noqa: E402
    _joint_loss, noise_batch, saliency_loss, salun_loss, sample_noise)
from concept_erase.diffusion.models.loading import load_pipeline  # noqa: E402
from concept_erase.runtime import resident_memory  # noqa: E402
from concept_erase.saliency import MaskedOptimizer, SaliencyMask, build_optimizer, compute_saliency  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--skeleton", type=Path,
                     help="an SD 1.x diffusers config folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), "
                          "no weights needed: the architecture is built with random weights")
    src.add_argument("--model", help='a pipeline load_pipeline reads: "minisd" or a diffusers folder')
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1, help="forget batch per step (the retain batch is the same)")
    p.add_argument("--forget-images", type=int, default=2, help="forget set size for the mask pass")
    p.add_argument("--steps", type=int, default=1, help="measured steps per row and round, after the warm-up steps")
    p.add_argument("--warmup-steps", type=int, default=4,
                   help="untimed steps first in each row: Adam's state is allocated and the heap grows to its "
                        "working size (on a CPU a masked run takes longer to get there: at 512 px its forward + "
                        "backward faulted 217, 112, 65 and 26 thousand pages in its first four steps, RL's 168, "
                        "45, 31 and 33 thousand)")
    p.add_argument("--repeats", type=int, default=2,
                   help="interleaved rounds of the timed rows; each row reports its fastest round")
    p.add_argument("--keep", type=float, default=0.5, help="mask keep ratio")
    p.add_argument("--alpha", type=float, default=0.5, help="retain loss weight")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"the training rows to time, comma-separated (salun and rl always run): {', '.join(ROWS)}")
    p.add_argument("--time-mask-pass", action=argparse.BooleanOptionalAction, default=True,
                   help="time the mask pass against the guided loss (--no-time-mask-pass: build the mask once, "
                        "untimed, for a run about the training step alone)")
    return p.parse_args(argv)


def build_skeleton(folder: Path):
    """SD 1.x from its config files with random weights (fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if not (folder / "unet" / "config.json").is_file():
        raise SystemExit(f"no diffusers config folder at {folder} (unet/config.json missing)")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class PeakMemory:
    """Peak growth of memory during a `with` block: CUDA max allocated, or RSS sampled by a thread."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        return resident_memory()

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:  # hand freed heap back to the OS so the row starts from a true baseline
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


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _resolution(pipe, args) -> tuple[int, int]:
    """(image side in pixels, the VAE's downscaling factor)."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return args.resolution or pipe.unet.config.sample_size * scale, scale


def load_model(args):
    """The pipeline on --device and its name in the report; prints what was built, in how long."""
    t0 = time.perf_counter()
    pipe = build_skeleton(args.skeleton) if args.skeleton else load_pipeline(args.model)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    name = f"SD 1.5 architecture, random weights ({args.skeleton.name})" if args.skeleton else args.model
    print(f"built {name} in {time.perf_counter() - t0:.0f} s: UNet {n_params / 1e6:.1f}M parameters; device "
          f"{args.device}, {torch.get_num_threads()} threads, {_resolution(pipe, args)[0]} px, batch "
          f"{args.batch_size}+{args.batch_size}", flush=True)
    return pipe, name


FORGET_PROMPT, SURROGATE = "a photo of a nude person", "a photo of a person wearing clothes"


class Workload:
    """What every row runs on, drawn once: the forget / retain latents and their conditionings; and the clock.

    The clock: on a CPU the process's CPU time, i.e. the work done, which other load on a shared machine does
    not inflate the way it inflates wall time (all threads count: compare runs with the same thread count);
    on CUDA wall time."""

    def __init__(self, pipe, args):
        self.pipe, self.unet, self.dev = pipe, pipe.unet, args.device
        self.B, self.forget_images = args.batch_size, args.forget_images
        self.T = pipe.scheduler.config.num_train_timesteps
        self.n_params = sum(p.numel() for p in self.unet.parameters())
        self.resolution, scale = _resolution(pipe, args)
        size, channels = self.resolution // scale, self.unet.config.in_channels
        g = torch.Generator().manual_seed(0)
        embed = PromptEmbeddings(pipe, self.dev)
        self.c_f, self.c_s, self.c_u = (embed([p]) for p in (FORGET_PROMPT, SURROGATE, ""))  # batches of one
        self.forget_z = torch.randn(max(self.B, args.forget_images), channels, size, size, generator=g)
        self.retain_z = torch.randn(self.B, channels, size, size, generator=g)
        self.clock = time.process_time if self.dev == "cpu" else time.perf_counter
        self.unit = "CPU seconds" if self.dev == "cpu" else "seconds"

    def train_batches(self):
        """One training step's (forget, retain) NoisedBatch pair, the same at every step."""
        B, dev = self.B, self.dev
        fz = self.forget_z[:B].to(dev)
        f_noise, f_t = sample_noise(fz, self.T, torch.Generator().manual_seed(1))
        r_noise, r_t = sample_noise(self.retain_z, self.T, torch.Generator().manual_seed(2))
        fb = noise_batch(self.pipe.scheduler, fz, self.c_f.expand(B), f_noise.to(dev), f_t.to(dev),
                         self.c_s.expand(B))
        rb = noise_batch(self.pipe.scheduler, self.retain_z.to(dev), self.c_s.expand(B), r_noise.to(dev), r_t.to(dev))
        return fb, rb

    def saliency_batches(self):
        """The mask pass's batches over the forget set (the unconditional prompt as the guidance target)."""
        gen = torch.Generator().manual_seed(0)
        for lo in range(0, self.forget_images, self.B):
            z = self.forget_z[lo: lo + self.B].to(self.dev)
            noise, ts = sample_noise(z, self.T, gen)
            n = len(z)
            yield noise_batch(self.pipe.scheduler, z, self.c_f.expand(n), noise.to(self.dev), ts.to(self.dev),
                              self.c_u.expand(n))

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def reading(self) -> tuple[float, float, int]:
        """(clock, CPU seconds in the kernel, minor page faults): the last two on a CPU only, where the
        kernel's share is mostly faulting freshly mapped pages in."""
        if self.dev != "cpu":
            return self.clock(), 0.0, 0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return self.clock(), usage.ru_stime, usage.ru_minflt


def measure_mask_pass(work: Workload, keep: float, repeats: int):
    """The mask pass vs the guided loss's own forward + backward, interleaved for `repeats` rounds: per row
    [fastest time, largest peak] ("threshold": the global threshold's fastest time), and the mask."""
    unet, clock = work.unet, work.clock

    def guided_pass():
        unet.eval().requires_grad_(True)
        for b in work.saliency_batches():
            saliency_loss(unet, b).backward()
        work.sync()
        unet.zero_grad(set_to_none=True)

    mask_box = {}

    def mask_pass():
        t = clock()
        scores = compute_saliency(unet, work.saliency_batches(), lambda m, b: saliency_loss(m, b))
        work.sync()
        t_scores = clock() - t
        mask_box["mask"] = SaliencyMask.from_scores(scores, keep, model=unet, concept=FORGET_PROMPT)
        mask_box["threshold_s"] = clock() - t - t_scores
        del scores

    rows = {"guided": [float("inf"), 0], "mask": [float("inf"), 0], "threshold": [float("inf"), 0]}
    for rep in range(repeats):
        for kind, fn in (("guided", guided_pass), ("mask", mask_pass)):
            with PeakMemory(work.dev) as mem:
                t = clock()
                fn()
                seconds = clock() - t
            rows[kind] = [min(rows[kind][0], seconds), max(rows[kind][1], mem.peak)]
            print(f"  round {rep + 1}: {kind} pass {seconds:.2f} s, peak +{mem.peak / 2**30:.2f} GiB", flush=True)
        rows["threshold"][0] = min(rows["threshold"][0], mask_box["threshold_s"])
    return rows, mask_box["mask"]


# The SalUn rows' memory settings (`build_optimizer`'s grad_release and master_weights; docs/ALGORITHMS.md 1)
SALUN_ROWS = {"salun": {}, "salun-grad-release": {"grad_release": True},
              "salun-salient-fp32": {"master_weights": "salient-fp32"},
              "salun-bf16-stochastic": {"master_weights": "bf16-stochastic"}}


def train_row(work: Workload, mask, kind: str, args):
    """--warmup-steps + --steps training steps of one row ("rl", "finetune" or one of SALUN_ROWS) on the same
    batches. Returns the fastest measured step's phases, each (seconds, kernel seconds, page faults); the row's
    peak memory growth; and its tensors' bytes by kind, counted after the last step. A bf16 row casts the UNet
    to bf16 and runs the forward under bf16 autocast, then casts it back."""
    unet = work.unet
    unet.train()
    settings = SALUN_ROWS.get(kind, {})
    bf16 = settings.get("master_weights", "fp32") != "fp32"
    if bf16:
        unet.to(torch.bfloat16)
    autocast = torch.autocast(work.dev, dtype=torch.bfloat16, enabled=bf16)
    with PeakMemory(work.dev) as mem:
        opt = build_optimizer(unet, mask if kind in SALUN_ROWS else None, "adam", lr=1e-5, **settings)
        steps = []
        for i in range(args.warmup_steps + args.steps):
            fb, rb = work.train_batches()
            work.sync()
            start = work.reading()
            with autocast:
                if kind == "finetune":  # the ordinary denoising loss on forget + retain latents
                    loss = _joint_loss(unet, fb, fb.target, rb, 1.0)[0]
                else:
                    loss = salun_loss(unet, fb, rb, args.alpha)[0]
            loss.backward()  # with grad release, the optimizer steps in here
            work.sync()
            middle = work.reading()
            grads = _bytes(p.grad for p in unet.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)
            work.sync()
            end = work.reading()
            if i >= args.warmup_steps:
                steps.append({"forward + backward": [b - a for a, b in zip(start, middle)],
                              "optimizer step": [b - a for a, b in zip(middle, end)]})
        masked = isinstance(opt, MaskedOptimizer)
        state = opt.packed_state() if masked else opt.state.values()
        targets = opt._targets if masked else []
        breakdown = {
            "weights": _bytes(unet.parameters()), "gradients": grads,
            "optimizer state": _bytes(t for s in state for t in s.values()),
            "fp32 copies (salient)": _bytes(t.proxy for t in targets if t.proxy.numel() and t.proxy is not t.param),
            "mask (bitmask, device)": _bytes(t.bits for t in targets if t.bits is not None),
            "mask (bool, host)": _bytes(mask.masks.values()) if kind in SALUN_ROWS else 0}
        if masked:
            opt.remove_hooks()
        del opt
    if bf16:
        unet.to(torch.float32)
    fastest = min(steps, key=lambda phases: sum(v[0] for v in phases.values()))
    return fastest, mem.peak, breakdown


def total(phases) -> list:
    """A step's (seconds, kernel seconds, page faults) over its phases."""
    return [sum(v[j] for v in phases.values()) for j in range(3)]


ROWS = ("salun", "rl", "finetune", *list(SALUN_ROWS)[1:])


def row_labels(args) -> dict[str, str]:
    """The rows this run times (--rows, salun and rl always), by name."""
    labels = {"salun": f"SalUn step (keep {args.keep}, masked Adam, bitmask)", "rl": "RL step (SalUn objective, no mask)",
              "finetune": "plain fine-tuning step (Adam, all weights)",
              "salun-grad-release": "SalUn + grad release", "salun-salient-fp32": "SalUn + bf16, salient-fp32 master",
              "salun-bf16-stochastic": "SalUn + bf16, stochastic rounding"}
    wanted = {"salun", "rl", *args.rows.split(",")}
    unknown = wanted - set(labels)
    if unknown:
        raise SystemExit(f"unknown --rows {', '.join(sorted(unknown))} (choose from {', '.join(ROWS)})")
    return {kind: label for kind, label in labels.items() if kind in wanted}


def measure_training_steps(work: Workload, mask, args):
    """SalUn (and its memory settings) vs RL (no mask) vs plain fine-tuning, interleaved for --repeats rounds in rotating order (machine
    drift hits all alike). Per row: the fastest step's phases, the largest peak, the last round's bytes."""
    labels = row_labels(args)
    best, peaks, breakdown = {}, dict.fromkeys(labels, 0), {}
    for rep in range(args.repeats):
        for kind in list(labels)[rep % len(labels):] + list(labels)[:rep % len(labels)]:
            phases, peak, breakdown[kind] = train_row(work, mask, kind, args)
            seconds, in_kernel, faults = total(phases)
            print(f"  round {rep + 1}: {labels[kind]}: {seconds:.2f} s ({in_kernel:.2f} in the kernel, "
                  f"{faults} page faults; optimizer step {phases['optimizer step'][0]:.2f} s), peak "
                  f"+{peak / 2**30:.2f} GiB", flush=True)
            if kind not in best or seconds < total(best[kind])[0]:
                best[kind] = phases
            peaks[kind] = max(peaks[kind], peak)
    return best, peaks, breakdown


def print_time_table(name: str, work: Workload, args, mask_rows: dict | None, best: dict, peaks: dict) -> None:
    """The timed rows (each phase and the whole step), then the ratios the benchmark is about (mask_rows None:
    the mask pass was not timed)."""
    labels, unit = row_labels(args), work.unit
    print(f"\n{name}: {work.dev.upper()}, {torch.get_num_threads()} threads, {work.resolution} px, forget batch "
          f"{work.B} + retain batch {work.B}, {args.forget_images} forget images "
          f"({-(-args.forget_images // work.B)} saliency batches), keep {args.keep}, fastest of {args.repeats} "
          f"interleaved rounds\n")
    print("| row | phase | " + unit + " | of which in the kernel | page faults | peak memory growth (GiB) |\n"
          "| --- | --- | ---: | ---: | ---: | ---: |")
    for kind in labels:
        for phase, (seconds, in_kernel, faults) in [*best[kind].items(), ("step", total(best[kind]))]:
            peak = f"{peaks[kind] / 2**30:.3f}" if phase == "step" else ""
            print(f"| {labels[kind]} | {phase} | {seconds:.3f} | {in_kernel:.3f} | {faults} | {peak} |")
    if mask_rows:
        print(f"| guided saliency loss, forward + backward over the forget set | | {mask_rows['guided'][0]:.3f} | | | "
              f"{mask_rows['guided'][1] / 2**30:.3f} |")
        print(f"| mask pass (scores + threshold) | | {mask_rows['mask'][0]:.3f} | | | "
              f"{mask_rows['mask'][1] / 2**30:.3f} |")
        print(f"| of which the global threshold (fixed cost) | | {mask_rows['threshold'][0]:.3f} | | | |")
    (s, sk, _), (r, rk, _) = (total(best[kind]) for kind in ("salun", "rl"))
    s_opt, r_opt = best["salun"]["optimizer step"][0], best["rl"]["optimizer step"][0]
    print(f"\nthe mask's own cost (SalUn step / RL step): time x{s / r:.3f} (outside the kernel "
          f"x{(s - sk) / (r - rk):.3f}), peak memory x{peaks['salun'] / max(peaks['rl'], 1):.3f}")
    # The two rows' forward + backward passes are the same computation (SalUn's skips the gradients of
    # wholly frozen tensors); their optimizer steps are where the mask's work lies.
    print(f"the optimizer steps alone: SalUn {s_opt:.3f} vs RL {r_opt:.3f} {unit}, a difference of "
          f"{(s_opt - r_opt) / r:+.1%} of the RL step")
    if "finetune" in labels:
        print(f"SalUn / plain fine-tuning: time x{s / total(best['finetune'])[0]:.3f}, peak memory "
              f"x{peaks['salun'] / max(peaks['finetune'], 1):.3f}")
    for kind in [kind for kind in list(SALUN_ROWS)[1:] if kind in labels]:
        print(f"{labels[kind]} / RL step: time x{total(best[kind])[0] / r:.3f}, peak memory "
              f"x{peaks[kind] / max(peaks['rl'], 1):.3f}")
    if mask_rows:
        per_batch = (mask_rows["mask"][0] - mask_rows["threshold"][0]) / mask_rows["guided"][0]
        print(f"mask pass / guided loss forward+backward: x{mask_rows['mask'][0] / mask_rows['guided'][0]:.3f} in "
              f"all, x{per_batch:.3f} without the threshold's fixed cost; peak memory x"
              f"{mask_rows['mask'][1] / max(mask_rows['guided'][1], 1):.3f}")


def print_bytes_table(work: Workload, args, breakdown: dict) -> None:
    """Bytes per UNet parameter of each training row, by kind of tensor."""
    n_params = work.n_params
    cols = list(next(iter(breakdown.values())))
    print(f"\nbytes per UNet parameter ({n_params / 1e6:.1f}M), counted from the tensors after a step\n")
    print("| row | " + " | ".join(cols) + " | total |\n| --- |" + " ---: |" * (len(cols) + 1))
    for kind, label in row_labels(args).items():
        b = breakdown[kind]
        print(f"| {label} | " + " | ".join(f"{b[c] / n_params:.2f}" for c in cols)
              + f" | {sum(b.values()) / n_params:.2f} |")


def main(argv=None):
    args = parse_args(argv)
    pipe, name = load_model(args)
    work = Workload(pipe, args)
    if args.time_mask_pass:
        mask_rows, mask = measure_mask_pass(work, args.keep, args.repeats)
    else:
        mask_rows = None
        scores = compute_saliency(work.unet, work.saliency_batches(), lambda m, b: saliency_loss(m, b))
        mask = SaliencyMask.from_scores(scores, args.keep, model=work.unet, concept=FORGET_PROMPT)
        del scores
    best, peaks, breakdown = measure_training_steps(work, mask, args)
    print_time_table(name, work, args, mask_rows, best, peaks)
    print_bytes_table(work, args, breakdown)


if __name__ == "__main__":
    main()
