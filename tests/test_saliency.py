"""The mask engine: exact definition, ties, files, compatibility errors, and frozen-means-frozen."""

import pytest
import torch
from torch import nn

from concept_erase import saliency
from concept_erase.errors import ConceptEraseError
from concept_erase.fingerprints import model_fingerprint
from concept_erase.saliency import (
    MaskedOptimizer,
    SaliencyMask,
    build_optimizer,
    compute_saliency,
    optimizer_class,
    salient_index,
    stochastic_round_,
    threshold_scores,
)


def _linear(w=(0.5, -0.5), b=0.1):
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w]))
        model.bias.fill_(b)
    return model


def _sum_loss(model, x):
    return model(x).sum()


def test_scores_are_abs_of_signed_sum_over_batches():
    # d(sum y)/dw = sum of inputs; batch 1 gives [1, -2], batch 2 gives [2, 1]; d/db = rows per batch.
    model = _linear()
    batches = [torch.tensor([[1.0, -2.0]]), torch.tensor([[2.0, 1.0]])]
    scores = compute_saliency(model, batches, _sum_loss)
    # |(-2) + 1| = 1, not |-2| + |1| = 3: the sign is summed before the absolute value (SalUn Eq. 6).
    assert torch.equal(scores["weight"], torch.tensor([[3.0, 1.0]]))
    assert torch.equal(scores["bias"], torch.tensor([2.0]))
    mask = SaliencyMask.from_scores(scores, keep=0.5, model=model)  # round(0.5 * 3) = 2 kept
    assert mask.masks["weight"].tolist() == [[True, False]]
    assert mask.masks["bias"].tolist() == [True]


def test_compute_leaves_model_as_it_was():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 1))
    model.train()
    model[0].bias.requires_grad_(False)
    compute_saliency(model, [torch.ones(3, 2)], _sum_loss, include=r"^2\.")
    assert model.training
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True
    assert all(p.grad is None for p in model.parameters())


def test_include_filter_and_empty_inputs():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    scores = compute_saliency(model, [torch.ones(1, 2)], _sum_loss, include=r"^1\.")
    assert set(scores) == {"1.weight", "1.bias"}
    with pytest.raises(ConceptEraseError, match="include='nothing'"):
        compute_saliency(model, [torch.ones(1, 2)], _sum_loss, include="nothing")
    with pytest.raises(ConceptEraseError, match="empty"):
        compute_saliency(model, [], _sum_loss)


def test_ties_are_broken_by_parameter_then_element_order():
    scores = {"a": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([2.0, 2.0, 0.0])}
    masks = threshold_scores(scores, keep=0.5)  # 3 of 6: the four 2.0s tie for 3 places
    assert masks["a"].tolist() == [False, True, True]
    assert masks["b"].tolist() == [True, False, False]


@pytest.mark.parametrize("lowest", [False, True])
def test_global_threshold_matches_a_full_sort(lowest):
    gen = torch.Generator().manual_seed(0)
    # integer-valued floats: many ties; three tensors of different sizes, one global ranking
    scores = {f"p{i}": torch.randint(0, 50, (n,), generator=gen).float() for i, n in enumerate([7, 300, 1000])}
    flat = torch.cat(list(scores.values()))
    for keep in (0.01, 0.3, 0.5, 0.9, 1.0):
        masks = threshold_scores(scores, keep, lowest=lowest)
        kept = torch.cat([m for m in masks.values()])
        k = round(keep * flat.numel())
        assert int(kept.sum()) == k
        chosen, rest = flat[kept], flat[~kept]
        if rest.numel():
            assert (chosen.min() >= rest.max()) if not lowest else (chosen.max() <= rest.min())
        # deterministic: same answer twice
        again = torch.cat(list(threshold_scores(scores, keep, lowest=lowest).values()))
        assert torch.equal(kept, again)


def test_threshold_handles_tiny_and_huge_float_ranges():
    scores = {"x": torch.tensor([0.0, 1e-30, 3.4e38, 1e-7, 2.5])}
    assert threshold_scores(scores, keep=0.4)["x"].tolist() == [False, False, True, False, True]
    assert threshold_scores(scores, keep=0.4, lowest=True)["x"].tolist() == [True, True, False, False, False]


