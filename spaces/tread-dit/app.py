"""TREAD DiT demo: class-conditional samples from a TREAD-trained DiT, in the browser (a Gradio app / HF Space).

Pick classes by name, the guidance the pipeline offers and its scale, steps, seed and images per class; the app shows
the grid (one row per class) and the time it took.

    python spaces/tread-dit/app.py                                   # the built-in demo model: tread-digits/
    python spaces/tread-dit/app.py --model user/tread-digits        # a Hub repo (remote code: no diffusers-tread)
    TREAD_MODEL=path/to/output_dir python spaces/tread-dit/app.py   # a training output folder (needs diffusers-tread)

On a Space, the ``TREAD_MODEL`` variable names the model (``training/push_to_hub.py --space_id`` sets it). It runs on
the CPU; the app reaches no server but the Hub (and not even that for a local folder): analytics and version checks
are off.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

# Offline and private: no usage analytics or version check, no Hub telemetry. Set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import diffusers  # noqa: E402
import gradio as gr  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils import make_image_grid  # noqa: E402
from PIL import Image  # noqa: E402

# The model `accelerate launch training/train_tread.py` writes with no arguments, when run from a repo checkout.
BUILTIN_MODEL = Path(__file__).resolve().parent.parent.parent / "tread-digits"
MAX_IMAGES = 64  # per click, so that one request cannot hold a CPU Space for long


def load_pipeline(source: str) -> DiffusionPipeline:
    """Load a pipeline from a Hub id or a folder.

    A repo with the remote-code bundle (``training/push_to_hub.py`` uploads one) loads with plain Diffusers; a stock
    Diffusers pipeline (e.g. ``facebook/DiT-XL-2-256``) too; a training output folder needs ``diffusers_tread``.
    """
    index = DiffusionPipeline.load_config(source)
    class_name = index.get("_class_name")
    if isinstance(class_name, (list, tuple)):
        pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    elif hasattr(diffusers, class_name):
        pipe = DiffusionPipeline.from_pretrained(source)
    else:
        from diffusers_tread import TreadDiTPipeline  # a local TREAD output folder (the library layout)

        pipe = TreadDiTPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def class_choices(pipe: DiffusionPipeline) -> list[tuple[str, int]]:
    """``(name, id)`` per class: the first name of each ``id2label`` entry, else ``"class <id>"``."""
    id2label = {int(key): value for key, value in (pipe.config.get("id2label") or {}).items()}
    if not id2label and getattr(pipe, "labels", None):
        id2label = {class_id: name for name, class_id in sorted(pipe.labels.items(), reverse=True)}
    num_classes = pipe.transformer.config.num_embeds_ada_norm
    return [(id2label.get(i, f"class {i}").split(",")[0].strip(), i) for i in range(num_classes)]


def guidance_kinds(pipe: DiffusionPipeline) -> list[str]:
    """What the pipeline takes as ``guidance=`` (its ``GUIDANCE_KINDS``, e.g. ``["cfg", "sparse"]``), or ``[]`` when
    it has no such argument (classifier-free guidance through ``guidance_scale`` only)."""
    parameter = inspect.signature(pipe.__call__).parameters.get("guidance")
    if parameter is None:
        return []
    kinds = getattr(pipe, "guidance_kinds", None) or getattr(
        sys.modules[type(pipe).__module__], "GUIDANCE_KINDS", None
    )
    return list(kinds or [parameter.default])


def takes(pipe: DiffusionPipeline, argument: str) -> bool:
    return argument in inspect.signature(pipe.__call__).parameters


def generate(
    pipe: DiffusionPipeline,
    class_ids: list[int],
    guidance: str | None,
    guidance_scale: float,
    sparse_guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    images_per_class: int,
) -> tuple[Image.Image, str]:
    """Sample ``images_per_class`` images of each class; returns the grid (a row per class) and the time taken."""
    class_ids = [int(class_id) for class_id in class_ids or []]
    if not class_ids:
        raise gr.Error("Pick at least one class.")
    images_per_class = int(images_per_class)
    if len(class_ids) * images_per_class > MAX_IMAGES:
        raise gr.Error(f"At most {MAX_IMAGES} images at a time: pick fewer classes or images per class.")
    kwargs = {}
    if guidance is not None and guidance_kinds(pipe):
        kwargs["guidance"] = guidance  # passed through as chosen: the pipeline validates it
        if sparse_guidance_scale > 0 and "sparse" in guidance and takes(pipe, "sparse_guidance_scale"):
            kwargs["sparse_guidance_scale"] = float(sparse_guidance_scale)
    labels = [class_id for class_id in class_ids for _ in range(images_per_class)]
    started = time.perf_counter()
    try:
        images = pipe(
            labels,
            guidance_scale=float(guidance_scale),
            num_inference_steps=int(num_inference_steps),
            generator=torch.Generator().manual_seed(int(seed)),
            **kwargs,
        ).images
    except ValueError as error:  # e.g. a guidance the model cannot do: show the pipeline's explanation
        raise gr.Error(str(error)) from error
    seconds = time.perf_counter() - started
    images = [image.convert("RGB") for image in images]
    grid = make_image_grid(images, rows=len(class_ids), cols=images_per_class)
    scale = max(1, 96 // images[0].width)  # make tiny (e.g. 8x8 digit) samples visible
    grid = grid.resize((grid.width * scale, grid.height * scale), resample=Image.NEAREST)
    device = pipe.device.type.upper()
    summary = (
        f"{len(images)} images ({len(class_ids)} classes x {images_per_class}) in **{seconds:.2f} s** "
        f"({int(num_inference_steps)} steps on {device}, seed {int(seed)}{', ' + guidance if guidance else ''})"
    )
    return grid, summary


def build_demo(pipe: DiffusionPipeline, source: str) -> gr.Blocks:
    choices = class_choices(pipe)
    kinds = guidance_kinds(pipe)
    with gr.Blocks(title="TREAD DiT demo") as demo:
        gr.Markdown(
            "# TREAD DiT demo\n"
            f"Class-conditional samples from `{source}`, a diffusion transformer trained with TREAD token routing "
            "([arXiv 2501.04765](https://arxiv.org/abs/2501.04765)). Sampling uses every token."
        )
        with gr.Row():
            with gr.Column():
                classes = gr.Dropdown(
                    choices=choices,
                    value=[choices[0][1]],
                    multiselect=True,
                    label="classes",
                    info="type to search; one grid row per class",
                    elem_id="tread-classes",
                )
                guidance = gr.Radio(
                    choices=kinds or ["cfg"],
                    value=(kinds or ["cfg"])[0],
                    label="guidance",
                    info="cfg: classifier-free"
                    + ("; sparse: Sparse Guidance (the model's routes at two ratios)" if "sparse" in kinds else ""),
                    interactive=bool(kinds),
                    elem_id="tread-guidance",
                )
                guidance_scale = gr.Slider(1.0, 10.0, value=2.0, step=0.25, label="guidance scale (1 = off)")
                sparse_guidance_scale = gr.Slider(
                    0.0,
                    10.0,
                    value=0.0,
                    step=0.25,
                    label="sparse guidance scale (0 = the guidance scale; cfg+sparse needs one)",
                    visible=any("sparse" in kind for kind in kinds) and takes(pipe, "sparse_guidance_scale"),
                )
                steps = gr.Slider(1, 100, value=25, step=1, label="steps")
                seed = gr.Number(value=0, precision=0, label="seed")
                images_per_class = gr.Slider(1, 8, value=4, step=1, label="images per class")
                button = gr.Button("Generate", variant="primary", elem_id="tread-generate")
            with gr.Column():
                grid = gr.Image(label="samples", type="pil", format="png", elem_id="tread-grid")
                timing = gr.Markdown(elem_id="tread-time")

        def run(class_ids, kind, scale, sparse_scale, num_steps, seed_value, per_class):
            return generate(
                pipe, class_ids, kind if kinds else None, scale, sparse_scale, num_steps, seed_value, per_class
            )

        button.click(
            run,
            inputs=[classes, guidance, guidance_scale, sparse_guidance_scale, steps, seed, images_per_class],
            outputs=[grid, timing],
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=os.environ.get("TREAD_MODEL") or str(BUILTIN_MODEL),
        help="Hub id or folder (default: $TREAD_MODEL, else the built-in demo model tread-digits/)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    if not (Path(args.model).is_dir() or args.model.count("/") == 1):
        parser.error(
            f"{args.model} is neither a folder nor a Hub id. Train the demo model with `accelerate launch "
            "training/train_tread.py`, or pass --model / set TREAD_MODEL."
        )
    pipe = load_pipeline(args.model)
    demo = build_demo(pipe, args.model)
    demo.queue(max_size=16).launch(server_name=args.host, server_port=args.port, ssr_mode=False, show_error=True)


if __name__ == "__main__":
    main()
