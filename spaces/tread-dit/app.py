"""TREAD DiT demo: class-conditional samples from a TREAD-trained DiT, in the browser (a Gradio app / HF Space).

Pick classes by name, the guidance the pipeline offers and its scale, steps, seed and images per class; the app shows
the grid (one row per class) and the time it took.

    python spaces/tread-dit/app.py                                   # the built-in demo model: tread-digits/
    python spaces/tread-dit/app.py --model user/tread-digits --revision <commit>  # a Hub repo (remote code)
    TREAD_MODEL=path/to/output_dir python spaces/tread-dit/app.py   # a training output folder (needs diffusers-tread)

On a Space, the ``TREAD_MODEL`` variable names the model and ``TREAD_MODEL_REVISION`` the model repo's commit
(``training/push_to_hub.py --space_id`` sets both). A Hub model whose pipeline code comes from its repo (remote code)
is only loaded at a pinned commit (``--revision`` / ``TREAD_MODEL_REVISION``, 40 hex digits): code pushed to the repo
later does not run in the Space until the revision is updated. It runs on the CPU; the app reaches no server but the
Hub (and not even that for a local folder): analytics and version checks are off.

One request is bounded in size and in time: at most ``MAX_IMAGES`` images and ``MAX_STEPS`` steps, at most
``TREAD_MAX_EVALUATIONS`` image-steps x model passes (classifier-free guidance and Sparse Guidance add a pass each,
default 3200: 64 images x 25 steps with guidance), and ``TREAD_TIMEOUT_S`` seconds (default 300), after which it stops
with a message. Seeds are 0 .. 2**32 - 1.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import sys
import time
from collections.abc import Iterator
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
MAX_STEPS = 100
MAX_GUIDANCE_SCALE = 10.0  # the sliders' range
MAX_SEED = 2**32 - 1
# Compute per request: images x steps x model passes per step (guidance adds passes); and a wall-clock limit.
MAX_EVALUATIONS = int(os.environ.get("TREAD_MAX_EVALUATIONS", 64 * 25 * 2))
TIMEOUT_S = float(os.environ.get("TREAD_TIMEOUT_S", 300))
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class GenerationTimeout(Exception):
    """Raised from the transformer's forward once a request has run past its time limit."""


@contextlib.contextmanager
def deadline(pipe: DiffusionPipeline, seconds: float) -> Iterator[None]:
    """Stop sampling (`GenerationTimeout` at the next transformer call) once ``seconds`` have passed; works for any
    pipeline, remote code included, as it only hooks the transformer's forward."""
    end = time.perf_counter() + seconds

    def check(module, args):
        if time.perf_counter() > end:
            raise GenerationTimeout

    handle = pipe.transformer.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def load_pipeline(source: str, revision: str | None = None) -> DiffusionPipeline:
    """Load a pipeline from a Hub id (at ``revision``) or a folder.

    A repo with the remote-code bundle (``training/push_to_hub.py`` uploads one) loads with plain Diffusers, but from
    the Hub only at a pinned commit (``revision``, 40 hex digits; a `ValueError` otherwise), so that the code the
    Space runs cannot change under it; a stock Diffusers pipeline (e.g. ``facebook/DiT-XL-2-256``) loads at
    ``revision`` or the default branch; a training output folder needs ``diffusers_tread``.
    """
    from_hub = not Path(source).is_dir()
    if not from_hub and not Path(source, "model_index.json").is_file():
        checkpoint = re.fullmatch(r"checkpoint-\d+", Path(source).name) or Path(source, "transformer_ema").is_dir()
        raise ValueError(
            f"{Path(source).name} is a training checkpoint, not a saved pipeline: start the app on the training "
            "output folder (the one holding model_index.json), or turn the checkpoint into one with `python "
            "training/push_to_hub.py <checkpoint> --hub_model_id <name> --save_to <folder>`."
            if checkpoint
            else f"{Path(source).name} is not a saved pipeline (no model_index.json in it): give a training output "
            "folder or a Hub id."
        )
    hub_kwargs = {"revision": revision} if from_hub and revision else {}
    index = DiffusionPipeline.load_config(source, **hub_kwargs)
    class_name = index.get("_class_name")
    if isinstance(class_name, (list, tuple)):
        if from_hub and not COMMIT_HASH.fullmatch(revision or ""):
            raise ValueError(
                f"{source} runs its own pipeline code (trust_remote_code), which this app only loads at a pinned "
                f"commit; got revision {revision!r}. Set the TREAD_MODEL_REVISION variable (or --revision) to the "
                "model repo's full 40-digit commit hash, e.g. the one on its 'Files and versions' page."
            )
        pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True, **hub_kwargs)
    elif hasattr(diffusers, class_name):
        pipe = DiffusionPipeline.from_pretrained(source, **hub_kwargs)
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


