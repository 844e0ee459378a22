"""Image-caption datasets for text-to-image training, and the cache of their caption embeddings.

A captioned dataset comes from the same sources as a class-conditional one (`images.resolve_dataset`) and its images
are read the same way (`images.read_image`: EXIF orientation, decompression-bomb guard, ``bad_images``). Captions
become indices into a table of distinct captions, whose text embeddings are computed once; the table can be kept in a
folder (`save_precomputed_embeddings`) with a fingerprint of everything it depends on, and is reused only when the
fingerprint matches (`load_precomputed_embeddings`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from .images import SeededItemDataset, read_image, require_columns, resolve_dataset, undecoded_images

EMBEDDINGS_FILE = "embeddings.safetensors"
EMBEDDINGS_INFO = "embeddings.json"
VALIDATION_PREFIX = "validation."  # the validation prompt's embeddings, stored in the same file
IMAGEFOLDER_CAPTIONS_HINT = (
    " An imagefolder takes its captions from a metadata.jsonl next to the images, one line per image: "
    '{"file_name": "0.png", "text": "a red circle"}.'
)


def load_captioned_images(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    *,
    config_name: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
):
    """The split's images (undecoded, for `CaptionedImageDataset`) and one caption per image: ``(data, captions,
    source)``.

    The source is found by `images.resolve_dataset` (a Hub dataset, a local dataset path, a ``save_to_disk`` folder,
    or `train_data_dir`, an imagefolder with a metadata.jsonl). A caption column of lists gives the first caption of
    each; anything else than a string is a ValueError naming the item. `max_samples` keeps that many items, drawn with
    `seed`.
    """
    folder = "an image folder with a metadata.jsonl of captions"  # how messages name a --train_data_dir
    data, source = resolve_dataset(
        dataset_name, train_data_dir, config_name=config_name, cache_dir=cache_dir, split=split, data_dir_kind=folder
    )
    hints = {caption_column: IMAGEFOLDER_CAPTIONS_HINT} if train_data_dir is not None else None
    require_columns(data, source, {image_column: "--image_column", caption_column: "--caption_column"}, hints)
    if max_samples is not None:
        data = data.shuffle(seed=seed).select(range(min(max_samples, len(data))))
    if len(data) == 0:
        raise ValueError(f"The {source} is empty.")
    captions = []
    for index, caption in enumerate(data[caption_column]):
        if isinstance(caption, (list, tuple)):
            caption = caption[0] if caption else None
        if not isinstance(caption, str):
            raise ValueError(
                f"The caption of item {index} of the {source} is {caption!r}; --caption_column must hold strings (or "
                "lists of strings, of which the first is used)."
            )
        captions.append(caption)
    data = undecoded_images(data.select_columns([image_column]), image_column)
    return data, captions, source


def caption_table(captions: list[str]) -> tuple[list[str], list[int]]:
    """The distinct captions, sorted, and each item's index into them: ``(unique_captions, caption_indices)``."""
    unique_captions = sorted(set(captions))
    position = {caption: index for index, caption in enumerate(unique_captions)}
    return unique_captions, [position[caption] for caption in captions]


class CaptionedImageDataset(SeededItemDataset):
    """Items ``{"pixel_values": (3, R, R) in [-1, 1], "caption_index": int}``.

    Crops and flips are drawn per (seed, epoch, item), so a resumed run sees exactly the augmentations of an
    uninterrupted one. An unreadable image raises a ValueError naming it with ``bad_images="stop"``; with ``"skip"``
    the item is None, and `images.collate_examples` drops and counts it. ``augmentation``: `SeededItemDataset`'s
    ``resolution``, ``center_crop``, ``random_flip``, ``seed`` and ``bad_images``.
    """

    def __init__(self, data, image_column: str, caption_indices: list[int], **augmentation):
        super().__init__(**augmentation)
        self.data, self.image_column, self.caption_indices = data, image_column, caption_indices

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        pixel_values = read_image(
            self.data[int(index)][self.image_column],
            int(index),
            self.resolution,
            self.center_crop,
            self.random_flip,
            generator=self.item_generator(int(index)),
            bad_images=self.bad_images,
        )
        if pixel_values is None:
            return None
        return {"pixel_values": pixel_values, "caption_index": self.caption_indices[index]}


