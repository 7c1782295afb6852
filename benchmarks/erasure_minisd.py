"""Erasure benchmark on MiniSD: SalUn against its ablations and the ESD baselines.

Same MiniSD, same forget/retain images, same budget and seeds for every method; one table per concept (a
digit, a style); each method is evaluated at several step counts (one continuous run, resumed from its
checkpoints, so 50 steps = the 25-step run plus 25 more).

Methods (docs/ALGORITHMS.md 2): SalUn (saliency mask, keep 0.5); RL (the same objective, no mask); ESD-x (cross-
attention only) and ESD-u (everything else), with the frozen original UNet; the saliency mask on ESD-u's
objective; and two controls at the same keep ratio: SalUn with a random mask, SalUn with the inverted mask
(the LEAST salient half).

Columns: forget accuracy (images of the forget prompts judged as the erased digit / style), retain accuracy
(images of the retain prompts judged as their requested digit AND style), FID on the digit judge's 128-d
features of retain-prompt images vs the original model's on the same seeds, wall time per step, and peak
memory (peak RSS growth of a fresh process over the method's mask + 10 steps, sampled every 2 ms, measured
separately so the methods do not share one process's memory).

Also, side by side in one process on the same batches: SalUn step time over a plain fine-tuning step, and
the mask computation time over one forward+backward pass over the forget set.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/erasure_minisd.py --out benchmarks/results/erasure_minisd.md

Run it with nothing else on the machine: two processes sharing 2 cores distort every timing (docs/DEPENDENCIES.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from concept_erase.concepts import get_concept
from concept_erase.diffusion.erase import PromptEmbeddings, TrainConfig, compute_mask, saliency_batches, train_unet
from concept_erase.diffusion.families import Conditioning
from concept_erase.diffusion.loading import load_pipeline
from concept_erase.diffusion.losses import noise_batch, salun_loss, saliency_loss, sample_noise
from concept_erase.diffusion.minisd import DIGITS, STYLES
from concept_erase.diffusion.minisd.experiment import MASK_BATCH_SIZE, make_latent_sets
from concept_erase.diffusion.minisd.judge import frechet_distance, load_judges
from concept_erase.diffusion.generate import generate_images
from concept_erase.io_utils import atomic_file
from concept_erase.saliency import SaliencyMask, build_optimizer

# name -> (TrainConfig.method, which mask)
METHODS: dict[str, tuple[str, str | None]] = {
    "SalUn": ("salun", "saliency"),
    "RL (no mask)": ("rl", None),
    "ESD-x": ("esd-x", None),
    "ESD-u": ("esd-u", None),
    "ESD-u + saliency mask": ("esd-u", "saliency"),
    "SalUn (random mask)": ("salun", "random"),
    "SalUn (inverted mask)": ("salun", "inverted"),
}


PLAIN_FT = "plain fine-tuning (reference)"


def parse_concept(name: str) -> tuple[str, int]:
    """'minisd-digit-seven' -> ("digit", 7); 'minisd-style-bold' -> ("style", 1)."""
    _, kind, value = name.split("-", 2)
    return kind, (DIGITS if kind == "digit" else STYLES).index(value)


def split_prompt(prompt: str) -> tuple[int, int]:
    """The (digit, style) a MiniSD prompt asks for."""
    from concept_erase.diffusion.minisd import minisd_prompt

    for d in range(len(DIGITS)):
        for s in range(len(STYLES)):
            if minisd_prompt(d, s) == prompt:
                return d, s
    raise ValueError(prompt)


class Evaluator:
    """Fixed evaluation images (prompts x seeds), judged; FID against the original model's images."""

    def __init__(self, pipe, concept, judges, forget_images: int, retain_seeds: int):
        self.kind, self.value = parse_concept(concept.name)
        self.judges = judges
        per = max(1, forget_images // len(concept.forget_prompts))
        self.forget = [(p, s) for p in concept.forget_prompts for s in range(per)]
        self.retain = [(p, s) for p in concept.retain_prompts for s in range(retain_seeds)]
        self.retain_labels = np.array([split_prompt(p) for p, _ in self.retain])
        self.reference = judges.features(self._images(pipe, self.retain))

    @staticmethod
    def _images(pipe, pairs):
        return generate_images(pipe, [p for p, _ in pairs], [s for _, s in pairs], num_inference_steps=25,
                               guidance_scale=5.0, batch_size=128)

    def __call__(self, pipe) -> dict:
        f_images, r_images = self._images(pipe, self.forget), self._images(pipe, self.retain)
        if self.kind == "digit":
            forget_acc = float((self.judges.predict_digits(f_images) == self.value).mean())
        else:
            forget_acc = float((self.judges.predict_styles(f_images) == self.value).mean())
        ok = (self.judges.predict_digits(r_images) == self.retain_labels[:, 0]) & (
            self.judges.predict_styles(r_images) == self.retain_labels[:, 1])
        fid = frechet_distance(self.reference, self.judges.features(r_images))
        return {"forget_acc": forget_acc, "retain_acc": float(ok.mean()), "fid": fid}


def make_mask(kind: str | None, pipe, forget, seed: int, keep: float):
    if kind is None:
        return None
    if kind == "random":
        return SaliencyMask.random(pipe.unet, keep=keep, seed=seed)
    return compute_mask(pipe, forget, keep, batch_size=MASK_BATCH_SIZE, seed=seed, lowest=(kind == "inverted"))


def run_method(pipe, base_state, forget, retain, method: str, mask_kind, args, seed: int, evaluate) -> list[dict]:
    """Train one method continuously, evaluating at every step count of `args.steps`."""
    pipe.unet.load_state_dict(base_state)
    objective, _ = METHODS[method]
    mask = make_mask(mask_kind, pipe, forget, seed, args.keep)
    frozen = copy.deepcopy(pipe.unet) if objective.startswith("esd") else None
    rows, seconds, done = [], 0.0, 0
    with tempfile.TemporaryDirectory() as ckpt:
        for steps in args.steps:
            config = TrainConfig(method=objective, steps=steps, lr=args.lr, batch_size=args.batch_size,
                                 alpha=0.0 if objective.startswith("esd") else args.alpha, seed=seed,
                                 esd_ddim_steps=args.esd_ddim_steps, checkpointing_steps=steps, checkpoints_total_limit=1)
            result = train_unet(pipe, forget, retain, config, mask=mask, frozen_unet=frozen,
                                checkpoint_dir=ckpt, resume="latest")
            seconds += result.seconds_per_step * (steps - done)
            done = steps
            rows.append({"method": method, "seed": seed, "steps": steps, "s_per_step": seconds / steps,
                         **evaluate(pipe)})
            print(json.dumps(rows[-1]), flush=True)
    pipe.unet.load_state_dict(base_state)
    return rows


# --------------------------------------------------------------------------------- side-by-side measures

def _fixed_batches(pipe, forget, retain, n_steps: int, batch_size: int) -> list:
    """n_steps (forget, retain) NoisedBatch pairs drawn once, so both step kinds see the same batches."""
    gen = torch.Generator().manual_seed(0)
    embed = PromptEmbeddings(pipe, pipe.device)
    f_cond, f_sur, r_cond = embed(forget.prompts), embed(forget.surrogates), embed(retain.prompts)
    T = pipe.scheduler.config.num_train_timesteps
    batches = []
    for _ in range(n_steps):
        fi = torch.randperm(len(forget.prompts), generator=gen)[:batch_size]
        ri = torch.randperm(len(retain.prompts), generator=gen)[:batch_size]
        fn, ft = sample_noise(forget.latents[fi], T, gen)
        rn, rt = sample_noise(retain.latents[ri], T, gen)
        batches.append((noise_batch(pipe.scheduler, forget.latents[fi], f_cond[fi], fn, ft, f_sur[fi]),
                        noise_batch(pipe.scheduler, retain.latents[ri], r_cond[ri], rn, rt)))
    return batches


def _salun_step(unet, mask):
    """One SalUn step function: surrogate target under no_grad + joint forward/backward + Adam step, on the
    mask's weights (`mask=None`: all weights, i.e. RL)."""
    unet.train()
    opt = build_optimizer(unet, mask, "adam", lr=1e-4)

    def step(fb, rb):
        loss, _, _ = salun_loss(unet, fb, rb, 0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _ft_step(unet):
    """One plain fine-tuning step function: the ordinary denoising loss on the same forget+retain items."""
    unet.train().requires_grad_(True)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)

    def step(fb, rb):
        out = unet(torch.cat([fb.noisy, rb.noisy]), torch.cat([fb.timesteps, rb.timesteps]),
                   **Conditioning.cat([fb.cond, rb.cond]).unet_kwargs()).sample
        torch.nn.functional.mse_loss(out, torch.cat([fb.target, rb.target])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _step_times(pipe, forget, retain, mask, n_steps: int, batch_size: int) -> dict:
    """Step time of SalUn, of RL (SalUn's objective without the mask) and of plain fine-tuning, each on its own
    copy of the UNet and the same batches, interleaved step by step in rotating order so that the machine's
    drift hits all three alike. Median over steps, the first two (warm-up) skipped."""
    batches = _fixed_batches(pipe, forget, retain, n_steps, batch_size)
    steps = {"salun": _salun_step(copy.deepcopy(pipe.unet), mask),
             "rl": _salun_step(copy.deepcopy(pipe.unet), None),
             "ft": _ft_step(copy.deepcopy(pipe.unet))}
    names, times = list(steps), {name: [] for name in steps}
    for i, (fb, rb) in enumerate(batches):
        for name in names[i % 3:] + names[:i % 3]:
            t0 = time.perf_counter()
            steps[name](fb, rb)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts[2:]) for name, ts in times.items()}
    return {"salun_step_s": med["salun"], "rl_step_s": med["rl"], "ft_step_s": med["ft"],
            "ratio": med["salun"] / med["ft"], "ratio_rl": med["salun"] / med["rl"]}


