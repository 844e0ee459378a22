"""diffusers_tread.data and training/extract_latents.py: digits, image datasets, latent shards (CPU, offline)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vae
from PIL import Image

from diffusers_tread.data import (
    CachedLatentDataset,
    CaptionedImageDataset,
    LatentShardDataset,
    caption_table,
    check_latents_match,
    check_latents_options,
    collate_examples,
    embeddings_fingerprint,
    load_captioned_images,
    load_digits,
    load_image_dataset,
    load_precomputed_embeddings,
    open_image,
    preprocess_image,
    read_image,
    save_precomputed_embeddings,
)
from diffusers_tread.data.images import HFImageDataset, digits_split_indices
from diffusers_tread.data.latents import METADATA_NAME, posterior_generator, shard_file_name

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_labels():
    from sklearn.datasets import load_digits as sklearn_load_digits

    reference = sklearn_load_digits()
    dataset, id2label = load_digits(resolution=16)
    assert len(dataset) == 1797 and id2label == {i: str(i) for i in range(10)}
    item = dataset[0]
    assert item["pixel_values"].shape == (1, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert dataset.pixel_values.min() >= -1 and dataset.pixel_values.max() <= 1
    assert dataset.pixel_values.min() == -1 and dataset.pixel_values.max() > 0.9
    assert set(dataset.class_labels.tolist()) == set(range(10))
    for index in (0, 7, 1000, 1796):
        assert dataset[index]["class_labels"] == reference.target[index]

    native, _ = load_digits(resolution=8, num_channels=3)  # no resampling: exactly the scaled source pixels
    assert native[5]["pixel_values"].shape == (3, 8, 8)
    expected = torch.from_numpy(reference.images[5]).float() / 8 - 1
    torch.testing.assert_close(native[5]["pixel_values"], expected.expand(3, 8, 8), rtol=0, atol=0)


def test_digits_split_is_disjoint_stratified_and_deterministic():
    from sklearn.datasets import load_digits as sklearn_load_digits

    labels = sklearn_load_digits().target
    train, test = digits_split_indices(labels, "train", 0.2), digits_split_indices(labels, "test", 0.2)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    np.testing.assert_array_equal(test, digits_split_indices(labels, "test", 0.2))
    for label in range(10):  # every class held out in proportion
        assert abs((labels[test] == label).sum() - 0.2 * (labels == label).sum()) <= 0.5

    test_set, _ = load_digits(resolution=8, split="test", test_fraction=0.2)
    train_set, _ = load_digits(resolution=8, split="train", test_fraction=0.2)
    assert len(test_set) == len(test) and len(train_set) == len(train)
    all_set, _ = load_digits(resolution=8)
    torch.testing.assert_close(test_set.pixel_values, all_set.pixel_values[torch.from_numpy(test)])
    with pytest.raises(ValueError, match="split"):
        load_digits(split="validation")


# ----------------------------------------------------------------------------------------------- image datasets


def _random_image(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


IMAGE_FOLDER = {  # class folder -> (width, height, mode) of its images
    "cat": [(20, 12, "RGB"), (16, 16, "L"), (13, 17, "RGBA")],
    "dog": [(16, 16, "RGB"), (24, 18, "RGB")],
    "emu": [(18, 16, "L"), (16, 21, "RGB")],
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for class_index, (name, images) in enumerate(IMAGE_FOLDER.items()):
        (root / name).mkdir()
        for image_index, (width, height, mode) in enumerate(images):
            _random_image((width, height), mode, seed=10 * class_index + image_index).save(
                root / name / f"{image_index}.png"
            )
    return root


def test_preprocess_image_resizes_shorter_side_then_center_crops():
    image = _random_image((20, 12), "RGBA", seed=0)
    pixels = preprocess_image(image, resolution=6, center_crop=True)
    expected = image.convert("RGB").resize((10, 6), Image.Resampling.BILINEAR).crop((2, 0, 8, 6))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(pixels, expected)
    assert preprocess_image(image, resolution=6, center_crop=True, mode="L").shape == (1, 6, 6)


def test_random_crop_and_flip_follow_torch_seed():
    image = _random_image((20, 12), "RGB", seed=1)
    resized = preprocess_image(image, resolution=12, center_crop=True)  # 20x12 -> 20x12: the crop picks a column
    assert resized.shape == (3, 12, 12)
    full = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    offsets, flips = set(), set()
    for seed in range(12):
        torch.manual_seed(seed)
        pixels = preprocess_image(image, resolution=12, random_flip=True)
        torch.manual_seed(seed)
        torch.testing.assert_close(pixels, preprocess_image(image, resolution=12, random_flip=True))
        matches = [
            (left, flipped)
            for left in range(9)
            for flipped in (False, True)
            if torch.equal(pixels, full[..., left : left + 12].flip(-1) if flipped else full[..., left : left + 12])
        ]
        assert len(matches) == 1
        offsets.add(matches[0][0])
        flips.add(matches[0][1])
    assert len(offsets) > 2 and flips == {False, True}


def test_load_image_folder(image_folder, tmp_path):
    dataset, id2label = load_image_dataset(
        train_data_dir=str(image_folder), resolution=8, center_crop=True, cache_dir=str(tmp_path)
    )
    assert id2label == {0: "cat", 1: "dog", 2: "emu"} and len(dataset) == 7
    labels = sorted(dataset[i]["class_labels"] for i in range(len(dataset)))
    assert labels == [0, 0, 0, 1, 1, 2, 2]
    for i in range(len(dataset)):
        pixels = dataset[i]["pixel_values"]
        assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
        assert -1 <= pixels.min() and pixels.max() <= 1

    grey, _ = load_image_dataset(
        train_data_dir=str(image_folder), resolution=8, num_channels=1, random_flip=True, cache_dir=str(tmp_path)
    )
    torch.manual_seed(0)
    first = [grey[i]["pixel_values"] for i in range(len(grey))]
    torch.manual_seed(0)
    second = [grey[i]["pixel_values"] for i in range(len(grey))]
    assert first[0].shape == (1, 8, 8)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_load_saved_dataset_with_custom_columns_and_plain_labels(tmp_path):
    import datasets

    species = ["wren", "auk", "wren", "jay"]
    images = [_random_image((10, 14), "RGB", seed=i) for i in range(4)]
    features = datasets.Features({"photo": datasets.Image(), "species": datasets.Value("string")})
    datasets.Dataset.from_dict({"photo": images, "species": species}, features=features).save_to_disk(
        tmp_path / "birds"
    )
    dataset, id2label = load_image_dataset(
        dataset_name=str(tmp_path / "birds"), image_column="photo", label_column="species", resolution=10
    )
    assert id2label == {0: "auk", 1: "jay", 2: "wren"}
    assert [dataset[i]["class_labels"] for i in range(4)] == [2, 0, 2, 1]
    torch.manual_seed(0)
    assert dataset[0]["pixel_values"].shape == (3, 10, 10)

    with pytest.raises(ValueError, match=r"no column 'image'.*\['photo', 'species'\]"):
        load_image_dataset(dataset_name=str(tmp_path / "birds"), label_column="species")
    with pytest.raises(ValueError, match=r"no column 'label'.*\['photo', 'species'\]"):
        load_image_dataset(dataset_name=str(tmp_path / "birds"), image_column="photo")


def test_load_image_dataset_errors(tmp_path):
    import datasets

    with pytest.raises(ValueError, match="exactly one of dataset_name .* neither"):
        load_image_dataset()
    with pytest.raises(ValueError, match="exactly one of dataset_name .* both"):
        load_image_dataset(dataset_name="x", train_data_dir="y")
    with pytest.raises(ValueError, match="num_channels"):
        load_image_dataset(dataset_name="x", num_channels=4)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).save_to_disk(
        tmp_path / "empty",
        num_shards=1,  # the default 0 shards for 0 rows cannot be loaded back
    )
    with pytest.raises(ValueError, match="is empty"):
        load_image_dataset(dataset_name=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------- latents


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    vae = tiny_vae(scaling_factor=0.7, shift_factor=0.1)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def _load_vae(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


@pytest.fixture(scope="module")
def accelerate_config(tmp_path_factory) -> Path:
    from accelerate.utils import write_basic_config

    path = tmp_path_factory.mktemp("accelerate") / "default_config.yaml"
    write_basic_config(save_location=str(path))
    return path


def run_extract(accelerate_config: Path | None, *args: str) -> str:
    """Run the script with `accelerate launch` (1 process), or with 2 CPU processes (torchrun) if no config is given.

    `accelerate launch` starts only one process on a CPU-only machine, hence torchrun with ACCELERATE_USE_CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if accelerate_config is not None:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
        launcher += ["--num_processes", "1", "--num_cpu_threads_per_process", "1"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        env["ACCELERATE_USE_CPU"] = "1"
    command = [*launcher, str(REPO / "training" / "extract_latents.py"), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def folder_latents(image_folder, vae_dir, accelerate_config, tmp_path_factory) -> Path:
    """The 7-image folder at 16 px with flipped copies, in shards of 3 (3 + 3 + 1), batches of 2."""
    output_dir = tmp_path_factory.mktemp("latents") / "folder"
    cache_dir = tmp_path_factory.mktemp("datasets-cache")
    run_extract(accelerate_config, *_folder_args(image_folder, vae_dir, output_dir, cache_dir))
    return output_dir


def _folder_args(image_folder, vae_dir, output_dir, cache_dir) -> list[str]:
    return [
        f"--train_data_dir={image_folder}",
        f"--vae={vae_dir}",
        f"--output_dir={output_dir}",
        f"--cache_dir={cache_dir}",
        "--resolution=16",
        "--center_crop",
        "--flip",
        "--batch_size=2",
        "--shard_size=3",
    ]


def _shard_names(num_shards: int) -> list[str]:
    return [shard_file_name(index, num_shards) for index in range(num_shards)]


def test_extracted_latents_equal_direct_encoding(folder_latents, image_folder, vae_dir, tmp_path):
    assert sorted(os.listdir(folder_latents)) == sorted([METADATA_NAME, *_shard_names(3)])
    metadata = json.loads((folder_latents / METADATA_NAME).read_text())
    assert metadata["vae"] == str(vae_dir) and metadata["resolution"] == 16 and metadata["flip"] is True
    assert (metadata["scaling_factor"], metadata["shift_factor"]) == (0.7, 0.1)
    assert (metadata["latent_channels"], metadata["latent_size"], metadata["num_samples"]) == (4, 8, 7)
    assert metadata["id2label"] == {"0": "cat", "1": "dog", "2": "emu"}
    assert [shard["num_samples"] for shard in metadata["shards"]] == [3, 3, 1]

    images, _ = load_image_dataset(
        train_data_dir=str(image_folder), resolution=16, center_crop=True, cache_dir=str(tmp_path)
    )
    pixel_values = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
    vae = _load_vae(vae_dir)
    with torch.no_grad():
        expected = (vae.encode(pixel_values).latent_dist.mean - 0.1) * 0.7
        expected_flipped = (vae.encode(pixel_values.flip(-1)).latent_dist.mean - 0.1) * 0.7

    latents = LatentShardDataset(str(folder_latents), random_flip=False)
    assert len(latents) == 7 and latents.id2label == {0: "cat", 1: "dog", 2: "emu"}
    for i in range(7):
        item = latents[i]
        assert item["latents"].shape == (4, 8, 8) and item["latents"].dtype == torch.float32
        assert item["class_labels"] == images[i]["class_labels"]
        torch.testing.assert_close(item["latents"], expected[i], rtol=0, atol=1e-5)

    flipping = LatentShardDataset(str(folder_latents), random_flip=True, seed=3)
    seen = set()
    for epoch in range(8):  # the flip is drawn per (seed, epoch, item): it varies across epochs, repeats within one
        flipping.set_epoch(epoch)
        item = flipping[4]
        flipped = torch.allclose(item["latents"], expected_flipped[4], atol=1e-5, rtol=0)
        assert flipped or torch.allclose(item["latents"], expected[4], atol=1e-5, rtol=0)
        seen.add(flipped)
        torch.testing.assert_close(flipping[4]["latents"], item["latents"])
    assert seen == {False, True}

    loader = torch.utils.data.DataLoader(latents, batch_size=4)
    batch = next(iter(loader))
    assert batch["latents"].shape == (4, 4, 8, 8) and batch["class_labels"].dtype == torch.int64
    with pytest.raises(IndexError):
        latents[7]


def test_extraction_resumes_on_two_processes_and_ignores_partial_writes(
    folder_latents, image_folder, vae_dir, tmp_path
):
    output_dir = tmp_path / "latents"
    shutil.copytree(folder_latents, output_dir)  # copy2 keeps the mtimes
    names = _shard_names(3)
    original = {name: (output_dir / name).read_bytes() for name in names}
    # An interrupted run: shard 1 never completed (only its temp file exists, half-written), shard 2's file is
    # damaged, and metadata.json is gone (a run removes it when it starts).
    (output_dir / names[1]).unlink()
    (output_dir / (names[1] + ".tmp")).write_bytes(original[names[1]][:100])
    (output_dir / names[2]).write_bytes(original[names[2]][:-10])
    (output_dir / METADATA_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="extract_latents"):
        LatentShardDataset(str(output_dir))
    untouched = (output_dir / names[0]).stat().st_mtime_ns

    # Two processes: process 0 owns shards 0 (kept) and 2 (redone), process 1 owns shard 1 (redone).
    log = run_extract(None, *_folder_args(image_folder, vae_dir, output_dir, tmp_path / "cache"))
    assert "Process 0: skipped 1 complete shards" in log and "Process 1: skipped 0 complete shards" in log

    assert sorted(os.listdir(output_dir)) == sorted([METADATA_NAME, *names])  # the temp file was replaced
    assert (output_dir / names[0]).stat().st_mtime_ns == untouched
    for name in names:
        assert (output_dir / name).read_bytes() == original[name]
    assert json.loads((output_dir / METADATA_NAME).read_text()) == json.loads(
        (folder_latents / METADATA_NAME).read_text()
    )
    assert len(LatentShardDataset(str(output_dir))) == 7


def test_extract_digits_with_posterior_samples(vae_dir, accelerate_config, tmp_path):
    output_dir = tmp_path / "digits"
    args = [f"--vae={vae_dir}", f"--output_dir={output_dir}", "--resolution=8", "--batch_size=256"]
    run_extract(accelerate_config, "--use_digits", *args, "--sample_posterior", "--seed=3", "--shard_size=1000")
    latents = LatentShardDataset(str(output_dir))
    digits, _ = load_digits(8, split="train", num_channels=3)  # --digits_split defaults to "train"
    assert len(latents) == len(digits) == 1438 and latents.metadata["dataset"] == "digits:train"
    assert latents.metadata["sample_posterior"] and latents.metadata["flip"] is False
    assert [shard["num_samples"] for shard in latents.metadata["shards"]] == [1000, 438]
    check_latents_match(latents.metadata, in_channels=4, sample_size=4, vae=str(vae_dir))

    indices = [0, 999, 1000, 1437]
    vae = _load_vae(vae_dir)
    with torch.no_grad():
        posterior = vae.encode(torch.stack([digits[i]["pixel_values"] for i in indices])).latent_dist
    noise = torch.cat([torch.randn(1, 4, 4, 4, generator=posterior_generator(3, i, False)) for i in indices])
    expected = (posterior.mean + posterior.std * noise - 0.1) * 0.7
    for row, index in enumerate(indices):
        item = latents[index]
        assert item["class_labels"] == digits[index]["class_labels"]
        torch.testing.assert_close(item["latents"], expected[row], rtol=0, atol=1e-5)
        assert not torch.allclose(item["latents"], (posterior.mean[row] - 0.1) * 0.7, rtol=0, atol=1e-5)


def test_check_latents_match(tmp_path):
    metadata = {"latent_channels": 4, "latent_size": 32, "resolution": 256, "vae": "stabilityai/sd-vae-ft-ema"}
    check_latents_match(metadata, in_channels=4, sample_size=32, vae="stabilityai/sd-vae-ft-ema")
    check_latents_match(metadata, in_channels=4, sample_size=32)
    with pytest.raises(ValueError, match="4 channels .* in_channels=16: set in_channels=4"):
        check_latents_match(metadata, in_channels=16, sample_size=32)
    with pytest.raises(ValueError, match="32x32 .* sample_size=16: set sample_size=32.*--resolution 128"):
        check_latents_match(metadata, in_channels=4, sample_size=16)
    with pytest.raises(ValueError, match="sd-vae-ft-ema.*other/vae"):
        check_latents_match(metadata, in_channels=4, sample_size=32, vae="other/vae")
    with pytest.raises(ValueError, match="(?s)channels.*sample_size"):  # every mismatch is reported at once
        check_latents_match(metadata, in_channels=8, sample_size=16)

    (tmp_path / "vae").mkdir()
    local = {**metadata, "vae": str(tmp_path / "vae")}
    check_latents_match(local, in_channels=4, sample_size=32, vae=str(tmp_path / "." / "vae"))


# ----------------------------------------------------------------------------------------------- bad images, resume


def test_unreadable_images_stop_with_the_file_name_or_are_skipped_and_counted(image_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(image_folder, folder)
    (folder / "dog" / "corrupt.png").write_bytes(b"this is not a png")
    png = (folder / "cat" / "0.png").read_bytes()
    (folder / "emu" / "truncated.png").write_bytes(png[: len(png) // 2])
    kwargs = dict(train_data_dir=str(folder), resolution=8, center_crop=True, cache_dir=str(tmp_path / "cache"))

    dataset, _ = load_image_dataset(**kwargs)
    assert len(dataset) == 9
    with pytest.raises(ValueError, match=r"Could not read the image of item \d+ \(.*(corrupt|truncated)\.png\).*"
                       r"--bad_images skip"):  # fmt: skip
        [dataset[i] for i in range(len(dataset))]

    skipping, _ = load_image_dataset(**kwargs, bad_images="skip")
    loader = torch.utils.data.DataLoader(skipping, batch_size=3, collate_fn=collate_examples)
    batches = list(loader)
    assert sum(b["num_skipped"] for b in batches) == 2
    assert sum(len(b["class_labels"]) for b in batches) == 7  # grey, RGBA and odd-sized images all load
    assert all(b["pixel_values"].shape[1:] == (3, 8, 8) for b in batches)


def test_image_augmentations_are_drawn_per_seed_epoch_and_item(image_folder, tmp_path):
    dataset, _ = load_image_dataset(
        train_data_dir=str(image_folder), resolution=12, random_flip=True, cache_dir=str(tmp_path), seed=5
    )
    first = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(first))
    dataset.set_epoch(1)
    assert any(not torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(first))


# ----------------------------------------------------------------------------------------------- opening images


def test_open_image_turns_by_exif_converts_modes_and_keeps_the_bomb_guard(tmp_path, monkeypatch):
    image = _random_image((20, 12), "RGB", seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; shown rotated 90 degrees clockwise
    image.save(tmp_path / "turned.png", exif=exif)
    opened = open_image(str(tmp_path / "turned.png"), "RGB")
    assert opened.size == (12, 20)
    np.testing.assert_array_equal(np.asarray(opened), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))
    # the same through an undecoded `datasets.Image` value, and through the class-conditional and caption datasets
    data = {"bytes": (tmp_path / "turned.png").read_bytes(), "path": None}
    np.testing.assert_array_equal(np.asarray(open_image(data, "RGB")), np.asarray(opened))
    assert read_image(data, 0, resolution=12, center_crop=True).shape == (3, 12, 12)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette with transparency goes straight to RGB
        assert open_image(palette, "RGB").getpixel((0, 0)) == (255, 0, 0)
    assert open_image(_random_image((4, 4), "RGBA", seed=0), "L").mode == "L"
    with pytest.raises(ValueError, match="expected an image"):
        open_image(None)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 240 px is over twice that: a decompression bomb
    with pytest.raises(ValueError, match=r"Could not read the image of item 5 \(.*turned\.png\).*--bad_images skip"):
        read_image(str(tmp_path / "turned.png"), 5, resolution=8)
    assert read_image(str(tmp_path / "turned.png"), 5, resolution=8, bad_images="skip") is None


# ----------------------------------------------------------------------------------------------- labels


def test_missing_or_out_of_range_labels_are_refused_naming_the_item(tmp_path):
    import datasets

    images = [_random_image((10, 10), "RGB", seed=i) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, -1, -1]}, features=features).save_to_disk(
        tmp_path / "missing"
    )
    with pytest.raises(ValueError, match=r"Item 2 .* label -1 \(-1 is how a `datasets` ClassLabel marks a missing "
                       r"label\) in column 'label', which is not a class id 0..1.*filter.*\(2 of the 4 items"):  # fmt: skip
        load_image_dataset(dataset_name=str(tmp_path / "missing"), resolution=8)

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "label": ["x", None, "y", "x"]}, features=features).save_to_disk(
        tmp_path / "none"
    )
    with pytest.raises(ValueError, match=r"Item 1 of the saved dataset .* label None \(missing\)"):
        load_image_dataset(dataset_name=str(tmp_path / "none"), resolution=8)

    # a dataset built directly: the item is refused when it is read, not as a device assert in the model
    rows = datasets.Dataset.from_dict({"image": images[:2], "label": [1, 5]})
    dataset = HFImageDataset(rows, "image", "label", None, 8, True, False, "RGB", num_classes=2)
    assert dataset[0]["class_labels"] == 1
    with pytest.raises(ValueError, match=r"Item 1 of the dataset has the label 5 in column 'label', which is not a "
                       r"class id 0..1"):  # fmt: skip
        dataset[1]


