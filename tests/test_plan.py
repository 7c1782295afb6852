"""The memory plan: sizes, the meta-device activation trace against a real forward, the estimate's parts."""

import shutil

import pytest
import torch
from helpers import saved_bytes

from concept_erase.diffusion.memory import backward_peak, load_counts, measure_process, no_grad_peak, trace_activations
from concept_erase.diffusion.plan import CUDA_RESERVE, estimate
from concept_erase.diffusion.plan_config import PlanConfig, parse_bytes
from concept_erase.diffusion.plan_search import describe, mask_step, search, suggestions
from concept_erase.errors import ConceptEraseError


def test_memory_sizes_parse_in_decimal_and_binary_units():
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1.5 gib") == int(1.5 * 2**30)
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("0.4GB") == 4 * 10**8 and parse_bytes("100B") == 100
    for bad in ("", "sixteen", "-1GB", "0GB", "16XB", "0.4", "16", "0.1B", "5iB"):  # a bare number is refused
        with pytest.raises(ConceptEraseError, match="not a size"):
            parse_bytes(bad)


def _saved_bytes_for_real(unet, batch, latent, cross_dim):
    """What autograd keeps for the backward pass in a real CPU forward (the kernels actually used)."""
    x = torch.randn(batch, 4, latent, latent)
    return saved_bytes(unet, lambda: unet(x, torch.zeros(batch, dtype=torch.long),
                                          encoder_hidden_states=torch.randn(batch, 77, cross_dim)))


def test_activation_trace_on_the_meta_device_matches_a_real_forward(tiny_pipeline):
    from diffusers import UNet2DConditionModel

    real = tiny_pipeline.unet.train()
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(real.config)
    cross = real.config.cross_attention_dim
    for batch in (1, 3):
        traced = trace_activations(meta, batch, 16, torch.float32, checkpointing=False)
        assert traced.total == _saved_bytes_for_real(real, batch, 16, cross)
    # only cross-attention trainable (ESD-x): autograd saves less, and the trace still follows it exactly
    for unet in (real, meta):
        for name, p in unet.named_parameters():
            p.requires_grad_(".attn2." in name)
    assert trace_activations(meta, 2, 16, torch.float32, checkpointing=False).total == _saved_bytes_for_real(
        real, 2, 16, cross) < traced.total * 2 / 3


def test_layer_scoped_methods_count_the_scope_and_state_the_loop_really_holds(tiny_pipeline_dir):
    """ESD-x trains whole cross-attention tensors, but the loop holds its scope as a bool mask over every UNet
    weight for the whole run: the plan's state must be the bytes of the real scope and optimizer state."""
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.methods import get_method
    from concept_erase.saliency import build_optimizer

    counts = load_counts(str(tiny_pipeline_dir))
    unet = load_pipeline(str(tiny_pipeline_dir)).unet
    for method in ("esd-x", "ca"):
        config = PlanConfig(model=str(tiny_pipeline_dir), batch_size=2, device="cpu", method=method)
        scope = get_method(method)(config).trainable(unet, counts.family, None)
        optimizer = build_optimizer(unet, scope, "adam", lr=1e-5)
        for p in unet.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        optimizer.step()
        real = sum(m.nbytes for m in scope.masks.values()) + sum(
            t.nbytes for s in optimizer.state.values() for t in s.values() if t.dim())
        train = estimate(config, counts).phases["training step"]
        assert train["optimizer state"] + train["layer scope (bool, 1 byte per UNet weight)"] == real
        assert "layer scope (bool, 1 byte per UNet weight)" in estimate(
            PlanConfig(model=str(tiny_pipeline_dir), batch_size=2, method=method, device="cuda"), counts).host


