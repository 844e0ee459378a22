"""TREAD model cards: the DiT pipeline card (``model_cards/tread_dit.md``) and the text-to-image LoRA card
(``model_cards/tread_t2i_lora.md``), rendered with ``huggingface_hub.ModelCard.from_template``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models import TreadSSM2DModel, model_class_for_config
from .bundle import PACKAGE, REMOTE_MODULE, REPO_ROOT, _replace_file


def _shipped_folder(name: str) -> Path:
    """``model_cards`` or ``spaces``: top-level folders of a checkout, installed with the wheel as the data packages
    ``diffusers_tread._model_cards`` / ``diffusers_tread._spaces`` (setup.py's ``package_dir``)."""
    spec = importlib.util.find_spec(f"{PACKAGE}._{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return REPO_ROOT / name  # a source checkout on sys.path, not installed


MODEL_CARD_TEMPLATE = _shipped_folder("model_cards") / "tread_dit.md"
LORA_MODEL_CARD_TEMPLATE = _shipped_folder("model_cards") / "tread_t2i_lora.md"
CARD_INFO_FILE = "tread_card.json"


# The Hub has no class-conditional task; class-conditional DiT checkpoints are image generators without a prompt or
# an input image, which is the Hub's "unconditional-image-generation" task.
PIPELINE_TAG = "unconditional-image-generation"
TAGS = ["tread", "diffusers-tread", "diffusers", "dit", "class-conditional", "image-generation"]
# A text-to-image LoRA's card: the tags Diffusers' LoRA training scripts give theirs (`populate_model_card`), TREAD's,
# and the model family (pixart, sd3, flux) before "template:sd-lora".
LORA_TAGS = ["text-to-image", "diffusers-training", "diffusers", "lora", "tread"]


@dataclasses.dataclass
class ModelCardInfo:
    """What a TREAD model card says beyond its Hub metadata: the training setup and how to use the model.

    Every field is optional; a table row or section whose value is None is left out. Saved next to the card as
    ``tread_card.json`` so the card can be rendered again (e.g. by `push_to_hub` with a repo id and demo link).
    """

    model_name: str
    repo_id: str | None = None
    demo_url: str | None = None
    # the model
    backbone: str | None = None
    model_class: str = "TreadTransformer2DModel"  # or "TreadSSM2DModel"
    num_parameters: str | None = None
    num_tokens: int | None = None
    routes: str | None = None
    route_reinsertion: str | None = None
    disable_routing_after_step: int | str | None = None
    # the training
    objective: str | None = None
    tread_loss: str | None = None
    dataset: str | None = None
    num_examples: int | None = None
    num_classes: int | None = None
    data_space: str | None = None
    steps: int | None = None
    global_batch_size: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    ema: str | None = None
    mixed_precision: str | None = None
    hardware: str | None = None
    training_time: str | None = None
    final_loss: str | None = None
    command: str | None = None
    training_table: list[list[str]] | None = None  # rows as given, instead of the fields above (an older card's)
    # the samples and usage
    grid: str | None = "samples/final_grid.png"
    loss_plot: str | None = "samples/loss.png"
    example_labels: list | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 4.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelCardInfo:
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in json.loads(text).items() if key in fields})


def card_metadata(
    info: ModelCardInfo,
    card_data: ModelCardData | None = None,
    eval_results: Sequence[EvalResult] | None = None,
) -> ModelCardData:
    """Hub metadata: ``card_data``'s fields (license, base_model, datasets, ...) and ``eval_results`` (else
    ``card_data``'s) plus what every TREAD card has: library_name ``diffusers``, the TREAD tags, the pipeline tag,
    and the model name the ``model-index`` of the eval results needs."""
    data = card_data.to_dict() if card_data is not None else {}
    data.pop("model-index", None)
    model_name = data.pop("model_name", None) or (card_data.model_name if card_data is not None else None)
    if eval_results is None and card_data is not None:
        eval_results = card_data.eval_results
    data.update(
        library_name="diffusers",
        license=data.get("license") or "apache-2.0",
        pipeline_tag=data.get("pipeline_tag") or PIPELINE_TAG,
        tags=list(dict.fromkeys([*TAGS, *(data.get("tags") or [])])),
    )
    if not eval_results:  # model_name only names the model-index entry
        return ModelCardData(**data)
    return ModelCardData(eval_results=list(eval_results), model_name=model_name or info.model_name, **data)


def _joined(*parts: Any, separator: str = ", ") -> str | None:
    return separator.join(str(part) for part in parts if part is not None and part != "") or None


