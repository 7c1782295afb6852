"""The four attacks on a tiny pipeline: each runs, is deterministic, saves what it learned and replays it
exactly; the token injection; budgets and detectors refuse bad input in one line."""

import pytest
import torch

from concept_erase.concepts import get_concept
from concept_erase.errors import ConceptEraseError
from evaluation.attacks import ATTACK_NAMES, attack_fn
from evaluation.attacks.budgets import TINY, make_budget
from evaluation.attacks.core import PLACEHOLDER, Learned, Targets, TokenPrefix, encode, prefixed
from evaluation.attacks.replay import read_saved_attack
from evaluation.attacks.run import concept_rows


@pytest.fixture(scope="module")
def setup():
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline

    pipe, base = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=1)
    concept = get_concept(forget=["a cat", "a red cat"], surrogate=["a dog", "a red dog"])
    rows = concept_rows(concept, [0, 1])[:3]
    g = torch.Generator().manual_seed(0)
    targets = Targets(rows=torch.randn(3, 4, 16, 16, generator=g), images=torch.randn(4, 4, 16, 16, generator=g),
                      captions=["a cat"] * 4)
    return pipe, base, concept, rows, targets


def _learn(name, setup, **budget):
    pipe, base, concept, rows, targets = setup
    return attack_fn(name)(pipe, rows, targets, make_budget(name, **{**TINY[name], **budget}), 0,
                           concept=concept, base=base)


@pytest.mark.parametrize("name,budget", [(n, {}) for n in ATTACK_NAMES] + [("unlearndiffatk", {"variant": "soft"})])
def test_each_attack_runs_is_deterministic_and_replays_exactly(setup, tmp_path, name, budget):
    pipe, _, _, rows, _ = setup
    first, second = _learn(name, setup, **budget), _learn(name, setup, **budget)
    a, b = first.conditioning_for(pipe), second.conditioning_for(pipe)
    assert a.hidden.shape[0] == len(rows) and torch.equal(a.hidden, b.hidden)
    assert first.history == second.history
    plain = encode(pipe, [r.prompt for r in rows])
    assert not torch.equal(a.hidden, plain.hidden)  # the attack changed the conditioning
    replayed = read_saved_attack(first.save(tmp_path / name))
    assert replayed.budget == first.budget and [r.seed for r in replayed.rows] == [0, 1, 0]
    assert torch.equal(replayed.conditioning_for(pipe).hidden, a.hidden)


def _error(pipe, latents, cond, rows):
    """The denoising objective on fixed draws (steps 1000..1009), so two conditionings compare fairly."""
    from evaluation.attacks.core import attack_denoising_error

    with torch.no_grad():
        return sum(attack_denoising_error(pipe, latents, cond, rows, 1000 + s, 0).item() for s in range(10))


def test_optimising_attacks_lower_their_objective(setup):
    pipe, _, _, rows, targets = setup
    ids = list(range(len(rows)))
    plain = encode(pipe, [r.prompt for r in rows])
    for name, budget in (("embedding", {"steps": 20, "lr": 0.05}),
                         ("unlearndiffatk", {"steps": 20, "lr": 0.05, "variant": "soft"})):
        learned = _learn(name, setup, **budget)
        assert _error(pipe, targets.rows, learned.conditioning_for(pipe), ids) < _error(pipe, targets.rows, plain, ids), name
    learned = _learn("inversion", setup, steps=20, lr=0.05, batch_size=4)
    start = Learned("inversion", {}, rows, learned.texts, prefix={
        "text_encoder": pipe.text_encoder.get_input_embeddings().weight.detach().mean(0).expand(1, 1, -1)})
    captions = [prefixed("a cat", 1)] * 4
    after, before = (encode(pipe, captions, lr.prefix) for lr in (learned, start))
    assert _error(pipe, targets.images, after, range(4)) < _error(pipe, targets.images, before, range(4))


