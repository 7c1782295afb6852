"""The original Stable Diffusion single-file layout: a pipeline's weights under the checkpoint names that
`from_single_file` and other SD tools (A1111, ComfyUI, Forge) read. SD 1.x (LDM): model.diffusion_model.*,
first_stage_model.*, cond_stage_model.transformer.* (CLIP ViT-L, transformers names); SD 2.x (LDM, `v2-inference.yaml`):
the same UNet and VAE names and cond_stage_model.model.* (OpenCLIP ViT-H names, as SDXL's second encoder); SDXL (SGM, `sd_xl_base.yaml`): the same UNet and VAE
names (plus label_emb.* for the pooled-text + size-id embedding), conditioner.embedders.0.transformer.* (CLIP
ViT-L, transformers names) and conditioner.embedders.1.model.* (OpenCLIP ViT-bigG names: fused q/k/v
`in_proj`, `text_projection` transposed). The family says which: its prefixes and which encoders take
OpenCLIP names (`families.py`). `export_single_file`
writes one `.safetensors` that loads back exactly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ConceptEraseError
from ...fingerprints import DIGEST_KEY, state_digest
from ...io_utils import atomic_file
from .loading import resolve_dtype

if TYPE_CHECKING:
    import torch

# The inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
# `convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py), written for any number of blocks
# and layers per block (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py hard-codes
# SD 1.x's 4 blocks x 2 layers). LDM numbers the UNet's sub-modules sequentially: input_blocks.0 is conv_in,
# then each down level has `layers_per_block` (resnet[, attention]) entries followed by one downsampler.

_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               # SDXL's `text_time` embedding of the pooled text embedding and size ids
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_rest(rest: str) -> str:
    for hf, ldm in _RESNET_TO_LDM:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel keys -> LDM keys (without the model.diffusion_model. prefix)."""
    if not isinstance(layers_per_block, int):
        raise ConceptEraseError(f"cannot export a UNet with per-block layer counts {layers_per_block!r}")
    n = layers_per_block + 1  # LDM entries per level: the layers, then the down/up sampler
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_FIXED:
            out[f"{_UNET_FIXED[module]}.{param}"] = value
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            index = 1 + i * n + j if side == "down" else i * n + j
            blocks = "input_blocks" if side == "down" else "output_blocks"
            rest = _resnet_rest(rest) if kind == "resnets" else rest
            out[f"{blocks}.{index}.{0 if kind == 'resnets' else 1}.{rest}"] = value
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
        if m:
            out[f"input_blocks.{(int(m.group(1)) + 1) * n}.0.op.{m.group(2)}"] = value
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
        if m:
            i = int(m.group(1))
            out[f"output_blocks.{i * n + layers_per_block}.{2 if i in up_has_attention else 1}.conv.{m.group(2)}"] = value
            continue
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            j = int(m.group(2))
            if m.group(1) == "resnets":
                out[f"middle_block.{2 * j}.{_resnet_rest(m.group(3))}"] = value
            else:
                out[f"middle_block.{2 * j + 1}.{m.group(3)}"] = value
            continue
        raise ConceptEraseError(f"cannot export UNet parameter {key!r}: it has no original Stable Diffusion name")
    return out


def _same(layers) -> int:
    """SDXL configs may list layers_per_block per level; LDM/SGM numbering needs one count."""
    if len(set(layers)) != 1:
        raise ConceptEraseError(f"cannot export a UNet with per-block layer counts {list(layers)!r}")
    return layers[0]


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL keys -> LDM keys (without the first_stage_model. prefix)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        # the decoder's levels are numbered from the bottom in LDM, from the top in diffusers
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.upsample.", new)
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new)
        if m:
            if m.group(2) not in _VAE_ATTN_TO_LDM:
                raise ConceptEraseError(f"cannot export VAE parameter {key!r}: it has no original Stable Diffusion name")
            new = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN_TO_LDM[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and m.group(2) != "group_norm":
                value = value.reshape(*value.shape, 1, 1)  # LDM's attention projections are 1x1 convolutions
        if "_blocks." in new or "mid_block." in new:
            raise ConceptEraseError(f"cannot export VAE parameter {key!r}: it has no original Stable Diffusion name")
        out[new] = value
    return out


_OPENCLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
_OPENCLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                   "text_model.embeddings.position_embedding.weight": "positional_embedding",
                   "text_model.final_layer_norm.weight": "ln_final.weight",
                   "text_model.final_layer_norm.bias": "ln_final.bias"}