def passes_per_step(guidance: str | None, guidance_scale: float, sparse_guidance_scale: float) -> int:
    """Model passes per image and step: one, plus one for classifier-free guidance (``guidance_scale > 1``, kinds
    with "cfg" or a pipeline without ``guidance=``), plus one for Sparse Guidance (its scale, or the guidance scale
    when 0, above 1). Sparse passes are routed (cheaper); counted in full, as an upper bound."""
    cfg = guidance is None or "cfg" in guidance
    sparse_scale = sparse_guidance_scale if sparse_guidance_scale > 0 else guidance_scale
    return (
        1 + int(cfg and guidance_scale > 1) + int(guidance is not None and "sparse" in guidance and sparse_scale > 1)
    )


def real_number(value, name: str, low: float, high: float) -> float:
    """``value`` as a float in ``low .. high`` (what the UI allows; API calls can send anything, e.g. ``"abc"``,
    ``inf`` or NaN, which the pipeline would turn into black or unguided images), else `gr.Error`."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not low <= number <= high:  # NaN compares false: refused
        raise gr.Error(f"The {name} must be a number from {low:g} to {high:g}, got {value!r}.")
    return number


def class_id_list(value, num_classes: int) -> list[int]:
    """The classes of a request: a list of ids (the dropdown's values), or one id or comma-separated ids as text
    (``"12"`` is class 12, ``"1, 2"`` classes 1 and 2), each a whole number below ``num_classes``, else `gr.Error`."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [] if value is None else [value]
    if not value:
        raise gr.Error("Pick at least one class.")
    return [whole_number(class_id, "class id", 0, num_classes - 1) for class_id in value]


def whole_number(value, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``low .. high`` (what the UI allows; API calls can send anything), else `gr.Error`."""
    try:
        number = value if isinstance(value, int) else float(value)
        whole = int(number) if number == int(number) else None
    except (TypeError, ValueError, OverflowError):  # not a number, NaN, infinite
        whole = None
    if whole is None or not low <= whole <= high:
        raise gr.Error(f"The {name} must be a whole number from {low} to {high}, got {value!r}.")
    return whole


def generate(
    pipe: DiffusionPipeline,
    class_ids: list[int],
    guidance: str | None,
    guidance_scale: float,
    sparse_guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    images_per_class: int,
    max_evaluations: int | None = None,
    timeout_s: float | None = None,
) -> tuple[Image.Image, str]:
    """Sample ``images_per_class`` images of each class; returns the grid (a row per class) and the time taken.

    Refused (`gr.Error`) beyond ``MAX_IMAGES`` images or ``max_evaluations`` (default ``MAX_EVALUATIONS``) image-steps
    x passes; stopped with a `gr.Error` after ``timeout_s`` seconds (default ``TIMEOUT_S``)."""
    max_evaluations = MAX_EVALUATIONS if max_evaluations is None else max_evaluations
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    class_ids = class_id_list(class_ids, pipe.transformer.config.num_embeds_ada_norm)
    guidance_scale = real_number(guidance_scale, "guidance scale", 1.0, MAX_GUIDANCE_SCALE)
    sparse_guidance_scale = real_number(sparse_guidance_scale, "sparse guidance scale", 0.0, MAX_GUIDANCE_SCALE)
    images_per_class = whole_number(images_per_class, "number of images per class", 1, MAX_IMAGES)
    num_inference_steps = whole_number(num_inference_steps, "number of steps", 1, MAX_STEPS)
    seed = whole_number(seed, "seed", 0, MAX_SEED)
    if len(class_ids) * images_per_class > MAX_IMAGES:
        raise gr.Error(f"At most {MAX_IMAGES} images at a time: pick fewer classes or images per class.")
    num_images = len(class_ids) * images_per_class
    passes = passes_per_step(guidance, guidance_scale, sparse_guidance_scale)
    if num_images * num_inference_steps * passes > max_evaluations:
        raise gr.Error(
            f"Too much for one request: {num_images} images x {num_inference_steps} steps x {passes} model passes per "
            f"step (guidance adds passes) = {num_images * num_inference_steps * passes} evaluations, over this "
            f"Space's limit of {max_evaluations}. Use fewer images, fewer steps, or guidance scale 1."
        )
    kwargs = {}
    if guidance is not None and guidance_kinds(pipe):
        kwargs["guidance"] = guidance  # passed through as chosen: the pipeline validates it
        if sparse_guidance_scale > 0 and "sparse" in guidance and takes(pipe, "sparse_guidance_scale"):
            kwargs["sparse_guidance_scale"] = sparse_guidance_scale
    labels = [class_id for class_id in class_ids for _ in range(images_per_class)]
    started = time.perf_counter()
    try:
        with deadline(pipe, timeout_s):
            images = pipe(
                labels,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed),
                **kwargs,
            ).images
    except ValueError as error:  # e.g. a guidance the model cannot do: show the pipeline's explanation
        raise gr.Error(str(error)) from error
    except GenerationTimeout:
        raise gr.Error(
            f"Stopped after {timeout_s:g} s, this Space's time limit per request: use fewer images or steps."
        ) from None
    seconds = time.perf_counter() - started
    images = [image.convert("RGB") for image in images]
    grid = make_image_grid(images, rows=len(class_ids), cols=images_per_class)
    scale = max(1, 96 // images[0].width)  # make tiny (e.g. 8x8 digit) samples visible
    grid = grid.resize((grid.width * scale, grid.height * scale), resample=Image.NEAREST)
    device = pipe.device.type.upper()
    summary = (
        f"{len(images)} images ({len(class_ids)} classes x {images_per_class}) in **{seconds:.2f} s** "
        f"({num_inference_steps} steps on {device}, seed {seed}{', ' + guidance if guidance else ''})"
    )
    return grid, summary


def model_name(source: str) -> str:
    """What the page calls the model: a Hub id as given, a folder by its name only (its absolute path would tell
    visitors where the app runs)."""
    return Path(source).name if Path(source).is_dir() else source


def build_demo(pipe: DiffusionPipeline, source: str) -> gr.Blocks:
    choices = class_choices(pipe)
    kinds = guidance_kinds(pipe)
    with gr.Blocks(title="TREAD DiT demo") as demo:
        gr.Markdown(
            "# TREAD DiT demo\n"
            f"Class-conditional samples from `{model_name(source)}`, a diffusion transformer trained with TREAD token routing "
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
                guidance_scale = gr.Slider(
                    1.0, MAX_GUIDANCE_SCALE, value=2.0, step=0.25, label="guidance scale (1 = off)"
                )
                sparse_guidance_scale = gr.Slider(
                    0.0,
                    MAX_GUIDANCE_SCALE,
                    value=0.0,
                    step=0.25,
                    label="sparse guidance scale (0 = the guidance scale; cfg+sparse needs one)",
                    visible=any("sparse" in kind for kind in kinds) and takes(pipe, "sparse_guidance_scale"),
                )
                steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="steps")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label=f"seed (0 .. {MAX_SEED})")
                images_per_class = gr.Slider(1, 8, value=4, step=1, label="images per class")
                gr.Markdown(
                    f"At most {MAX_IMAGES} images and {MAX_EVALUATIONS} image-steps x model passes (guidance doubles "
                    f"them) per request, stopped after {TIMEOUT_S:g} s."
                )
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
    parser.add_argument(
        "--revision",
        default=os.environ.get("TREAD_MODEL_REVISION") or None,
        help="commit of a Hub model to load (default: $TREAD_MODEL_REVISION); required for remote code",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    if not (Path(args.model).is_dir() or args.model.count("/") == 1):
        parser.error(
            f"{args.model} is neither a folder nor a Hub id. Train the demo model with `accelerate launch "
            "training/train_tread.py`, or pass --model / set TREAD_MODEL."
        )
    try:
        pipe = load_pipeline(args.model, args.revision)
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:  # missing or truncated weights, an unreachable Hub
        parser.error(
            f"could not load {model_name(args.model)}: {error} If its weights are incomplete (an interrupted copy, "
            "download or save), copy or download them again."
        )
    demo = build_demo(pipe, args.model)
    demo.queue(max_size=16).launch(server_name=args.host, server_port=args.port, ssr_mode=False, show_error=True)


if __name__ == "__main__":
    main()
