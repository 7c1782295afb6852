"""Transfer of an erasure made on a base to the "community checkpoints" made from it, on MiniSD: does the erasure
of a digit, exported from MiniSD and applied to a fine-tune or a merge, erase there as well as erasing that
checkpoint itself, and does it keep what the fine-tune added?

The two community checkpoints, made the way people make them:
- fine-tune: MiniSD's UNet trained further on a fourth style the base never saw, "italic" (each plain digit
  sheared by 0.3, the top leaning right), asked for with a new trigger word the tokenizer splits into
  letters ("a handwritten digit seven in italic"), plus the three styles it knows so they stay. The UNet
  only, MiniSD's own training loop (`minisd.train.train_unet`: AdamW, warm-up and cosine decay, EMA),
  `--finetune-steps` steps at `--finetune-lr`; the text encoder and VAE stay MiniSD's;
- merge: the weighted average of the fine-tune's and MiniSD's UNets (`--merge-weight` of the fine-tune), as
  A1111's checkpoint merger's "weighted sum" makes one.

For each erasure method (`--methods`, the recipe of `lora_minisd.py`), the erasure of the digit is made once
on MiniSD and applied to each checkpoint at strength 1 as:
- the delta (`concept-erase apply DELTA --base minisd`: its difference from the base, fp32);
- kohya LoRAs at `--ranks` (fp16, loaded with diffusers' `load_lora_weights` + `fuse_lora`);
- LyCORIS full (fp16, `concept-erase apply`'s code);
and compared with erasing that checkpoint itself with the same recipe (its own forget/retain images, its own
saliency mask).

Columns: moved = the median over the UNet's layers of ||checkpoint - MiniSD|| / ||MiniSD|| (what `apply` prints);
forget = images of the digit's prompts in the three known styles judged as the digit (MiniSD's digit judge);
forget italic = images of "<digit> in italic" judged as the digit; retain = the other digits in the known
styles judged as their digit and style (MiniSD's judges); italic kept = the other digits "in italic" judged as
their digit AND as italic; FID = the Frechet distance on the digit judge's 128-d features of the retain and
italic images against the same checkpoint's own images before erasure on the same seeds (only comparable
within a checkpoint). Below the table, each erasure's own size (the median relative difference of the UNet
layers it changed on MiniSD), to set beside how far the checkpoints moved. MiniSD's style judge knows three
styles, so the italic columns use two judges trained here (a minute) on the real digits in all four styles
(MiniSD's judges' network and training; their held-out accuracy is printed with the table).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/lora_transfer_minisd.py \
        --out benchmarks/results/lora_transfer_minisd.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from concept_erase.concepts import get_concept
from concept_erase.diffusion.data.generate import generate_images
from concept_erase.diffusion.minisd import DIGITS, PROMPT_PREFIX, STYLES, minisd_prompt
from concept_erase.diffusion.minisd.data import load_digit_images
from concept_erase.diffusion.minisd.experiment import SAMPLING, make_latent_sets
from concept_erase.diffusion.minisd.judge import JudgeNet, _accuracy, _train_one, load_judges
from concept_erase.diffusion.minisd.train import (MiniSDTrainConfig, encode_mean_latents, encode_prompts,
                                                  train_unet as train_minisd_unet)
from concept_erase.diffusion.models.apply import apply_erasure, read_erasure, relative_distance
from concept_erase.diffusion.models.delta import save_delta
from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.diffusion.models.lora import export_erasure
from evaluation.quality import frechet_distance, make_fid

from erasure_minisd import parse_concept, write_results  # noqa: E402  (benchmarks/ is the script's folder)
from lora_minisd import METHODS, add_recipe_flags, erase, with_lora  # noqa: E402

ITALIC = "italic"  # the fine-tune's style: index len(STYLES) for the judges trained here
SHEAR = 0.3        # the packaged digit judge still reads 90% of the real test digits sheared this much


# ---------------------------------------------------------------------------------------- the new style

def italic(images: torch.Tensor, shear: float = SHEAR) -> torch.Tensor:
    """Plain [N, 1, H, W] digits sheared horizontally (rows further from the centre shift further)."""
    theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]).expand(len(images), 2, 3)
    return F.grid_sample(images, F.affine_grid(theta, images.shape, align_corners=False), align_corners=False)


def italic_prompt(digit: int) -> str:
    return f"{PROMPT_PREFIX} {DIGITS[digit]} in {ITALIC}"


def four_styles(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real digits of `split` in MiniSD's three styles and in italic (style index 3): images, digits, styles."""
    data = load_digit_images(split)
    plain = data.styles == 0
    images = torch.cat([data.images, italic(data.images[plain])])
    digits = torch.cat([data.digits, data.digits[plain]])
    styles = torch.cat([data.styles, torch.full_like(data.digits[plain], len(STYLES))])
    return images, digits, styles


