"""The method layer (`concept_erase.diffusion.methods`): each method's scope, data needs, flags and loss,
through the loop and the `erase` command on tiny real pipelines; UCE's closed form; several concepts."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import weights_copy

from concept_erase.cli import main
from concept_erase.diffusion.data.latents import LatentSet
from concept_erase.diffusion.training.config import EraseConfig, TrainConfig
from concept_erase.diffusion.training.loop import train_unet
from concept_erase.diffusion.models.families import family_of
from concept_erase.diffusion.models.tiny import build_tiny_pipeline
from concept_erase.diffusion.methods.uce import cross_attention_projections, uce_edit, uce_weights
from concept_erase.errors import ConceptEraseError


def _changed(pipe, base):
    after = pipe.unet.state_dict()
    return {k for k in base if not torch.equal(after[k], base[k])}


# ------------------------------------------------------------------------------------------ the registry

RESOLVE = """
import sys
from concept_erase.diffusion.methods import METHODS, get_method
for name in METHODS:
    cls = get_method(name)
    assert cls.name == name and cls.fields and cls.help, name
loaded = [m for m in ("concept_erase.diffusion.training.loop", "concept_erase.diffusion.training.job", "accelerate",
                      "diffusers") if m in sys.modules]
assert not loaded, loaded
print(",".join(METHODS))
"""


def test_every_registered_method_resolves_without_importing_the_loop():
    """The registry is an explicit table: a fresh interpreter resolves every method (salun-adv included, with
    no earlier import registering it) without loading the loop, the job, accelerate or diffusers."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", RESOLVE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert set(run.stdout.strip().split(",")) == {"salun", "rl", "esd-x", "esd-u", "ca", "uce", "salun-adv"}


# ------------------------------------------------------------------------------------------ flags and alpha

@pytest.mark.parametrize("method, values, flag", [
    ("esd-u", {"keep": 0.3}, "--keep"),
    ("esd-x", {"mask_scope": "attn"}, "--mask-scope"),
    ("esd-x", {"num_forget_images": 8}, "--num-forget-images"),
    ("esd-u", {"forget_images": "dir"}, "--forget-images"),
    ("rl", {"keep": 0.3}, "--keep"),
    ("rl", {"mask": "m.safetensors"}, "--mask"),
    ("uce", {"steps": 3}, "--steps"),
    ("uce", {"alpha": 0.5}, "--alpha"),
    ("salun", {"uce_lambda": 1.0}, "--uce-lambda"),
    ("ca", {"forget_images": "dir"}, "--forget-images"),
    ("esd-u", {"num_retain_images": 8}, "--num-retain-images"),  # no retain term without --alpha
    ("uce", {"image_steps": 5}, "--num-inference-steps"),  # the flag's own spelling
    ("esd-x", {"image_guidance": 5.0}, "--guidance-scale"),  # ESD without a retain term samples no image
])
def test_a_flag_the_method_does_not_use_is_refused(method, values, flag):
    with pytest.raises(ConceptEraseError, match=f"^{flag} is not used by --method {method}"):
        EraseConfig(model="m", output="o", forget=["x"], surrogate=["y"], method=method, **values)


def test_a_typed_flag_is_refused_even_at_its_default_and_presets_keep_the_methods_alpha():
    # the CLI passes only what the user typed: --keep 0.5 with ESD is refused although 0.5 is the default
    with pytest.raises(ConceptEraseError, match="--keep is not used by --method esd-x"):
        EraseConfig.for_concept(model="m", output="o", concept="nudity", method="esd-x", keep=0.5)
    # a preset's recipe is SalUn's: ESD and CA keep alpha 0 and get none of the images they do not use
    for method in ("esd-x", "esd-u", "ca"):
        cfg = EraseConfig.for_concept(model="m", output="o", concept="minisd-digit-three", method=method)
        assert cfg.alpha == 0.0 and cfg.num_retain_images == 64, method
    assert EraseConfig.for_concept(model="m", output="o", concept="minisd-digit-three", method="esd-x",
                                   alpha=0.2).alpha == 0.2  # unless the user asks
    assert EraseConfig.for_concept(model="m", output="o", concept="minisd-digit-three").alpha == 0.5
    uce = EraseConfig.for_concept(model="m", output="o", concept="nudity", method="uce")
    assert uce.steps == 100 and uce.alpha == 0.0  # recipe training fields are not applied to a closed form


# ------------------------------------------------------------------------------------------ loop methods

def test_esd_trains_on_prompts_only():
    pipe = build_tiny_pipeline(0)
    base = weights_copy(pipe.unet)
    forget = LatentSet.prompts_only(["a nude", "a nude cat"], (4, 16, 16))
    assert forget.latents is None and len(forget) == 2
    cfg = TrainConfig(method="esd-x", steps=1, batch_size=2, lr=1e-2, esd_ddim_steps=3)
    result = train_unet(pipe, forget, None, cfg, concept_of={"a nude": "a", "a nude cat": "b"})
    changed = _changed(pipe, base)
    assert changed and all(family_of(pipe).is_cross_attention(k) for k in changed)
    assert set(result.forget_per_concept) == {"a", "b"} and result.retain_loss is None


