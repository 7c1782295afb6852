"""Every erasure method as the parser and the run config see it, with no torch: its options dataclass (the flags
only it reads), the run-config fields it reads, its defaults, its one-line help (docs/ALGORITHMS.md 2).

`erase`, `mask` and `plan` build their flags from these and refuse a bad flag before `import torch` (seconds)
is paid (docs/ARCHITECTURE.md). Each method has one `MethodSpec` subclass here, in a section citing its paper;
the class that runs it (`<method>.py`, beside its tensors) subclasses its spec, so each fact has one home. The
registry (`methods/__init__.py`) maps a name to its spec and imports the running class only in `get_method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConceptEraseError
from .spec import (FORGET_IMAGE_FIELDS, LOOP_FIELDS, RETAIN_DATA, RETAIN_FIELDS, SALIENCY_FIELDS, SAMPLING_FIELDS,
                   MethodSpec, unused_outputs, option_names)

# ----------------------------------------------------------------------------------------------------------
# SalUn (Fan et al., ICLR 2024, arXiv 2310.12508) and RL, its objective without the mask
# ----------------------------------------------------------------------------------------------------------

class SalUnSpec(MethodSpec):
    name = "salun"
    help = ("SalUn (arXiv 2310.12508): the forget prompt's prediction steered to the surrogate's (stop-gradient), "
            "plus alpha x the retain denoising loss, on the saliency mask's weights")
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS | SALIENCY_FIELDS
    default_alpha = 0.5  # the reference README's class command (docs/ALGORITHMS.md 2); a preset may set its own
    computes_mask = True
    transformer_form = True  # the same objective in velocity space (rectified flow: losses.RectifiedFlow)


class RLSpec(SalUnSpec):
    name = "rl"
    help = "SalUn's objective on every weight (no mask): measures what the mask buys"
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS
    computes_mask = False


# ----------------------------------------------------------------------------------------------------------
# SalUn-Adv: SalUn with an AdvUnlearn-style inner attack (Zhang et al., NeurIPS 2024)
# ----------------------------------------------------------------------------------------------------------

# The module that trains (`training/trained.py`): the denoiser, or the text encoder (AdvUnlearn).
TRAINED = ("unet", "text-encoder")
# What SalUn-Adv's inner attack attacks: the conditioning (AdvUnlearn), or the weights by relearning (a
# first-order simulated fine-tuning, in the spirit of meta-unlearning: Gao et al., "Meta-Unlearning on Diffusion
# Models: Preventing Relearning Unlearned Concepts", arXiv 2410.12777, ICCV 2025; docs/ALGORITHMS.md 4).
ADV_ATTACKS = ("conditioning", "relearn")
# --adv-lr when not given, per attack: the conditioning delta's Adam rate; for relearn the simulated fine-tuning's
# Adam rate, the relearning attack's own (evaluation/attacks/budgets.py). Four times it (5 steps about as far as
# the attack's 20) wrecked MiniSD: the first-order gradient at weights that far away kept "seven" and lost the
# other digits (benchmarks/results/salun_adv_relearn_minisd.md)
ADV_LR = {"conditioning": 0.02, "relearn": 1e-4}


@dataclass
class AdversarialOptions:
    adversarial: bool = field(default=False, metadata={
        "help": "SalUn-Adv: every --adv-every steps an inner attack finds adversarial conditionings for half the "
                "forget items against the current model, and the step remaps them to the surrogate as well "
                "(AdvUnlearn-style; --method salun only; --adv-attack relearn attacks the weights instead)"})
    adv_attack: str = field(default="conditioning", metadata={
        "help": "adversarial: the inner attack: conditioning (perturbed conditionings, AdvUnlearn) or relearn "
                "(--adv-steps simulated fine-tuning steps of the UNet on the forget images; SalUn's forget loss at "
                "the fine-tuned weights adds its gradient to the step, first-order meta-unlearning)",
        "choices": ADV_ATTACKS})
    adv_every: int = field(default=1, metadata={
        "help": "adversarial: run the inner attack every this many steps", "min": 1})
    adv_steps: int = field(default=5, metadata={
        "help": "adversarial: inner attack steps (Adam on the conditioning, or on the UNet's weights for relearn)",
        "min": 1})
    adv_lr: float | None = field(default=None, metadata={
        "help": "adversarial: the inner attack's learning rate (default: "
                + ", ".join(f"{lr:g} for {attack}" for attack, lr in ADV_LR.items()) + ")", "above": 0})
    adv_weight: float = field(default=1.0, metadata={
        "help": "adversarial relearn: the weight of SalUn's forget loss at the simulated fine-tuned weights", "min": 0})
    train: str = field(default="unet", metadata={
        "help": "the module that trains: unet, or text-encoder (AdvUnlearn's plug-in robust text encoder, UNet "
                "frozen; salun only; the saliency mask is over the encoder's weights; the inner attack of "
                "--adversarial perturbs the input token embeddings)", "choices": TRAINED})


class SalUnAdvSpec(SalUnSpec):
    name = "salun-adv"
    help = ("SalUn-Adv (SalUn + AdvUnlearn-style adversarial training): every --adv-every steps, --adv-steps inner "
            "attack steps find adversarial conditionings for half the forget items against the current model; the "
            "SalUn step remaps them to the surrogate with the plain prompts, on the saliency mask's weights "
            "(--adv-attack relearn: SalUn's forget loss after simulated fine-tuning instead)")
    fields = SalUnSpec.fields | option_names(AdversarialOptions)

    @classmethod
    def check_fields(cls, given, flag, all_fields):
        super().check_fields(given, flag, all_fields)
        relearn = given.get("adv_attack") == "relearn"
        if "adv_weight" in given and not relearn:
            raise ConceptEraseError(f"{flag('adv_weight')} is for --adv-attack relearn, not "
                                    f"{given.get('adv_attack', 'conditioning')}")
        if relearn and given.get("train", "unet") != "unet":
            raise ConceptEraseError(f"--adv-attack relearn fine-tunes the UNet: it does not run with "
                                    f"{flag('train')} {given['train']}")

    def inner_lr(self) -> float:
        """The inner attack's learning rate: --adv-lr, or its attack's default."""
        c = self.config
        return c.adv_lr if c.adv_lr is not None else ADV_LR[c.adv_attack]


# --adversarial turns a method into its adversarial variant (the run config rewrites the method name).
ADVERSARIAL_VARIANTS = {"salun": SalUnAdvSpec.name}


# ----------------------------------------------------------------------------------------------------------
# ESD (Gandikota et al., ICCV 2023): ESD-x on cross-attention, ESD-u on the rest
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ESDOptions:
    esd_eta: float = field(default=1.0, metadata={"help": "ESD negative guidance eta", "min": 0})
    esd_ddim_steps: int = field(default=50, metadata={
        "help": "ESD: steps of the partial sampling that gives z_t (DDIM; SD 3, FLUX: Euler)", "min": 1})
    esd_start_guidance: float = field(default=3.0, metadata={
        "help": "ESD: guidance scale of that partial sampling", "min": 0})


class ESDSpec(MethodSpec):
    # retain images (alpha > 0) are generated like any method's, so the sampling fields apply to them
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | option_names(ESDOptions) | {"mask"}
    needs_surrogate = False
    samples_latents = True
    frozen_copy = True
    transformer_form = True  # the target in velocity, the text-side scope (docs/ALGORITHMS.md 5)

    def forget_image_prompts(self, concept):
        return []  # no forget images: the forget "data" are its prompts


class ESDXSpec(ESDSpec):
    name = "esd-x"
    help = "ESD-x: ESD's negative-guidance target on the cross-attention weights only"


class ESDUSpec(ESDSpec):
    name = "esd-u"
    help = "ESD-u: ESD's negative-guidance target on every weight except cross-attention"


# ----------------------------------------------------------------------------------------------------------
# Concept Ablation, model-based (Kumari et al., ICCV 2023)
# ----------------------------------------------------------------------------------------------------------

CA_PARAMS = ("kv", "unet")


@dataclass
class CAOptions:
    ca_params: str = field(default="kv", metadata={
        "help": "CA: which weights train: kv (cross-attention K/V; SD 3, FLUX: text-side) or unet (all)",
        "choices": CA_PARAMS})


class CASpec(MethodSpec):
    name = "ca"
    help = ("Concept Ablation (Kumari et al. 2023), model-based: on images of the anchor (surrogate), the forget "
            "prompt's prediction matched to the anchor's (stop-gradient); cross-attention K/V or the whole UNet")
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | option_names(CAOptions) | {"mask", "num_forget_images"}
    transformer_form = True  # the anchors' velocity target, the text-side scope (docs/ALGORITHMS.md 5)

    def forget_image_prompts(self, concept):
        return list(dict.fromkeys(concept.surrogate_for(p) for p in concept.forget_prompts))  # the anchors


# ----------------------------------------------------------------------------------------------------------
# UCE, Unified Concept Editing (Gandikota et al., WACV 2024): a closed form
# ----------------------------------------------------------------------------------------------------------

UCE_TOKENS = ("last-to-end", "all")


@dataclass
class UCEOptions:
    uce_erase_scale: float = field(default=1.0, metadata={"help": "UCE: erase scale s_e", "min": 0})
    uce_preserve_scale: float | None = field(default=None, metadata={
        "help": "UCE: preserve scale s_p (default: max(0.1, 1 / number of retain prompts))", "min": 0})
    uce_lambda: float = field(default=0.1, metadata={
        "help": "UCE: ridge lambda that keeps the inverse stable (the edit stays near the original weights)",
        "min": 0})
    uce_tokens: str = field(default="last-to-end", metadata={
        "help": "UCE: the token embeddings edited: last-to-end (the official code: each prompt's last word "
                "token to the end of the padded sequence) or all (every position)", "choices": UCE_TOKENS})


class UCESpec(MethodSpec):
    name = "uce"
    help = ("UCE (Gandikota et al. 2024): closed-form edit of the cross-attention K/V projections mapping each "
            "forget prompt to its surrogate while keeping the retain prompts; seconds, no images")
    fields = option_names(UCEOptions) | {"retain_prompts"}
    closed_form = True
    transformer_form = True  # context_embedder and the text stream's K/V (`uce.transformer_uce_edit`)


# ----------------------------------------------------------------------------------------------------------
# RECE, Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE iterated
# ----------------------------------------------------------------------------------------------------------

@dataclass
class RECEOptions:
    rece_rounds: int = field(default=3, metadata={
        "help": "RECE: rounds of deriving the embedding that regenerates the concept and erasing it", "min": 1})
    rece_regulariser: float = field(default=1e-3, metadata={
        "help": "RECE: weight rho of the regulariser that keeps derived embeddings off the preserved prompts",
        "min": 0})


class RECESpec(UCESpec):
    name = "rece"
    help = ("RECE (Gong et al. 2024): UCE, then rounds of deriving in closed form the embedding that still "
            "regenerates the concept in the edited model and erasing it too; seconds, no images")
    fields = UCESpec.fields | option_names(RECEOptions)
    transformer_form = False  # its derived embeddings are a UNet's cross-attention inputs


# ----------------------------------------------------------------------------------------------------------
# MACE, Mass Concept Erasure (Lu et al., CVPR 2024)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class MACEOptions:
    mace_rank: int = field(default=1, metadata={"help": "MACE: rank of each concept's LoRA on the cross-attention "
                                                        "K/V (the paper: 1)", "min": 1})
    mace_lambda: float = field(default=1e3, metadata={
        "help": "MACE: ridge lambda of the closed-form refinement and fusion (the weights stay near the original "
                "in directions no prompt touches; the paper's object setting: 1000)", "above": 0})
    mace_preserve_scale: float = field(default=0.0, metadata={
        "help": "MACE: weight s_p of the retain prompts kept by the refinement and the fusion (the paper's "
                "object setting: 0)", "min": 0})


class MACESpec(MethodSpec):
    name = "mace"
    help = ("MACE (Lu et al. 2024): closed-form refinement of the cross-attention K/V, a LoRA per concept "
            "lowering its tokens' attention in its region, and their closed-form fusion")
    fields = (frozenset({"steps", "batch_size", "lr", "seed", "resolution", "cache_dir", "retain_prompts"})
              | SAMPLING_FIELDS | FORGET_IMAGE_FIELDS | option_names(MACEOptions))
    closed_form = True  # no project loop (nothing to resume or checkpoint): the edit trains its LoRAs itself

    @classmethod
    def generates_images(cls, alpha):
        return True  # the LoRAs train on the base model's images of the concept


# ----------------------------------------------------------------------------------------------------------
# SAFREE (Yoon et al., ICLR 2025): training-free, at inference
# ----------------------------------------------------------------------------------------------------------

# The paper's sampling steps, which gamma counts; the filter's own copy is `models/safree.REFERENCE_STEPS`
# (below this layer, and beside torch), and tests/test_methods.py holds the two equal.
SAFREE_REFERENCE_STEPS = 50


@dataclass
class SAFREEOptions:
    safree_alpha: float = field(default=0.01, metadata={
        "help": "SAFREE: a token is a trigger when masking it moves the prompt (1 + alpha) x farther from the "
                "concept subspace than masking the others does on average", "min": 0})
    safree_gamma: int = field(default=10, metadata={
        "help": "SAFREE: the most denoising steps (of 50, as a fraction of the trajectory) that use the "
                "filtered embedding (self-validating filtering)", "min": 0, "max": SAFREE_REFERENCE_STEPS})


class SAFREESpec(MethodSpec):
    name = "safree"
    help = ("SAFREE (Yoon et al. 2025), training-free: projects the prompt's trigger tokens off the concept's "
            "subspace in the first denoising steps; writes the base model plus safree.json (weights unchanged)")
    fields = option_names(SAFREEOptions) | {"retain_prompts"}
    closed_form = True

    @classmethod
    def check_fields(cls, given, flag, all_fields):
        super().check_fields(given, flag, all_fields)
        unused_outputs(cls, given, flag, ("export_single_file", "save_delta"),
                        "it changes no weight (the erased model is the output folder with its safree.json)")


# ----------------------------------------------------------------------------------------------------------
# Forget-Me-Not (Zhang et al. 2023): attention re-steering
# ----------------------------------------------------------------------------------------------------------

FMN_PARAMS = ("unet", "cross-attention")


@dataclass
class FMNOptions:
    fmn_params: str = field(default="unet", metadata={
        "help": "FMN: which weights train: unet (all) or cross-attention", "choices": FMN_PARAMS})


class FMNSpec(MethodSpec):
    name = "fmn"
    help = ("Forget-Me-Not (Zhang et al. 2023): attention re-steering, the concept tokens' cross-attention "
            "probabilities minimised on images of the concept; the UNet or its cross-attention")
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS | option_names(FMNOptions) | {"mask"}


# ----------------------------------------------------------------------------------------------------------
# ScissorHands (Wu & Harandi 2024): trim by connection sensitivity, repair by gradient projection
# ----------------------------------------------------------------------------------------------------------

# The weights the trim ranks: the connection weights (no bias, no norm: SNIP scores connections) of the
# self-attention of the up blocks' second transformer: SD 1.x/2.x output_blocks.4 and .7, the layers the
# authors' Stable Diffusion code re-initialises (SDXL: output_blocks.4).
TRIM_SCOPE = r"^up_blocks\.[12]\.attentions\.1\.transformer_blocks\.\d+\.attn1\.(to_[qkv]|to_out\.0)\.weight$"


class ScissorHandsSpec(MethodSpec):
    name = "scissorhands"
    help = ("ScissorHands (Wu & Harandi 2024): the top --keep up-block self-attention weights by SNIP connection "
            "sensitivity on the forget images are re-initialised, then repaired by gradient projection: the "
            "forget images mapped to the surrogate plus alpha x the retain loss, without the component that "
            "lowers the forget images' own denoising loss")
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS | SALIENCY_FIELDS
    default_alpha = 10.0  # the authors' loss_r + 0.1 loss_u, as loss_u + 10 loss_r
    computes_mask = True
    default_score = "snip"
    default_keep = 0.01
    default_mask_scope = TRIM_SCOPE


# ----------------------------------------------------------------------------------------------------------
# EraseDiff (Wu, Le, Hayat & Harandi 2024): a bilevel objective, first-order
# ----------------------------------------------------------------------------------------------------------

@dataclass
class EraseDiffOptions:
    erasediff_eta: float = field(default=0.01, metadata={
        "help": "EraseDiff: eta of the dynamic barrier (each update lowers the forget objective at least at rate "
                "eta ||grad f||^2)", "min": 0})


class EraseDiffSpec(MethodSpec):
    name = "erasediff"
    help = ("EraseDiff (Wu et al. 2024): the forget images' denoising steered to uniform (out-of-distribution) noise "
            "as the inner problem of a bilevel objective whose outer one keeps the retain loss; first-order, with a "
            "dynamic barrier")
    # no --alpha: the outer objective is the retain loss itself (default_alpha asks for retain images)
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_DATA | FORGET_IMAGE_FIELDS | option_names(EraseDiffOptions) | {"mask"}
    default_alpha = 1.0


# ----------------------------------------------------------------------------------------------------------
# ANT (Li, Lu, Ren & Kong, arXiv 2504.12782): auto-steering the denoising trajectories
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ANTOptions:
    ant_eta: float = field(default=1.0, metadata={"help": "ANT: guidance scale eta of its targets", "min": 0})
    ant_ddim_steps: int = field(default=50, metadata={
        "help": "ANT: DDIM steps of the partial sampling that gives z_t", "min": 2})
    ant_before_step: int = field(default=7, metadata={
        "help": "ANT: t' as a DDIM step index: the first this many sampling steps are the early stage, kept as "
                "the original model's; the later ones are steered away", "min": 1})
    ant_alpha_1: float = field(default=1.0, metadata={"help": "ANT: weight a1 of the early-stage terms", "min": 0})
    ant_alpha_2: float = field(default=0.5, metadata={
        "help": "ANT: weight a2 of the unconditional-preservation terms", "min": 0})
    ant_start_guidance: float = field(default=3.0, metadata={
        "help": "ANT: guidance scale of the partial sampling", "min": 0})
    ant_rounds: int = field(default=5, metadata={
        "help": "ANT: augmented passes over the forget images for the saliency map (--score ant)", "min": 1})


class ANTSpec(MethodSpec):
    name = "ant"
    help = ("ANT (arXiv 2504.12782): the concept's classifier-free-guidance direction reversed in the middle-to-late "
            "denoising stages, the early stages and the unconditional prediction kept, on the weights of an "
            "augmented saliency map; z_t from partial sampling")
    fields = LOOP_FIELDS | SAMPLING_FIELDS | FORGET_IMAGE_FIELDS | SALIENCY_FIELDS | option_names(ANTOptions)
    needs_surrogate = False
    samples_latents = True
    frozen_copy = True
    computes_mask = True
    default_score = "ant"

    @classmethod
    def generates_images(cls, alpha):
        return True  # the forget images of its saliency map

    def forget_image_prompts(self, concept):
        return [] if self.config.mask else list(concept.forget_prompts)  # a given mask: no images to score


# ----------------------------------------------------------------------------------------------------------
# The token remap: the attacks' control (docs/PROTOCOLS.md, "Calibration against a control")
# ----------------------------------------------------------------------------------------------------------

class RemapSpec(MethodSpec):
    name = "remap"
    help = ("token remap (the control): the concept's words read as the surrogate's in the text encoder's input "
            "embeddings, the UNet untouched; what a prompt filter achieves, and what every attack must recover; "
            "seconds, no images")
    fields = frozenset({"retain_prompts"})  # only to measure the drift of the retain prompts' encodings
    closed_form = True
    transformer_form = True  # only text encoders change, whatever the denoiser

    @classmethod
    def check_fields(cls, given, flag, all_fields):
        super().check_fields(given, flag, all_fields)
        unused_outputs(cls, given, flag, ("save_delta",), "it changes no UNet weight (the remapped embeddings are "
                                                           "in the text encoder, in the output folder)")


# The options dataclasses of every method: the run config inherits their fields (and so their flags).
OPTIONS = (ESDOptions, CAOptions, UCEOptions, AdversarialOptions, RECEOptions, SAFREEOptions, FMNOptions,
           EraseDiffOptions, ANTOptions, MACEOptions)
