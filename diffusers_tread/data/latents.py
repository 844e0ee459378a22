"""VAE latents on disk: the shard format written by ``training/extract_latents.py`` and read by training.

A latents directory holds safetensors shards ``latents-00000-of-00012.safetensors`` with the tensors ``latents``
(N, C, h, w) float32 (already ``(z - shift_factor) * scaling_factor``), ``class_labels`` (N,) int64 and, when
extracted with ``--flip``, ``latents_flipped`` (the encodings of the horizontally flipped images). Extracted with
``--repa_encoder``, shards also hold ``repa_features`` (N, grid*grid, D) float32 (and ``repa_features_flipped``), the
frozen encoder's patch features for REPA (`diffusers_tread.repa`). Each shard's
header records the extraction settings. A shard is written under a ``.tmp`` name and renamed when complete, so a
file with the final name is never half-written. ``metadata.json`` is written last, once every shard exists, and is
removed when an extraction starts: its presence means the directory is complete and consistent.

Integrity: each shard's header also records a fingerprint of its source (SHA-256 of the preprocessed images and
labels it encodes, `SourceFingerprint`), so re-extracting after the images changed redoes the shards whose source
changed instead of keeping stale latents; ``metadata.json`` records each shard file's SHA-256, which
`LatentShardDataset` checks when it opens the shards (one read of every shard at start: about a second per GB on a
local SSD; ``verify_checksums=False`` skips it). Every shard error names the file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .images import seeded_generator

METADATA_NAME = "metadata.json"


def shard_file_name(index: int, num_shards: int) -> str:
    return f"latents-{index:05d}-of-{num_shards:05d}.safetensors"


def _replace_atomically(path: str, write) -> None:
    """Call ``write(temp_path)``, then rename the temp file to `path` (``os.replace`` is atomic on one filesystem)."""
    temp_path = path + ".tmp"
    write(temp_path)
    os.replace(temp_path, path)


def write_shard(path: str, tensors: dict[str, torch.Tensor], settings: dict[str, Any]) -> None:
    """Write one shard atomically, with the extraction `settings` in its header (see `read_shard_settings`)."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    header = {"settings": json.dumps(settings, sort_keys=True)}
    _replace_atomically(path, lambda temp_path: save_file(tensors, temp_path, metadata=header))


def read_shard_settings(path: str) -> dict[str, Any] | None:
    """The settings a complete shard was written with, or None if the file is missing or unreadable."""
    try:
        with safe_open(path, framework="pt") as shard:
            return json.loads(shard.metadata()["settings"])
    except Exception:  # missing, truncated, or not a shard: treat as absent
        return None