def test_inverted_mask_ranks_scores_far_below_the_largest():
    # 1e-12 and 1e-9 are both below 2^-24 of the largest score: ranking (max - s) in fp32 would tie them all
    # and fall back on parameter order, keeping a's 1e-9 entries instead of b's smaller ones.
    scores = {"a": torch.tensor([1.0] + [1e-9] * 10), "b": torch.full((10,), 1e-12)}
    masks = threshold_scores(scores, keep=10 / 21, lowest=True)
    assert not masks["a"].any() and masks["b"].all()


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan")])
def test_keep_outside_unit_interval_is_refused(keep):
    with pytest.raises(ConceptEraseError, match="keep must be in"):
        threshold_scores({"x": torch.ones(4)}, keep)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _forget_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen)) for _ in range(3)]


def test_save_load_round_trip_and_layer_stats(tmp_path):
    model = _mlp()
    mask = SaliencyMask.compute(model, _forget_batches(), _ce_loss, keep=0.3, concept="class 2")
    path = mask.save(tmp_path / "mask.safetensors")
    loaded = SaliencyMask.load(path, model=model)
    assert loaded.keep == 0.3 and loaded.concept == "class 2" and loaded.fingerprint == model_fingerprint(model)
    for name in mask.masks:
        assert torch.equal(loaded.masks[name], mask.masks[name])
    total = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in loaded.masks.values()) == round(0.3 * total)
    stats = loaded.layer_stats(depth=1)
    assert set(stats) == {"0", "2"} and all(0 <= v <= 1 for v in stats.values())
    with pytest.raises(ConceptEraseError, match="already exists"):
        mask.save(path)


def test_mask_for_another_model_names_the_first_mismatch(tmp_path):
    mask = SaliencyMask.compute(_mlp(), _forget_batches(), _ce_loss)
    path = mask.save(tmp_path / "m.safetensors")
    wider = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(ConceptEraseError, match=r"'0.weight' has shape \(8, 4\) but the model's is \(9, 4\)"):
        SaliencyMask.load(path, model=wider)
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    with pytest.raises(ConceptEraseError, match="'3.weight' differs"):
        SaliencyMask.load(path, model=other)
    renamed = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with pytest.raises(ConceptEraseError, match="'2.weight' does not exist"):
        SaliencyMask.load(path, model=renamed)


def test_unreadable_mask_files(tmp_path):
    with pytest.raises(ConceptEraseError, match="does not exist"):
        SaliencyMask.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ConceptEraseError, match="cannot read mask file"):
        SaliencyMask.load(junk)
    good = SaliencyMask.compute(_mlp(), _forget_batches(), _ce_loss).save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(ConceptEraseError, match="cannot read mask file"):
        SaliencyMask.load(truncated)
    flipped = bytearray(good.read_bytes())
    flipped[-1] ^= 0x01  # one mask bit: without the recorded digest, a different mask would load silently
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ConceptEraseError, match="is damaged: its content digest differs"):
        SaliencyMask.load(tmp_path / "flipped.safetensors")


def test_bool_mask_files_load_too(tmp_path):
    import json

    from safetensors.torch import save_file

    model = _mlp()
    mask = SaliencyMask.random(model, keep=0.5, seed=3)
    meta = {"format": "concept-erase-saliency-mask", "keep": "0.5",
            "mask_shapes": json.dumps({n: list(m.shape) for n, m in mask.masks.items()}),
            "model_shapes": json.dumps([[n, list(s)] for n, s in mask.model_shapes])}
    save_file(dict(mask.masks), str(tmp_path / "bool.safetensors"), metadata=meta)
    loaded = SaliencyMask.load(tmp_path / "bool.safetensors", model=model)
    assert all(torch.equal(loaded.masks[n], m) for n, m in mask.masks.items())


@pytest.mark.parametrize("kind,options", [
    ("adam", {"lr": 1e-2, "weight_decay": 0.1}),  # AdamW: decoupled weight decay touches every entry it holds
    ("sgd", {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1}),
], ids=["adamw", "sgd-momentum"])
def test_frozen_weights_stay_bit_identical(kind, options):
    model = _mlp()
    mask = SaliencyMask.compute(model, _forget_batches(), _ce_loss, keep=0.5, include=r"^0\.")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, mask, kind, **options)
    for batch in _forget_batches() * 10:
        optimizer.zero_grad()
        _ce_loss(model, batch).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        m = mask.masks.get(name, torch.zeros(p.shape, dtype=torch.bool))
        assert torch.equal(p.detach()[~m], before[name][~m]), f"frozen entries of {name} moved"
        if m.any():
            assert not torch.equal(p.detach()[m], before[name][m]), f"salient entries of {name} did not move"