def training_rows(info: ModelCardInfo) -> list[tuple[str, str]]:
    """The rows of the card's training table, leaving out what is unknown."""
    if info.training_table:
        return [(str(name), str(value)) for name, value in info.training_table]
    backbone = info.backbone
    details = _joined(
        f"{info.num_parameters} parameters" if info.num_parameters else None,
        f"{info.num_tokens} tokens per image" if info.num_tokens else None,
    )
    if backbone and details:
        backbone = f"{backbone} ({details})"
    routes = info.routes and _joined(
        f"`{info.routes}`",
        f"({info.route_reinsertion} re-insertion)" if info.route_reinsertion else None,
        separator=" ",
    )
    data = info.dataset
    details = _joined(
        f"{info.num_examples} examples" if info.num_examples is not None else None,
        f"{info.num_classes} classes" if info.num_classes is not None else None,
        info.data_space,
    )
    if data and details:
        data = f"{data} ({details})"
    optimizer = None
    if info.learning_rate is not None:
        optimizer = _joined(
            f"AdamW, learning rate {info.learning_rate}",
            f"{info.lr_scheduler} schedule" if info.lr_scheduler else None,
        )
    rows = [
        ("backbone", backbone),
        ("routes", routes),
        ("routing disabled after step", info.disable_routing_after_step),
        ("objective", info.objective and f"`{info.objective}`"),
        ("TREAD loss", info.tread_loss),
        ("data", data),
        ("steps", info.steps),
        ("batch size (global)", info.global_batch_size),
        ("optimizer", optimizer),
        ("EMA", info.ema),
        ("mixed precision", info.mixed_precision),
        ("hardware", info.hardware),
        ("training time", info.training_time),
        ("final training loss", info.final_loss),
    ]
    return [(name, str(value)) for name, value in rows if value is not None]


def eval_rows(card_data: ModelCardData) -> list[dict[str, Any]]:
    return [
        {
            "metric": result.metric_name or result.metric_type,
            "value": result.metric_value,
            "dataset": result.dataset_name + (f" ({result.dataset_split})" if result.dataset_split else ""),
        }
        for result in card_data.eval_results or []
    ]