def clip_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) keys -> OpenCLIP keys (the inverse of diffusers'
    `convert_open_clip_checkpoint`): q/k/v fused into one `in_proj` (rows q, k, v), `text_projection` (SDXL's
    bigG only) stored (width, projection) as OpenCLIP multiplies `x @ text_projection`. SD 2.x's diffusers
    encoder has 23 of ViT-H's 24 layers (SD 2 conditions on the penultimate layer), so its file holds
    resblocks 0-22; diffusers' reader ignores a resblocks.23 and the unused `text_projection`."""
    import torch

    out, qkv = {}, {}
    for key, value in state.items():
        if key in _OPENCLIP_FIXED:
            out[_OPENCLIP_FIXED[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            raise ConceptEraseError(f"cannot export text encoder parameter {key!r}: it has no OpenCLIP name")
        layer, rest = int(m.group(1)), m.group(2)
        q = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if q:
            qkv.setdefault((layer, q.group(2)), {})[q.group(1)] = value
            continue
        for hf, oc in _OPENCLIP_LAYER:
            if rest.startswith(hf):
                out[f"transformer.resblocks.{layer}.{oc}{rest[len(hf):]}"] = value
                break
        else:
            raise ConceptEraseError(f"cannot export text encoder parameter {key!r}: it has no OpenCLIP name")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


# ------------------------------------------------------------------------------- diffusion transformers
# The inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers` and
# `convert_sd3_transformer_checkpoint_to_diffusers` (diffusers/loaders/single_file_utils.py): per block, diffusers
# module -> original module, with the q/k/v projections that the original layouts fuse (concatenated on the output
# axis in this order) and the final modulation whose halves the original stores as (shift, scale), diffusers as
# (scale, shift). A parameter without an original name is refused, so nothing is silently dropped.

_FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
                "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
                "proj_out": "linear2"}
_FLUX_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
# a single-stream block's one input projection: q, k, v and the MLP's input, side by side
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

_SD3_TOP = {"pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "context_embedder": "context_embedder", "proj_out": "final_layer.linear"}
_SD3_JOINT = {"norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              # SD 3.5 medium's second (image-only) attention in the first blocks (MMDiT-X)
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
              "attn2.to_out.0": "x_block.attn2.proj",
              "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
_SD3_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) on the output axis: diffusers' `swap_scale_shift`, its own inverse."""
    import torch

    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first])


def _blocks_to_original(state: dict[str, torch.Tensor], blocks: dict[str, tuple[str, str, dict, dict]],
                        top: dict[str, str], norm_param: str, what: str) -> dict[str, torch.Tensor]:
    """Rename `state` by module: `top` (outside the blocks) and, per block prefix in `blocks` (diffusers prefix ->
    (original prefix, renames, fused)), each block's renames and fused q/k/v; norm weights take `norm_param`'s
    name (FLUX's RMSNorm `scale`). The final modulation's halves are swapped."""
    import torch

    out, used = {}, set()

    def put(new_module: str, param: str, value):
        if param == "weight" and new_module.split(".")[-1] in ("query_norm", "key_norm", "ln_q", "ln_k"):
            param = norm_param
        out[f"{new_module}.{param}"] = value

    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in top:
            put(top[module], param, value)
            used.add(key)
        elif module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(value)
            used.add(key)
    for block_prefix, (original, renames, fused) in blocks.items():
        for diffusers_module, original_module in renames.items():
            for param in ("weight", "bias"):
                key = f"{block_prefix}.{diffusers_module}.{param}"
                if key in state:
                    put(f"{original}.{original_module}", param, state[key])
                    used.add(key)
        for original_module, parts in fused.items():
            for param in ("weight", "bias"):
                keys = [f"{block_prefix}.{p}.{param}" for p in parts]
                if all(k in state for k in keys):
                    out[f"{original}.{original_module}.{param}"] = torch.cat([state[k] for k in keys])
                    used.update(keys)
    left = [k for k in state if k not in used]
    if left:
        raise ConceptEraseError(f"cannot export {what} parameter {left[0]!r}: it has no original single-file name")
    return out


def _block_indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))})


