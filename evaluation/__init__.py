"""Evaluation: generate images over a prompt set (sharded, resumable), score them, write reports.

Layers (docs/PROTOCOLS.md): `prompts` reads I2P / class / COCO / plain-text prompt sets; `generation` renders
them under a pinned protocol; `nudity` (NudeNet), `classes` (ImageNet classifier or MiniSD judges) and
`quality` (FID, CLIP score) score images with update/compute metrics; `report` writes Markdown, charts
and grids; `cli` registers `concept-erase evaluate` and `concept-erase compare`.

Nothing here is imported by `concept_erase` (dependency direction: app -> evaluation -> concept_erase).
"""
