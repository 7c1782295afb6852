"""What the four attacks share: the learned result (`Learned`), token injection, the denoising objective
(optimised by `concept_erase.diffusion.conditioning.optimise_conditioning`, the one Adam loop in conditioning
space, which SalUn-Adv's inner attack uses too).

Every attack ends in UNet conditioning (`concept_erase.diffusion.models.family.Conditioning`) for each attacked
row (a prompt and its seed), reached in one of three ways, all stored in `Learned` so any of them can be
replayed on another model (a transfer attack):

- learned *token embeddings*: the prompt gets `k` placeholder words in front ("* * * a photo of ...") and
  `TokenPrefix` swaps the text encoder's input embeddings at those positions for the learned vectors
  (concept inversion; UnlearnDiffAtk soft) or for the vocabulary rows of chosen token ids (UnlearnDiffAtk
  discrete: exactly what typing those tokens gives). The text encoder itself runs as usual, through the
  model family's `encode`, so the same code serves every family whose text encoders are CLIP-like;
- an *offset* added to the encoder's output (Ring-A-Bell's concept vector);
- the *conditioning itself* (the conditioning-space upper bound: no tokenizer, no encoder; the text-free
  attack: the empty prompt's, with each row's initial noise found by inversion, `latents`).

The relearning attack changes the model instead: its `weights` (the fine-tuned UNet's state) are swapped in
while its rows are drawn (`weights_applied`); they are kept in memory only, so it is re-run, not replayed.

The objective of the optimising attacks is the erased model's denoising error on images of the concept
(UnlearnDiffAtk, Zhang et al. ECCV 2024, eq. 3; textual inversion's loss in concept inversion, Pham et al.
ICLR 2024): noise and timestep of row r at step s come from a generator seeded with (seed, r, s), so a run
is deterministic and does not depend on how rows are batched.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from concept_erase.diffusion.conditioning import edited_token_embeddings, shifted
from concept_erase.diffusion.models.family import Conditioning
from concept_erase.diffusion.models.families import family_of
from concept_erase.errors import ConceptEraseError

from ..prompts import PromptRow
from .structure import ATTACK_FILE, LEARNED_FILE, PLACEHOLDER, prefixed

def text_encoders(pipe) -> dict[str, torch.nn.Module]:
    return family_of(pipe).text_modules(pipe)


def check_prefix_fits(pipe, prompts: Sequence[str], k: int) -> None:
    """k placeholders must each be one token right after BOS, and prefix + prompt must fit the encoder's
    window (77 tokens on SD, 16 on MiniSD), else the prompt's end would be cut silently."""
    tok = pipe.tokenizer
    ph = tok(PLACEHOLDER, add_special_tokens=False).input_ids
    if len(ph) != 1:
        raise ConceptEraseError(f"placeholder {PLACEHOLDER!r} is {len(ph)} tokens for this tokenizer (needs 1)")
    for p in prompts:
        n = len(tok(prefixed(p, k), truncation=False).input_ids)
        if n > tok.model_max_length:
            raise ConceptEraseError(f"{k} attack tokens + prompt {p!r} make {n} tokens, more than the text encoder's "
                                    f"{tok.model_max_length}: use fewer tokens or a shorter prompt")


def TokenPrefix(pipe, vectors: dict[str, Tensor]):
    """A context in which each text encoder's input embeddings at positions 1..k (the k placeholders after BOS)
    are replaced by `vectors[encoder]` ((B or 1, k, D) for a batch of B prompts). Gradients flow into the
    vectors; the encoders' weights are untouched. Refuses a batch whose positions 1..k are not placeholders."""
    edits = {}
    for name, encoder in text_encoders(pipe).items():
        if name not in vectors:
            continue
        v = vectors[name]
        k = v.shape[1]
        tokenizer = family_of(pipe).tokenizer_of(pipe, name)  # SDXL: each encoder reads its own tokenizer's ids
        placeholder = tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids[0]

        def edit(ids, embeddings, v=v, k=k, placeholder=placeholder):
            if not bool((ids[:, 1:1 + k] == placeholder).all()):
                raise ConceptEraseError("attack tokens must be the first words of the prompt (placeholders missing)")
            out = embeddings.clone()
            out[:, 1:1 + k] = v.to(out.dtype).expand(out.shape[0], -1, -1)
            return out

        edits[encoder] = edit
    return edited_token_embeddings(edits)


def encode(pipe, prompts: Sequence[str], vectors: dict[str, Tensor] | None = None) -> Conditioning:
    """The family's conditioning of `prompts` (fp32, on the UNet's device), with `vectors` injected at the
    placeholder prefix when given (the prompts must then start with that many placeholders)."""
    device = pipe.unet.device
    family = family_of(pipe)
    if not vectors:
        return family.encode(pipe, list(prompts), device)
    with TokenPrefix(pipe, {k: v.to(device) for k, v in vectors.items()}):
        return family.encode(pipe, list(prompts), device)