def flux_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> Black Forest Labs' original FLUX.1 keys (`flux1-dev.safetensors`:
    `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `img_in`, `txt_in`, ...)."""
    blocks = {f"transformer_blocks.{i}": (f"double_blocks.{i}", _FLUX_DOUBLE, _FLUX_FUSED)
              for i in _block_indices(state, "transformer_blocks")}
    blocks |= {f"single_transformer_blocks.{i}": (f"single_blocks.{i}", _FLUX_SINGLE, _FLUX_SINGLE_FUSED)
               for i in _block_indices(state, "single_transformer_blocks")}
    return _blocks_to_original(state, blocks, _FLUX_TOP, "scale", "FLUX transformer")


# diffusers' FLUX reader (`convert_flux_transformer_checkpoint_to_diffusers`) splits `single_blocks.N.linear1` at
# FLUX.1's sizes written into it (width 3072, MLP 4 x 3072), whatever the config says.
_FLUX1_LINEAR1 = (3072, 3 * 3072 + 4 * 3072)


def flux_single_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX transformer's single-file names: BFL's (`flux_to_bfl`) at FLUX.1's width, which every tool reads;
    at any other width (MiniSD-Flux's 64) diffusers' own names, as diffusers' reader cannot split BFL's
    `linear1` there but loads a file whose keys already match the model as it is
    (`FluxTransformer2DModel.from_single_file(F, config=FOLDER, subfolder="transformer")`)."""
    linear1 = state.get("single_transformer_blocks.0.attn.to_q.weight")
    if linear1 is None or (linear1.shape[1], sum(state[f"single_transformer_blocks.0.{p}.weight"].shape[0] for p in
                                                 _FLUX_SINGLE_FUSED["linear1"])) == _FLUX1_LINEAR1:
        return flux_to_bfl(state)
    return dict(state)


def sd3_to_mmdit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel keys -> Stability AI's original MMDiT keys (`sd3_medium.safetensors`
    without its `model.diffusion_model.` prefix: `joint_blocks.N.{x_block,context_block}`, `x_embedder`, ...).
    The last joint block keeps only the text stream's modulation (`context_pre_only`), whose halves diffusers
    swaps like the final layer's."""
    indices = _block_indices(state, "transformer_blocks")
    blocks = {f"transformer_blocks.{i}": (f"joint_blocks.{i}", _SD3_JOINT, _SD3_FUSED) for i in indices}
    out = _blocks_to_original({k: v for k, v in state.items() if k != "pos_embed.pos_embed"}, blocks, _SD3_TOP,
                              "weight", "SD 3 transformer")
    if "pos_embed.pos_embed" in state:
        out["pos_embed"] = state["pos_embed.pos_embed"]
    if indices:
        for param in ("weight", "bias"):
            key = f"joint_blocks.{indices[-1]}.context_block.adaLN_modulation.1.{param}"
            out[key] = _swap_halves(out[key])
    return out


# what each transformer family's `single_file_layout` names
TRANSFORMER_LAYOUTS = {"bfl": flux_single_file, "mmdit": sd3_to_mmdit}


def to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) under the original checkpoint names of its family:
    the family's key prefixes, and OpenCLIP names for the encoders it lists in `openclip_text_encoders`
    (SD 2.x: cond_stage_model.model.*; SDXL: conditioner.embedders.1.model.*). A diffusion transformer
    (SD 3, FLUX) is written alone, in its family's `single_file_layout` under its prefix, as the files people
    load it from are: what erasure changes is the transformer, and the text encoders and VAE stay the base's."""
    from .families import family_of

    family = family_of(pipe)
    prefixes = family.single_file_prefixes
    if family.single_file_layout is not None:
        state = TRANSFORMER_LAYOUTS[family.single_file_layout](family.denoiser(pipe).state_dict())
        return {prefixes[family.denoiser_name] + k: v.detach().cpu().contiguous() for k, v in state.items()}
    layers = pipe.unet.config.layers_per_block
    unet = unet_to_ldm(pipe.unet.state_dict(), layers if isinstance(layers, int) else _same(layers))
    vae = vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))
    state = {prefixes["unet"] + k: v for k, v in unet.items()}
    state.update({prefixes["vae"] + k: v for k, v in vae.items()})
    for name, encoder in family.text_modules(pipe).items():
        weights = encoder.state_dict()
        names = clip_to_openclip(weights) if name in family.openclip_text_encoders else weights
        state.update({prefixes[name] + k: v for k, v in names.items()})
    # CPU and contiguous for safetensors; no copy when already so (an SD checkpoint is GBs)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_single_file(pipe, path: str | os.PathLike, *, overwrite: bool = False,
                       dtype: str | torch.dtype | None = None) -> Path:
    """One `.safetensors` in the original layout of the pipeline's family; load it back with
    `StableDiffusionPipeline.from_single_file(path, config=<a diffusers folder of the same model>)`
    (SD 1.x and 2.x; `StableDiffusionXLPipeline` for SDXL).
    `dtype` ("fp16", "bf16", "fp32"): store the weights in that precision (default: as they are)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConceptEraseError(f"single-file export {str(path)!r} must end in .safetensors")
    state = to_original_state_dict(pipe)
    if dtype is not None:
        target = resolve_dtype(dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", DIGEST_KEY: state_digest(state)})
    return path
