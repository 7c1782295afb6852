"""Real-scale check of the single-file export: the SD 1.5 architecture (random weights, built from a config
folder such as ../shared/sd15-skeleton) -> `export_single_file` -> diffusers' own `from_single_file` -> the
same weights, tensor for tensor. Also checks the key names against the original SD 1.5 layout that
diffusers' loader detects, and prints time, file size and key counts.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/single_file_sd15.py ../shared/sd15-skeleton [--dtype fp16]

fp16 by default to halve memory (~7 GB peak); no GPU needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def build_random(config_dir: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.schedulers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")).to(dtype)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")).to(dtype)
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")).to(dtype)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(config_dir / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(config_dir / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a diffusers folder with the SD 1.5 configs (no weights needed)")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"), help="weights dtype (default fp16)")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from concept_erase.diffusion.models.single_file import export_single_file

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    t0 = time.perf_counter()
    pipe = build_random(args.config, dtype)
    t_build = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15.safetensors"
        t0 = time.perf_counter()
        export_single_file(pipe, path)
        t_export = time.perf_counter() - t0
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            model_type = infer_diffusers_model_type({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in keys})
        t0 = time.perf_counter()
        loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(args.config), torch_dtype=dtype,
                                                          local_files_only=True, safety_checker=None,
                                                          feature_extractor=None, requires_safety_checker=False)
        t_load = time.perf_counter() - t0
        size = path.stat().st_size
    mismatched = []
    counts = {}
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        counts[name] = len(a)
        if a.keys() != b.keys():
            mismatched.append(f"{name}: keys differ {sorted(set(a) ^ set(b))[:3]}")
        mismatched += [f"{name}.{k}" for k in a if k in b and not torch.equal(a[k], b[k])]
    print("| check | value |")
    print("| --- | --- |")
    print(f"| architecture detected by diffusers from the keys | {model_type} |")
    print(f"| tensors in the file | {len(keys)} (unet {counts['unet']}, vae {counts['vae']}, text {counts['text_encoder']}) |")
    print(f"| file size | {size / 2**30:.2f} GiB ({args.dtype}) |")
    print(f"| build random pipeline / export / from_single_file | {t_build:.1f} s / {t_export:.1f} s / {t_load:.1f} s |")
    print(f"| tensors not identical after the round trip | {len(mismatched)} {mismatched[:5]} |")
    raise SystemExit(1 if mismatched else 0)


if __name__ == "__main__":
    main()