def vocabulary(pipe) -> dict[str, Tensor]:
    """Each text encoder's input-embedding matrix (V, D): what a discrete token can be."""
    return {name: enc.get_input_embeddings().weight for name, enc in text_encoders(pipe).items()}


def special_ids(pipe) -> list[int]:
    tok = pipe.tokenizer
    return sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None})


def attack_denoising_error(pipe, latents: Tensor, cond: Conditioning, rows: Sequence[int], step: int,
                           seed: int, draws: int = 1) -> Tensor:
    """The attacks' objective: the per-row denoising error MSE(eps_theta(z_t, c), eps), summed over rows (each
    row's parameters get the gradient of its own error only). Noise and t of row r at `step` come from a
    generator seeded with (seed, r, step): independent of batching. `draws` > 1: that many (noise, t) pairs
    per row, t stratified (one in each of `draws` equal parts of [0, T)), their errors averaged: the same
    expectation with a far less noisy gradient, which is what lets a per-prompt attack converge in few steps."""
    from concept_erase.diffusion.losses import noise_batch, sample_noise, training_scheduler

    scheduler = training_scheduler(pipe.scheduler)
    T = scheduler.config.num_train_timesteps
    noises, ts = [], []
    for r in rows:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + r) * 10_007 + step)
        if draws == 1:
            n, t = sample_noise(latents[:1], T, gen)
        else:
            n = torch.randn((draws, *latents.shape[1:]), generator=gen)
            t = ((torch.arange(draws) + torch.rand(draws, generator=gen)) * T / draws).long().clamp(max=T - 1)
        noises.append(n)
        ts.append(t)
    device = pipe.unet.device
    each = torch.arange(len(rows)).repeat_interleave(draws)  # row i's draws side by side
    cond = cond[each.to(cond.hidden.device)] if draws > 1 else cond
    batch = noise_batch(scheduler, latents[each].to(device), cond.hidden, torch.cat(noises).to(device, latents.dtype),
                        torch.cat(ts).to(device))
    pred = pipe.unet(batch.noisy, batch.timesteps, **cond.unet_kwargs(batch.noisy.dtype)).sample
    per_draw = F.mse_loss(pred.float(), batch.target.float(), reduction="none").flatten(1).mean(1)
    return per_draw.view(len(rows), draws).mean(1).sum()


# ------------------------------------------------------------------------------------------ the result