def test_checkpointing_and_half_precision_shrink_the_activations(tiny_pipeline):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(tiny_pipeline.unet.config)
    full = trace_activations(meta, 4, 16, torch.float32, checkpointing=False)
    ckpt = trace_activations(meta, 4, 16, torch.float32, checkpointing=True)
    half = trace_activations(meta, 4, 16, torch.bfloat16, checkpointing=False)
    assert 0 < ckpt.recompute < ckpt.total < full.total
    assert half.total < 0.6 * full.total
    assert all(p.dtype == torch.float32 for p in meta.parameters())  # the trace leaves the model as it was


def test_no_grad_forward_holds_less_than_a_training_forward_and_grows_with_the_batch(tiny_pipeline):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(tiny_pipeline.unet.config)
    one, two = (no_grad_peak(meta, b, 16, torch.float32) for b in (1, 2))
    saved = trace_activations(meta, 1, 16, torch.float32, checkpointing=False).total
    assert 0 < one < saved  # nothing is kept for a backward pass: only the skip connections and the running op
    assert two == 2 * one   # every live tensor has a batch dimension
    assert no_grad_peak(meta, 1, 16, torch.bfloat16) == one // 2
    assert all(p.dtype == torch.float32 for p in meta.parameters())


def test_backward_peak_walks_the_forward_in_reverse():
    from concept_erase.diffusion.memory import Activations

    # activations 10 @ position 1, 20 @ 3; gradients 5 (first used @ 0), 7 (@ 2)
    acts = Activations(saved=[(1, 10), (3, 20)], param_position={1: 0, 2: 2}, recompute=0, largest=20)
    grads = {1: 5, 2: 7}
    # at 3: 30 held, 0 made; at 2: 10 held + 7 = 17; at 1: 10 + 7; at 0: 0 + 12
    assert backward_peak(acts, grads, grads_exist=False) == 30
    assert backward_peak(acts, grads, grads_exist=True) == 42
    # gradient release: each gradient (+ 3 bytes of its step) lives only at its parameter's first use:
    # at 3: 30; at 2: 10 + 7 + 3; at 0: 0 + 5 + 3
    assert backward_peak(acts, grads, grads_exist=False, step_bytes=3) == 30
    acts.saved[1] = (2, 20)  # now the activations at 2 meet the gradient completed there
    assert backward_peak(acts, grads, grads_exist=False, step_bytes=3) == 40


