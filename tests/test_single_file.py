"""The original single-file key layout: export, diffusers' loader and a pickled .ckpt read it back exactly."""

import pytest
import torch
from helpers import assert_same_weights, leftovers

from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.diffusion.models.single_file import export_single_file, to_original_state_dict, unet_to_ldm
from concept_erase.errors import ConceptEraseError


def test_single_file_round_trip_through_diffusers(tmp_path, tiny_pipeline_dir, other_pipeline):
    path = export_single_file(other_pipeline, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and q.ndim == 4
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    # diffusers' own loader, configs from a folder holding OTHER weights: the file's weights must win
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_pipeline_dir), local_files_only=True)
    assert_same_weights(loaded, other_pipeline)
    # the same weights as a pickled .ckpt, read through load_pipeline (weights_only)
    torch.save({"state_dict": to_original_state_dict(other_pipeline)}, tmp_path / "model.ckpt")
    assert_same_weights(load_pipeline(tmp_path / "model.ckpt", config=tiny_pipeline_dir), other_pipeline)
    with pytest.raises(ConceptEraseError, match="already exists"):
        export_single_file(other_pipeline, path)
    with pytest.raises(ConceptEraseError, match="must end in .safetensors"):
        export_single_file(other_pipeline, tmp_path / "model.ckpt2")
    assert leftovers(tmp_path) == []


