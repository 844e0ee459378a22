"""Captioned video clips for text-to-video LoRA training: a folder of clips (mp4, webm, gif) and/or images with a
``metadata.jsonl`` of captions, read as fixed-length, square clips ``(3, F, R, R)`` in [-1, 1].

Clips are decoded by ``imageio-ffmpeg``, whose wheel ships an FFmpeg binary (no system codecs needed). Which frames
and which crop an item gets is drawn from the per-(seed, epoch, item) generator (`images.seeded_generator`), so that a
resumed run reads exactly the clips of an uninterrupted one. An unreadable clip (corrupt, not a video, or shorter than
``num_frames``) follows ``bad_images``, as an unreadable image does: "stop" names the file, "skip" drops the item
(`images.collate_examples` counts it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import UNREADABLE_IMAGE_ERRORS, SeededItemDataset, open_image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mov", ".mkv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# What a clip that cannot be read raises: imageio-ffmpeg's OSError/RuntimeError (FFmpeg could not open or decode it),
# the ValueError of `read_video` (too short, wrong frame size), and whatever PIL raises for an image.
UNREADABLE_VIDEO_ERRORS = (RuntimeError, *UNREADABLE_IMAGE_ERRORS)


def decode_frames(path: str | Path, resolution: int) -> list[Image.Image]:
    """Every frame of the clip at ``path`` as an RGB PIL image, its shorter side resized to ``resolution`` (bilinear,
    as `images.preprocess_image` resizes an image), so that a long clip costs R x R' x 3 bytes per frame in memory.
    A still image is a one-frame clip."""
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        frames = [open_image(str(path), "RGB")]
    else:
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        try:
            meta = next(reader)
        except OSError as error:  # FFmpeg's whole log: keep its last line, which says what went wrong
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise OSError(f"FFmpeg could not open it ({lines[-1] if lines else error})") from None
        width, height = meta["size"]
        frames = []
        try:
            for raw in reader:
                array = np.frombuffer(raw, dtype=np.uint8)
                if array.size != width * height * 3:
                    raise ValueError(f"a frame of {array.size} bytes, not {width}x{height}x3")
                frames.append(resize_shorter_side(Image.fromarray(array.reshape(height, width, 3)), resolution))
        finally:
            reader.close()
        return frames
    return [resize_shorter_side(frame, resolution) for frame in frames]


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    return image.resize(size, Image.Resampling.BILINEAR)


def read_video(
    path: str | Path,
    num_frames: int,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``num_frames`` consecutive frames of the clip at ``path`` as a ``(3, F, R, R)`` float tensor in [-1, 1].

    The first frame is drawn uniformly from the clip's valid starts (the first one with ``center_crop``), then the
    square crop (centred, or at a random offset) and, with ``random_flip``, a horizontal flip with p=0.5; the same
    crop and flip for every frame. All draws use ``generator``, in this order (start, top, left, flip). A clip with
    fewer frames than ``num_frames`` is a ValueError.
    """
    frames = decode_frames(path, resolution)
    if len(frames) < num_frames:
        raise ValueError(f"it has {len(frames)} frames, fewer than --num_frames {num_frames}")
    if center_crop:
        start = (len(frames) - num_frames) // 2
    else:
        start = int(torch.randint(0, len(frames) - num_frames + 1, (), generator=generator))
    frames = frames[start : start + num_frames]
    width, height = frames[0].size
    free_x, free_y = width - resolution, height - resolution
    if center_crop:
        left, top = int(round(free_x / 2)), int(round(free_y / 2))
    else:
        top = int(torch.randint(0, free_y + 1, (), generator=generator))
        left = int(torch.randint(0, free_x + 1, (), generator=generator))
    flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    arrays = []
    for frame in frames:
        frame = frame.crop((left, top, left + resolution, top + resolution))
        if flip:
            frame = frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arrays.append(np.asarray(frame, dtype=np.float32))
    video = np.stack(arrays) / 127.5 - 1.0  # (F, R, R, 3)
    return torch.from_numpy(np.ascontiguousarray(video.transpose(3, 0, 1, 2)))


def load_captioned_videos(
    train_data_dir: str,
    caption_column: str = "text",
    file_column: str = "file_name",
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[list[Path], list[str], str]:
    """The clips (and images) listed in ``train_data_dir``/metadata.jsonl and their captions: ``(files, captions,
    source)``. Each line is a JSON object with the file (relative to the folder) under ``file_column`` and the caption
    under ``caption_column``. A missing folder, metadata file, column or file is a ValueError that names it.
    ``max_samples`` keeps that many items, drawn with ``seed``."""
    folder = Path(train_data_dir)
    source = f"video folder {str(folder)!r}"
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise ValueError(
            f"The {source} has no {METADATA_FILE}: add one line per clip, e.g. "
            '{"file_name": "clip0.mp4", "text": "a red ball bouncing"}.'
        )
    files, captions = [], []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata}, line {number}: not JSON ({error}).") from None
        for column, flag in ((file_column, "the file"), (caption_column, "--caption_column")):
            if column not in row:
                raise ValueError(f"{metadata}, line {number}: no {column!r} ({flag}); its keys are {sorted(row)}.")
        caption = row[caption_column]
        if isinstance(caption, (list, tuple)):
            caption = caption[0] if caption else None
        if not isinstance(caption, str):
            raise ValueError(f"{metadata}, line {number}: the caption is {caption!r}, not a string.")
        path = folder / row[file_column]
        if path.suffix.lower() not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
            raise ValueError(
                f"{metadata}, line {number}: {row[file_column]!r} is neither a clip ({', '.join(VIDEO_EXTENSIONS)}) "
                f"nor an image ({', '.join(IMAGE_EXTENSIONS)})."
            )
        if not path.is_file():
            raise ValueError(f"{metadata}, line {number}: {path} does not exist.")
        files.append(path)
        captions.append(caption)
    if not files:
        raise ValueError(f"The {source} is empty ({metadata} lists no clips).")
    if max_samples is not None and max_samples < len(files):
        keep = sorted(np.random.default_rng(seed).permutation(len(files))[:max_samples].tolist())
        files, captions = [files[i] for i in keep], [captions[i] for i in keep]
    return files, captions, source


class CaptionedVideoDataset(SeededItemDataset):
    """Items ``{"pixel_values": (3, F, R, R) in [-1, 1], "caption_index": int}`` from `load_captioned_videos`' files.

    Frames, crops and flips are drawn per (seed, epoch, item) (`set_epoch` is called by Accelerate's data loader), so a
    resumed run reads exactly the clips of an uninterrupted one. An unreadable or too short clip raises a ValueError
    naming it with ``bad_images="stop"``; with ``"skip"`` the item is None. ``augmentation``: `SeededItemDataset`'s
    ``resolution``, ``center_crop``, ``random_flip``, ``seed`` and ``bad_images``.
    """

    def __init__(self, files: list[Path], caption_indices: list[int], num_frames: int, **augmentation):
        super().__init__(**augmentation)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.files, self.caption_indices, self.num_frames = files, caption_indices, num_frames

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        try:
            video = read_video(
                self.files[index],
                self.num_frames,
                self.resolution,
                self.center_crop,
                self.random_flip,
                generator=self.item_generator(index),
            )
        except UNREADABLE_VIDEO_ERRORS as error:
            if self.bad_images == "skip":
                return None
            raise ValueError(
                f"Could not read the clip of item {index} ({self.files[index]}): {error}. Fix or remove it, or pass "
                "--bad_images skip to skip unreadable clips (they are counted and logged)."
            ) from error
        return {"pixel_values": video, "caption_index": self.caption_indices[index]}