class SourceFingerprint:
    """The SHA-256 of what a shard encodes: the preprocessed images (float32, un-flipped) and their labels, in order.
    Two extractions give the same fingerprint exactly when the shard would hold the same latents' sources."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def update(self, pixel_values: torch.Tensor, class_labels: torch.Tensor) -> None:
        self._hash.update(pixel_values.detach().float().cpu().contiguous().numpy().tobytes())
        self._hash.update(class_labels.detach().long().cpu().contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (read in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shard_error(path: str, error: Exception, latents_dir: str) -> ValueError:
    return ValueError(
        f"The latent shard {path} does not load ({type(error).__name__}: {error}); it is truncated or damaged: re-run "
        f"training/extract_latents.py --output_dir {latents_dir}, which redoes it."
    )


def write_metadata(latents_dir: str, metadata: dict[str, Any]) -> None:
    path = os.path.join(latents_dir, METADATA_NAME)

    def write(temp_path: str) -> None:
        with open(temp_path, "w") as f:
            json.dump(metadata, f, indent=2)

    _replace_atomically(path, write)


def posterior_generator(seed: int, index: int, flipped: bool) -> torch.Generator:
    """The generator for image `index`'s posterior sample: one stream per (seed, image, copy), so the sample does
    not depend on the batch size, the shard size or the number of processes."""
    return seeded_generator(seed, index, int(flipped))


def load_latents_metadata(latents_dir: str) -> dict[str, Any]:
    """The ``metadata.json`` of a complete latents directory (the extraction settings, the shards, the labels); a
    FileNotFoundError saying how to complete it if there is none."""
    path = os.path.join(latents_dir, METADATA_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: run training/extract_latents.py --output_dir {latents_dir} to completion "
            "(it writes metadata.json last, once every shard is complete)."
        )
    with open(path) as f:
        return json.load(f)


def check_latents_options(
    metadata: dict[str, Any],
    *,
    resolution: int | None = None,
    center_crop: bool = False,
    random_flip: bool = False,
    sample_posterior: bool = False,
) -> list[str]:
    """Compare a training run's image options with the settings the latents were extracted with.

    Training from latents cannot re-crop, re-flip or re-sample what extraction froze, so a request the latents cannot
    honour is a ValueError naming every such option and what to do: `resolution` other than the extracted one,
    `center_crop` over randomly cropped latents, `random_flip` without stored flipped copies (``--flip``),
    `sample_posterior` over posterior means. Returns the warnings for options that are honoured only in part (today:
    `sample_posterior` over latents that hold one sample per image, drawn once at extraction).
    """
    problems, warnings = [], []
    extracted = metadata.get("resolution")
    if resolution is not None and resolution != extracted:
        problems.append(
            f"--resolution {resolution}: the latents were extracted from images at {extracted} px; drop "
            f"--resolution (or pass {extracted}), or re-extract with --resolution {resolution}"
        )
    cropped = not str(metadata.get("dataset", "")).startswith("digits:")  # the square digits are never cropped
    if center_crop and cropped and not metadata.get("center_crop"):
        problems.append(
            "--center_crop: the latents were extracted from random crops (one per image); drop --center_crop, or "
            "re-extract with --center_crop"
        )
    if random_flip and not metadata.get("flip"):
        problems.append(
            "--random_flip: the latents were extracted without --flip, so there are no flipped copies to draw from; "
            "drop --random_flip, or re-extract with --flip"
        )
    if sample_posterior and not metadata.get("sample_posterior"):
        problems.append(
            "--sample_posterior: the latents hold the VAE posterior means, not samples; drop --sample_posterior, or "
            "re-extract with --sample_posterior"
        )
    elif sample_posterior:
        warnings.append(
            "--sample_posterior: the latents hold one posterior sample per image, drawn once at extraction; "
            "training reads that sample every epoch and draws no new one"
        )
    if problems:
        raise ValueError("The options ask for what the extracted latents cannot give:\n- " + "\n- ".join(problems))
    return warnings


class LatentShardDataset(Dataset):
    """The latents written by ``training/extract_latents.py``: items ``{"latents": (C, h, w), "class_labels": int}``.

    Shards are memory-mapped and read one row per item, so a large dataset is not loaded into RAM. If flipped copies
    were stored and `random_flip` is set, an item is the flipped copy with p=0.5, drawn per (seed, epoch, item) so
    that a resumed run reads exactly what an uninterrupted one would. ``verify_checksums``: check every shard against
    the SHA-256 that extraction recorded (one read of all shards; a shard changed in place is a ValueError naming it).
    """

    def __init__(
        self,
        latents_dir: str,
        random_flip: bool = True,
        seed: int = 0,
        repa_features: bool = False,
        verify_checksums: bool = True,
    ):
        self.seed, self.epoch = seed, 0
        self.repa_features = repa_features  # items also carry "repa_features", of the same (flipped or not) copy
        self.metadata: dict[str, Any] = load_latents_metadata(latents_dir)
        self.latents_dir = latents_dir
        self.random_flip = random_flip and self.metadata["flip"]
        self.id2label = {int(k): v for k, v in self.metadata["id2label"].items()}
        self.shard_paths = [os.path.join(latents_dir, shard["file"]) for shard in self.metadata["shards"]]

        labels = []
        for shard_info, shard_path in zip(self.metadata["shards"], self.shard_paths, strict=True):
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(
                    f"The latent shard {shard_path} is missing: re-run training/extract_latents.py."
                )
            if verify_checksums and shard_info.get("sha256") and file_sha256(shard_path) != shard_info["sha256"]:
                raise ValueError(
                    f"The latent shard {shard_path} changed since extraction (its SHA-256 is not the one metadata.json "
                    f"records): it is damaged or was overwritten. Re-run training/extract_latents.py --output_dir "
                    f"{latents_dir}, which redoes it."
                )
            try:
                with safe_open(shard_path, framework="pt") as shard:
                    labels.append(shard.get_tensor("class_labels"))
            except Exception as error:  # noqa: BLE001 - safetensors' errors do not name the file
                raise _shard_error(shard_path, error, latents_dir) from error
        self.class_labels = torch.cat(labels)
        self.shard_starts = np.cumsum([0] + [len(shard_labels) for shard_labels in labels[:-1]]).tolist()
        if len(self.class_labels) != self.metadata["num_samples"]:
            raise ValueError(
                f"{latents_dir}: the shards hold {len(self.class_labels)} samples, metadata.json says "
                f"{self.metadata['num_samples']}; re-run training/extract_latents.py."
            )
        self._shards: dict[int, Any] = {}  # opened lazily, per process (DataLoader workers open their own)

    def __len__(self) -> int:
        return len(self.class_labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}}  # open file handles don't pickle

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        shard_index = bisect.bisect_right(self.shard_starts, index) - 1
        flip = self.random_flip and torch.rand((), generator=seeded_generator(self.seed, self.epoch, index)) < 0.5
        name = "latents_flipped" if flip else "latents"
        row = index - self.shard_starts[shard_index]
        try:
            if shard_index not in self._shards:
                self._shards[shard_index] = safe_open(self.shard_paths[shard_index], framework="pt")
            shard = self._shards[shard_index]
            item = {"latents": shard.get_slice(name)[row : row + 1][0].float()}
            if self.repa_features:
                features = "repa_features_flipped" if flip else "repa_features"
                item["repa_features"] = shard.get_slice(features)[row : row + 1][0].float()
        except Exception as error:  # noqa: BLE001 - safetensors' errors do not name the file
            raise _shard_error(self.shard_paths[shard_index], error, self.latents_dir) from error
        item["class_labels"] = int(self.class_labels[index])
        return item


def _same_vae(a: str, b: str) -> bool:
    if a == b:
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


def check_latents_match(
    metadata: dict[str, Any], *, in_channels: int, sample_size: int, vae: str | None = None
) -> None:
    """Raise a ValueError naming every mismatch between extracted latents and the model (and the VAE, if given)."""
    channels, size, resolution = metadata["latent_channels"], metadata["latent_size"], metadata["resolution"]
    problems = []
    if channels != in_channels:
        problems.append(
            f"the latents have {channels} channels but the model has in_channels={in_channels}: set in_channels="
            f"{channels} (and out_channels={2 * channels} with learned sigma), or re-extract with a VAE that has "
            f"{in_channels} latent channels"
        )
    if size != sample_size:
        problems.append(
            f"the latents are {size}x{size} (images at {resolution} px) but the model has sample_size={sample_size}: "
            f"set sample_size={size}, or re-extract with --resolution {sample_size * (resolution // size)}"
        )
    if vae is not None and not _same_vae(vae, metadata["vae"]):
        problems.append(
            f"the latents were encoded with the VAE {metadata['vae']!r} but this run uses {vae!r} (e.g. to decode "
            f"samples): use --vae {metadata['vae']}, or re-extract with --vae {vae}"
        )
    if problems:
        raise ValueError("The latents do not match the model:\n- " + "\n- ".join(problems))
