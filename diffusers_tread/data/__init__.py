"""Training data: scikit-learn's digits, `datasets` image datasets, and VAE latent shards.

Not imported by ``import diffusers_tread``: the training-only dependencies (``datasets``, ``scikit-learn``) are
imported inside the functions that need them.
"""

from .images import collate_examples, load_digits, load_image_dataset, preprocess_image, seeded_generator
from .latents import LatentShardDataset, check_latents_match

__all__ = [
    "LatentShardDataset",
    "check_latents_match",
    "collate_examples",
    "load_digits",
    "load_image_dataset",
    "preprocess_image",
    "seeded_generator",
]
