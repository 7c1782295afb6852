"""What the four attacks share: the learned result (`Learned`), token injection, the denoising objective
(optimised by `concept_erase.diffusion.conditioning.optimise_conditioning`, the one Adam loop in conditioning
space, which SalUn-Adv's inner attack uses too).

Every attack ends in UNet conditioning (`concept_erase.diffusion.models.families.Conditioning`) for each attacked
row (a prompt and its seed), reached in one of three ways, all stored in `Learned` so any of them can be
replayed on another model (a transfer attack):

- learned *token embeddings*: the prompt gets `k` placeholder words in front ("* * * a photo of ...") and
  `TokenPrefix` swaps the text encoder's input embeddings at those positions for the learned vectors
  (concept inversion; UnlearnDiffAtk soft) or for the vocabulary rows of chosen token ids (UnlearnDiffAtk
  discrete: exactly what typing those tokens gives). The text encoder itself runs as usual, through the
  model family's `encode`, so the same code serves every family whose text encoders are CLIP-like;
- an *offset* added to the encoder's output (Ring-A-Bell's concept vector);
- the *conditioning itself* (the conditioning-space upper bound: no tokenizer, no encoder).

The objective of the optimising attacks is the erased model's denoising error on images of the concept
(UnlearnDiffAtk, Zhang et al. ECCV 2024, eq. 3; textual inversion's loss in concept inversion, Pham et al.
ICLR 2024): noise and timestep of row r at step s come from a generator seeded with (seed, r, s), so a run
is deterministic and does not depend on how rows are batched.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from concept_erase.diffusion.conditioning import edited_token_embeddings, shifted
from concept_erase.diffusion.models.families import Conditioning, family_of
from concept_erase.errors import ConceptEraseError

from ..prompts import PromptRow

# The placeholder word standing for one learned token. Any word the tokenizer makes ONE token works; "*" is
# one in CLIP's vocabulary and in the byte-level tokenizers of MiniSD and the tiny test pipelines.
PLACEHOLDER = "*"
# Text encoders a pipeline may have, in the order the family concatenates them (SDXL has both).
LEARNED_FILE = "learned.safetensors"
ATTACK_FILE = "attack.json"


def text_encoders(pipe) -> dict[str, torch.nn.Module]:
    return family_of(pipe).text_modules(pipe)


def prefixed(prompt: str, k: int) -> str:
    """`prompt` with k placeholder words in front: what the text encoder reads for a token-prefix attack."""
    return " ".join([PLACEHOLDER] * k + [prompt]) if k else prompt


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
                           seed: int) -> Tensor:
    """The attacks' objective: the per-row denoising error MSE(eps_theta(z_t, c), eps), summed over rows (each
    row's parameters get the gradient of its own error only). Noise and t of row r at `step` come from a
    generator seeded with (seed, r, step): independent of batching."""
    from concept_erase.diffusion.losses import noise_batch, sample_noise, training_scheduler

    scheduler = training_scheduler(pipe.scheduler)
    T = scheduler.config.num_train_timesteps
    noises, ts = [], []
    for r in rows:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + r) * 10_007 + step)
        n, t = sample_noise(latents[:1], T, gen)
        noises.append(n)
        ts.append(t)
    device = pipe.unet.device
    batch = noise_batch(scheduler, latents.to(device), cond.hidden, torch.cat(noises).to(device),
                        torch.cat(ts).to(device))
    pred = pipe.unet(batch.noisy, batch.timesteps, **cond.unet_kwargs(batch.noisy.dtype)).sample
    per_row = F.mse_loss(pred.float(), batch.target.float(), reduction="none").flatten(1).mean(1)
    return per_row.sum()


# ------------------------------------------------------------------------------------------ the result


@dataclass
class Learned:
    """What an attack learned, enough to rebuild its adversarial conditioning on any model of the same
    family (`conditioning_for`). Saved as attack.json + learned.safetensors (`save` / `load`)."""

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

    def save(self, folder: str | Path) -> Path:
        """attack.json (settings, rows, texts, history) and learned.safetensors (the tensors) in `folder`."""
        from safetensors.torch import save_file

        from concept_erase.io_utils import atomic_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"prefix.{k}": v for k, v in self.prefix.items()}
        tensors |= {f"offset.{k}": v for k, v in self.offset.items()}
        if self.prefix_ids is not None:
            tensors["prefix_ids"] = self.prefix_ids
        if self.conditioning is not None:
            tensors["conditioning.hidden"] = self.conditioning.hidden
            tensors |= {f"conditioning.added.{k}": v for k, v in self.conditioning.added.items()}
        tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
                   for k, v in tensors.items()}
        with atomic_file(folder / LEARNED_FILE, overwrite=True) as tmp:
            save_file(tensors, str(tmp), metadata={"attack": self.attack})
        meta = {"attack": self.attack, "budget": self.budget, "rows": [r.to_dict() for r in self.rows],
                "texts": self.texts, "decoded": self.decoded, "history": self.history,
                "seconds": round(self.seconds, 3), "placeholder": PLACEHOLDER}
        with atomic_file(folder / ATTACK_FILE, overwrite=True) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Learned":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / ATTACK_FILE).is_file() or not (folder / LEARNED_FILE).is_file():
            raise ConceptEraseError(f"{str(folder)!r} holds no saved attack ({ATTACK_FILE} + {LEARNED_FILE})")
        meta = json.loads((folder / ATTACK_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / LEARNED_FILE))
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        conditioning = None
        if "conditioning.hidden" in tensors:
            conditioning = Conditioning(tensors["conditioning.hidden"], part("conditioning.added."))
        rows = [PromptRow(**{**r, "categories": tuple(r.get("categories") or ())}) for r in meta["rows"]]
        return cls(meta["attack"], meta["budget"], rows, meta["texts"], part("prefix."),
                   tensors.get("prefix_ids"), part("offset."), conditioning, meta.get("decoded"),
                   meta.get("history", []), meta.get("seconds", 0.0))


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

