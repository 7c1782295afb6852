"""Images: `generate` samples them from a pipeline, `folder` keeps them resumably with a manifest, `images` makes
the forget/retain sets an erasure learns from (and their latents)."""