def test_several_timesteps_per_step_are_stratified_seeded_per_row_and_averaged(setup):
    """`timesteps` draws per row and step: one t in each of that many equal parts of [0, T), from the row's own
    generator (a row's error is the same in any batch), averaged into the row's error."""
    from evaluation.attacks.core import attack_denoising_error

    pipe, _, _, rows, targets = setup
    cond = encode(pipe, [r.prompt for r in rows])
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    try:
        with torch.no_grad():
            together = attack_denoising_error(pipe, targets.rows, cond, [0, 1, 2], 7, 0, draws=4)
            alone = [attack_denoising_error(pipe, targets.rows[i:i + 1], cond[i], [i], 7, 0, draws=4) for i in range(3)]
            again = attack_denoising_error(pipe, targets.rows, cond, [0, 1, 2], 7, 0, draws=4)
    finally:
        hook.remove()
    assert torch.allclose(together, sum(alone), rtol=1e-5) and torch.equal(together, again)
    T = pipe.scheduler.config.num_train_timesteps
    per_row = [seen[0][4 * i:4 * i + 4] for i in range(3)]
    assert all(k * T / 4 <= t < (k + 1) * T / 4 for ts in per_row for k, t in enumerate(ts)), per_row
    assert per_row[0] == seen[1] and per_row[0] != per_row[1]  # row 0 alone draws what it drew in the batch


def test_calibration_lines_say_which_asr_is_only_a_lower_bound():
    from evaluation.attacks.run import calibration_lines

    attack = {"budget": {}, "control_asr": None, "calibrated": None}
    summary = {"rows": 20, "control": None, "attacks": {"embedding": attack}}
    assert calibration_lines(summary) == ["- embedding: uncalibrated (no control: --no-control): its ASR is only a "
                                          "lower bound."]
    summary["control"] = {"remapped": {"text_encoder": {"cat": ["dog"]}}, "vocabulary": {"text_encoder": 9}}
    summary["attacks"] = {"embedding": {**attack, "control_asr": 95.0, "calibrated": True},
                          "ringabell": {**attack, "control_asr": 90.0, "calibrated": False}}
    assert calibration_lines(summary) == [
        "- embedding: recovers the control on 19 of 20 rows (95.0%): calibrated at this budget.",
        "- ringabell: recovers the control on 18 of 20 rows (90.0%), below 95%: **uncalibrated at this budget**; "
        "its ASR is only a lower bound."]


def test_discrete_unlearndiffatk_uses_vocabulary_tokens_and_decodes_them(setup):
    pipe, _, _, rows, _ = setup
    learned = _learn("unlearndiffatk", setup)
    assert learned.prefix_ids.shape == (3, 2) and not learned.prefix
    specials = {pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id}
    assert not specials & set(learned.prefix_ids.flatten().tolist())
    assert learned.decoded[0].endswith(rows[0].prompt)
    # the injected vectors are exactly the vocabulary rows of those ids
    weight = pipe.text_encoder.get_input_embeddings().weight
    with TokenPrefix(pipe, {"text_encoder": weight[learned.prefix_ids[:1]]}):
        direct = encode(pipe, learned.texts[:1])
    assert torch.equal(direct.hidden, learned.conditioning_for(pipe)[0].hidden)


def test_token_prefix_injects_with_gradient_and_refuses_prompts_without_placeholders(tiny_pipeline):
    vec = torch.zeros(1, 2, 32, requires_grad=True)
    cond = encode(tiny_pipeline, [prefixed("a cat", 2)], {"text_encoder": vec})
    cond.hidden.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert not torch.equal(cond.hidden, encode(tiny_pipeline, [prefixed("a cat", 2)]).hidden)
    with pytest.raises(ConceptEraseError, match="placeholders"):
        encode(tiny_pipeline, ["a cat"], {"text_encoder": vec})
    assert prefixed("x", 3) == f"{PLACEHOLDER} {PLACEHOLDER} {PLACEHOLDER} x"