def _train(model, optimizer, steps=6):
    for batch in (_forget_batches() * steps)[:steps]:
        optimizer.zero_grad()
        _ce_loss(model, batch).backward()
        optimizer.step()


@pytest.mark.parametrize("index_slice", [saliency.INDEX_SLICE, 8], ids=["one-slice", "slices-of-8"])
def test_masked_adam_is_adam_on_the_salient_entries_with_packed_state(index_slice, monkeypatch):
    """The salient entries follow torch Adam exactly (bit for bit: Adam is elementwise), with state of size k
    and the salient set held as a packed bitmask, 1 bit per entry, its positions rebuilt slice by slice (slices
    of 8 entries: several per tensor, the last one short). Reference: plain Adam on every entry with the frozen
    entries' gradients zeroed (without weight decay a zero gradient leaves an Adam entry where it is)."""
    monkeypatch.setattr(saliency, "INDEX_SLICE", index_slice)
    mask = SaliencyMask.random(_mlp(), keep=0.3, seed=2)
    masked_model, reference = _mlp(), _mlp()
    optimizer = build_optimizer(masked_model, mask, "adam", lr=1e-2)
    assert isinstance(optimizer, MaskedOptimizer)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for name, p in reference.named_parameters():
        p.register_hook(lambda g, m=mask.masks[name]: g.masked_fill(~m, 0))
    _train(masked_model, optimizer)
    _train(reference, ref_opt)
    for (name, p), q in zip(masked_model.named_parameters(), reference.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    packed = sorted(s["exp_avg"].numel() for s in optimizer.packed_state())
    assert packed == sorted(int(m.sum()) for m in mask.masks.values())
    assert all(p.grad is None for p in masked_model.parameters())  # the step consumed the gradients
    for t, m in zip(optimizer._targets, mask.masks.values()):  # 1 bit per entry, no index kept
        assert t.bits.dtype == torch.uint8 and t.bits.numel() == -(-m.numel() // 8)
        assert torch.equal(salient_index(t.bits, m.numel(), int(m.sum())), m.reshape(-1).nonzero().squeeze(1))


@pytest.mark.parametrize("masked", [True, False], ids=["salun-mask", "no-mask"])
def test_grad_release_steps_in_the_backward_pass_with_the_same_result(masked):
    """Each parameter is stepped by its post-accumulate-grad hook: after backward no gradient is left, and the
    weights are bit-identical to stepping after the backward (with AdamW's decay and a mask, or without one)."""
    mask = SaliencyMask.random(_mlp(), keep=0.4, seed=5) if masked else None
    straight, released = _mlp(), _mlp()
    opt = build_optimizer(straight, mask, "adam", lr=1e-2, weight_decay=0.1)
    hooked = build_optimizer(released, mask, "adam", lr=1e-2, weight_decay=0.1, grad_release=True)
    _train(straight, opt)
    for batch in (_forget_batches() * 6)[:6]:
        _ce_loss(released, batch).backward()
        assert all(p.grad is None for p in released.parameters())  # stepped and freed during the backward
        hooked.step()  # nothing left to do
    for p, q in zip(straight.parameters(), released.parameters()):
        assert torch.equal(p.detach(), q.detach())
    hooked.remove_hooks()
    _ce_loss(released, _forget_batches()[0]).backward()
    assert all(p.grad is not None for p in released.parameters() if p.requires_grad)


def _bf16_mlp(seed=0):
    return _mlp(seed).to(torch.bfloat16)


def _train_bf16(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        optimizer.step()


@pytest.mark.parametrize("index_slice", [saliency.INDEX_SLICE, 8], ids=["one-slice", "slices-of-8"])
def test_salient_fp32_master_copies_follow_torch_adam_and_frozen_bf16_stays_frozen(index_slice, monkeypatch):
    """salient-fp32: bf16 weights, fp32 copies of the salient entries only, stepped exactly as torch Adam
    steps fp32 tensors given the same (bf16) gradients; the weights are those copies rounded to bf16."""
    monkeypatch.setattr(saliency, "INDEX_SLICE", index_slice)
    mask = SaliencyMask.random(_mlp(), keep=0.5, seed=1)
    model = _bf16_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, mask, "adam", lr=1e-2, weight_decay=0.1, master_weights="salient-fp32")
    masters = {n: before[n][m].float().requires_grad_() for n, m in mask.masks.items()}
    reference = torch.optim.AdamW(list(masters.values()), lr=1e-2, weight_decay=0.1)
    for x, y in _forget_batches() * 3:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:  # None: no salient entry, so no gradient at all
                masters[n].grad = p.grad[mask.masks[n]].float()
        optimizer.step()
        reference.step()
    for n, p in model.named_parameters():
        m = mask.masks[n]
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach()[~m], before[n][~m]), f"frozen entries of {n} moved"
        assert torch.equal(p.detach()[m], masters[n].detach().to(torch.bfloat16)), n
    held = [t.proxy for t in optimizer._targets]
    assert all(h.dtype == torch.float32 for h in held)
    assert sum(h.numel() for h in held) == sum(int(m.sum()) for m in mask.masks.values())  # salient entries only


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((20000,), 1.0 + 2**-9)  # a quarter of the way from 1 to the next bf16 (1 + 2**-7)
    rounded = stochastic_round_(x.clone(), torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.mean().item() - (1.0 + 2**-9)) < 2e-4  # round-to-nearest would give exactly 1.0
    negative = stochastic_round_(-x.clone(), torch.Generator().manual_seed(0)).float()
    assert torch.equal(negative, -rounded)  # symmetric: the magnitude is rounded


@pytest.mark.parametrize("master", ["salient-fp32", "bf16-stochastic"])
def test_bf16_master_modes_freeze_and_resume_exactly(master):
    """Frozen entries stay bit-identical, salient ones move, and a run resumed from the state dict (the fp32
    copies and the rounding's update counts with it) ends bit-identical; with grad release too."""
    mask = SaliencyMask.random(_mlp(), keep=0.5, seed=0)
    batches = _forget_batches() * 2
    straight, resumed, released = _bf16_mlp(), _bf16_mlp(), _bf16_mlp()
    before = {n: p.detach().clone() for n, p in straight.named_parameters()}
    options = {"lr": 1e-2, "weight_decay": 0.1, "master_weights": master, "seed": 3}
    _train_bf16(straight, build_optimizer(straight, mask, "adam", **options), batches)
    first = build_optimizer(resumed, mask, "adam", **options)
    _train_bf16(resumed, first, batches[:3])
    again = build_optimizer(resumed, mask, "adam", **options)
    again.load_state_dict(first.state_dict())
    _train_bf16(resumed, again, batches[3:])
    _train_bf16(released, build_optimizer(released, mask, "adam", grad_release=True, **options), batches)
    for n, p in straight.named_parameters():
        m = mask.masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), f"frozen entries of {n} moved"
        assert not torch.equal(p.detach()[m], before[n][m]), f"salient entries of {n} did not move"
    for other in (resumed, released):
        for p, q in zip(straight.parameters(), other.parameters()):
            assert torch.equal(p.detach(), q.detach())


