"""Image datasets as tensors in [-1, 1]: items are ``{"pixel_values": (C, R, R) float32, "class_labels": int}``.

Also what every image data path shares (the caption datasets of `captions.py` too): where a dataset comes from
(`resolve_dataset`), how an image is opened (`open_image`) and read into a tensor (`read_image`), and what an
unreadable one does (`BAD_IMAGE_POLICIES`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

DIGITS_SPLIT_SEED = 0  # fixed, so that every run and benchmark holds out the same digits
BAD_IMAGE_POLICIES = ("stop", "skip")
BAD_IMAGES_HELP = "unreadable images: stop naming the file, or skip them (counted in the logs)"
# What opening or decoding a broken image raises: PIL's OSError/SyntaxError (corrupt, truncated, not an image), a
# ValueError, and PIL's decompression-bomb guard (an image of more than 2 x Image.MAX_IMAGE_PIXELS pixels).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# An image longer than this many times its width (or the reverse) is unreadable: resizing its short side to the
# resolution would cost up to this many times a square image's memory and time (a 39 KB PNG of 1 x 10,000,000 pixels
# passes the decompression-bomb guard, then needs ~7.7 GB at a 16-px short side).
MAX_ASPECT_RATIO = 100
# PIL modes with more than 8 bits per pixel: 16-bit integer ("I;16*", and "I", which 16-bit PNG and TIFF files also
# open as) and 32-bit float ("F"). PIL's conversion to "L"/"RGB" clips them at 255, so a dark 16-bit picture reads as
# near-white; `to_8_bit` scales them instead.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator for one (seed, epoch, item, ...) key: the same key gives the same draws in every run,
    whatever the batch size, number of workers or processes, or where a run was resumed."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class TensorImageDataset(Dataset):
    """Images already in memory, e.g. the digits."""

    def __init__(self, pixel_values: torch.Tensor, class_labels: torch.Tensor):
        self.pixel_values = pixel_values
        self.class_labels = class_labels

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixel_values[index], "class_labels": int(self.class_labels[index])}


def digits_split_indices(labels: np.ndarray, split: str = "all", test_fraction: float = 0.2) -> np.ndarray:
    """Sorted indices of a stratified split of the digits.

    Per class, a fixed permutation (NumPy's legacy ``RandomState``, whose stream never changes across versions)
    puts its first ``round(test_fraction * n_class)`` images in "test" and the rest in "train"; "all" is everything.
    """
    if split == "all":
        return np.arange(len(labels))
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[: round(test_fraction * len(members))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def load_digits(
    resolution: int = 16, split: str = "all", test_fraction: float = 0.2, num_channels: int = 1
) -> tuple[TensorImageDataset, dict[int, str]]:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 16 grey levels, classes 0-9) at `resolution`.

    `split` is "all", or "train"/"test" from a fixed stratified split holding out `test_fraction` of each class
    (see `digits_split_indices`); the two are disjoint and the same on every call. `num_channels` > 1 repeats the
    grey channel (e.g. 3 for an RGB VAE).
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    indices = digits_split_indices(digits.target, split, test_fraction)
    pixel_values = torch.from_numpy(digits.images[indices]).float().unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if resolution != pixel_values.shape[-1]:
        # Bilinear rather than nearest: the 8x8 digits are coarse samples of smooth pen strokes, and nearest would
        # turn every source pixel into a flat block (at 16 px and patch size 2, every token one flat colour).
        # Bilinear weights are convex, so values stay in [-1, 1]; antialias only matters when shrinking.
        pixel_values = F.interpolate(
            pixel_values, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        ).clamp(-1.0, 1.0)
    pixel_values = pixel_values.repeat(1, num_channels, 1, 1)
    class_labels = torch.from_numpy(digits.target[indices]).long()
    return TensorImageDataset(pixel_values, class_labels), {i: str(i) for i in range(10)}


def preprocess_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    mode: str = "RGB",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PIL image -> (C, R, R) float tensor in [-1, 1], like the torchvision transforms of Diffusers' examples.

    Converts to `mode` ("RGB" or "L"; alpha is dropped), resizes the shorter side to `resolution` (bilinear), crops a
    square at the center or at a random offset, and flips horizontally with p=0.5 if `random_flip`. The random draws
    use `generator`, else torch's global RNG. An image more than `MAX_ASPECT_RATIO` times longer than wide (or the
    reverse) is a ValueError before any resizing (`read_image` treats it as unreadable).
    """
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(
            f"the image is {width}x{height} pixels, longer than {MAX_ASPECT_RATIO} times its width (or height): "
            f"resizing its short side to {resolution} would take {max(width, height) * resolution // min(width, height)}"
            f" x {resolution} pixels"
        )
    image = to_8_bit(image).convert(mode)
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    image = image.resize(size, Image.Resampling.BILINEAR)
    free_x, free_y = size[0] - resolution, size[1] - resolution
    if center_crop:
        left, top = int(round(free_x / 2)), int(round(free_y / 2))
    else:
        top = int(torch.randint(0, free_y + 1, (), generator=generator))
        left = int(torch.randint(0, free_x + 1, (), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand((), generator=generator) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or float greyscale image (`HIGH_BIT_DEPTH_MODES`) as an 8-bit "L" image of the same brightness:
    16-bit integers (0..65535; "I" is taken in that range too) are divided by 257, floats (0..1, as float TIFFs
    store them) multiplied by 255, rounded and clipped to 0..255. Other images are returned as they are."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    array = np.asarray(image, dtype=np.float64)
    array = array * 255.0 if image.mode == "F" else array / 257.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(array)), 0, 255).astype(np.uint8), mode="L")