class CachedLatentDataset(Dataset):
    """Items ``{"latent_parameters": VAE posterior (mean | logvar), "caption_index": int}``: the images encoded once."""

    def __init__(self, latent_parameters: torch.Tensor, caption_indices: list[int]):
        if len(latent_parameters) != len(caption_indices):
            raise ValueError(f"{len(latent_parameters)} latents but {len(caption_indices)} caption indices")
        self.latent_parameters, self.caption_indices = latent_parameters, caption_indices

    def __len__(self) -> int:
        return len(self.latent_parameters)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latent_parameters": self.latent_parameters[index], "caption_index": self.caption_indices[index]}


def embeddings_fingerprint(
    *,
    model: str,
    revision: str | None,
    pipeline: str,
    model_path: str,
    text_components: Iterable[str],
    max_sequence_length: int | None,
    captions: list[str],
) -> dict[str, Any]:
    """What caption embeddings depend on, written next to them and compared before they are reused: the model (its
    name, revision and pipeline class, and the hashes of its text encoders' and tokenizers' configs under
    `model_path`), the sequence length, and the captions."""
    text_configs = {}
    for name in text_components:
        for config_name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
            path = Path(model_path, name, config_name)
            if path.is_file():
                text_configs[f"{name}/{config_name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        "model": model,
        "revision": revision,
        "pipeline": pipeline,
        "text_components": text_configs,
        "max_sequence_length": max_sequence_length,
        "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
        "num_captions": len(captions),
    }


def save_precomputed_embeddings(
    folder: str,
    table: dict[str, torch.Tensor],
    fingerprint: dict[str, Any],
    validation: dict[str, torch.Tensor] | None = None,
    validation_prompt: str | None = None,
) -> None:
    """Write the caption table (one row per distinct caption) and, if given, the validation prompt's embeddings to
    `folder`, with `fingerprint`; the tensors first, the fingerprint last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in table.items()}
    tensors |= {f"{VALIDATION_PREFIX}{key}": value.contiguous() for key, value in (validation or {}).items()}
    save_file(tensors, folder / EMBEDDINGS_FILE)
    info = fingerprint | {"validation_prompt": validation_prompt if validation else None}
    (folder / EMBEDDINGS_INFO).write_text(json.dumps(info, indent=2))


def load_precomputed_embeddings(
    folder: str, fingerprint: dict[str, Any], validation_prompt: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None:
    """The caption table saved in `folder` and the embeddings of `validation_prompt` if they were saved with it
    (else None): ``(table, validation)``; None if the folder holds no embeddings. A ValueError, naming what differs, if
    it holds embeddings of other captions, another model or another sequence length."""
    info_file, tensor_file = Path(folder, EMBEDDINGS_INFO), Path(folder, EMBEDDINGS_FILE)
    if not (info_file.is_file() and tensor_file.is_file()):
        return None
    saved = json.loads(info_file.read_text())
    different = sorted(key for key in fingerprint if saved.get(key) != fingerprint[key])
    if different:
        raise ValueError(
            f"{folder} holds embeddings for other inputs (they differ in: {', '.join(different)}). Use another "
            "--precomputed_embeddings_dir, or delete the folder to compute them again."
        )
    tensors = load_file(tensor_file)
    table = {key: value for key, value in tensors.items() if not key.startswith(VALIDATION_PREFIX)}
    validation = None
    if validation_prompt and saved.get("validation_prompt") == validation_prompt:
        validation = {
            key.removeprefix(VALIDATION_PREFIX): value
            for key, value in tensors.items()
            if key.startswith(VALIDATION_PREFIX)
        }
    return table, validation or None