def test_bf16_master_modes_need_bf16_weights():
    with pytest.raises(ConceptEraseError, match="train bf16 weights, not torch.float32"):
        build_optimizer(_mlp(), None, "adam", lr=1e-2, master_weights="salient-fp32")
    with pytest.raises(ConceptEraseError, match="unknown master weights 'fp8'"):
        build_optimizer(_mlp(), None, "adam", lr=1e-2, master_weights="fp8")


def test_masked_optimizer_resumes_exactly_from_its_state_dict():
    mask = SaliencyMask.random(_mlp(), keep=0.5, seed=0)
    straight, resumed = _mlp(), _mlp()
    opt = build_optimizer(straight, mask, "adam", lr=1e-2, weight_decay=0.1)
    _train(straight, opt, steps=6)
    first = build_optimizer(resumed, mask, "adam", lr=1e-2, weight_decay=0.1)
    _train(resumed, first, steps=3)
    state = first.state_dict()
    again = build_optimizer(resumed, mask, "adam", lr=1e-2, weight_decay=0.1)
    again.load_state_dict(state)
    for batch in (_forget_batches() * 6)[3:6]:
        again.zero_grad()
        _ce_loss(resumed, batch).backward()
        again.step()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_learning_rate_set_on_param_groups_reaches_the_packed_step():
    mask = SaliencyMask.random(_mlp(), keep=0.5, seed=0)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, mask, "sgd", lr=1.0)
    for group in optimizer.param_groups:  # what a schedule (or the classification loop's cosine) does
        group["lr"] = 0.0
    _train(model, optimizer, steps=1)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_optimizer_kinds_are_checked():
    with pytest.raises(ConceptEraseError, match="unknown optimizer 'lion'"):
        optimizer_class("lion")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConceptEraseError, match="needs bitsandbytes"):
            optimizer_class("adam8bit")


