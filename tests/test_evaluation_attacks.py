"""The four attacks on a tiny pipeline: each runs, is deterministic, saves what it learned and replays it
exactly; the token injection; budgets and detectors refuse bad input in one line."""

import pytest
import torch

from concept_erase.concepts import get_concept
from concept_erase.errors import ConceptEraseError
from evaluation.attacks import ATTACK_NAMES, attack_fn
from evaluation.attacks.budgets import TINY, make_budget
from evaluation.attacks.core import PLACEHOLDER, Learned, Targets, TokenPrefix, encode, prefixed
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
    replayed = Learned.load(first.save(tmp_path / name))
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
             (lambda: make_budget("unlearndiffatk", steps=0), "steps must be > 0, got 0"),
             (lambda: make_budget("ringabell", eta=0.0), "eta must be > 0"),
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
