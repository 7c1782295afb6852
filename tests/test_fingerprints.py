"""Model identities: the architecture fingerprint ignores values, the weights digest sees one changed bit, the
pipeline digest covers every component that decides pixels."""

import copy

import torch

from concept_erase.fingerprints import model_fingerprint, pipeline_digest, weights_digest


def test_architecture_fingerprint_ignores_values_and_weights_digest_does_not():
    a = torch.nn.Linear(3, 2)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.weight.view(-1)[0] = torch.nextafter(b.weight.view(-1)[0], torch.tensor(1.0))  # one ulp
    assert model_fingerprint(a) == model_fingerprint(b) and weights_digest(a) != weights_digest(b)
    assert model_fingerprint(a) != model_fingerprint(torch.nn.Linear(3, 3))


def test_pipeline_digest_covers_components_and_scheduler(tiny_pipeline):
    before = pipeline_digest(tiny_pipeline)
    weights_only = pipeline_digest(tiny_pipeline, scheduler=False)
    tiny_pipeline.scheduler.register_to_config(steps_offset=0)
    assert pipeline_digest(tiny_pipeline) != before  # another sampler config draws other images
    assert pipeline_digest(tiny_pipeline, scheduler=False) == weights_only
    with torch.no_grad():
        next(tiny_pipeline.vae.parameters()).view(-1)[0] += 1
    assert pipeline_digest(tiny_pipeline, scheduler=False) != weights_only
    tiny_pipeline.text_encoder_2 = copy.deepcopy(tiny_pipeline.text_encoder)  # SDXL's second encoder counts
    assert pipeline_digest(tiny_pipeline, scheduler=False) != weights_only