def _mask_vs_pass(pipe, forget) -> dict:
    """Mask computation (scores + global threshold) vs one forward+backward pass over the forget set."""
    batches = list(saliency_batches(pipe, forget, batch_size=MASK_BATCH_SIZE))
    unet = pipe.unet
    unet.requires_grad_(True)
    t0 = time.perf_counter()
    for b in batches:
        saliency_loss(unet, b).backward()
    t_pass = time.perf_counter() - t0
    unet.zero_grad(set_to_none=True)
    unet.requires_grad_(False)
    t0 = time.perf_counter()
    compute_mask(pipe, forget, batch_size=MASK_BATCH_SIZE)
    t_mask = time.perf_counter() - t0
    return {"pass_s": t_pass, "mask_s": t_mask, "ratio": t_mask / t_pass}


class RSSPeak:
    """Peak resident set size while the block runs, sampled every 2 ms from /proc/self/statm, minus the RSS
    at entry. (ru_maxrss is useless here: loading the model peaks higher than training MiniSD does.)"""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.start


def _memory_probe(method: str, data_path: str, batch_size: int, esd_ddim_steps: int, queue) -> None:
    """In a fresh process holding only MiniSD and the cached latents: peak-RSS growth over the method's mask
    computation (if any) plus 10 training steps."""
    from safetensors import safe_open

    from concept_erase.diffusion.erase import LatentSet

    pipe = load_pipeline("minisd")
    with safe_open(data_path, framework="pt") as f:
        meta = json.loads(f.metadata()["prompts"])
        forget = LatentSet(f.get_tensor("forget"), meta["forget"], meta["surrogates"])
        retain = LatentSet(f.get_tensor("retain"), meta["retain"])
    if method == PLAIN_FT:
        batches = _fixed_batches(pipe, forget, retain, 10, batch_size)
        with RSSPeak() as peak:
            step = _ft_step(pipe.unet)
            for fb, rb in batches:
                step(fb, rb)
        queue.put(peak.growth)
        return
    objective, mask_kind = METHODS[method]
    config = TrainConfig(method=objective, steps=10, lr=1e-4, batch_size=batch_size, esd_ddim_steps=esd_ddim_steps,
                         alpha=0.0 if objective.startswith("esd") else 0.5)
    import accelerate  # noqa: F401  (imported before measuring: module memory is not the method's)

    with RSSPeak() as peak:
        mask = make_mask(mask_kind, pipe, forget, 0, 0.5)
        train_unet(pipe, forget, retain, config, mask=mask)
    queue.put(peak.growth)