def test_attacks_need_their_inputs_and_leave_the_model_frozen(setup):
    pipe, base, concept, rows, _ = setup
    before = [p.requires_grad for p in pipe.unet.parameters()]
    for name in ("unlearndiffatk", "embedding", "inversion"):
        with pytest.raises(ConceptEraseError, match="--base"):
            attack_fn(name)(pipe, rows, Targets(), make_budget(name), 0, concept=concept)
    _learn("embedding", setup)
    assert [p.requires_grad for p in pipe.unet.parameters()] == before


def test_every_attack_runs_on_sdxl_through_both_text_encoders():
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)
    concept = get_concept(forget=["a cat"], surrogate=["a dog"])
    rows = concept_rows(concept, [0, 1])
    targets = Targets(rows=torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    targets.images, targets.captions = targets.rows, ["a cat"] * 2
    plain = encode(pipe, [r.prompt for r in rows])
    for name in ATTACK_NAMES:
        learned = attack_fn(name)(pipe, rows, targets, make_budget(name, **TINY[name]), 0, concept=concept, base=pipe)
        cond = learned.conditioning_for(pipe)
        assert cond.hidden.shape == plain.hidden.shape and set(cond.added) == {"text_embeds", "time_ids"}
        assert torch.equal(cond.added["time_ids"], plain.added["time_ids"])  # size ids are never attacked
        if name == "inversion":
            assert set(learned.prefix) == {"text_encoder", "text_encoder_2"}
        assert not torch.equal(cond.added["text_embeds"], plain.added["text_embeds"]), name  # the pooled one too


def test_bad_attack_budget_and_detector_are_one_line_errors():
    from evaluation.attacks.detectors import detector_for

    cases = [(lambda: attack_fn("pez"), "unknown attack 'pez'"),
             (lambda: make_budget("unlearndiffatk", steps=0), "--unlearndiffatk-steps must be >= 1, got 0"),
             (lambda: make_budget("ringabell", eta=0.0), "--ringabell-eta must be > 0"),
             (lambda: make_budget("embedding", tokens=3), "no budget setting 'tokens'"),
             (lambda: make_budget("unlearndiffatk", variant="hard"), "variant"),
             (lambda: detector_for("style-van-gogh"), "'style-van-gogh' has no detector")]
    for call, message in cases:
        with pytest.raises(ConceptEraseError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_too_many_tokens_for_the_text_window_is_refused():
    from concept_erase.diffusion.models.loading import load_pipeline
    from evaluation.attacks.core import check_prefix_fits

    pipe = load_pipeline("minisd")  # a 16-token window
    check_prefix_fits(pipe, ["a handwritten digit seven in bold strokes"], 5)
    with pytest.raises(ConceptEraseError, match="more than the text encoder's 16"):
        check_prefix_fits(pipe, ["a handwritten digit seven in bold strokes"], 9)


def test_detectors_print_their_rule_and_score_images():
    from PIL import Image

    from evaluation.attacks.detectors import ClassifierDetector, NudityDetector, detector_for

    grey = [Image.new("RGB", (64, 64), (128, 128, 128))] * 2
    nudity = detector_for("nudity")  # the real NudeNet 320n model in the wheel
    assert isinstance(nudity, NudityDetector) and "0.45" in nudity.describe() and "9 exposed" in nudity.describe()
    assert nudity.present(grey) == [False, False] and nudity.label(grey) == ["covered", "covered"]

    class Fixed:  # a classifier that always answers index 1
        labels = ["tench", "church"]

        def topk(self, images, k=5):
            return torch.ones(len(images), 1, dtype=torch.long)

    church = ClassifierDetector(Fixed(), 1, "test classifier")
    assert church.present(grey) == [True, True] and church.label(grey) == ["church", "church"]
    seven = detector_for("minisd-digit-seven")
    assert "'seven'" in seven.describe() and seven.present([Image.new("L", (16, 16))]) in ([True], [False])


# ------------------------------------------------------------------------------------------ no unmeasured number


def _numeric_budget_fields():
    from dataclasses import fields

    from evaluation.attacks.budgets import BUDGETS

    return [(name, f.name) for name, cls in BUDGETS.items() for f in fields(cls)
            if str(f.type) in ("int", "float")]


@pytest.mark.parametrize("attack,setting", _numeric_budget_fields())
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_budget_field_of_every_attack_refuses_inf_and_nan(attack, setting, value):
    with pytest.raises(ConceptEraseError) as err:
        make_budget(attack, **{setting: value})
    flag = f"--{attack}-{setting.replace('_', '-')}"
    assert str(err.value) == f"{flag} must be a finite number, got {value!r}"


@pytest.mark.parametrize("name,budget,message", [
    ("embedding", {"lr": 1e30}, "embedding attack: its objective is nan at step 2 of 4"),
    ("inversion", {"lr": 1e30}, "inversion attack: its objective is nan at step 2 of 4"),
    ("unlearndiffatk", {"lr": 1e30, "variant": "soft"}, "unlearndiffatk attack: its objective is nan at step 2"),
    ("ringabell", {"eta": 1e308}, "ringabell attack: its learned offset.hidden is not finite"),
])
def test_an_attack_that_blows_up_stops_naming_the_attack_and_the_step(setup, name, budget, message):
    with pytest.raises(ConceptEraseError) as err:
        _learn(name, setup, **budget)
    assert str(err.value).startswith(message) and "nothing is reported" in str(err.value), str(err.value)


def test_a_non_finite_conditioning_or_image_is_never_scored(setup):
    from evaluation.attacks.run import draw_learned
    from evaluation.generation import make_protocol

    pipe, _, _, rows, _ = setup
    learned = _learn("ringabell", setup)
    learned.offset = {"hidden": torch.full_like(learned.offset["hidden"], float("inf"))}
    protocol = make_protocol("minisd", num_inference_steps=2)
    with pytest.raises(ConceptEraseError, match="^ringabell attack: its adversarial conditioning on this model is "
                                                "not finite"):
        draw_learned(pipe, learned, protocol)
    learned.offset = {"hidden": torch.full_like(learned.offset["hidden"], 1e30)}  # finite, but NaN pixels
    with pytest.raises(ConceptEraseError, match="^ringabell attack, drawing the attacked images: the model drew "
                                                "non-finite"):
        draw_learned(pipe, learned, protocol)


# ------------------------------------------------------------------------------------------ replay folders


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    """Two saved attacks of the tiny SD 1.x pipeline: the embedding attack and the discrete UnlearnDiffAtk."""
    folder = tmp_path_factory.mktemp("saved")
    for name in ("embedding", "unlearndiffatk"):
        learned = _learn(name, setup)
        learned.model = "tiny"
        learned.save(folder / name)
    return folder


def _edit_json(key, value):
    def edit(folder):
        import json

        meta = json.loads((folder / "attack.json").read_text())
        if value is KeyError:
            del meta[key]
        else:
            meta[key] = value(meta) if callable(value) else value
        (folder / "attack.json").write_text(json.dumps(meta))
    return edit


def _edit_tensor(change, record=True):
    def edit(folder):
        import json

        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "learned.safetensors"))
        tensors["conditioning.hidden"] = change(tensors["conditioning.hidden"])
        save_file(tensors, str(folder / "learned.safetensors"), metadata={"attack": "embedding"})
        if record:
            shape = list(tensors["conditioning.hidden"].shape)
            _edit_json("tensors", lambda m: {**m["tensors"], "conditioning.hidden": shape})(folder)
    return edit