def open_image(image, mode: str | None = None) -> Image.Image:
    """A PIL image from what a dataset's image column holds: a decoded image, an undecoded ``datasets.Image`` value
    (``{"bytes", "path"}``) or a file path.

    The image is turned upright by its EXIF orientation (as photos from cameras and phones need) and, if `mode` is
    given, converted to it ("RGB" or "L"; alpha is dropped, a palette with transparency goes through RGBA, 16-bit
    and float images are scaled to 8 bits by `to_8_bit`). PIL's
    decompression-bomb guard applies: an image of more than twice ``Image.MAX_IMAGE_PIXELS`` pixels raises
    ``Image.DecompressionBombError``. Every failure raises one of `UNREADABLE_IMAGE_ERRORS`.
    """
    if isinstance(image, dict):  # undecoded `datasets.Image`
        if image.get("bytes"):
            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = Image.open(image["path"])
        else:
            raise ValueError("the item has neither image bytes nor a path")
    elif isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected an image, a file path or image bytes, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    if mode is not None:
        image = to_8_bit(image)  # 16-bit and float images keep their brightness (PIL's convert would clip them)
    if mode is not None and image.mode != mode:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert(mode)
    return image


def describe_image(image, index: int) -> str:
    """How an error names a dataset item: ``item 3 (photos/cat.jpg)``."""
    if isinstance(image, dict):
        return f"item {index} ({image.get('path') or 'embedded bytes'})"
    if isinstance(image, (str, os.PathLike)):
        return f"item {index} ({image})"
    return f"item {index}"


def read_image(
    image,
    index: int,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    mode: str = "RGB",
    generator: torch.Generator | None = None,
    bad_images: str = "stop",
) -> torch.Tensor | None:
    """Dataset item `index`'s image (anything `open_image` takes) as a `preprocess_image` tensor.

    An unreadable image raises a ValueError naming the item and its file with ``bad_images="stop"``; with ``"skip"``
    the result is None (`collate_examples` drops and counts it).
    """
    try:
        return preprocess_image(open_image(image, mode), resolution, center_crop, random_flip, mode, generator)
    except UNREADABLE_IMAGE_ERRORS as error:
        if bad_images == "skip":
            return None
        raise ValueError(
            f"Could not read the image of {describe_image(image, index)}: {error}. Fix or remove it, or pass "
            "--bad_images skip to skip unreadable images (they are counted and logged)."
        ) from error