@pytest.mark.parametrize("params", ["kv", "unet"])
def test_concept_ablation_scope(params):
    pipe = build_tiny_pipeline(0)
    base = weights_copy(pipe.unet)
    g = torch.Generator().manual_seed(0)
    # anchor images (here: random latents) with the target prompt and the anchor prompt as its surrogate
    forget = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a nude"] * 4, ["a dressed"] * 4)
    cfg = TrainConfig(method="ca", steps=2, batch_size=2, lr=1e-2, ca_params=params)
    assert cfg.alpha == 0.0
    train_unet(pipe, forget, None, cfg)
    changed = _changed(pipe, base)
    family = family_of(pipe)
    if params == "kv":
        assert changed and all(family.is_cross_attention(k) and (".to_k." in k or ".to_v." in k) for k in changed)
    else:
        assert len(changed) > 0.9 * len(base)


def test_ca_loss_is_zero_when_target_and_anchor_prompts_agree():
    """Kumari et al. Eq. 3: MSE(eps(x_t, c*), sg eps(x_t, c_anchor)) vanishes when c* = c_anchor."""
    pipe = build_tiny_pipeline(0)
    forget = LatentSet(torch.randn(2, 4, 16, 16), ["a dressed"] * 2, ["a dressed"] * 2)
    result = train_unet(pipe, forget, None, TrainConfig(method="ca", steps=1, batch_size=2, lr=1e-2))
    assert result.losses[0]["loss_forget"] == 0.0


# ------------------------------------------------------------------------------------------ UCE

def test_uce_closed_form_is_the_minimiser():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 5, generator=g, dtype=torch.float64)
    ce, ct, cp = (torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (3, 3, 4))
    se, sp, lam = 1.0, 0.3, 0.1
    new = uce_weights(W, ce, ct, cp, se, sp, lam)
    # the gradient of se sum ||W'c_i - Wc*_i||^2 + sp sum ||W'c_j - Wc_j||^2 + lam ||W' - W||^2 vanishes at W'
    grad = se * (new @ ce.T - W @ ct.T) @ ce + sp * ((new - W) @ cp.T) @ cp + lam * (new - W)
    assert grad.abs().max() < 1e-10
    # with nothing to preserve and a tiny ridge, fewer tokens than dimensions map exactly onto their targets
    exact = uce_weights(W, ce, ct, None, 1.0, 0.0, 1e-9)
    assert torch.allclose(ce @ exact.T, ct @ W.T, atol=1e-6)


def test_uce_edits_only_cross_attention_kv():
    from concept_erase.concepts import get_concept

    pipe = build_tiny_pipeline(0)
    base = weights_copy(pipe.unet)
    concept = get_concept(forget=["a nude"], surrogate=["a dressed"], retain_prompts=["a tree", "a dressed"])
    report = uce_edit(pipe, concept, ridge=0.1)
    layers = cross_attention_projections(pipe.unet, family_of(pipe))
    assert _changed(pipe, base) == {f"{name}.weight" for name in layers}
    assert report["edited_parameters"] == len(layers) and report["preserve_prompts"] == 2
    assert report["forget_per_concept"]["custom: a nude"] < 0.2 and report["retain"] < 0.05


def test_uce_on_sdxl_edits_its_cross_attention_through_the_family():
    """SDXL's conditioning (both encoders, 2048-d tokens) goes through `Family.encode`; its to_k/to_v take it."""
    from concept_erase.concepts import get_concept
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(0)
    base = weights_copy(pipe.unet)
    report = uce_edit(pipe, get_concept(forget=["a nude"], surrogate=["a dressed"], retain_prompts=["a tree"]))
    layers = cross_attention_projections(pipe.unet, family_of(pipe))
    assert family_of(pipe).name == "sdxl" and _changed(pipe, base) == {f"{name}.weight" for name in layers}
    assert report["forget_per_concept"]["custom: a nude"] < 0.2


# ------------------------------------------------------------------------------------------ the command

def _cli(pipe_dir, cache, *extra, samples=True):
    """erase's arguments; `samples`: the method generates images (not ESD without a retain term)."""
    return ["erase", "--model", str(pipe_dir), "--forget", "a nude", "--surrogate", "a dressed",
            *(["--image-steps", "2"] if samples else []), "--cache-dir", str(cache), "--batch-size", "2",
            "--no-progress", *extra]