def test_weight_decay_alone_would_move_masked_weights():
    """The control for the test above: masking gradients without restoring is NOT enough with AdamW."""
    model = _mlp()
    mask = SaliencyMask.random(model, keep=0.5, seed=0)
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for name, p in model.named_parameters():
        p.register_hook(lambda g, m=mask.masks[name]: g * m)
    for batch in _forget_batches():
        optimizer.zero_grad()
        _ce_loss(model, batch).backward()
        optimizer.step()
    frozen = ~mask.masks["0.weight"]
    assert not torch.equal(model[0].weight.detach()[frozen], before[frozen])


def test_random_and_name_masks():
    model = _mlp()
    a, b = SaliencyMask.random(model, 0.25, seed=0), SaliencyMask.random(model, 0.25, seed=1)
    total = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in a.masks.values()) == round(0.25 * total)
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    named = SaliencyMask.from_names(model, r"^2\.")
    assert named.masks["2.weight"].all() and not named.masks["0.weight"].any()
    assert named.kept_fraction == pytest.approx((8 * 3 + 3) / total)
    assert [p.shape for p in named.trainable_parameters(model)] == [(3, 8), (3,)]


# ------------------------------------------------------------------------------------------ alternative scores

def test_snip_score_is_abs_of_weight_times_summed_gradient():
    """ScissorHands' connection sensitivity |theta * sum_b g_b|: a large gradient on a zero weight scores 0."""
    model = _linear(w=(0.0, -0.5), b=2.0)
    batches = [torch.tensor([[1.0, -2.0]]), torch.tensor([[2.0, 1.0]])]
    scores = compute_saliency(model, batches, _sum_loss, score="snip")
    # gradients as in the salun test: weight [3, -1], bias 2; times the weights (0, -0.5) and 2
    assert torch.equal(scores["weight"], torch.tensor([[0.0, 0.5]]))
    assert torch.equal(scores["bias"], torch.tensor([4.0]))
    salun = compute_saliency(model, batches, _sum_loss)
    assert torch.equal(salun["weight"], torch.tensor([[3.0, 1.0]]))  # the same gradients, other ranking


def test_ant_score_sums_each_rounds_absolute_gradient():
    """ANT's augmented map: |.| per round (augmentation), then the sum over rounds; SalUn's would cancel
    the two rounds' opposite signs."""
    model = _linear()
    rounds = [[torch.tensor([[1.0, -2.0]])], [torch.tensor([[-1.0, 1.0]]), torch.tensor([[-1.0, 0.0]])]]
    scores = compute_saliency(model, rounds, _sum_loss, score="ant")
    # round 1: |[1, -2]| = [1, 2]; round 2: |[-2, 1]| = [2, 1]; bias |1| + |2|
    assert torch.equal(scores["weight"], torch.tensor([[3.0, 3.0]]))
    assert torch.equal(scores["bias"], torch.tensor([3.0]))
    one_pass = compute_saliency(model, [b for r in rounds for b in r], _sum_loss)
    assert torch.equal(one_pass["weight"], torch.tensor([[1.0, 1.0]]))
    assert all(p.grad is None for p in model.parameters())


def test_scores_reach_the_mask_file_and_unknown_scores_are_refused(tmp_path):
    model = _mlp()
    for score, batches in (("snip", _forget_batches()), ("ant", [_forget_batches(), _forget_batches()[:1]])):
        mask = SaliencyMask.compute(model, batches, _ce_loss, keep=0.3, score=score)
        assert SaliencyMask.load(mask.save(tmp_path / f"{score}.safetensors"), model=model).score == score
    assert SaliencyMask.random(model, 0.3).score == "random"
    inverted = SaliencyMask.compute(model, _forget_batches(), _ce_loss, keep=0.3, lowest=True)
    assert inverted.score == "salun-inverted"
    with pytest.raises(ConceptEraseError, match="unknown saliency score 'grad'"):
        compute_saliency(model, _forget_batches(), _ce_loss, score="grad")
