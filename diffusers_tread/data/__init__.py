"""Training data: scikit-learn's digits, `datasets` image and image-caption datasets, captioned video clips, VAE
latent shards and caption embedding caches; one path for both training scripts.

Not imported by ``import diffusers_tread``: the training-only dependencies (``datasets``, ``scikit-learn``) are
imported inside the functions that need them.
"""

from .captions import (
    CachedLatentDataset,
    CaptionedImageDataset,
    caption_table,
    embeddings_fingerprint,
    load_captioned_images,
    load_precomputed_embeddings,
    save_precomputed_embeddings,
)
from .images import (
    BAD_IMAGE_POLICIES,
    BAD_IMAGES_HELP,
    collate_examples,
    first_readable_example,
    load_digits,
    load_image_dataset,
    open_image,
    preprocess_image,
    read_image,
    resolve_dataset,
    seeded_generator,
)
from .latents import LatentShardDataset, check_latents_match, check_latents_options, load_latents_metadata
from .videos import CaptionedVideoDataset, load_captioned_videos, read_video

__all__ = [
    "BAD_IMAGES_HELP",
    "BAD_IMAGE_POLICIES",
    "CachedLatentDataset",
    "CaptionedVideoDataset",
    "CaptionedImageDataset",
    "LatentShardDataset",
    "caption_table",
    "check_latents_match",
    "check_latents_options",
    "collate_examples",
    "embeddings_fingerprint",
    "first_readable_example",
    "load_captioned_images",
    "load_captioned_videos",
    "load_digits",
    "load_image_dataset",
    "load_latents_metadata",
    "load_precomputed_embeddings",
    "open_image",
    "preprocess_image",
    "read_image",
    "read_video",
    "resolve_dataset",
    "save_precomputed_embeddings",
    "seeded_generator",
]