def test_unet_key_layout_matches_stable_diffusion():
    """SD 1.x's block structure (4 levels x 2 layers, no attention at the bottom) at toy width: the names
    must be the original checkpoint's, and diffusers' converter must map them back to the same tensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, 2)
    expected = {
        "down_blocks.1.attentions.1.proj_in.weight": "input_blocks.5.1.proj_in.weight",
        "down_blocks.2.downsamplers.0.conv.weight": "input_blocks.9.0.op.weight",
        "down_blocks.3.resnets.1.conv1.weight": "input_blocks.11.0.in_layers.2.weight",
        "down_blocks.2.resnets.0.conv_shortcut.weight": "input_blocks.7.0.skip_connection.weight",
        "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
        "mid_block.attentions.0.norm.weight": "middle_block.1.norm.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",
        "up_blocks.1.upsamplers.0.conv.weight": "output_blocks.5.2.conv.weight",
        "up_blocks.3.attentions.2.proj_out.bias": "output_blocks.11.1.proj_out.bias",
        "conv_norm_out.weight": "out.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
    }
    for hf, sd in expected.items():
        assert ldm[sd] is state[hf], hf
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, unet.config)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)



@pytest.mark.parametrize("prediction,family", [("epsilon", "sd2"), ("v_prediction", "sd2-v")])
def test_sd2_single_file_in_the_original_layout_loads_back_exactly(tmp_path, capsys, prediction, family):
    """SD 2.x's original layout (`v2-inference.yaml`): the OpenCLIP ViT-H encoder under cond_stage_model.model.*
    with OpenCLIP names; diffusers' reader and load_pipeline give back every tensor, with configs from a folder
    holding OTHER weights, and the folder's scheduler settles epsilon vs v-prediction."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from concept_erase.diffusion.models.tiny import build_tiny_sd2_pipeline

    config = tmp_path / "config"
    build_tiny_sd2_pipeline(seed=0, prediction_type=prediction).save_pretrained(config)
    other = build_tiny_sd2_pipeline(seed=1, prediction_type=prediction)
    path = export_single_file(other, tmp_path / "sd2.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        in_proj = f.get_tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    text = {k.removeprefix("cond_stage_model.model.") for k in keys if k.startswith("cond_stage_model.")}
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.mlp.c_fc.weight"} <= text
    assert not any("q_proj" in k or "text_model" in k for k in text)
    attn = other.text_encoder.text_model.encoder.layers[0].self_attn
    assert torch.equal(in_proj, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    assert_same_weights(loaded, other)
    again = load_pipeline(path, config=config)
    assert f"model family: {family}," in capsys.readouterr().err
    assert again.scheduler.config.prediction_type == prediction
    assert_same_weights(again, other)


def test_sdxl_single_file_in_the_sgm_layout_loads_back_exactly(tmp_path, tiny_sdxl_pipeline_dir, capsys):
    """SDXL's original (SGM) layout: the file A1111, ComfyUI and Forge read; diffusers' reader and
    load_pipeline give back every tensor, with configs from a folder holding OTHER weights."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline

    other = build_tiny_sdxl_pipeline(seed=1, layers_per_block=2, transformer_layers=(1, 2))
    path = export_single_file(other, tmp_path / "xl.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert {".".join(k.split(".")[:3]) for k in keys if k.startswith("conditioner")} == {
        "conditioner.embedders.0", "conditioner.embedders.1"}
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the pooled-text + size-id embedding
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # fused q/k/v
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert projection.shape == (48, 48) and torch.equal(projection, other.text_encoder_2.text_projection.weight.T)
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_pipeline_dir),
                                                        local_files_only=True)
    assert_same_weights(loaded, other)
    again = load_pipeline(path, config=tiny_sdxl_pipeline_dir)
    assert type(again).__name__ == "StableDiffusionXLPipeline" and "model family: sdxl" in capsys.readouterr().err
    assert_same_weights(again, other)


def test_sdxl_single_file_needs_sdxl_configs(tmp_path, tiny_sdxl_pipeline, tiny_pipeline_dir):
    path = export_single_file(tiny_sdxl_pipeline, tmp_path / "xl.safetensors")
    with pytest.raises(ConceptEraseError, match="needs --config"):
        load_pipeline(path)  # offline (conftest), no configs
    with pytest.raises(ConceptEraseError, match="is a sd1 model but .* is sdxl"):
        load_pipeline(path, config=tiny_pipeline_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xl.safetensors"]


def test_a_flipped_byte_in_an_export_is_reported_on_load(tmp_path, tiny_pipeline_dir, other_pipeline):
    """The export records its content digest in the metadata; safetensors itself has no checksum, so without
    it a flipped bit would load silently as other weights."""
    path = export_single_file(other_pipeline, tmp_path / "model.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # a bit of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ConceptEraseError, match=r"checkpoint '.*model\.safetensors' is damaged: its content digest"):
        load_pipeline(path, config=tiny_pipeline_dir)


# ------------------------------------------------------------------------------- diffusion transformers

def _same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sd3_single_file_in_the_mmdit_layout_loads_back_exactly(tmp_path, tiny_sd3_pipeline_dir, capsys):
    """SD 3's transformer alone under `model.diffusion_model.` in Stability AI's MMDiT names: diffusers' own
    reader (`SD3Transformer2DModel.from_single_file`) and load_pipeline give back every tensor, with configs
    from a folder holding OTHER weights (whose text encoders and VAE load_pipeline takes)."""
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open

    from concept_erase.diffusion.models.tiny import build_tiny_sd3_pipeline

    other = build_tiny_sd3_pipeline(seed=1)
    path = export_single_file(other, tmp_path / "sd3.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        qkv = f.get_tensor("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight")
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    assert {"model.diffusion_model.pos_embed", "model.diffusion_model.x_embedder.proj.weight",
            "model.diffusion_model.y_embedder.mlp.0.weight", "model.diffusion_model.final_layer.linear.weight",
            "model.diffusion_model.joint_blocks.1.x_block.attn.proj.weight"} <= keys
    attn = other.transformer.transformer_blocks[0].attn  # the text stream's q, k, v fused in that order
    assert torch.equal(qkv, torch.cat([attn.add_q_proj.weight, attn.add_k_proj.weight, attn.add_v_proj.weight]))
    loaded = SD3Transformer2DModel.from_single_file(str(path), config=str(tiny_sd3_pipeline_dir),
                                                    subfolder="transformer", local_files_only=True)
    _same_state(loaded.state_dict(), other.transformer.state_dict())
    capsys.readouterr()
    again = load_pipeline(path, config=tiny_sd3_pipeline_dir)
    assert "model family: sd3" in capsys.readouterr().err
    _same_state(again.transformer.state_dict(), other.transformer.state_dict())
    base = load_pipeline(tiny_sd3_pipeline_dir)
    _same_state(again.vae.state_dict(), base.vae.state_dict())
    _same_state(again.text_encoder_3.state_dict(), base.text_encoder_3.state_dict())
    with pytest.raises(ConceptEraseError, match="needs --config"):  # its text encoders and VAE
        load_pipeline(path)


def test_sd35_qk_norm_and_dual_attention_map_back_through_diffusers_converter():
    """SD 3.5's variants of the MMDiT: RMS q/k norms (`ln_q`, `ln_k`; Large) and the image-only second attention
    of the first blocks (`attn2`; Medium): diffusers' converter maps the names back to the same tensors."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from concept_erase.diffusion.models.single_file import sd3_to_mmdit

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                  num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                  pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8,
                                  qk_norm="rms_norm", dual_attention_layers=(0, 1))
    state = model.state_dict()
    original = sd3_to_mmdit(state)
    assert {"joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.2.context_block.attn.ln_k.weight"} <= set(original)
    back = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in original.items()})
    _same_state(back, state)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_bfl_layout_maps_back_through_diffusers_converter_at_flux1_width(guidance):
    """FLUX.1's original layout (`flux1-dev.safetensors`), alone and under `model.diffusion_model.`: diffusers'
    converter gives back every tensor. Its converter only reads FLUX.1's width (it hard-codes 3072 and MLP ratio
    4 to split `single_blocks.N.linear1`), so the model is FLUX.1-dev's (two blocks of each kind, guidance
    embedding or schnell's none) with each weight matrix cut to one column: the output axis, which every fused
    q/k/v and swapped modulation is laid along, is whole, and the values are distinct per row."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from concept_erase.diffusion.models.families import FLUX, family_from_keys
    from concept_erase.diffusion.models.single_file import flux_to_bfl

    with init_empty_weights():
        shapes = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=guidance).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape[0], *(1,) * (v.ndim - 1), generator=g) for k, v in shapes.items()}
    bfl = flux_to_bfl(state)
    assert {"img_in.weight", "txt_in.bias", "time_in.in_layer.weight", "vector_in.out_layer.weight",
            "double_blocks.1.img_attn.qkv.weight", "double_blocks.0.txt_mod.lin.weight",
            "double_blocks.0.txt_attn.norm.key_norm.scale", "double_blocks.1.txt_mlp.2.bias",
            "single_blocks.1.linear1.weight", "single_blocks.0.modulation.lin.bias",
            "final_layer.adaLN_modulation.1.weight"} <= set(bfl)
    assert any(k.startswith("guidance_in.") for k in bfl) == guidance
    assert bfl["single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072
    for prefix in ("", "model.diffusion_model."):
        named = {prefix + k: v for k, v in bfl.items()}
        assert family_from_keys(named) is FLUX
        _same_state(convert_flux_transformer_checkpoint_to_diffusers(dict(named)), state)


def test_flux_export_writes_the_transformer_alone_bfl_at_flux1_width_else_diffusers_names(tmp_path):
    """A FLUX pipeline's export holds its transformer alone, with no prefix, as FLUX's own files do. At FLUX.1's
    width in BFL's names (`flux_to_bfl`, checked against diffusers' converter above); at a toy width in diffusers'
    names, since diffusers' converter splits `linear1` at 3072 whatever the config: the file loads back through
    `FluxTransformer2DModel.from_single_file`, every tensor."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from concept_erase.diffusion.models.single_file import flux_single_file, flux_to_bfl
    from concept_erase.diffusion.models.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(seed=1)
    path = export_single_file(pipe, tmp_path / "flux.safetensors", dtype="bf16")
    stored = load_file(str(path))
    expected = pipe.transformer.state_dict()
    assert stored.keys() == expected.keys() and "single_transformer_blocks.0.proj_mlp.weight" in stored
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k].bfloat16()) for k, v in stored.items())
    pipe.save_pretrained(tmp_path / "folder")
    loaded = FluxTransformer2DModel.from_single_file(str(path), config=str(tmp_path / "folder"), subfolder="transformer",
                                                     local_files_only=True, torch_dtype=torch.bfloat16).state_dict()
    assert loaded.keys() == stored.keys() and all(torch.equal(loaded[k], stored[k]) for k in stored)
    with torch.device("meta"):  # FLUX.1's width, one block of each kind: BFL's names
        wide = FluxTransformer2DModel(num_layers=1, num_single_layers=1).state_dict()
    assert flux_single_file(wide).keys() == flux_to_bfl(wide).keys()


def test_a_parameter_without_an_original_name_is_refused():
    from concept_erase.diffusion.models.single_file import flux_to_bfl, sd3_to_mmdit

    with pytest.raises(ConceptEraseError, match="cannot export FLUX transformer parameter 'extra.weight'"):
        flux_to_bfl({"x_embedder.weight": torch.zeros(2, 2), "extra.weight": torch.zeros(1)})
    with pytest.raises(ConceptEraseError, match="cannot export SD 3 transformer parameter 'transformer_blocks.0.x.w'"):
        sd3_to_mmdit({"transformer_blocks.0.x.w": torch.zeros(1)})