REPLAY_FAULTS = {
    "bad JSON": (lambda f: (f / "attack.json").write_text("{not json"), "attack.json is not readable JSON"),
    "not an object": (lambda f: (f / "attack.json").write_text("[1, 2]"), "attack.json is not a JSON object"),
    "a missing key": (_edit_json("rows", KeyError), "attack.json has no 'rows'"),
    "an older folder": (_edit_json("structure", KeyError), "from an older version: run the attack again"),
    "an unknown attack": (_edit_json("attack", "bogus"), "unknown attack 'bogus' in attack.json"),
    "an infinite budget": (_edit_json("budget", {"steps": 4, "lr": float("inf"), "batch_size": 8}),
                           "budget: --embedding-lr must be a finite number, got inf"),
    "a bad seed": (_edit_json("rows", lambda m: [{**m["rows"][0], "seed": -1}, *m["rows"][1:]]), "is out of range"),
    "texts per row": (_edit_json("texts", ["a cat"]), "'texts' is not one string per row"),
    "a truncated tensor file": (lambda f: (f / "learned.safetensors").write_bytes(
        (f / "learned.safetensors").read_bytes()[:100]), "learned.safetensors is not readable"),
    "a tensor of the wrong width": (_edit_tensor(lambda t: torch.zeros(*t.shape[:-1], t.shape[-1] + 1)),
                                    "is not (rows, tokens, 32)"),
    "a shape attack.json does not record": (_edit_tensor(lambda t: t[:1], record=False), "but attack.json records"),
    "a NaN tensor": (_edit_tensor(lambda t: t * float("nan")), "conditioning.hidden is not finite"),
    "foreign structure": (_edit_json("structure", lambda m: {**m["structure"], "family": "sdxl"}), None),
}


