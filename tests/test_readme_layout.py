"""The README's "## Layout" block matches the tree (issue #23): every file it names exists, and every library module,
training script and benchmark script is named."""

import re

from conftest import REPO

# The folders a name in the block may sit in (the block names files relative to the folder line they stand under).
FOLDERS = [
    "",
    "diffusers_tread",
    "diffusers_tread/data",
    "diffusers_tread/hub",
    "training",
    "bench",
    "bench/diffusers_suite",
    "spaces/tread-dit",
    "model_cards",
    "pipelines",
    "pipelines/tread_dit",
]


def layout_names() -> set[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout\n", 1)[1].split("```", 2)[1]
    return set(re.findall(r"[\w./-]+\.(?:py|sh|md|txt|toml)\b", block))


def test_every_file_the_layout_names_exists():
    missing = [name for name in layout_names() if not any((REPO / folder / name).is_file() for folder in FOLDERS)]
    assert not missing, missing


def test_the_layout_names_every_module_and_script():
    names = layout_names()
    unnamed = []
    for path in sorted((REPO / "diffusers_tread").rglob("*.py")):
        relative = path.relative_to(REPO / "diffusers_tread").as_posix()
        in_listed_folder = path.parent.name in ("data", "hub") and path.name in names
        if relative not in names and not in_listed_folder:
            unnamed.append(f"diffusers_tread/{relative}")
    for folder in ("training", "bench"):
        unnamed += [f"{folder}/{path.name}" for path in sorted((REPO / folder).glob("*.py")) if path.name not in names]
    assert not unnamed, unnamed