# ----------------------------------------------------------------------------------------------- captions


def _captioned_folder(root: Path, broken: bool = False) -> Path:
    root.mkdir(parents=True)
    lines = []
    for index in range(4):
        _random_image((12 + index, 10), "RGB", seed=index).save(root / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"caption {index % 2}"}))
    if broken:
        (root / "broken.png").write_bytes(b"this is not a png")
        lines.append(json.dumps({"file_name": "broken.png", "text": "caption 0"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_captioned_images_share_sources_image_reading_and_bad_images(tmp_path):
    import datasets

    folder = _captioned_folder(tmp_path / "folder", broken=True)
    cache = str(tmp_path / "cache")
    data, captions, source = load_captioned_images(train_data_dir=str(folder), cache_dir=cache)
    assert source == f"image folder {str(folder)!r}" and len(data) == 5 and data.column_names == ["image"]
    unique, indices = caption_table(captions)
    assert unique == ["caption 0", "caption 1"] and [unique[i] for i in indices] == captions

    dataset = CaptionedImageDataset(data, "image", indices, resolution=8, center_crop=True)
    with pytest.raises(ValueError, match=r"Could not read the image of item \d \(.*broken\.png\).*--bad_images skip"):
        [dataset[i] for i in range(len(dataset))]
    skipping = CaptionedImageDataset(data, "image", indices, resolution=8, random_flip=True, seed=3, bad_images="skip")
    batches = list(torch.utils.data.DataLoader(skipping, batch_size=5, collate_fn=collate_examples))
    assert batches[0]["num_skipped"] == 1 and batches[0]["pixel_values"].shape == (4, 3, 8, 8)
    assert torch.equal(skipping[0]["pixel_values"], skipping[0]["pixel_values"])  # drawn per (seed, epoch, item)
    with pytest.raises(ValueError, match="bad_images"):
        CaptionedImageDataset(data, "image", indices, resolution=8, bad_images="ignore")
    cached = CachedLatentDataset(torch.zeros(4, 8, 2, 2), [0, 1, 0, 1])
    assert cached[3]["caption_index"] == 1 and cached[3]["latent_parameters"].shape == (8, 2, 2)

    with pytest.raises(ValueError, match=r"no column 'caption'.*metadata.jsonl"):
        load_captioned_images(train_data_dir=str(folder), caption_column="caption", cache_dir=cache)
    with pytest.raises(ValueError, match="exactly one of dataset_name"):
        load_captioned_images()

    # a saved dataset with lists of captions (the first is used); a bad caption is named
    images = [_random_image((10, 10), "RGB", seed=i) for i in range(3)]
    features = datasets.Features({"photo": datasets.Image(), "texts": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_dict(
        {"photo": images, "texts": [["a", "b"], ["c"], ["d", "e"]]}, features=features
    ).save_to_disk(tmp_path / "saved")
    data, captions, source = load_captioned_images(
        dataset_name=str(tmp_path / "saved"), image_column="photo", caption_column="texts", max_samples=2, seed=1
    )
    assert source.startswith("saved dataset") and len(data) == 2 and set(captions) <= {"a", "c", "d"}
    datasets.Dataset.from_dict({"photo": images, "texts": [["a"], [], ["d"]]}, features=features).save_to_disk(
        tmp_path / "empty-caption"
    )
    with pytest.raises(ValueError, match=r"caption of item 1 .* is None"):
        load_captioned_images(
            dataset_name=str(tmp_path / "empty-caption"), image_column="photo", caption_column="texts"
        )


def test_precomputed_embeddings_round_trip_and_refuse_other_inputs(tmp_path):
    model = tmp_path / "model"
    (model / "text_encoder").mkdir(parents=True)
    (model / "text_encoder" / "config.json").write_text('{"d_model": 32}')

    def fingerprint(**overrides):
        kwargs = dict(model="org/model", revision=None, pipeline="PixArtSigmaPipeline", model_path=str(model),
                      text_components=["text_encoder", "tokenizer"], max_sequence_length=16, captions=["a", "b"])  # fmt: skip
        return embeddings_fingerprint(**(kwargs | overrides))

    folder = tmp_path / "embeddings"
    assert load_precomputed_embeddings(str(folder), fingerprint()) is None
    table = {"prompt_embeds": torch.randn(2, 16, 32), "prompt_attention_mask": torch.ones(2, 16)}
    validation = {"prompt_embeds": torch.randn(1, 16, 32)}
    save_precomputed_embeddings(str(folder), table, fingerprint(), validation, "a fox")
    loaded, loaded_validation = load_precomputed_embeddings(str(folder), fingerprint(), "a fox")
    assert loaded.keys() == table.keys() and all(torch.equal(loaded[k], table[k]) for k in table)
    assert torch.equal(loaded_validation["prompt_embeds"], validation["prompt_embeds"])
    assert load_precomputed_embeddings(str(folder), fingerprint(), "another prompt")[1] is None
    assert load_precomputed_embeddings(str(folder), fingerprint())[1] is None

    with pytest.raises(ValueError, match=r"differ in: max_sequence_length\b"):
        load_precomputed_embeddings(str(folder), fingerprint(max_sequence_length=8))
    with pytest.raises(ValueError, match=r"differ in: captions_sha256, num_captions"):
        load_precomputed_embeddings(str(folder), fingerprint(captions=["a", "b", "c"]))
    (model / "text_encoder" / "config.json").write_text('{"d_model": 64}')
    with pytest.raises(ValueError, match=r"differ in: text_components"):
        load_precomputed_embeddings(str(folder), fingerprint())


# ----------------------------------------------------------------------------------------------- latents options


def test_check_latents_options():
    metadata = {"dataset": "/data/train", "resolution": 256, "center_crop": False, "flip": False,
                "sample_posterior": False}  # fmt: skip
    assert check_latents_options(metadata) == []
    assert check_latents_options(metadata, resolution=256) == []
    with pytest.raises(ValueError) as error:
        check_latents_options(metadata, resolution=512, center_crop=True, random_flip=True, sample_posterior=True)
    message = str(error.value)
    for expected in ("--resolution 512: the latents were extracted from images at 256 px",
                     "--center_crop: the latents were extracted from random crops", "re-extract with --flip",
                     "--sample_posterior: the latents hold the VAE posterior means"):  # fmt: skip
        assert expected in message
    stored = {**metadata, "center_crop": True, "flip": True, "sample_posterior": True}
    assert check_latents_options(stored, center_crop=True, random_flip=True) == []
    (warning,) = check_latents_options(stored, sample_posterior=True)
    assert "one posterior sample per image, drawn once at extraction" in warning
    # the digits are never cropped: --center_crop asks for nothing they lack
    assert check_latents_options({**metadata, "dataset": "digits:train"}, center_crop=True) == []


def _extract_in_process(*args: str) -> None:
    spec = importlib.util.spec_from_file_location("extract_latents", REPO / "training" / "extract_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(module.parse_args(list(args)))


def test_extraction_seed_drives_the_random_crops(image_folder, vae_dir, tmp_path):
    common = [f"--train_data_dir={image_folder}", f"--vae={vae_dir}", f"--cache_dir={tmp_path / 'cache'}",
              "--resolution=8", "--batch_size=7"]  # fmt: skip

    def extract(name: str, seed: int) -> torch.Tensor:
        _extract_in_process(*common, f"--output_dir={tmp_path / name}", f"--seed={seed}")
        latents = LatentShardDataset(str(tmp_path / name), random_flip=False)
        return torch.stack([latents[i]["latents"] for i in range(len(latents))])

    first, other, again = extract("seed0", 0), extract("seed1", 1), extract("seed0-again", 0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.allclose(other, first, atol=1e-4)
    # the crops are exactly the dataset's for that seed
    images, _ = load_image_dataset(train_data_dir=str(image_folder), resolution=8, cache_dir=str(tmp_path), seed=1)
    with torch.no_grad():
        pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
        expected = (_load_vae(vae_dir).encode(pixels).latent_dist.mean - 0.1) * 0.7
    torch.testing.assert_close(other, expected, rtol=0, atol=1e-5)


# --- issue #21: stale and corrupt latents ---------------------------------------------------------------------------


def test_changed_images_are_re_extracted_and_damaged_shards_are_named(
    image_folder, vae_dir, accelerate_config, tmp_path
):
    """Re-running extraction after the images changed (same count) kept every old shard ("skipped 3 complete
    shards"), so no latent row matched its image; a truncated shard gave a SafetensorError without the file's name,
    and a shard zeroed in place trained without a word."""
    folder, output_dir = tmp_path / "images", tmp_path / "latents"
    shutil.copytree(image_folder, folder)
    args = _folder_args(folder, vae_dir, output_dir, tmp_path / "cache")
    run_extract(accelerate_config, *args)
    first = json.loads((output_dir / METADATA_NAME).read_text())
    assert len(first["source_sha256"]) == 64 and all(len(shard["sha256"]) == 64 for shard in first["shards"])
    assert "skipped 3 complete shards" in run_extract(accelerate_config, *args)  # unchanged: kept

    for path in sorted(folder.rglob("*.png")):  # new pictures under the same names and labels
        with Image.open(path) as image:
            size, mode = image.size, image.mode
        _random_image(size, mode, seed=1000 + len(str(path))).save(path)
    log = run_extract(accelerate_config, *args, f"--cache_dir={tmp_path / 'cache2'}")
    assert "skipped 0 complete shards" in log and "images or labels changed" in log
    second = json.loads((output_dir / METADATA_NAME).read_text())
    assert second["source_sha256"] != first["source_sha256"]
    images, _ = load_image_dataset(train_data_dir=str(folder), resolution=16, center_crop=True,
                                   cache_dir=str(tmp_path / "cache3"))  # fmt: skip
    vae = _load_vae(vae_dir)
    latents = LatentShardDataset(str(output_dir), random_flip=False)
    with torch.no_grad():
        expected = (vae.encode(images[0]["pixel_values"][None]).latent_dist.mean[0] - 0.1) * 0.7
    torch.testing.assert_close(latents[0]["latents"], expected, rtol=1e-4, atol=1e-5)

    shard = output_dir / second["shards"][1]["file"]
    size = shard.stat().st_size
    shard.write_bytes(b"\0" * size)  # zeroed in place, same size
    with pytest.raises(ValueError, match=rf"latent shard {shard} changed since extraction"):
        LatentShardDataset(str(output_dir))
    with pytest.raises(ValueError, match=rf"latent shard {shard} does not load"):  # without the checksum: named
        LatentShardDataset(str(output_dir), verify_checksums=False)
    log = run_extract(accelerate_config, *args, f"--cache_dir={tmp_path / 'cache2'}")  # redoes the damaged one
    assert "skipped 2 complete shards" in log
    shard.write_bytes(shard.read_bytes()[: size // 2])  # truncated
    with pytest.raises(ValueError, match=rf"latent shard {shard} changed since extraction"):
        LatentShardDataset(str(output_dir))
    with pytest.raises(ValueError, match=rf"latent shard {shard} does not load"):
        LatentShardDataset(str(output_dir), verify_checksums=False)