def check_bad_images(bad_images: str) -> None:
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")


class SeededItemDataset(Dataset):
    """The base of the datasets that read files and draw augmentations per (seed, epoch, item) (`item_generator`):
    a resumed run sees exactly the draws of an uninterrupted one (`set_epoch` is called by Accelerate's data loader).

    The augmentation options, declared here once for every such dataset: ``resolution`` (the side of the square
    crop), ``center_crop`` (else a random crop), ``random_flip`` (horizontal), ``seed``, and ``bad_images``
    (`BAD_IMAGE_POLICIES`): what an unreadable item does, ``"stop"`` raises, ``"skip"`` gives None.
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        bad_images: str = "stop",
    ) -> None:
        check_bad_images(bad_images)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch, self.bad_images = seed, 0, bad_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_generator(self, index: int) -> torch.Generator:
        """The generator of item ``index``'s draws in this epoch."""
        return seeded_generator(self.seed, self.epoch, index)


def label_error(index: int, value, column: str, source: str, num_classes: int | None) -> str:
    """The message for item `index` of `source`, whose label is no class id; what to do about it."""
    if value is None:
        why = " (missing)"
    elif value == -1:
        why = " (-1 is how a `datasets` ClassLabel marks a missing label)"
    else:
        why = ""
    classes = f"a class id 0..{num_classes - 1}" if num_classes else "a class id >= 0"
    return (
        f"Item {index} of the {source} has the label {value!r}{why} in column {column!r}, which is not {classes}. "
        f"Remove the unlabelled rows first, e.g. `data = data.filter(lambda x: x[{column!r}] is not None and "
        f"x[{column!r}] >= 0)` and `data.save_to_disk(folder)`, then train on that folder; or use a labelled split "
        "(test splits are often unlabelled)."
    )


class HFImageDataset(SeededItemDataset):
    """A `datasets.Dataset` with an image and a label column, decoded and preprocessed on access.

    Random crops and flips are drawn per (seed, epoch, item) (`set_epoch` is called by Accelerate's data loader), so a
    resumed run sees exactly the augmentations of an uninterrupted one. An unreadable image (corrupt, truncated, not
    an image) raises a ValueError naming it with ``bad_images="stop"``; with ``"skip"`` the item is None and
    `collate_examples` drops and counts it. A label that is no class id below `num_classes` (None, a ClassLabel's -1)
    raises a ValueError naming the item whatever `bad_images` says: it is the dataset, not a file, that needs fixing.
    """

    def __init__(
        self,
        data,
        image_column: str,
        label_column: str,
        label_to_id: dict | None,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        mode: str,
        bad_images: str = "stop",
        seed: int = 0,
        num_classes: int | None = None,
        source: str = "dataset",
    ):
        super().__init__(resolution, center_crop, random_flip, seed, bad_images)
        self.data, self.mode = data, mode
        self.image_column, self.label_column, self.label_to_id = image_column, label_column, label_to_id
        self.num_classes = len(label_to_id) if num_classes is None and label_to_id is not None else num_classes
        self.source = source

    def __len__(self) -> int:
        return len(self.data)

    def class_id(self, index: int, label) -> int:
        """Item `index`'s label as a class id; a ValueError naming the item for a missing or out-of-range label (a
        `datasets` ClassLabel stores a missing one as -1), which would otherwise fail deep inside the model."""
        class_id = label if self.label_to_id is None or label is None else self.label_to_id.get(label)
        if class_id is None or not 0 <= int(class_id) < (self.num_classes or float("inf")):
            raise ValueError(label_error(index, label, self.label_column, self.source, self.num_classes))
        return int(class_id)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        example = self.data[int(index)]
        class_id = self.class_id(int(index), example[self.label_column])
        generator = self.item_generator(int(index))
        pixel_values = read_image(
            example[self.image_column],
            int(index),
            self.resolution,
            self.center_crop,
            self.random_flip,
            self.mode,
            generator=generator,
            bad_images=self.bad_images,
        )
        if pixel_values is None:
            return None
        return {"pixel_values": pixel_values, "class_labels": class_id}