@pytest.mark.parametrize("fault", list(REPLAY_FAULTS))
def test_a_damaged_replay_folder_is_one_line_naming_it(saved, tmp_path, fault):
    import shutil

    from evaluation.attacks.replay import load_replay

    edit, message = REPLAY_FAULTS[fault]
    folder = tmp_path / "replay"
    shutil.copytree(saved, folder)
    edit(folder / "embedding")
    if message is None:  # a self-consistent folder of another structure loads; `fit_replay` judges it
        assert load_replay(folder)["embedding"].structure["family"] == "sdxl"
        return
    with pytest.raises(ConceptEraseError) as err:
        load_replay(folder)
    text = str(err.value)
    assert text.startswith(f"--replay {str(folder / 'embedding')!r}: ") and message in text and "\n" not in text, text


def test_the_structure_read_from_configs_is_the_loaded_models(tiny_pipeline_dir, tiny_sdxl_pipeline_dir):
    from concept_erase.diffusion.models.loading import load_pipeline
    from evaluation.attacks.core import model_structure, structure_of

    for source in (tiny_pipeline_dir, tiny_sdxl_pipeline_dir, "minisd", "minisd-xl"):
        assert model_structure(str(source)) == structure_of(load_pipeline(source)), source
    assert model_structure("some-org/some-hub-model") is None  # checked once it loads


def test_a_replay_crosses_structures_only_as_a_text_prompt(saved, setup):
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline
    from evaluation.attacks.core import structure_of
    from evaluation.attacks.replay import fit_replay, load_replay

    pipe = setup[0]
    replay = load_replay(saved)
    same, how = fit_replay(replay["embedding"], structure_of(pipe), "tiny")
    assert same is replay["embedding"] and how["as"] == "learned tensors" and how["from_model"] == "tiny"
    sdxl = build_tiny_sdxl_pipeline(seed=0)
    with pytest.raises(ConceptEraseError, match="^cannot replay the embedding attack learned on sd1 .* only a text "
                                                "prompt transfers"):
        fit_replay(replay["embedding"], structure_of(sdxl), "tiny-sdxl")
    text, how = fit_replay(replay["unlearndiffatk"], structure_of(sdxl), "tiny-sdxl")
    assert text.texts == replay["unlearndiffatk"].decoded and text.prefix_ids is None
    assert how["as"].startswith("its text prompts (crossed to sdxl")
    assert len(text.conditioning_for(sdxl)) == len(text.rows)  # the other model reads the prompts