def memory_growth(method: str, forget, retain, batch_size: int, esd_ddim_steps: int) -> int:
    from safetensors.torch import save_file

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "latents.safetensors")
        meta = {"forget": forget.prompts, "surrogates": forget.surrogates, "retain": retain.prompts}
        save_file({"forget": forget.latents.contiguous(), "retain": retain.latents.contiguous()}, data_path,
                  metadata={"prompts": json.dumps(meta)})
        proc = ctx.Process(target=_memory_probe, args=(method, data_path, batch_size, esd_ddim_steps, queue))
        proc.start()
        value = queue.get()
        proc.join()
    return value


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default="minisd-digit-seven,minisd-style-bold",
                   help="comma-separated MiniSD concept presets (default: a digit and a style)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data, mask noise, training draws)")
    p.add_argument("--steps", default="25,50,100,200", help="step counts at which each run is evaluated")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate for every method (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=16, help="forget (and retain) batch (default 16)")
    p.add_argument("--alpha", type=float, default=0.5, help="retain weight of SalUn/RL (ESD: 0) (default 0.5)")
    p.add_argument("--esd-ddim-steps", type=int, default=25,
                   help="ESD: DDIM steps of the partial sampling that gives z_t (default 25, MiniSD's sampling steps)")
    p.add_argument("--keep", type=float, default=0.5, help="mask keep ratio (default 0.5)")
    p.add_argument("--num-forget", type=int, default=96, help="generated forget images (default 96)")
    p.add_argument("--num-retain", type=int, default=432, help="generated retain images (default 432)")
    p.add_argument("--eval-forget", type=int, default=30, help="judged forget-prompt images (default 30)")
    p.add_argument("--eval-retain-seeds", type=int, default=4, help="judged images per retain prompt (default 4)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method fresh-process memory probes")
    p.add_argument("--out", default="benchmarks/results/erasure_minisd.md", help="Markdown output file (replaced)")
    args = p.parse_args(argv)
    args.steps = sorted(int(s) for s in args.steps.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}")

    start = time.perf_counter()
    judges = load_judges()
    pipe = load_pipeline("minisd")
    base_state = copy.deepcopy(pipe.unet.state_dict())
    lines = ["# MiniSD erasure benchmark", "",
             f"Command: `python benchmarks/erasure_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"Settings: lr {args.lr}, batch {args.batch_size} forget + {args.batch_size} retain, alpha "
             f"{args.alpha} (ESD: 0), keep {args.keep}, {args.num_forget} forget / {args.num_retain} retain "
             f"images generated by MiniSD, seeds {seeds}; ESD: eta 1, {args.esd_ddim_steps} DDIM steps of partial "
             f"sampling, guidance 3. Evaluation: 25 DDIM steps, guidance 5; {args.eval_forget} forget-prompt images, "
             f"{args.eval_retain_seeds} seeds per retain prompt. Values: mean +- std over seeds. "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", ""]
    all_rows = []
    side = None
    for concept_name in args.concepts.split(","):
        concept = get_concept(concept_name)
        evaluate = Evaluator(pipe, concept, judges, args.eval_forget, args.eval_retain_seeds)
        base_eval = evaluate(pipe)
        rows = []
        for seed in seeds:
            forget, retain = make_latent_sets(pipe, concept, args.num_forget, args.num_retain, seed=seed)
            if side is None:
                first_data = (forget, retain)
                mask = compute_mask(pipe, forget, args.keep, batch_size=MASK_BATCH_SIZE)
                side = {"step": _step_times(pipe, forget, retain, mask, 30, args.batch_size),
                        "mask": _mask_vs_pass(pipe, forget)}
                print(json.dumps(side), flush=True)
            for method in methods:
                rows += run_method(pipe, base_state, forget, retain, method, METHODS[method][1], args, seed,
                                   evaluate)
        all_rows += [{**r, "concept": concept_name} for r in rows]
        lines += [f"## {concept_name}", "",
                  f"Original model: forget acc {100 * base_eval['forget_acc']:.1f}%, retain acc "
                  f"{100 * base_eval['retain_acc']:.1f}%, FID {base_eval['fid']:.1e} (against itself: numerically about 0). "
                  f"FID compares {len(evaluate.retain)} retain-prompt images per model on the judge's 128-d features; "
                  f"with fewer images than dimensions the covariances are rank-deficient, so compare FID only "
                  f"within this table, not with image FIDs elsewhere.", "",
                  "| method | steps | forget acc % (lower is better) | retain acc % | FID (judge features) | s/step |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for method in methods:
            for steps in args.steps:
                sel = [r for r in rows if r["method"] == method and r["steps"] == steps]
                ms = lambda k, scale=1.0: (f"{scale * statistics.mean(r[k] for r in sel):.1f} +- "  # noqa: E731
                                           f"{scale * (statistics.stdev(r[k] for r in sel) if len(sel) > 1 else 0):.1f}")
                lines.append(f"| {method} | {steps} | {ms('forget_acc', 100)} | {ms('retain_acc', 100)} | "
                             f"{ms('fid')} | {statistics.mean(r['s_per_step'] for r in sel):.3f} |")
        lines.append("")

    if not args.no_memory:
        lines += [f"## Peak memory (fresh process, mask + 10 steps, batch {args.batch_size}+{args.batch_size}, "
                  f"first concept's data; peak RSS during it minus RSS before, sampled every 2 ms)", "",
                  "| method | peak RSS growth (MiB) |", "| --- | --- |"]
        for method in [PLAIN_FT] + methods:
            lines.append(f"| {method} | {memory_growth(method, *first_data, args.batch_size, args.esd_ddim_steps) / 2**20:.1f} |")
        lines.append("")
    lines += ["## Side by side (same process, same batches; the three step kinds interleaved, 30 steps each, median)", "",
              "| measure | value |", "| --- | --- |",
              f"| SalUn step (s) | {side['step']['salun_step_s']:.4f} |",
              f"| RL step: SalUn's objective without the mask (s) | {side['step']['rl_step_s']:.4f} |",
              f"| plain fine-tuning step (s) | {side['step']['ft_step_s']:.4f} |",
              f"| SalUn / fine-tuning step time | {side['step']['ratio']:.2f} |",
              f"| SalUn / RL step time (the mask's own cost) | {side['step']['ratio_rl']:.2f} |",
              f"| one forward+backward pass over the forget set (s) | {side['mask']['pass_s']:.3f} |",
              f"| mask computation (scores + threshold) (s) | {side['mask']['mask_s']:.3f} |",
              f"| mask / one pass | {side['mask']['ratio']:.2f} |", "",
              f"Total benchmark wall time: {time.perf_counter() - start:.0f} s.", ""]
    out = Path(args.out)
    with atomic_file(out, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    with atomic_file(out.with_suffix(".jsonl"), overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in all_rows), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