def first_readable_example(dataset: Dataset) -> dict[str, Any]:
    """The dataset's first item that is not None (with ``bad_images="skip"`` an unreadable image's item is None), for
    reading the data's shapes; a ValueError when no image can be read at all."""
    for index in range(len(dataset)):
        example = dataset[index]
        if example is not None:
            return example
    raise ValueError(
        f"None of the {len(dataset)} images could be read (all were skipped as unreadable); check the data."
    )


def collate_examples(examples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch dataset items, dropping the unreadable ones a dataset returned as None; ``num_skipped`` counts them."""
    good = [example for example in examples if example is not None]
    if not good:
        raise ValueError(f"All {len(examples)} images of a batch were unreadable; check the dataset.")
    batch = torch.utils.data.default_collate(good)
    batch["num_skipped"] = len(examples) - len(good)
    return batch


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def resolve_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    *,
    config_name: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    data_dir_kind: str = "an image folder",
):
    """One split of a dataset, and how messages name it (e.g. ``"saved dataset 'birds'"``): ``(data, source)``.

    Exactly one source: `dataset_name`, a Hub dataset or a local path for ``datasets.load_dataset`` (with
    `config_name`), or a folder written by ``save_to_disk`` (read with ``load_from_disk``); or `train_data_dir`, read
    as ``load_dataset("imagefolder", data_dir=...)`` (`data_dir_kind` describes what it should hold, for the error).
    """
    import datasets

    if (dataset_name is None) == (train_data_dir is None):
        given = "both" if dataset_name is not None else "neither"
        raise ValueError(
            f"Pass exactly one of dataset_name (a Hub dataset or a local dataset path) and train_data_dir "
            f"({data_dir_kind}); {given} was given."
        )
    if train_data_dir is not None:
        source = f"image folder {train_data_dir!r}"
        data = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    elif os.path.isdir(dataset_name) and _is_saved_dataset(dataset_name):
        source = f"saved dataset {dataset_name!r}"
        data = datasets.load_from_disk(dataset_name)
    else:
        source = f"dataset {dataset_name!r}"
        data = datasets.load_dataset(dataset_name, config_name, cache_dir=cache_dir)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"The {source} has no split {split!r}; its splits are {list(data)}.")
        data = data[split]
    return data, source


def require_columns(data, source: str, columns: dict[str, str], hints: dict[str, str] | None = None) -> None:
    """A ValueError naming the first of `columns` (column -> the option that set it) that `data` lacks, its columns,
    and ``hints[column]`` if given."""
    for column, flag in columns.items():
        if column not in data.column_names:
            hint = (hints or {}).get(column, "")
            raise ValueError(
                f"The {source} has no column {column!r} (set by {flag}); its columns are {data.column_names}.{hint}"
            )


def single_class_labels(data, image_column: str, train_data_dir: str):
    """An image folder of one class: ``datasets``' imagefolder only adds a ``label`` column for two or more class
    subfolders, so give every image label 0, named after the one subfolder. Images directly in the folder (no
    class subfolder) are a ValueError that says how to lay the folder out."""
    import datasets

    if image_column not in data.column_names or len(data) == 0:
        return data  # require_columns and the empty check name the problem
    paths = undecoded_images(data, image_column)[image_column]
    parents = {os.path.dirname(os.path.abspath(item["path"])) for item in paths if item.get("path")}
    root = os.path.abspath(train_data_dir)
    if len(parents) != 1 or next(iter(parents)) == root:
        raise ValueError(
            f"The image folder {train_data_dir!r} has no class subfolders: put the images of each class in a "
            "subfolder named after the class (a single subfolder trains one class), e.g. "
            f"{os.path.join(train_data_dir, 'cat', '0.png')}."
        )
    name = os.path.basename(next(iter(parents)))
    return data.add_column("label", [0] * len(data), feature=datasets.ClassLabel(names=[name]))


def undecoded_images(data, image_column: str):
    """`data` with its ``datasets.Image`` column left undecoded, so that `read_image` opens each image itself and
    can name the file that fails."""
    import datasets

    if isinstance(data.features[image_column], datasets.Image):
        data = data.cast_column(image_column, datasets.Image(decode=False))
    return data


def load_image_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    resolution: int = 256,
    center_crop: bool = False,
    random_flip: bool = False,
    cache_dir: str | None = None,
    num_channels: int = 3,
    split: str = "train",
    bad_images: str = "stop",
    seed: int = 0,
    config_name: str | None = None,
) -> tuple[HFImageDataset, dict[int, str]]:
    """A labelled image dataset from the Hub, a local dataset path, or an image folder (one subfolder per class).

    The source is found by `resolve_dataset` (`dataset_name` with `config_name`, or `train_data_dir`). The label map
    comes from the label column's ``ClassLabel`` names when it has them, else from its sorted unique values (which
    are then mapped to 0..K-1). A row without a valid label (None, a ClassLabel's -1 for "missing", or an id past the
    names) is a ValueError naming the first such item, before training starts. Images are opened by `open_image` and
    preprocessed by `preprocess_image` (center or random crop, optional flip) with ``num_channels`` 3 (RGB) or 1
    (grey); grey, RGBA and odd-sized images are converted. `bad_images` and `seed`: see `HFImageDataset`.
    """
    import datasets

    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grey) or 3 (RGB), got {num_channels}")
    check_bad_images(bad_images)
    folder = "a folder of images in one subfolder per class"  # how messages name a --train_data_dir
    data, source = resolve_dataset(
        dataset_name, train_data_dir, config_name=config_name, cache_dir=cache_dir, split=split, data_dir_kind=folder
    )
    if train_data_dir is not None and label_column == "label" and label_column not in data.column_names:
        data = single_class_labels(data, image_column, train_data_dir)
    require_columns(data, source, {image_column: "image_column", label_column: "label_column"})
    if len(data) == 0:
        raise ValueError(f"The {source} is empty (split {split!r}).")
    data = data.select_columns([image_column, label_column])  # don't decode columns we never use

    # Check every label now (the column alone, no image is decoded): a bad one would otherwise stop training midway,
    # on a GPU as a device-side assert that names no item.
    labels = data[label_column]
    feature = data.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        id2label, label_to_id, num_classes = dict(enumerate(feature.names)), None, feature.num_classes
        bad = [i for i, label in enumerate(labels) if label is None or not 0 <= label < num_classes]
    else:
        bad = [i for i, label in enumerate(labels) if label is None]
        values = sorted({label for label in labels if label is not None})
        id2label = {i: str(value) for i, value in enumerate(values)}
        label_to_id = {value: i for i, value in enumerate(values)}
        num_classes = len(values)
    if bad:
        message = label_error(bad[0], labels[bad[0]], label_column, source, num_classes)
        raise ValueError(f"{message} ({len(bad)} of the {len(data)} items have no valid label.)")

    data = undecoded_images(data, image_column)
    mode = "RGB" if num_channels == 3 else "L"
    dataset = HFImageDataset(
        data,
        image_column,
        label_column,
        label_to_id,
        resolution,
        center_crop,
        random_flip,
        mode,
        bad_images,
        seed,
        num_classes=num_classes,
        source=source,
    )
    return dataset, id2label
