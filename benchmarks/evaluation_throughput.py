"""Throughput of the evaluation hot paths, measured side by side in one run (docs/DEPENDENCIES.md: nothing else running).

1. NudeNet: `evaluation.nudity.detect` (batched ONNX calls) vs a loop of NudeNet's per-image `detect`.
2. Generation: `generate_images` with batch_size=B vs batch_size=1, same prompts and seeds.

The two variants of each pair alternate within every repeat, so machine load hits both alike; the table
gives the median images/second and the ratio. Example:
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/evaluation_throughput.py --images 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per measurement (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is shown (default 3)")
    parser.add_argument("--size", type=int, default=512, help="side of the images NudeNet scores, as SD's 512 (default)")
    parser.add_argument("--nudenet-batch", type=int, default=16, help="NudeNet batch size (default 16)")
    parser.add_argument("--model", default="minisd", help='pipeline for the generation rows: "minisd", "tiny" or a folder')
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per generated image (default 10)")
    parser.add_argument("--gen-batch", type=int, default=8, help="generation batch size (default 8)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from concept_erase.diffusion.data.generate import generate_images
    from evaluation.nudity import detect, load_detector, parse_nudenet, to_bgr_array

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.images)]
    detector = load_detector()
    if args.model == "tiny":
        from concept_erase.diffusion.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0)
    else:
        from concept_erase.diffusion.models.loading import load_pipeline

        pipe = load_pipeline(args.model)
    prompts = [f"a handwritten digit {d}" for d in ("zero", "one", "two", "three", "four", "five", "six", "seven")]
    prompts = [prompts[i % len(prompts)] for i in range(args.images)]
    seeds = list(range(args.images))

    def per_image_loop():
        return [parse_nudenet(detector.detect(to_bgr_array(im))) for im in images]

    def gen(batch):
        return lambda: generate_images(pipe, prompts, seeds, num_inference_steps=args.steps, batch_size=batch)

    pairs = {
        "NudeNet": (("per-image detect loop", per_image_loop),
                    (f"detect(batch_size={args.nudenet_batch})", lambda: detect(images, batch_size=args.nudenet_batch))),
        "generation": (("batch_size=1", gen(1)), (f"batch_size={args.gen_batch}", gen(args.gen_batch))),
    }
    for _, fn in [v for pair in pairs.values() for v in pair]:  # warm-up: sessions, kernels, caches
        fn()
    rates: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for task, pair in pairs.items():
            for name, fn in pair:
                rates.setdefault(f"{task}|{name}", []).append(_rate(fn, args.images))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.images} images, "
          f"median of {args.repeats}; NudeNet on {args.size}px, generation '{args.model}' {args.steps} steps")
    print("| task | variant | images/s | ratio vs first |\n| --- | --- | --- | --- |")
    for task, pair in pairs.items():
        base = statistics.median(rates[f"{task}|{pair[0][0]}"])
        for name, _ in pair:
            r = statistics.median(rates[f"{task}|{name}"])
            print(f"| {task} | {name} | {r:.2f} | {r / base:.2f}x |")


if __name__ == "__main__":
    main()
