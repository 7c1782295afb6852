"""Model families: the Conditioning batch type and family detection."""

import pytest
import torch

from concept_erase.diffusion.families import SD1, Conditioning, as_conditioning, family_of


def _cond(n, extras=True):
    g = torch.Generator().manual_seed(n)
    added = {"text_embeds": torch.randn(n, 3, generator=g), "time_ids": torch.randn(n, 6, generator=g)} if extras else {}
    return Conditioning(torch.randn(n, 4, 5, generator=g), added)


def test_conditioning_indexes_concatenates_and_expands_every_part():
    a, b = _cond(2), _cond(3)
    both = Conditioning.cat([a, b])
    assert len(both) == 5 and both.added["time_ids"].shape == (5, 6)
    assert torch.equal(both[2:].hidden, b.hidden) and torch.equal(both[2:].added["text_embeds"], b.added["text_embeds"])
    one = both[torch.tensor([4])]
    assert torch.equal(one.expand(3).added["time_ids"], b.added["time_ids"][2:].expand(3, 6))
    assert len(both[0]) == 1  # an int index keeps the batch axis
    with pytest.raises(ValueError):
        both.expand(2)
    with pytest.raises(ValueError):
        Conditioning.cat([a, _cond(1, extras=False)])


def test_unet_kwargs_pass_added_cond_only_when_present_and_cast():
    plain = as_conditioning(torch.ones(2, 3, 4))
    assert set(plain.unet_kwargs()) == {"encoder_hidden_states"}
    kwargs = _cond(2).unet_kwargs(torch.float16)
    assert kwargs["encoder_hidden_states"].dtype == torch.float16
    assert kwargs["added_cond_kwargs"]["time_ids"].dtype == torch.float16


def test_family_of_tiny_sd_pipeline_encodes_like_the_pipeline(tiny_pipeline):
    family = family_of(tiny_pipeline)
    assert family is SD1
    cond = family.encode(tiny_pipeline, ["a cat", "a dog"], "cpu")
    expected = tiny_pipeline.encode_prompt(["a cat", "a dog"], "cpu", 1, False)[0]
    assert torch.equal(cond.hidden, expected.float()) and cond.added == {}
