"""Hugging Face Hub integration, by job:

- `bundle`: the remote-code bundle, standalone modules generated from this package's sources so that plain Diffusers
  runs a pushed checkpoint (``DiffusionPipeline.from_pretrained("user/repo", trust_remote_code=True)``);
- `cards`: the model cards of DiT pipelines and text-to-image LoRAs;
- `uploads`: Hub-ready folders, pushing a pipeline and its demo Space, a training run's uploads.

Keeping the token out of what a run writes is `diffusers_tread.redaction`, beside the training toolkit. Nothing here
imports training-only packages (datasets, scikit-learn, matplotlib, gradio).
"""

from ..redaction import launch_command, redact
from .bundle import (
    PACKAGE,
    REMOTE_MODULE,
    REMOTE_SOURCE,
    bundle_files,
    generate_module,
    library_model_index,
    remote_code_files,
    remote_code_model_index,
    write_remote_code,
)
from .cards import (
    CARD_INFO_FILE,
    LORA_MODEL_CARD_TEMPLATE,
    MODEL_CARD_TEMPLATE,
    PIPELINE_TAG,
    LoraCardInfo,
    ModelCardInfo,
    card_info_from_folder,
    load_model_card_info,
    render_lora_model_card,
    render_model_card,
    save_lora_model_card,
    save_model_card,
)
from .uploads import (
    HUB_IGNORE_PATTERNS,
    SPACE_DIR,
    CheckpointUploads,
    prepare_hub_folder,
    prepare_space,
    push_to_hub,
    upload_final_output,
    upload_output,
)

__all__ = [
    "CARD_INFO_FILE",
    "HUB_IGNORE_PATTERNS",
    "LORA_MODEL_CARD_TEMPLATE",
    "MODEL_CARD_TEMPLATE",
    "PACKAGE",
    "PIPELINE_TAG",
    "REMOTE_MODULE",
    "REMOTE_SOURCE",
    "SPACE_DIR",
    "CheckpointUploads",
    "LoraCardInfo",
    "ModelCardInfo",
    "bundle_files",
    "card_info_from_folder",
    "generate_module",
    "launch_command",
    "library_model_index",
    "load_model_card_info",
    "prepare_hub_folder",
    "prepare_space",
    "push_to_hub",
    "redact",
    "remote_code_files",
    "remote_code_model_index",
    "render_lora_model_card",
    "render_model_card",
    "save_lora_model_card",
    "save_model_card",
    "upload_final_output",
    "upload_output",
    "write_remote_code",
]