def italic_judges(seed: int, epochs: int = 6) -> tuple[JudgeNet, JudgeNet, dict]:
    """A digit judge and a four-style judge trained on the real digits in all four styles, as MiniSD's judges
    are on three (`minisd.judge.train_judges`), with their held-out accuracy on the italic digits."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    (x, d, s), (xt, dt, st) = four_styles("train"), four_styles("test")
    digit, style = JudgeNet(len(DIGITS)), JudgeNet(len(STYLES) + 1)
    _train_one(digit, x, d, epochs, gen, shift=True)
    _train_one(style, x, s, epochs, gen, shift=False)
    new = st == len(STYLES)
    info = {"digit": _accuracy(digit, xt[new], dt[new]), "style": _accuracy(style, xt[new], st[new]),
            "style_all": _accuracy(style, xt, st)}
    return digit, style, info


# ------------------------------------------------------------------------------- community checkpoints

def fine_tune(base, steps: int, lr: float, seed: int):
    """A copy of `base` whose UNet is trained further on the four styles (italic new), with MiniSD's loop."""
    pipe = copy.deepcopy(base)
    images, digits, styles = four_styles("train")
    latents = encode_mean_latents(pipe.vae, images) * pipe.vae.config.scaling_factor
    prompts = [minisd_prompt(d, s) for s in range(len(STYLES)) for d in range(len(DIGITS))]
    prompts += [italic_prompt(d) for d in range(len(DIGITS))] + [""]
    config = MiniSDTrainConfig(seed=seed, unet_steps=steps, unet_lr=lr, warmup_steps=max(1, steps // 10))
    ema = train_minisd_unet(pipe, latents, styles * len(DIGITS) + digits, encode_prompts(pipe, prompts), config,
                            torch.Generator().manual_seed(seed))
    pipe.unet.load_state_dict(ema)
    return pipe


def merge(a, b, weight: float):
    """A copy of `a` whose UNet is weight * a + (1 - weight) * b (A1111's "weighted sum")."""
    pipe = copy.deepcopy(a)
    other = b.unet.state_dict()
    pipe.unet.load_state_dict({k: torch.lerp(other[k], v, weight) for k, v in a.unet.state_dict().items()})
    return pipe


def moved(pipe, base, changed_only: bool = False) -> float:
    """Median over the UNet's layers (`changed_only`: those that differ) of the relative difference from `base`
    (`apply.relative_distance`, what `concept-erase apply` prints)."""
    return statistics.median(d for name, d in relative_distance(pipe, base).items()
                             if name.startswith("unet.") and (d > 0 or not changed_only))


# ---------------------------------------------------------------------------------------------- judging

class TransferEvaluator:
    """Fixed prompts x seeds, judged; FID against `reference`'s own images (the checkpoint before erasure)."""

    def __init__(self, reference, digit: int, judges, italic_digit: JudgeNet, italic_style: JudgeNet,
                 forget_seeds: int, retain_seeds: int):
        self.digit, self.judges, self.italic_digit, self.italic_style = digit, judges, italic_digit, italic_style
        others = [d for d in range(len(DIGITS)) if d != digit]
        self.cells = {  # name -> [(prompt, seed, digit, style)]
            "forget": [(minisd_prompt(digit, s), n, digit, s) for s in range(len(STYLES)) for n in range(forget_seeds)],
            "forget_italic": [(italic_prompt(digit), n, digit, len(STYLES)) for n in range(forget_seeds)],
            "retain": [(minisd_prompt(d, s), n, d, s) for d in others for s in range(len(STYLES))
                       for n in range(retain_seeds)],
            "italic": [(italic_prompt(d), n, d, len(STYLES)) for d in others for n in range(retain_seeds)],
        }
        self.fid = make_fid(feature_extractor=judges.fid_features())
        self.reference = self._images(reference)

    def _images(self, pipe) -> dict[str, list]:
        cells = [c for part in self.cells.values() for c in part]
        images = generate_images(pipe, [c[0] for c in cells], [c[1] for c in cells], batch_size=128, **SAMPLING)
        out, start = {}, 0
        for name, part in self.cells.items():
            out[name], start = images[start:start + len(part)], start + len(part)
        return out

    @torch.no_grad()
    def _italic(self, net: JudgeNet, images) -> np.ndarray:
        from concept_erase.diffusion.minisd.judge import to_tensor

        return net(to_tensor(images)).argmax(1).numpy()

    def __call__(self, pipe) -> dict:
        images = self._images(pipe)
        truth = {name: np.array([c[2:] for c in part]) for name, part in self.cells.items()}
        retain_ok = (self.judges.predict_digits(images["retain"]) == truth["retain"][:, 0]) & (
            self.judges.predict_styles(images["retain"]) == truth["retain"][:, 1])
        italic_ok = (self._italic(self.italic_digit, images["italic"]) == truth["italic"][:, 0]) & (
            self._italic(self.italic_style, images["italic"]) == len(STYLES))
        kept = images["retain"] + images["italic"]
        return {
            "forget_acc": float((self.judges.predict_digits(images["forget"]) == self.digit).mean()),
            "forget_italic": float((self._italic(self.italic_digit, images["forget_italic"]) == self.digit).mean()),
            "retain_acc": float(retain_ok.mean()), "italic_kept": float(italic_ok.mean()),
            "fid": frechet_distance(self.fid, self.reference["retain"] + self.reference["italic"], kept),
        }


# -------------------------------------------------------------------------------------------------- run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="SalUn,UCE", help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--ranks", default="4,64", help="LoRA ranks (default 4,64)")
    p.add_argument("--finetune-steps", type=int, default=300, help="the fine-tune's UNet steps (default 300)")
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="its peak learning rate (default 3e-4)")
    p.add_argument("--merge-weight", type=float, default=0.5, help="the fine-tune's share of the merge (default 0.5)")
    add_recipe_flags(p)
    p.add_argument("--forget-seeds", type=int, default=8, help="judged images per forget prompt (default 8)")
    p.add_argument("--retain-seeds", type=int, default=2, help="judged images per retain prompt (default 2)")
    p.add_argument("--out", default="benchmarks/results/lora_transfer_minisd.md", help="Markdown output (replaced)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]

    start = time.perf_counter()
    concept = get_concept(args.concept)
    kind, digit = parse_concept(concept.name)
    if kind != "digit":
        raise SystemExit(f"--concept must be a MiniSD digit preset, got {args.concept}")
    judges = load_judges()
    j_digit, j_style, judge_info = italic_judges(args.seed)
    print(json.dumps({"italic_judges": judge_info}), flush=True)
    base = load_pipeline("minisd")
    finetuned = fine_tune(base, args.finetune_steps, args.finetune_lr, args.seed)
    checkpoints = {"MiniSD": base, "fine-tune": finetuned, "merge": merge(finetuned, base, args.merge_weight)}
    evaluators = {name: TransferEvaluator(pipe, digit, judges, j_digit, j_style, args.forget_seeds, args.retain_seeds)
                  for name, pipe in checkpoints.items()}
    distance = {name: moved(pipe, base) for name, pipe in checkpoints.items()}
    latent_sets = {}  # each checkpoint's own forget/retain images, made once for every method
    rows = []

    def record(checkpoint: str, model, **row):
        rows.append({"checkpoint": checkpoint, **row, "moved": distance[checkpoint], **evaluators[checkpoint](model)})
        print(json.dumps(rows[-1]), flush=True)

    for name, pipe in checkpoints.items():
        record(name, pipe, method="none", erasure="none")
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            files = {}
            for name, pipe in checkpoints.items():  # each checkpoint erased itself, MiniSD's erasure kept
                erased = copy.deepcopy(pipe)
                if name not in latent_sets:
                    latent_sets[name] = make_latent_sets(pipe, concept, args.num_forget, args.num_retain, seed=args.seed)
                torch.manual_seed(args.seed)
                erase(erased, METHODS[method], *latent_sets[name], concept, args)
                record(name, erased, method=method, erasure="erased itself", erasure_moved=moved(erased, pipe, True))
                if name == "MiniSD":
                    files["delta"] = save_delta(base.unet, erased.unet, None, Path(tmp) / f"{method}-delta")
                    for r in ranks:
                        files[f"LoRA rank {r}"] = export_erasure(base, erased, Path(tmp) / f"{method}-r{r}.safetensors",
                                                                 rank=r, dtype="fp16").path
                    files["LyCORIS full"] = export_erasure(base, erased, Path(tmp) / f"{method}-full.safetensors",
                                                           to="lycoris-full", dtype="fp16").path
            for name, pipe in checkpoints.items():
                if name == "MiniSD":
                    continue
                for label, path in files.items():
                    if label.startswith("LoRA"):
                        model = with_lora(pipe, path)
                    else:  # the delta (its difference from --base) and LyCORIS full: `concept-erase apply`'s code
                        model = copy.deepcopy(pipe)
                        apply_erasure(model, read_erasure(path), 1.0, base_pipe=base)
                    record(name, model, method=method, erasure=f"MiniSD's, as {label}")
    command = f"python benchmarks/lora_transfer_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    write_results(args.out, tables(args, command.rstrip(), rows, judge_info, time.perf_counter() - start), rows)
    return 0


def tables(args, command: str, rows: list[dict], judge_info: dict, seconds: float) -> list[str]:
    pct = lambda v: f"{100 * v:.0f}"  # noqa: E731
    lines = ["# An erasure made on MiniSD, applied to a fine-tune and a merge of it", "", f"Command: `{command}`", "",
             f"Concept {args.concept}. Fine-tune: MiniSD's UNet, {args.finetune_steps} steps at peak lr "
             f"{args.finetune_lr:g} (batch 64, warm-up and cosine decay, EMA) on the real training digits in its "
             f"three styles plus italic (shear {SHEAR}, a new trigger word); merge: {args.merge_weight:g} x "
             f"fine-tune + {1 - args.merge_weight:g} x MiniSD. Erasures: {args.steps} steps, lr {args.lr:g}, batch "
             f"{args.batch_size} + {args.batch_size}, alpha {args.alpha:g} (ESD: 0, {args.esd_ddim_steps} DDIM "
             f"steps), UCE closed form; {args.num_forget} forget / {args.num_retain} retain images generated by the "
             f"checkpoint being erased; seed {args.seed}. Files from MiniSD's erasure: the delta applied against "
             f"--base MiniSD (fp32), kohya LoRAs at fp16 through diffusers' load_lora_weights + fuse_lora, LyCORIS "
             f"full at fp16 through `concept-erase apply`'s code, all at strength 1. Evaluation: 25 DDIM steps, "
             f"guidance 5, {args.forget_seeds} images per forget prompt, {args.retain_seeds} per retain prompt, the "
             f"same seeds for every model. Italic judges trained here: held-out italic digits {pct(judge_info['digit'])}% "
             f"judged as their digit, {pct(judge_info['style'])}% as italic (four-style judge: "
             f"{100 * judge_info['style_all']:.1f}% on all held-out images). One seed: a few images are noise "
             f"(one forget image is {100 / (len(STYLES) * args.forget_seeds):.0f} points, one italic one "
             f"{100 / args.forget_seeds:.0f}). torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
             f"{seconds / 60:.1f} min in all.", "",
             "| checkpoint | moved from MiniSD | method | erasure | forget % | forget italic % | retain % | "
             "italic kept % | FID |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {100 * r['moved']:.2f}% | {r['method']} | {r['erasure']} | "
                     f"{pct(r['forget_acc'])} | {pct(r['forget_italic'])} | {pct(r['retain_acc'])} | "
                     f"{pct(r['italic_kept'])} | {max(r['fid'], 0.0):.0f} |")
    sizes = [f"{r['method']} {100 * r['erasure_moved']:.2f}%" for r in rows
             if r["checkpoint"] == "MiniSD" and "erasure_moved" in r]
    lines += ["", "The erasures' own size on MiniSD, for comparison with how far the checkpoints moved (the median "
              "relative difference of the UNet layers each changed): " + ", ".join(sizes) + "."]
    return lines + [""]


if __name__ == "__main__":
    raise SystemExit(main())