def test_uce_command_writes_the_same_outputs(tiny_pipeline_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from concept_erase.diffusion.models.card import read_model_card
    from concept_erase.diffusion.models.delta import apply_delta
    from concept_erase.diffusion.models.loading import load_pipeline

    out = tmp_path / "uce"
    argv = ["erase", "--model", str(tiny_pipeline_dir), "--forget", "a nude", "--surrogate", "a dressed",
            "--method", "uce", "--output", str(out), "--save-delta", str(tmp_path / "delta"),
            "--export-single-file", str(tmp_path / "uce.safetensors"), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "uce" and summary["edited_parameters"] > 0 and summary["seconds_edit"] < 30
    card = read_model_card(out)
    assert card["method"] == "uce" and card["edit"]["ridge"] == 0.1 and "steps" not in card
    assert set(card["erasure_check"]["forget_per_concept"]) == {"custom: a nude"}
    erased = load_pipeline(out).unet.state_dict()
    again = apply_delta(load_pipeline(tiny_pipeline_dir), tmp_path / "delta").unet.state_dict()
    assert all(torch.equal(erased[k], again[k]) for k in erased)
    assert any(k.endswith("to_k.weight") for k in load_file(str(tmp_path / "uce.safetensors")))
    capsys.readouterr()
    assert main([*argv[:-1], "--steps", "5", "--output", str(tmp_path / "x")]) == 2
    assert "--steps is not used by --method uce" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["esd-u", "ca"])
def test_esd_makes_no_images_and_ca_makes_anchor_images(method, tiny_pipeline_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    extra = ["--esd-ddim-steps", "2"] if method == "esd-u" else ["--num-forget-images", "2"]
    assert main([*_cli(tiny_pipeline_dir, cache, "--method", method, "--steps", "1", "--output", str(tmp_path / "o"),
                       *extra, samples=method != "esd-u")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["alpha"] == 0.0 and summary["retain_images"] == 0
    manifests = [json.loads(line) for m in cache.rglob("manifest.jsonl") for line in m.read_text().splitlines()]
    if method == "esd-u":
        assert summary["forget_images"] == 0 and not manifests
    else:  # images of the anchor (the surrogate), never of the concept
        assert summary["forget_images"] == 2 and {r["prompt"] for r in manifests} == {"a dressed"}


def test_several_concepts_in_one_run(tiny_pipeline_dir, tmp_path, capsys):
    """Two MiniSD digit presets at once: one mask over the union forget set, a surrogate per concept, forget
    per concept and the joint retain in the summary and the card (the tiny pipeline reads any text)."""
    from concept_erase.diffusion.models.card import read_model_card

    (tmp_path / "concepts.txt").write_text("minisd-digit-three\nminisd-digit-four\n")
    out = tmp_path / "two"
    assert main(["erase", "--model", str(tiny_pipeline_dir), "--concepts-file", str(tmp_path / "concepts.txt"),
                 "--num-forget-images", "6", "--num-retain-images", "24", "--image-steps", "2", "--steps", "1",
                 "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["concepts"] == ["minisd-digit-three", "minisd-digit-four"]
    assert set(summary["forget_per_concept"]) == {"minisd-digit-three", "minisd-digit-four"}
    assert summary["retain"] is not None and summary["keep"] == pytest.approx(0.5, abs=0.01)
    card = read_model_card(out)
    assert card["concepts"] == summary["concepts"] and card["concept"] == "minisd-digit-three+minisd-digit-four"
    # three's surrogate (four) is erased too: three is steered on to five
    assert "five" in card["surrogate"][0] and not any("four" in s for s in card["surrogate"])


@pytest.mark.parametrize("method", ["rl", "esd-x", "ca"])
def test_every_loop_method_resumes_exactly(method, tmp_path):
    """A run killed after its checkpoint and resumed ends with the weights of an uninterrupted one (ESD's
    partial-sampling stop index is one of the step's seeded draws, so it repeats too)."""
    g = torch.Generator().manual_seed(0)
    forget = LatentSet(torch.randn(4, 4, 16, 16, generator=g), ["a nude"] * 4, ["a dressed"] * 4)
    if method == "esd-x":
        forget = LatentSet.prompts_only(forget.prompts, (4, 16, 16))
    cfg = TrainConfig(method=method, steps=3, batch_size=2, lr=1e-3, checkpointing_steps=2,
                      **({"esd_ddim_steps": 3} if method == "esd-x" else {}))
    straight = train_unet(build_tiny_pipeline(0), forget, None, cfg, checkpoint_dir=tmp_path / "a")
    short = replace(cfg, steps=2)  # "killed" right after checkpoint-2
    train_unet(build_tiny_pipeline(0), forget, None, short, checkpoint_dir=tmp_path / "b")
    resumed = train_unet(build_tiny_pipeline(0), forget, None, cfg, checkpoint_dir=tmp_path / "b", resume="latest")
    assert resumed.resumed_from == 2
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