@dataclass
class Learned:
    """What an attack learned, enough to rebuild its adversarial conditioning on any model of the same
    structure (`conditioning_for`); the discrete UnlearnDiffAtk's result is also a text prompt, which any model
    can read (`as_text`). Saved as attack.json + learned.safetensors (`save`; `replay.read_saved_attack` reads
    it back, checked whole)."""

    attack: str
    budget: dict                        # the attack's settings, printed in every report
    rows: list[PromptRow]               # the attacked prompts and their seeds
    texts: list[str]                    # per row: what the text encoder reads ("*" = an injected token)
    prefix: dict[str, Tensor] = field(default_factory=dict)   # encoder -> (R or 1, k, D) learned vectors
    prefix_ids: Tensor | None = None    # (R, k) vocabulary ids (discrete attack): their rows are injected
    offset: dict[str, Tensor] = field(default_factory=dict)   # added to the conditioning: "hidden" -> (L, D)
    conditioning: Conditioning | None = None  # per row, the whole conditioning (replaces the encoder)
    decoded: list[str] | None = None    # discrete attack: the adversarial prompt as text
    history: list[float] = field(default_factory=list)  # mean objective per step
    seconds: float = 0.0
    structure: dict | None = None       # `structure_of` the attacked model
    model: str | None = None            # the attacked model, as the attack job was given it
    latents: Tensor | None = None       # per row, the initial noise z_T to draw from (text-free attack)
    weights: dict[str, Tensor] | None = None  # the relearned UNet's state (relearning; in memory, never saved)

    def conditioning_for(self, pipe, batch_size: int = 16) -> Conditioning:
        """The adversarial conditioning of every row on `pipe` (the attacked model, or another one: replay)."""
        if self.conditioning is not None:
            return self.conditioning.to(pipe.unet.device)
        out = []
        for lo in range(0, len(self.rows), batch_size):
            sl = slice(lo, lo + batch_size)
            vectors = self._vectors(pipe, sl)
            with torch.no_grad():
                cond = encode(pipe, self.texts[sl], vectors)
            if self.offset:
                cond = shifted(cond, self.offset)
            out.append(cond)
        return Conditioning.cat(out)

    def _vectors(self, pipe, sl: slice) -> dict[str, Tensor] | None:
        if self.prefix_ids is not None:
            return {name: w[self.prefix_ids[sl].to(w.device)].detach() for name, w in vocabulary(pipe).items()}
        if self.prefix:
            return {name: (v if v.shape[0] == 1 else v[sl]) for name, v in self.prefix.items()}
        return None

    def as_text(self) -> "Learned":
        """The discrete attack as the prompts it decodes to, for a model of another structure: what a user
        would type there (the learned ids belong to the attacked model's tokenizer)."""
        if self.decoded is None:
            raise ConceptEraseError(f"the {self.attack} attack learned no text prompt")
        return Learned(self.attack, self.budget, self.rows, list(self.decoded), decoded=list(self.decoded),
                       history=self.history, seconds=self.seconds, structure=self.structure, model=self.model)

    @property
    def replayable(self) -> bool:
        """Saved and replayed with --replay: every attack but relearning, whose result is a whole fine-tuned UNet."""
        return self.weights is None

    @contextmanager
    def weights_applied(self, pipe):
        """`pipe` with this attack's relearned UNet weights while the block runs (no change without weights);
        the attacked model's own weights are put back afterwards."""
        if self.weights is None:
            yield pipe
            return
        own = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
        pipe.unet.load_state_dict(self.weights)
        try:
            yield pipe
        finally:
            pipe.unet.load_state_dict(own)

    def tensors(self) -> dict[str, Tensor]:
        """Every learned tensor by its name in learned.safetensors."""
        tensors = {f"prefix.{k}": v for k, v in self.prefix.items()}
        if self.latents is not None:
            tensors["latents"] = self.latents
        tensors |= {f"offset.{k}": v for k, v in self.offset.items()}
        if self.prefix_ids is not None:
            tensors["prefix_ids"] = self.prefix_ids
        if self.conditioning is not None:
            tensors["conditioning.hidden"] = self.conditioning.hidden
            tensors |= {f"conditioning.added.{k}": v for k, v in self.conditioning.added.items()}
        return tensors

    def check_finite(self) -> None:
        """No number a measurement did not produce: a non-finite objective or learned tensor (an optimisation
        that blew up) stops the job with one line naming the attack and the step, before anything is drawn."""
        steps = len(self.history)
        bad = next((i for i, h in enumerate(self.history) if not math.isfinite(h)), None)
        if bad is not None:
            raise ConceptEraseError(f"{self.attack} attack: its objective is {self.history[bad]} at step {bad + 1} "
                                    f"of {steps} (the optimisation blew up; lower its lr); nothing is reported")
        when = f" after step {steps}" if steps else ""
        for name, tensor in self.tensors().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ConceptEraseError(f"{self.attack} attack: its learned {name} is not finite{when} (its budget "
                                        f"overflows it: {budget_line(self.attack, self.budget)}); nothing is reported")

    def save(self, folder: str | Path) -> Path:
        """attack.json (settings, rows, texts, history, the structure and shapes) and learned.safetensors (the
        tensors) in `folder`."""
        from safetensors.torch import save_file

        from concept_erase.io_utils import atomic_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
                   for k, v in self.tensors().items()}
        with atomic_file(folder / LEARNED_FILE, overwrite=True) as tmp:
            save_file(tensors, str(tmp), metadata={"attack": self.attack})
        meta = {"attack": self.attack, "budget": self.budget, "rows": [r.to_dict() for r in self.rows],
                "texts": self.texts, "decoded": self.decoded, "history": self.history,
                "seconds": round(self.seconds, 3), "placeholder": PLACEHOLDER, "model": self.model,
                "structure": self.structure, "tensors": {k: list(v.shape) for k, v in tensors.items()}}
        with atomic_file(folder / ATTACK_FILE, overwrite=True) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return folder


def budget_line(name: str, budget) -> str:
    """'unlearndiffatk budget: steps=40 lr=0.01 tokens=5 ...' (printed before an attack runs)."""
    values = asdict(budget) if not isinstance(budget, dict) else budget
    return f"{name} budget: " + " ".join(f"{k}={v}" for k, v in values.items())


@dataclass
class Targets:
    """Images of the concept, as latents of the attacked model's VAE.

    `rows`: per attacked row, the image the ORIGINAL model draws for that prompt and seed (UnlearnDiffAtk's
    target: the attack asks the erased model to denoise it as the original would). `images` + `captions`:
    a training set of concept images (concept inversion): the same images, or the user's own."""

    rows: Tensor | None = None
    images: Tensor | None = None
    captions: list[str] | None = None


@contextmanager
def frozen(pipe):
    """No weight of `pipe` takes a gradient while an attack runs (only the attack's own tensors do); the
    requires_grad flags are restored afterwards."""
    modules = [m for m in (pipe.unet, *text_encoders(pipe).values()) if m is not None]
    saved = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, flags in zip(modules, saved):
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)