def test_estimate_parts_follow_the_settings(tiny_pipeline_dir):
    counts = load_counts(str(tiny_pipeline_dir))
    n_unet = counts.components["unet"]
    assert set(counts.components) == {"unet", "text_encoder", "vae"}
    assert n_unet == sum(p.numel() for p in counts.unet.parameters())

    def plan(**kw):
        return estimate(PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda", **kw), counts)

    rl, salun = plan(method="rl"), plan(method="salun", keep=0.5)
    train = lambda p: p.phases["training step"]  # noqa: E731
    assert train(rl)["optimizer state"] == 8 * n_unet
    assert abs(train(salun)["optimizer state"] - 4 * n_unet) <= 8 * len(list(counts.unet.parameters()))
    assert "mask pass" in salun.phases and "mask pass" not in plan(method="salun", mask="m.safetensors").phases
    # one mask batch makes the gradients during its backward; a second adds to gradients already there
    scores = lambda p: p.phases["mask pass"]["activations + gradients (the scores) during backward"]  # noqa: E731
    assert scores(plan(method="salun", num_forget_images=4)) < scores(plan(method="salun", num_forget_images=5))
    assert scores(plan(method="salun", num_forget_images=5)) == scores(salun)
    assert "frozen original UNet (ESD)" in train(plan(method="esd-x"))
    # ESD's no-grad sampling and target forwards: cond + uncond, so twice the micro-batch; under accumulation
    # the gradients are already there for later micro-batches
    sampling = plan(method="esd-x").phases["sampling (no grad)"]
    assert sampling["no-grad forward (skip connections + the running op)"] == no_grad_peak(
        counts.unet, 8, counts.default_resolution // counts.vae_scale, torch.float32)
    assert "gradients (accumulating)" in plan(method="esd-x", gradient_accumulation_steps=2).phases["sampling (no grad)"]
    assert "sampling (no grad)" not in rl.phases
    assert train(plan(method="rl", optimizer="adam8bit"))["optimizer state"] < 0.5 * train(rl)["optimizer state"]
    assert plan(method="rl", gradient_checkpointing=True).peak < rl.peak
    # gradient accumulation: the micro-batch's activations, every gradient already there after the first
    assert plan(method="rl", gradient_accumulation_steps=4).phases["training step"][
        "activations + gradients during backward"] < train(rl)["activations + gradients during backward"]


def test_budget_verdict_and_suggestions(tiny_pipeline_dir):
    counts = load_counts(str(tiny_pipeline_dir))
    config = PlanConfig(model=str(tiny_pipeline_dir), batch_size=8, resolution=64, device="cpu")
    plan = estimate(config, counts)
    assert "fits" in describe(plan, plan.peak + 1, counts)
    text = describe(plan, plan.peak - 1, counts)
    assert "does NOT fit" in text and "fits with --" in text
    assert "no combination" in describe(plan, 1000, counts)


def test_a_cpu_plan_adds_the_measured_process_to_its_tensors(tiny_pipeline_dir, tmp_path):
    from concept_erase.runtime import resident_memory

    counts = load_counts(str(tiny_pipeline_dir))
    process = measure_process(counts, str(tiny_pipeline_dir))
    # this process, with torch and the tokenizer loaded: far more than nothing, no more than its peak resident
    # set (getrusage's figure may lag the kernel's per-thread counters by a few pages)
    assert 100 * 2**20 < process <= resident_memory(peak=True) + 2**20
    cpu = estimate(PlanConfig(model=str(tiny_pipeline_dir), batch_size=2, device="cpu"), counts)
    assert cpu.process == process and cpu.resident == cpu.peak + process
    assert not cpu.fits(cpu.peak + 1) and cpu.fits(cpu.resident)
    assert "resident" in describe(cpu) and "the process itself" in describe(cpu)
    # on a GPU the process lives in host memory: the budget is the tensors plus the CUDA reserve
    cuda = estimate(PlanConfig(model=str(tiny_pipeline_dir), batch_size=2, device="cuda"), counts)
    assert cuda.resident == cuda.peak + CUDA_RESERVE
    assert "host memory, not on the GPU: the process itself" in describe(cuda)
    # a tokenizer erase could not load either is named
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    (broken / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConceptEraseError, match="cannot load tokenizer"):
        measure_process(load_counts(str(broken)), str(broken))


def test_plan_refuses_bad_input(tmp_path):
    with pytest.raises(ConceptEraseError, match="not a size"):
        PlanConfig(model="minisd", memory_budget="lots")
    with pytest.raises(ConceptEraseError, match="not a diffusers folder"):
        load_counts(str(tmp_path / "nowhere"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConceptEraseError, match="give --config"):
        load_counts(str(tmp_path / "model.safetensors"))


def test_plan_command(tiny_pipeline_dir, capsys):
    from concept_erase.cli import main

    assert main(["plan", "--model", str(tiny_pipeline_dir), "--batch-size", "2", "--memory-budget", "1KB"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak" in out and "does NOT fit" in out
    assert main(["plan", "--model", str(tiny_pipeline_dir), "--memory-budget", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err


def test_shipped_models_plan_by_name():
    for name in ("minisd", "minisd-xl"):
        counts = load_counts(name)
        plan = estimate(PlanConfig(model=name, batch_size=2, device="cpu", method="esd-x"), counts)
        assert 0 < plan.phases["training step"]["optimizer state"] < 8 * counts.components["unet"]
    assert counts.family.name == "sdxl" and "text_encoder_2" in counts.components


@pytest.mark.parametrize("method, flags", [
    ("esd-x", ["--keep", "0.3"]),
    ("esd-u", ["--num-forget-images", "8"]),
    ("rl", ["--keep", "0.3"]),
    ("rl", ["--mask", "m.safetensors"]),
    ("ca", ["--keep", "0.3"]),
    ("uce", ["--batch-size", "4"]),
    ("uce", ["--keep", "0.3"]),
])
def test_plan_refuses_the_method_flags_erase_refuses(method, flags, tiny_pipeline_dir, tmp_path, capsys):
    """`plan` and `erase` read one run config, so a flag the method does not read is refused by both, with the
    same one line, before any work."""
    from concept_erase.cli import main

    errors = []
    for command in (["plan", "--device", "cpu"], ["erase", "--forget", "x", "--surrogate", "y", "--output",
                                                   str(tmp_path / "out")]):
        assert main([*command, "--model", str(tiny_pipeline_dir), "--method", method, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("concept-erase: error: "), err
        errors.append(err[0])
    assert errors[0] == errors[1] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [
    ["--resolution", "12"],
    ["--resolution", "100000"],
    ["--batch-size", "8", "--gradient-accumulation-steps", "3"],
    ["--keep", "1e-12"],
])
def test_plan_refuses_the_sizes_batches_and_keeps_erase_refuses(flags, tiny_pipeline_dir, tmp_path, capsys):
    """The same checks as erase (erase meets some only once the model is loaded): the same one line."""
    from concept_erase.cli import main

    errors = []
    for command in (["plan", "--device", "cpu"], ["erase", "--forget", "x", "--surrogate", "y", "--output",
                                                   str(tmp_path / "out")]):
        assert main([*command, "--model", str(tiny_pipeline_dir), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        errors.append(err[-1])
    assert errors[0] == errors[1] and errors[0].startswith("concept-erase: error: "), errors
    assert not list(tmp_path.iterdir())


def test_plan_defaults_to_minisd_on_the_device_erase_would_use(monkeypatch):
    """No CUDA context is counted on a machine without a GPU, and a GPU machine plans for its GPU; --device says
    otherwise."""
    for cuda, device in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        config = PlanConfig()
        assert (config.model, config.device) == ("minisd", None)  # chosen after the checks, which need no torch
        assert (config.on_device().device, PlanConfig(device="cpu").on_device().device) == (device, "cpu")


def test_a_concept_preset_plans_the_recipe_erase_runs():
    from concept_erase.diffusion.minisd.presets import MINISD_RECIPE
    from concept_erase.diffusion.training.config import EraseConfig

    config = PlanConfig.for_concept(concept="minisd-digit-three")
    erase = EraseConfig.for_concept(model="minisd", concept="minisd-digit-three", output="o")
    assert (config.batch_size, config.num_forget_images, config.alpha) == (
        MINISD_RECIPE["batch_size"], MINISD_RECIPE["num_forget_images"], MINISD_RECIPE["alpha"])
    assert (config.batch_size, config.num_forget_images, config.alpha, config.keep) == (
        erase.batch_size, erase.num_forget_images, erase.alpha, erase.keep)
    assert config.batch_size != PlanConfig().batch_size  # the preset, not the dataclass's default
    assert PlanConfig.for_concept(concept="minisd-digit-three", batch_size=4).batch_size == 4  # a typed flag wins
    esd = PlanConfig.for_concept(concept="minisd-digit-three", method="esd-u")  # no retain term: the recipe's alpha
    assert esd.alpha == EraseConfig.for_concept(model="minisd", concept="minisd-digit-three", output="o",
                                                method="esd-u").alpha == 0


def test_plan_command_plans_the_default_model_and_states_the_budget_in_both_units(capsys):
    from concept_erase.cli import main

    assert main(["plan", "--concept", "minisd-digit-three", "--memory-budget", "16GB"]) == 0
    out = capsys.readouterr().out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert out.startswith("Memory plan: salun on minisd for minisd-digit-three (") and f"; device {device}\n" in out
    assert "batch 16 forget + 16 retain" in out
    verdict = next(line for line in out.splitlines() if line.startswith("budget "))
    assert verdict.startswith(f"budget 16GB = {16e9 / 2**30:.2f} GiB (GB: 10^9 bytes; GiB") and ": fits" in verdict
    assert main(["plan", "--concept", "nudity"]) == 2  # a preset for Stable Diffusion, as erase refuses it
    assert "written for Stable Diffusion checkpoints" in capsys.readouterr().err


def test_a_binary_budget_is_shown_as_written(tiny_pipeline_dir):
    counts = load_counts(str(tiny_pipeline_dir))
    plan = estimate(PlanConfig(model=str(tiny_pipeline_dir), batch_size=2, device="cpu", memory_budget="24GiB"), counts)
    assert "budget 24GiB (24.00 GiB): fits" in describe(plan, parse_bytes("24GiB"), counts)


def test_memory_settings_change_the_bytes_they_hold(tiny_pipeline_dir):
    """Each setting of layout.py changes only its own part: the bitmask is a bit per entry of a partially salient
    weight, bf16 weights halve the weights and gradients (salient-fp32 adds 4 bytes per salient entry), gradient
    release leaves only the largest gradient in the backward pass, sharding divides by the processes, ZeRO's
    offload moves the optimizer state to the host."""
    counts = load_counts(str(tiny_pipeline_dir))
    n_unet = counts.components["unet"]
    numels = [p.numel() for p in counts.unet.parameters()]
    k = sum(round(0.5 * n) for n in numels)

    def train(**kw):
        config = PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda", mask="m", **kw)
        return estimate(config, counts).phases["training step"]

    base = train()
    assert base["mask (1 bit per entry of a partially salient weight)"] == sum(-(-n // 8) for n in numels)
    assert base["weights (fp32 UNet master)"] == 4 * n_unet
    bf16 = train(mixed_precision="bf16", master_weights="bf16-stochastic")
    assert bf16["weights (bf16 UNet)"] == 2 * n_unet and "half-precision weight copies (autocast)" not in bf16
    salient = train(mixed_precision="bf16", master_weights="salient-fp32")
    assert salient["fp32 master of the salient entries"] == 4 * k
    backward = "activations + gradients during backward"
    released = train(grad_release=True)
    grads = 4 * n_unet
    # one tensor at a time: its fp32 gradient, then its salient half's values, gradients, int64 index and (CUDA)
    # foreach Adam's temporary: 4 + 0.5 * (4 + 4 + 8 + 4) bytes per entry
    assert base[backward] - grads <= released[backward] <= base[backward] + 14 * max(numels)
    assert "optimizer step" not in estimate(PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda",
                                                       mask="m", grad_release=True), counts).phases
    fsdp = train(num_processes=2, sharding="fsdp")
    assert fsdp["weights (fp32 UNet master, 1/2 of the UNet per process)"] == 2 * n_unet
    assert fsdp["optimizer state"] == -(-base["optimizer state"] // 2)
    assert fsdp["gathered blocks (the largest, twice)"] == 8 * counts.largest_block > 0
    zero2 = train(num_processes=2, sharding="zero2")
    assert zero2["weights (fp32 UNet master)"] == 4 * n_unet and zero2["optimizer state"] == fsdp["optimizer state"]
    offload = estimate(PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda", mask="m",
                                  num_processes=2, sharding="zero3", offload_optimizer=True), counts)
    assert "optimizer state" not in offload.phases["training step"]
    assert offload.host["optimizer state (ZeRO CPU offload)"] == fsdp["optimizer state"]


def test_plan_refuses_settings_erase_refuses(tiny_pipeline_dir):
    for bad, match in (({"offload_optimizer": True}, "needs --sharding zero2 or zero3"),
                       ({"master_weights": "salient-fp32"}, "needs --mixed-precision bf16"),
                       ({"grad_release": True, "gradient_accumulation_steps": 2}, "--grad-release one micro-batch"),
                       ({"grad_release": True, "num_processes": 2}, "--grad-release one micro-batch"),
                       ({"num_processes": 3}, "divisible by processes")):
        with pytest.raises(ConceptEraseError, match=match):
            PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda", **bad)


def test_suggestions_use_the_memory_settings_and_a_mask_made_beforehand(tiny_pipeline_dir):
    """A budget below the mask pass but above the lightest training step: only a mask made beforehand fits,
    and the answer says so and what that pass needs."""
    counts = load_counts(str(tiny_pipeline_dir))
    config = PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda")
    plan = estimate(config, counts)
    lightest = estimate(PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda", mask="m",
                                   gradient_checkpointing=True, mixed_precision="bf16", optimizer="adam8bit",
                                   grad_release=True, master_weights="bf16-stochastic"), counts)
    budget = lightest.resident + 1
    assert sum(plan.phases["mask pass"].values()) + CUDA_RESERVE > budget
    fixes = suggestions(config, budget, counts)
    assert fixes and all(change.get("mask") == "MASK" and fixed.fits(budget) for change, fixed in fixes)
    text = describe(plan, budget, counts)
    assert "fits with" in text and "1. concept-erase mask" in text and "2. concept-erase erase" in text


def test_the_shipped_accelerate_configs_select_their_engines():
    """configs/accelerate/*.yaml parse as accelerate's launch configs and name the engine the plan's --sharding
    models; their DeepSpeed sections are what accelerate's DeepSpeedPlugin takes (it needs no CUDA to build)."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    folder = Path(__file__).parents[1] / "configs" / "accelerate"
    engines = {}
    for path in sorted(folder.glob("*.yaml")):
        config = load_config_from_file(str(path))
        engines[path.stem] = config.distributed_type.value
        if config.deepspeed_config:
            ds = config.deepspeed_config
            plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], offload_param_device=ds["offload_param_device"],
                                     offload_optimizer_device=ds["offload_optimizer_device"])
            assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        if config.fsdp_config:
            # FSDP2 (the loop's own fully_shard keeps parameter names: the mask finds them), and a plugin that
            # starts without a GPU (FSDP1's sync_module_states does not)
            assert config.fsdp_config["fsdp_version"] == 2
            assert FullyShardedDataParallelPlugin(fsdp_version=2).fsdp_version == 2
    assert engines == {"deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP", "zero3_offload": "DEEPSPEED"}


def test_activations_of_any_batch_come_from_two_or_three_traces(tiny_pipeline_dir):
    """The suggestions ask for many batches: each (resolution, dtype, checkpointing, scope) is traced at two
    consecutive batches (three where batch 1 takes another graph) and extended linearly, exactly."""
    counts = load_counts(str(tiny_pipeline_dir))
    names = {name for name, _ in counts.unet.named_parameters()}
    for checkpointing in (False, True):
        for batch in (1, 3, 6):
            exact = trace_activations(counts.unet, batch, 8, torch.float32, checkpointing)
            planned = counts.activations(batch, 8, torch.float32, checkpointing, names)
            assert (planned.total, planned.recompute, planned.largest) == (exact.total, exact.recompute, exact.largest)
        traced = counts.traces[(8, torch.float32, checkpointing, frozenset(names))]
        assert set(traced) <= {1, 2, 3}


def test_the_search_stops_at_the_fewest_changes_that_fit(tiny_pipeline_dir, monkeypatch):
    """A combination with more changes is never shown before one with fewer, so once a number of changes has
    enough answers the rest are not estimated (a 12B transformer's plan answers in seconds)."""
    import concept_erase.diffusion.plan_search as plan_search

    counts = load_counts(str(tiny_pipeline_dir))
    config = PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device="cuda", method="rl")
    plan = estimate(config, counts)
    calls = []
    monkeypatch.setattr(plan_search, "estimate", lambda c, n: calls.append(c) or estimate(c, n))
    fixes, _ = search(config, plan.resident - 1, counts, limit=1)  # any single saving fits
    assert len(fixes) == 1 and len(fixes[0][0]) == 1
    assert all(sum(getattr(c, k) != getattr(config, k) for k in ("gradient_checkpointing", "mixed_precision",
               "optimizer", "grad_release", "master_weights", "gradient_accumulation_steps")) == 1 for c in calls)
    calls.clear()
    fixes, lightest = search(config, 1000, counts)  # nothing fits: every combination tried, the lightest named
    assert not fixes and len(calls) > 20
    assert lightest[1].resident == min(estimate(c, counts).resident for c in calls)
    assert "the lightest, --" in describe(plan, 1000, counts)


def test_a_masked_optimizer_step_holds_the_gradients_and_one_tensor_at_a_time(tiny_pipeline_dir):
    """`MaskedOptimizer` gathers, steps and scatters one tensor's salient entries at a time while the others'
    full gradients wait: the step holds every gradient plus one tensor's fp32 values, gradients and int64 index
    (on CUDA also foreach Adam's temporary), never the packed copy of every salient entry at once."""
    counts = load_counts(str(tiny_pipeline_dir))
    n_unet, largest = counts.components["unet"], max(p.numel() for p in counts.unet.parameters())
    for device, per_entry in (("cpu", 16), ("cuda", 20)):
        config = PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device=device, mask="m")
        step = estimate(config, counts).phases["optimizer step"]["gradients and step temporaries"]
        assert step == 4 * n_unet + per_entry * round(0.5 * largest)
        bf16 = PlanConfig(model=str(tiny_pipeline_dir), batch_size=4, device=device, mask="m",
                          mixed_precision="bf16", master_weights="bf16-stochastic")
        assert estimate(bf16, counts).phases["optimizer step"]["gradients and step temporaries"] == (
            2 * n_unet + per_entry * round(0.5 * largest))


def test_a_mask_made_beforehand_is_answered_as_two_commands_with_the_mask_pass_own_settings(tiny_pipeline_dir):
    """The mask pass cannot take the training's savings (fp32 weights and their fp32 gradients, the scores),
    but it honours its batch and gradient checkpointing: the answer is the mask command with the lightest of
    those that fits (or, where none does, what it needs on a CPU), then erase --mask; its figure is the pass at
    that batch, not at the run's micro-batch."""
    from concept_erase.cli import build_parser

    counts = load_counts(str(tiny_pipeline_dir))
    counts.process = 500 * 2**20
    config = PlanConfig(model=str(tiny_pipeline_dir), batch_size=8, device="cuda", resolution=64)
    users = sum(estimate(config, counts).phases["mask pass"].values())
    light = mask_step(config, 2**50, counts)
    assert light.fits and (light.batch, light.checkpointing) == (8, False)  # nothing to change
    lightest = mask_step(config, 1, counts)
    assert not lightest.fits and (lightest.batch, lightest.checkpointing) == (1, True)
    assert lightest.need - CUDA_RESERVE < users
    assert lightest.cpu_need > lightest.need - CUDA_RESERVE + counts.process  # + the bool mask on the host
    fits_light = mask_step(config, lightest.need, counts)
    assert fits_light.fits and fits_light.need <= lightest.need
    # the printed mask command is one the mask parser takes
    plan = estimate(config, counts)
    text = describe(plan, lightest.need, counts)
    mask_line = next(line for line in text.splitlines() if line.strip().startswith("1. concept-erase mask"))
    args = mask_line.split("concept-erase ", 1)[1].replace("PROMPT", "x").split()
    parsed = build_parser().parse_args(args)
    assert parsed.gradient_checkpointing is fits_light.checkpointing and parsed.batch_size == fits_light.batch
    assert "2. concept-erase erase" in text and "fits this budget on this GPU" in text
