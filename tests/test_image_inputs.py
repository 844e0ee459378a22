"""Image and option inputs that used to end in tracebacks or train on wrong pixels (issue #21 items 7, 8 and 10)."""

import json

import numpy as np
import pytest
from conftest import REPO, TINY, load_module, load_script
from PIL import Image

from diffusers_tread.data import first_readable_example, load_image_dataset


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