def render_model_card(
    info: ModelCardInfo,
    card_data: ModelCardData | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the TREAD model card template (``model_cards/tread_dit.md``) with ``ModelCard.from_template``; see
    `card_metadata` for the metadata and eval results (``huggingface_hub.EvalResult``)."""
    metadata = card_metadata(info, card_data, eval_results)
    return _render_card(
        template_path or MODEL_CARD_TEMPLATE,
        metadata,
        info=info,
        repo=info.repo_id or info.model_name,
        training_rows=training_rows(info),
        eval_rows=eval_rows(metadata),
        remote_module=REMOTE_MODULE,
    )


def _render_card(template_path: str | os.PathLike, card_data: ModelCardData, **context: Any) -> ModelCard:
    """``ModelCard.from_template`` with one of the templates shipped in ``model_cards/`` (or another file), given the
    library version; the blank lines of left-out sections are squeezed."""
    from .. import __version__

    card = ModelCard.from_template(card_data, template_path=str(template_path), library_version=__version__, **context)
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)
    return card


def save_model_card(
    folder: str | os.PathLike,
    info: ModelCardInfo,
    card_data: ModelCardData | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Write ``README.md`` (the card) and ``tread_card.json`` (``info``, to render it again later) into ``folder``."""
    card = render_model_card(info, card_data, eval_results, template_path)
    _replace_file(Path(folder, "README.md"), str(card))
    _replace_file(Path(folder, CARD_INFO_FILE), info.to_json())
    return card


def load_model_card_info(folder: str | os.PathLike) -> ModelCardInfo | None:
    path = Path(folder, CARD_INFO_FILE)
    return ModelCardInfo.from_json(path.read_text()) if path.is_file() else None


@dataclasses.dataclass
class LoraCardInfo:
    """What the card of a text-to-image LoRA (``training/train_tread_t2i_lora.py``) says: the base pipeline, the
    adapters, how to load them, and the training run. A training value left None leaves its table row out."""

    base_model: str  # the Hub id or local folder trained from
    pipeline_class: str  # e.g. "PixArtSigmaPipeline"
    transformer_class: str
    family: str  # pixart, sd3 or flux (a tag)
    rank: int
    lora_alpha: float
    target_modules: list[str]
    repo_id: str  # where `load_lora_weights` finds the adapters: the Hub repo, or the output folder
    # False where the pipeline has no `load_lora_weights` (PixArt): the card's code injects the adapters with PEFT.
    diffusers_loader: bool = True
    prompt: str | None = None  # the validation prompt: the card's example and its images' caption
    # the training
    routes: str | None = None  # JSON
    objective: str | None = None  # the loss, in words
    dataset: str | None = None
    num_examples: int | None = None
    resolution: int | None = None
    steps: int | None = None
    global_batch_size: int | None = None
    batch_size_per_device: int | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    mixed_precision: str | None = None
    hardware: str | None = None
    training_time: str | None = None
    final_loss: str | None = None
    command: str | None = None  # `launch_command`'s: the token redacted


def lora_training_rows(info: LoraCardInfo) -> list[tuple[str, str]]:
    """The rows of a LoRA card's training table, leaving out what is unknown."""
    data = info.dataset and _joined(
        f"{info.num_examples} image-caption pairs from `{info.dataset}`"
        if info.num_examples is not None
        else f"`{info.dataset}`",
        f"{info.resolution} px" if info.resolution else None,
    )
    steps = info.steps
    if steps is not None and info.global_batch_size:
        steps = f"{steps} at batch {info.global_batch_size}"
        if info.batch_size_per_device and info.gradient_accumulation_steps:
            steps += f" ({info.batch_size_per_device} per device x {info.gradient_accumulation_steps} accumulation)"
    learning_rate = info.learning_rate
    if learning_rate is not None and info.lr_scheduler:
        learning_rate = f"{learning_rate} ({info.lr_scheduler})"
    rows = [
        ("routes", info.routes and f"`{info.routes}`"),
        ("loss", info.objective),
        ("data", data),
        ("steps", steps),
        ("learning rate", learning_rate),
        ("mixed precision", info.mixed_precision),
        ("hardware, time", _joined(info.hardware, info.training_time)),
        ("final loss", info.final_loss),
    ]
    return [(name, str(value)) for name, value in rows if value is not None]


def render_lora_model_card(
    info: LoraCardInfo, image_files: Sequence[str] = (), template_path: str | os.PathLike | None = None
) -> ModelCard:
    """Render ``model_cards/tread_t2i_lora.md``: the Hub metadata Diffusers' LoRA training scripts write (base model,
    widget of ``image_files`` with the prompt, ``LORA_TAGS``) and the text (the adapters, how to load them, the
    training table)."""
    card_data = ModelCardData(
        license=None,
        library_name="diffusers",
        inference=True,
        base_model=None if Path(info.base_model).exists() else info.base_model,  # a Hub id, not a local folder
        instance_prompt=info.prompt,
        widget=[{"text": info.prompt, "output": {"url": name}} for name in image_files],
        tags=[*LORA_TAGS, info.family, "template:sd-lora"],
    )
    return _render_card(
        template_path or LORA_MODEL_CARD_TEMPLATE, card_data, info=info, training_rows=lora_training_rows(info)
    )


def save_lora_model_card(
    folder: str | os.PathLike,
    info: LoraCardInfo,
    images: Sequence[Any] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Write ``README.md`` (`render_lora_model_card`) into ``folder``, with ``images`` (PIL images, e.g. the final
    validation samples) saved next to it as ``image_<i>.png`` for the card's widget."""
    image_files = []
    for index, image in enumerate(images or []):
        image_files.append(f"image_{index}.png")
        image.save(Path(folder, image_files[-1]))
    card = render_lora_model_card(info, image_files, template_path)
    _replace_file(Path(folder, "README.md"), str(card))
    return card


def card_info_from_folder(folder: str | os.PathLike, model_name: str | None = None) -> ModelCardInfo:
    """What a pipeline folder itself tells about the model (configs, weights, samples), for a card when the training
    run left no ``tread_card.json``."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    info = ModelCardInfo(model_name=model_name or folder.resolve().name)
    config_path = folder / "transformer" / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        info.model_class = config.get("_class_name", info.model_class)
        if model_class_for_config(config) is TreadSSM2DModel:
            info.backbone = (
                f"bidirectional Mamba, {config.get('num_layers')} layers, width {config.get('hidden_size')}"
            )
        else:
            width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
            info.backbone = f"DiT, {config.get('num_layers')} layers, width {width}"
        info.backbone += f", patch {config.get('patch_size')}"
        info.num_tokens = (config.get("sample_size", 0) // max(config.get("patch_size", 1), 1)) ** 2
        info.routes = json.dumps(config.get("routes", []))
        info.route_reinsertion = config.get("route_reinsertion")
        info.num_classes = config.get("num_embeds_ada_norm")
        info.example_labels = list(range(min(4, info.num_classes or 1)))
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        if weights.is_file():
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as tensors:
                count = sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
            info.num_parameters = f"{count / 1e6:.2f}M"
    info.data_space = "pixel space" if list(index.get("vae") or [None])[0] is None else "VAE latents"
    info.grid = info.grid if (folder / str(info.grid)).is_file() else None
    info.loss_plot = info.loss_plot if (folder / str(info.loss_plot)).is_file() else None
    if (folder / "README.md").is_file():  # a card from before tread_card.json: keep its training table and command
        training = ModelCard.load(folder / "README.md").text.partition("## Training")[2].split("\n## ")[0]
        rows = re.findall(r"^\| (.+?) \| (.+?) \|$", training, flags=re.MULTILINE)
        info.training_table = [[name, value] for name, value in rows if name != "setting"] or None
        command = re.search(r"```bash\n(.+?)\n```", training, flags=re.DOTALL)
        info.command = command.group(1) if command else None
    return info
