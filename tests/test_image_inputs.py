"""Image and option inputs that used to end in tracebacks or train on wrong pixels (issue #21 items 7, 8 and 10)."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, load_module, load_script
from PIL import Image

from diffusers_tread.data import first_readable_example, load_image_dataset, preprocess_image, read_image


def save_images(folder, count, seed=0, size=(10, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{index}.png")


# ------------------------------------------------------------------------------------------------- item 10: messages


def test_first_readable_example_skips_unreadable_items_and_says_when_none_is(tmp_path):
    data = tmp_path / "data"
    save_images(data / "a", 2)
    save_images(data / "b", 2, seed=1)
    (data / "a" / "0.png").write_bytes(b"not a png")  # item 0
    kwargs = dict(train_data_dir=str(data), resolution=8, cache_dir=str(tmp_path / "cache"), bad_images="skip")
    dataset, _ = load_image_dataset(**kwargs)
    assert dataset[0] is None and first_readable_example(dataset)["pixel_values"].shape == (3, 8, 8)
    for path in data.glob("?/*.png"):
        path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="None of the 4 images could be read"):
        first_readable_example(dataset)


def test_training_with_bad_images_skip_and_the_first_image_bad(tmp_path):
    data = tmp_path / "data"
    save_images(data / "a", 3)
    save_images(data / "b", 3, seed=1)
    (data / "a" / "0.png").write_bytes(b"not a png")  # the first item: it used to be a TypeError on `dataset[0]`
    out = tmp_path / "out"
    load_script().main([*TINY, "--train_batch_size=2", f"--train_data_dir={data}", "--bad_images=skip",
                        "--max_train_steps=1", f"--output_dir={out}"])  # fmt: skip
    assert (out / "model_index.json").is_file()


def test_an_image_folder_with_one_class_subfolder_is_one_class(tmp_path):
    save_images(tmp_path / "one" / "cat", 3)
    dataset, id2label = load_image_dataset(train_data_dir=str(tmp_path / "one"), resolution=8,
                                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert id2label == {0: "cat"} and [dataset[i]["class_labels"] for i in range(3)] == [0, 0, 0]
    out = tmp_path / "out"
    load_script().main([*TINY, "--train_batch_size=2", f"--train_data_dir={tmp_path / 'one'}",
                        "--validation_class_labels=cat", "--max_train_steps=1", f"--output_dir={out}"])  # fmt: skip
    assert json.loads((out / "model_index.json").read_text())["id2label"] == {"0": "cat"}

    save_images(tmp_path / "flat", 3)  # images in the folder itself: no class at all
    with pytest.raises(ValueError, match=r"has no class subfolders: put the images of each class in a subfolder"):
        load_image_dataset(train_data_dir=str(tmp_path / "flat"), resolution=8, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("{}", "holds no model settings"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"num_layers": 2,', "is not valid JSON"),
        (None, "is neither a preset nor a file"),
    ],
)
def test_model_config_files_that_are_no_settings_are_named(tmp_path, text, message):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=rf"--model_config '{path}' {message}.*: give a preset \(DiT-"):
        load_script().main([*TINY, f"--model_config={path}", "--max_train_steps=1", f"--output_dir={tmp_path / 'o'}"])


def test_model_config_without_num_layers_uses_the_model_default(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_attention_heads": 2, "attention_head_dim": 8, "_class_name": "x"}))
    out = tmp_path / "out"
    load_script().main([*TINY, f"--model_config={path}", "--routes=none", "--max_train_steps=1",
                        "--validation_num_inference_steps=1", f"--output_dir={out}"])  # fmt: skip
    assert json.loads((out / "transformer" / "config.json").read_text())["num_layers"] == 28


@pytest.mark.parametrize(
    "script, base",
    [
        ("train_tread.py", []),
        ("train_tread_t2i_lora.py", ["--pretrained_model_name_or_path=org/model", "--train_data_dir=images"]),
    ],
)
def test_num_validation_images_zero_is_refused_up_front(script, base, capsys):
    with pytest.raises(SystemExit):
        load_module(REPO / "training" / script).parse_args([*base, "--num_validation_images=0"])
    assert "--num_validation_images must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- item 7: 16-bit and float


def test_16_bit_and_float_images_keep_their_brightness(tmp_path):
    """A 16-bit greyscale PNG ("I;16") used to read as near-white: PIL's conversion to RGB clips at 255."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    grey[:4] = 0  # black rows: a clipping conversion turns every non-zero 16-bit value white
    Image.fromarray(grey, mode="L").save(tmp_path / "8bit.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tiff")
    Image.fromarray(grey.astype(np.int32) * 257, mode="I").save(tmp_path / "32bit.tiff")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16" and Image.open(tmp_path / "float.tiff").mode == "F"
    for mode in ("RGB", "L"):
        reference = read_image(str(tmp_path / "8bit.png"), 0, resolution=8, center_crop=True, mode=mode)
        for name in ("16bit.png", "float.tiff", "32bit.tiff"):
            pixels = read_image(str(tmp_path / name), 0, resolution=8, center_crop=True, mode=mode)
            assert torch.equal(pixels, reference), (name, mode, pixels.mean().item(), reference.mean().item())
    black = tmp_path / "black16.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(black)
    assert read_image(str(black), 0, resolution=8).max().item() == -1.0  # black stays black (was 0.992 mean white)
    assert preprocess_image(Image.open(black), resolution=8).max().item() == -1.0  # called directly too


# ------------------------------------------------------------------------------------ item 8: extreme aspect ratios


def test_extreme_aspect_ratios_are_bad_images_before_any_resize(tmp_path, monkeypatch):
    """A 1 x 10,000,000 PNG (39 KB) passes the decompression-bomb guard; resizing its short side to 16 px needs
    ~7.7 GB. Here 1 x 1000 (the same check; its resize would still be cheap) must be refused before resizing."""
    Image.new("RGB", (1000, 1)).save(tmp_path / "strip.png")
    Image.new("RGB", (800, 8)).save(tmp_path / "panorama.png")  # 100:1, still allowed
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized before the check"))
    with pytest.raises(ValueError, match=r"item 3 \(.*strip\.png\): the image is 1000x1 pixels, longer than 100 "
                       r"times its width \(or height\): resizing its short side to 16 would take 16000 x 16"):  # fmt: skip
        read_image(str(tmp_path / "strip.png"), 3, resolution=16)
    assert read_image(str(tmp_path / "strip.png"), 3, resolution=16, bad_images="skip") is None
    monkeypatch.undo()
    assert read_image(str(tmp_path / "panorama.png"), 0, resolution=8).shape == (3, 8, 8)


def test_training_skips_and_counts_an_extreme_aspect_ratio_or_stops_naming_it(tmp_path, caplog):
    data = tmp_path / "data"
    save_images(data / "a", 3)
    save_images(data / "b", 3, seed=1)
    Image.new("RGB", (1, 2000)).save(data / "b" / "strip.png")
    base = [*TINY, "--train_batch_size=2", f"--train_data_dir={data}", "--max_train_steps=2"]
    with pytest.raises(ValueError, match=r"Could not read the image of item \d \(.*strip\.png\): the image is 1x2000"):
        load_script().main([*base, f"--output_dir={tmp_path / 'stop'}", "--num_train_epochs=1"])
    load_script().main([*base, f"--output_dir={tmp_path / 'skip'}", "--bad_images=skip"])
    assert (tmp_path / "skip" / "model_index.json").is_file()
