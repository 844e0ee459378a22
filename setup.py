from setuptools import find_packages, setup

# Diffusers: 0.35 is the floor (models.attention.AttentionMixin, which the DiT model subclasses, first ships in 0.35);
# the cap lets the next minor release (0.43) in untested: the private API the package touches is named, with the
# releases it serves, in diffusers_tread/compat.py, and .ci/run tests the floor (0.35.2) and the newest release.
install_requires = [
    "torch>=2.5",  # torch.serialization.safe_globals (checkpoint conversion)
    "diffusers>=0.35,<0.44",
    "huggingface-hub>=1.0",
    "safetensors>=0.4",
    # 1.1.0 is the first release whose load_accelerator_state (Accelerator.load_state, i.e. --resume_from_checkpoint)
    # reads optimizer/scheduler/sampler/scaler/RNG files through accelerate.utils.other.load, which sets
    # weights_only=True unless told otherwise (torch >= 2.4); 1.0.x calls bare torch.load, i.e. weights_only=False
    # under torch 2.5. (load_custom_state, for register_for_checkpointing objects, passes weights_only=False in
    # every release through 1.15.0; the training scripts register none.)
    "accelerate>=1.1",
    "peft>=0.17",
    "filelock>=3.8",  # the run folder's lock (diffusers_tread.checkpointing.lock_run_folder); huggingface-hub needs it too
    "numpy",
    "packaging",  # diffusers_tread/compat.py compares Diffusers versions
    "Pillow",
]
extras = {
    # imageio-ffmpeg ships FFmpeg in its wheel: it decodes the training clips (mp4, webm, gif) of the LoRA script, and
    # with imageio it is what Diffusers' export_to_video writes the validation videos with. ftfy: the Wan and
    # SkyReels-V2 pipelines clean prompts with it (SkyReels-V2's fails without it in Diffusers 0.42).
    "train": [
        "datasets>=3.0",
        "transformers>=4.45",
        "scikit-learn>=1.3",
        "tensorboard",
        "matplotlib",
        "imageio>=2.31",
        "imageio-ffmpeg>=0.5",
        "ftfy",
    ],
    # The Gradio demo (spaces/tread-dit); the Space itself gets gradio from its sdk_version.
    "demo": ["gradio>=6,<7"],
    # Diffusers' own DiT test files import these; bench/diffusers_suite/run.py runs them against our classes.
    "diffusers-suite": ["parameterized", "requests-mock", "pytest>=8"],
}
# selenium drives Debian's chromium + chromium-driver in the demo's browser test (see .ci/run).
# setuptools>=70.1 builds wheels without the `wheel` package (tests/test_wheel.py builds one, offline).
# pytest-xdist: the README's `pytest -n 2` runs the suite on two workers (most tests wait on a training subprocess).
extras["test"] = (
    extras["train"] + extras["demo"] + ["pytest>=8", "pytest-xdist>=3.5", "selenium>=4.20", "setuptools>=70.1"]
)
extras["dev"] = extras["test"] + ["ruff>=0.6"]

setup(
    name="diffusers-tread",
    version="0.1.0",
    description="TREAD token routing for efficient diffusion transformer training, as a Hugging Face Diffusers integration",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # Python 3.10 resolves Diffusers 0.35-0.41; Diffusers 0.42 itself requires Python >= 3.11.
    python_requires=">=3.10",
    # model_cards/ and spaces/ travel with the wheel as data packages (hub.py finds them there, or in a checkout).
    packages=find_packages(include=["diffusers_tread", "diffusers_tread.*"])
    + ["diffusers_tread._model_cards", "diffusers_tread._spaces"],
    package_dir={"diffusers_tread._model_cards": "model_cards", "diffusers_tread._spaces": "spaces"},
    package_data={"diffusers_tread._model_cards": ["*.md"], "diffusers_tread._spaces": ["tread-dit/*"]},
    install_requires=install_requires,
    extras_require=extras,
)
