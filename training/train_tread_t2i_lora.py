#!/usr/bin/env python
"""LoRA text-to-image fine-tuning with TREAD token routing (Krause et al., arXiv 2501.04765) for PixArt, SD3 and Flux.

In the style of Diffusers' `train_dreambooth_lora_sd3.py` / `train_text_to_image_lora.py`: an image-caption data set (an
`imagefolder` with a `metadata.jsonl`, a local `datasets` folder, or a Hub data set), a Diffusers pipeline folder or Hub
id, LoRA adapters (PEFT) on the transformer, and TREAD routing on the transformer's image tokens while it trains.

    accelerate launch training/train_tread_t2i_lora.py \
        --pretrained_model_name_or_path PixArt-alpha/PixArt-Sigma-XL-2-512-MS --train_data_dir my-images \
        --resolution 512 --rank 16 --routes paper --validation_prompt "a photo of a red fox" --output_dir fox-lora

The story, top to bottom: arguments -> which model (from `model_index.json`) -> data -> text embeddings (and optionally
VAE latents) computed ONCE, after which the text encoders are freed -> transformer + LoRA + routing -> optimizer ->
(resume) -> loop -> LoRA weights in Diffusers' format, a model card, and an optional push.

Routing (`diffusers_tread.models.tread_t2i.apply_tread`) is a set of hooks on the transformer's blocks: it runs only in
train mode, touches only image tokens (text tokens and the conditioning are never routed), and leaves the module tree
and state dict alone, so PEFT's LoRA layers and Diffusers' LoRA saving and loading are unaffected. Validation switches
the model to eval mode, which samples with every token.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
)
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE, LoraBaseMixin
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, create_repo
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from diffusers_tread import hub, paper_routes

# The library's crash-safe run folder (checkpoints, final save, resume, stop signals), shared with train_tread.py, so
# that both scripts behave the same way.
from diffusers_tread.checkpointing import (
    LOSS_HISTORY,
    check_run_arguments,
    clear_output_dir,
    final_output,
    finished_step,
    install_stop_handlers,
    process_seed,
    register_checkpoint_hooks,
    restore_stop_handlers,
    resume_from_checkpoint,
    resume_loss_history,
    save_checkpoint,
    stop_requested,
)
from diffusers_tread.data import (
    BAD_IMAGE_POLICIES,
    BAD_IMAGES_HELP,
    CachedLatentDataset,
    CaptionedImageDataset,
    caption_table,
    collate_examples,
    embeddings_fingerprint,
    load_captioned_images,
    load_precomputed_embeddings,
    save_precomputed_embeddings,
)
from diffusers_tread.models.tread_t2i import apply_tread
from diffusers_tread.routing import ROUTE_REINSERTION_MODES, validate_routes
from diffusers_tread.training_utils import main_with_messages, parse_routes

logger = get_logger(__name__, log_level="INFO")

# The LoraConfig fields a saved file's metadata gives back when it is loaded into a PixArt transformer.
LORA_CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora")


# ----------------------------------------------------------------------------------------------------------------------
# The supported model families: what tells them apart is collected here.
# ----------------------------------------------------------------------------------------------------------------------

FAMILIES = {
    # transformer class -> family. PixArt: DDPM (epsilon or v) with learned sigma, T5. SD3 and Flux: rectified flow,
    # CLIP x2 + T5 (Flux: CLIP + T5, packed 2x2 latents, RoPE ids, guidance embedding).
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
DEFAULT_TARGET_MODULES = {
    "pixart": ["to_k", "to_q", "to_v", "to_out.0"],  # self- and cross-attention (attn1, attn2)
    "sd3": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
    "flux": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
}
# The pipelines' own defaults (PixArt-Alpha was trained with 120 T5 tokens, Sigma with 300); 77 for SD3 as in
# Diffusers' SD3 LoRA examples (the CLIP length; T5 may take more).
DEFAULT_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300, "sd3": 77, "flux": 512}


class ModelSpec:
    """What the script needs to know about the base pipeline, read from its `model_index.json`."""

    def __init__(self, path: str, model_index: dict):
        self.path = path  # a local folder (Hub ids are downloaded first)
        self.model_index = model_index
        self.pipeline_class_name = model_index.get("_class_name")
        transformer = model_index.get("transformer")
        transformer_class = (
            transformer[1] if isinstance(transformer, (list, tuple)) and len(transformer) == 2 else None
        )
        if transformer_class not in FAMILIES:
            supported = ", ".join(f"{cls} ({family})" for cls, family in FAMILIES.items())
            raise ValueError(
                f"{path}: the pipeline's transformer is {transformer_class!r} (pipeline {self.pipeline_class_name}); "
                f"this script supports {supported}."
            )
        self.transformer_class_name = transformer_class
        self.family = FAMILIES[transformer_class]
        self.pipeline_class = getattr(diffusers, self.pipeline_class_name, None)
        if self.pipeline_class is None or not issubclass(self.pipeline_class, DiffusionPipeline):
            raise ValueError(f"{path}: unknown pipeline class {self.pipeline_class_name!r} in model_index.json.")
        self.transformer_class = getattr(diffusers, transformer_class)
        # Every component from transformers (text encoders, tokenizers): loaded to encode captions, then freed.
        self.text_components = [
            name
            for name, value in model_index.items()
            if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == "transformers"
        ]

    @property
    def flow_matching(self) -> bool:
        return self.family in ("sd3", "flux")

    def default_max_sequence_length(self) -> int:
        return DEFAULT_MAX_SEQUENCE_LENGTH.get(self.pipeline_class_name) or DEFAULT_MAX_SEQUENCE_LENGTH.get(
            self.family, 300
        )


def check_routes(spec: ModelSpec, routes) -> None:
    """Fail early on routes that do not fit the transformer's blocks (the router checks them again when attached).
    Flux counts its double-stream blocks first, then its single-stream blocks."""
    if not routes:
        return
    config = spec.transformer_class.load_config(spec.path, subfolder="transformer")
    num_blocks = config["num_layers"] + (config.get("num_single_layers", 0) if spec.family == "flux" else 0)
    if routes == "paper" and num_blocks < 6:
        raise ValueError(
            f"--routes paper (blocks 2..{num_blocks - 4}, i.e. 2..depth-4, at ratio 0.5) does not fit a transformer "
            f"with {num_blocks} blocks; give the routes explicitly, e.g. --routes 1:{num_blocks - 2}:0.5, or none."
        )
    validate_routes(paper_routes(num_blocks) if routes == "paper" else routes, num_blocks)


def resolve_model(args) -> ModelSpec:
    """A local pipeline folder, or a Hub id downloaded once (every later load reads the local snapshot)."""
    path = args.pretrained_model_name_or_path
    if not Path(path).is_dir():
        path = DiffusionPipeline.download(
            path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, token=args.hub_token
        )
    index_file = Path(path, "model_index.json")
    if not index_file.is_file():
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is not a Diffusers pipeline (no model_index.json); pass a "
            "pipeline folder or Hub id, e.g. PixArt-alpha/PixArt-Sigma-XL-2-512-MS or "
            "stabilityai/stable-diffusion-3-medium-diffusers."
        )
    return ModelSpec(str(path), json.loads(index_file.read_text()))


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # allow_abbrev=False: an abbreviation such as --hub_tok would escape the token's redaction (issue #14).
    parser = argparse.ArgumentParser(
        description="LoRA text-to-image fine-tuning with TREAD token routing.", allow_abbrev=False
    )
    # Model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="a Diffusers pipeline folder or Hub id (PixArt-Alpha/Sigma, Stable Diffusion 3, Flux)",
    )
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None, help='e.g. "fp16"')
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument(
        "--routes",
        type=parse_routes,
        default="paper",
        help='TREAD routes over the transformer blocks: "paper" (default), "none" (dense training), JSON, or '
        "start:end:ratio[,start:end:ratio] (end inclusive)",
    )
    parser.add_argument(
        "--route_reinsertion",
        choices=ROUTE_REINSERTION_MODES,
        default="pre_route",
        help="what a bypassed token carries past its route: its pre-route state (ICCV) or that plus the input tokens (v1)",
    )
    # LoRA
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated module names; default: the attention projections (SD3/Flux: with the add_*_proj)",
    )
    # Data
    parser.add_argument("--dataset_name", default=None, help="a Hub data set, or a local `datasets` folder")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument(
        "--train_data_dir", default=None, help="an imagefolder: images plus a metadata.jsonl with the captions"
    )
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--bad_images", choices=BAD_IMAGE_POLICIES, default="stop", help=BAD_IMAGES_HELP)
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens (default: the pipeline's own: PixArt-Alpha 120, PixArt-Sigma 300, SD3 77, Flux 512)",
    )
    parser.add_argument("--text_encoding_batch_size", type=int, default=8)
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode every image with the VAE once, before training (crops and flips are then drawn once)",
    )
    parser.add_argument(
        "--precomputed_embeddings_dir",
        default=None,
        help="where the caption embeddings are kept: read if it holds them for this model and data, else written",
    )
    parser.add_argument(
        "--precompute_only",
        action="store_true",
        help="write the embeddings to --precomputed_embeddings_dir and exit (e.g. on a machine with more memory)",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    # Objective
    parser.add_argument(
        "--weighting_scheme",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        default="none",
        help="SD3/Flux: timestep density and loss weighting (SD3 paper)",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument("--mode_scale", type=float, default=1.29)
    parser.add_argument(
        "--precondition_outputs",
        type=int,
        default=1,
        help="SD3/Flux: 1 compares x0 = x_t - sigma * v with the clean latents (as Diffusers' SD3 examples); "
        "0 compares the velocity with noise - latents",
    )
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="Flux's guidance embedding while training")
    # Optimisation
    parser.add_argument("--output_dir", default="tread-t2i-lora")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="delete the checkpoints and outputs of an earlier run in --output_dir (otherwise such a folder is refused)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=4, help="per device")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true", help="multiply the LR by batch x accumulation x processes")
    parser.add_argument(
        "--lr_scheduler",
        default="constant",
        help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-4)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--allow_tf32", action="store_true")
    # Checkpoints, validation, logging, Hub
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    parser.add_argument("--validation_prompt", default=None)
    parser.add_argument("--num_validation_images", type=int, default=4)
    parser.add_argument("--validation_steps", type=int, default=None, help="validate every this many steps")
    parser.add_argument("--validation_epochs", type=int, default=None, help="validate every this many epochs")
    parser.add_argument("--validation_num_inference_steps", type=int, default=25)
    parser.add_argument("--validation_guidance_scale", type=float, default=None, help="default: the pipeline's")
    parser.add_argument("--report_to", default="tensorboard", help='tensorboard, wandb, all or "none"')
    parser.add_argument("--logging_dir", default="logs")
    parser.add_argument("--tracker_project_name", default="train_tread_t2i_lora")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--push_checkpoints", action="store_true", help="also upload checkpoints, in the background")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--hub_token", default=None, help="default (safer): HF_TOKEN or the `hf auth login` token")
    parser.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)

    for name in ("checkpointing_steps", "validation_steps", "validation_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (it is a step interval)")
    if (args.dataset_name is None) == (args.train_data_dir is None):
        parser.error("give exactly one of --dataset_name and --train_data_dir")
    if args.precompute_only and not args.precomputed_embeddings_dir:
        parser.error("--precompute_only writes to --precomputed_embeddings_dir: give it")
    if args.rank < 1:
        parser.error("--rank must be at least 1")
    check_run_arguments(parser, args)  # the output folder, the checkpoint limit, the Hub token
    if args.resolution % 16:
        parser.error("--resolution must be a multiple of 16 (VAE downsampling x patch size)")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Text embeddings, computed once (the data and the embeddings cache are in diffusers_tread.data.captions)
# ----------------------------------------------------------------------------------------------------------------------


def encode_prompts(spec: ModelSpec, pipeline, prompts: list[str], max_sequence_length: int, device, negative=False):
    """Each pipeline's own `encode_prompt`, so training sees exactly the embeddings inference makes.

    Returns the keyword arguments the pipeline's `__call__` takes (with `negative=True`: also the negative ones, for
    classifier-free guidance at validation); the training loop uses the positive ones.
    """
    with torch.no_grad():
        if spec.family == "pixart":
            embeds, mask, negative_embeds, negative_mask = pipeline.encode_prompt(
                prompts,
                do_classifier_free_guidance=negative,
                device=device,
                clean_caption=False,
                max_sequence_length=max_sequence_length,
            )
            out = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
            if negative:
                out |= {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask}
        elif spec.family == "sd3":
            embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
                prompts,
                None,
                None,
                device=device,
                do_classifier_free_guidance=negative,
                max_sequence_length=max_sequence_length,
            )
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            if negative:
                out |= {"negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled}
        else:  # flux: guidance-distilled, no negative prompt; text_ids are the same (zeros) for every prompt
            embeds, pooled, _ = pipeline.encode_prompt(
                prompts, None, device=device, max_sequence_length=max_sequence_length
            )
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    return {key: value.detach() for key, value in out.items()}


def compute_embeddings(spec: ModelSpec, args, unique_captions: list[str], accelerator, weight_dtype):
    """Encode every distinct caption (and the validation prompt) once; the text encoders are freed afterwards."""
    logger.info(f"Encoding {len(unique_captions)} distinct captions with {', '.join(spec.text_components)}")
    pipeline = spec.pipeline_class.from_pretrained(
        spec.path, transformer=None, vae=None, variant=args.variant, dtype=weight_dtype
    )
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(unique_captions), args.text_encoding_batch_size):
        batch = unique_captions[start : start + args.text_encoding_batch_size]
        for key, value in encode_prompts(spec, pipeline, batch, args.max_sequence_length, accelerator.device).items():
            chunks.setdefault(key, []).append(value.cpu())
    table = {key: torch.cat(values).contiguous() for key, values in chunks.items()}
    validation = None
    if args.validation_prompt:
        validation = encode_prompts(
            spec, pipeline, [args.validation_prompt], args.max_sequence_length, accelerator.device, negative=True
        )
        validation = {key: value.cpu() for key, value in validation.items()}
    del pipeline
    free_memory()
    return table, validation


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: add, save in Diffusers' format, load back
# ----------------------------------------------------------------------------------------------------------------------


def add_lora(transformer, config: LoraConfig) -> None:
    """`add_adapter` where the transformer has Diffusers' PEFT mixin (SD3, Flux); PixArt's transformer has none in
    Diffusers 0.42, so it gets the same PEFT injection `add_adapter` performs."""
    if isinstance(transformer, PeftAdapterMixin):
        transformer.add_adapter(config)
    else:
        inject_adapter_in_model(config, transformer, "default")


def save_lora(spec: ModelSpec, folder: str, transformer) -> Path:
    """`pytorch_lora_weights.safetensors` in Diffusers' format: PEFT keys prefixed `transformer.`, the LoRA config in
    the file's metadata. SD3/Flux: the pipeline's own `save_lora_weights`; PixArt (no LoRA loader mixin): the same
    file through `LoraBaseMixin.write_lora_layers`."""
    state_dict = {key: value.detach().float().cpu() for key, value in get_peft_model_state_dict(transformer).items()}
    metadata = transformer.peft_config["default"].to_dict()
    if hasattr(spec.pipeline_class, "save_lora_weights"):
        spec.pipeline_class.save_lora_weights(
            folder, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=metadata
        )
    else:
        LoraBaseMixin.write_lora_layers(
            state_dict={f"transformer.{key}": value for key, value in state_dict.items()},
            save_directory=folder,
            is_main_process=True,
            weight_name=LORA_WEIGHT_NAME_SAFE,
            save_function=None,
            safe_serialization=True,
            lora_adapter_metadata={f"transformer.{key}": value for key, value in metadata.items()},
        )
    return Path(folder, LORA_WEIGHT_NAME_SAFE)


def read_transformer_lora(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The transformer's LoRA tensors (keys without the `transformer.` prefix) and config from a saved file."""
    path = Path(folder, LORA_WEIGHT_NAME_SAFE)
    with safe_open(str(path), framework="pt") as f:
        packed = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state_dict = {key.removeprefix("transformer."): f.get_tensor(key) for key in f.keys()}
    config = {key.removeprefix("transformer."): value for key, value in packed.items()}
    return state_dict, config


def load_lora_into_transformer(transformer, folder: str, adapter_name: str = "default") -> None:
    """Load a saved LoRA into a transformer without Diffusers' PEFT mixin (PixArt): PEFT injection, then weights."""
    state_dict, config = read_transformer_lora(folder)
    if "r" not in config:  # a file without Diffusers' metadata: the rank and targets from the tensors themselves
        down = [key for key in state_dict if key.endswith("lora_A.weight")]
        config = {
            "r": state_dict[down[0]].shape[0],
            "target_modules": sorted({key.split(".lora_A")[0] for key in down}),
        }
    config = LoraConfig(**{key: value for key, value in config.items() if key in LORA_CONFIG_FIELDS})
    inject_adapter_in_model(config, transformer, adapter_name)
    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: LoRA weights that match no module: {result.unexpected_keys[:5]}")


def load_lora(pipeline, folder: str) -> None:
    """Load this script's output into a pipeline: `load_lora_weights` (SD3, Flux) or PEFT injection (PixArt)."""
    if hasattr(pipeline, "load_lora_weights"):
        pipeline.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME_SAFE)
    else:
        load_lora_into_transformer(pipeline.transformer, folder)


# ----------------------------------------------------------------------------------------------------------------------
# One training step's model call and loss
# ----------------------------------------------------------------------------------------------------------------------


def vae_latents(vae_config, sample: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (sample - shift) * vae_config.scaling_factor


def model_prediction(spec: ModelSpec, transformer, noisy, timesteps, embeds, args, weight_dtype, vae_scale_factor):
    """The transformer's output for `noisy` latents `(B, C, H, W)`, as `(B, C, H, W)` (PixArt: the epsilon/v half of
    a learned-sigma output)."""
    noisy = noisy.to(weight_dtype)
    embeds = {
        key: value.to(noisy.device, weight_dtype if value.is_floating_point() else value.dtype)
        for key, value in embeds.items()
    }
    if spec.family == "pixart":
        config = unwrap(transformer).config
        batch, channels, height, width = noisy.shape
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(unwrap(transformer), "use_additional_conditions", False):  # PixArt-Alpha 1024: size conditioning
            pixels = [height * vae_scale_factor, width * vae_scale_factor]
            added["resolution"] = torch.tensor([pixels] * batch, dtype=weight_dtype, device=noisy.device)
            added["aspect_ratio"] = torch.tensor([[height / width]] * batch, dtype=weight_dtype, device=noisy.device)
        output = transformer(
            noisy,
            encoder_hidden_states=embeds["prompt_embeds"],
            encoder_attention_mask=embeds["prompt_attention_mask"],
            timestep=timesteps,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if config.out_channels == 2 * channels:  # learned sigma: [eps | variance]; Diffusers trains the first half
            output = output.chunk(2, dim=1)[0]
        return output
    if spec.family == "sd3":
        return transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
    # flux: 2x2 patches packed into tokens, RoPE ids for image and text tokens, guidance as an input
    batch, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, weight_dtype)
    text_ids = torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=noisy.device, dtype=weight_dtype)
    guidance = None
    if unwrap(transformer).config.guidance_embeds:
        guidance = torch.full((batch,), args.guidance_scale, device=noisy.device, dtype=torch.float32)
    output = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=embeds["pooled_prompt_embeds"],
        encoder_hidden_states=embeds["prompt_embeds"],
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(output, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor)


def unwrap(model):
    """The model inside DDP/compile wrappers (without needing the Accelerator)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def training_loss(spec, transformer, noise_scheduler, x0, embeds, args, generator, weight_dtype, vae_scale_factor):
    """Noise the clean latents `x0`, run the (routed) transformer, and return the loss.

    The loss is the plain diffusion loss on **all** image tokens, the TREAD paper's loss in its ICCV version (Sec. 3,
    "no additional losses"): routing only changes which blocks a token passes through; every token, bypassed or not,
    leaves the final layer with a prediction, so every token has a target and the loss is the one dense fine-tuning
    uses. (v1's adapted loss, kept-token denoising plus an MAE term on the bypassed tokens, is `--tread_loss adapted`
    of the class-conditional script.) PixArt: MSE to epsilon (or v, per its scheduler); SD3/Flux: rectified flow with
    Diffusers' SD3 timestep densities and loss weightings.
    """
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    if spec.flow_matching:
        u = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme,
            batch_size=batch,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
            device=generator.device,
            generator=generator,
        )
        indices = (u * noise_scheduler.config.num_train_timesteps).long().clamp(max=len(noise_scheduler.timesteps) - 1)
        timesteps = noise_scheduler.timesteps[indices.cpu()].to(x0.device)
        sigmas = noise_scheduler.sigmas[indices.cpu()].to(x0.device, torch.float32).view(batch, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        prediction = model_prediction(
            spec, transformer, noisy, timesteps, embeds, args, weight_dtype, vae_scale_factor
        ).float()
        if args.precondition_outputs:
            prediction = prediction * (-sigmas) + noisy
            target = x0
        else:
            target = noise - x0
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas).float()
        per_sample = (weighting * (prediction - target) ** 2).reshape(batch, -1).mean(dim=1)
        return per_sample.mean()
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator, device=generator.device
    ).to(x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    else:
        target = noise
    prediction = model_prediction(spec, transformer, noisy, timesteps, embeds, args, weight_dtype, vae_scale_factor)
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def describe_routing(router) -> list[dict]:
    """Per route of the last forward: how many image tokens of each sample bypassed it (from the router's masks)."""
    masks = getattr(router, "route_masks", None) if router is not None else None
    if not masks:
        return []
    routes = list(getattr(router, "routes", None) or [{}] * len(masks))
    return [
        {
            "route": index,
            "blocks": f"{route.get('start_layer_idx', '?')}..{route.get('end_layer_idx', '?')}",
            "bypassed": int(mask[0].sum()),
            "tokens": int(mask.shape[1]),
            "fraction": float(mask.float().mean()),
        }
        for index, (route, mask) in enumerate(zip(routes, masks, strict=True))
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Validation, model card, push
# ----------------------------------------------------------------------------------------------------------------------


def validation_pipeline(spec: ModelSpec, args, transformer, vae, weight_dtype):
    """The base pipeline around the training transformer, without text encoders (prompts come precomputed)."""
    no_text = {name: None for name in spec.text_components}
    pipeline = spec.pipeline_class.from_pretrained(
        spec.path, transformer=transformer, vae=vae, variant=args.variant, dtype=weight_dtype, **no_text
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(spec: ModelSpec, pipeline, args, prompt_kwargs: dict, device, weight_dtype) -> list[Image.Image]:
    """--num_validation_images images of the validation prompt, one per call with seeds seed, seed + 1, ... (a batch
    of precomputed prompt embeddings is not expanded the same way by every pipeline), with all tokens (eval mode)."""
    kwargs = {key: value.to(device) for key, value in prompt_kwargs.items()}
    kwargs |= dict(
        height=args.resolution, width=args.resolution, num_inference_steps=args.validation_num_inference_steps
    )
    if args.validation_guidance_scale is not None:
        kwargs["guidance_scale"] = args.validation_guidance_scale
    if spec.family == "pixart":  # no aspect-ratio bins; the negative prompt comes as embeddings ("" by default)
        kwargs |= {"use_resolution_binning": False, "negative_prompt": None}
    if spec.family in ("pixart", "sd3"):
        kwargs["max_sequence_length"] = args.max_sequence_length
    autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    images = []
    with autocast:
        for index in range(args.num_validation_images):
            generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
            images += pipeline(**kwargs, generator=generator).images
    return images


def log_validation(accelerator, spec, args, transformer, vae, prompt_kwargs, weight_dtype, step, name) -> list:
    transformer.eval()  # every token through every block: routing is training-only
    pipeline = validation_pipeline(spec, args, transformer, vae, weight_dtype)
    images = generate(spec, pipeline, args, prompt_kwargs, accelerator.device, weight_dtype)
    folder = Path(args.output_dir, "validation")
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"{name}_{index}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=args.validation_prompt) for image in images]})
    logger.info(f"Validation images at step {step}: {folder}/{name}_*.png")
    del pipeline
    free_memory()
    transformer.train()
    return images


def save_model_card(
    folder, args, argv, spec, repo_id, images, routes, steps, total_batch_size, seconds, final_loss, num_examples
) -> None:
    """``folder``/README.md: Diffusers' LoRA card metadata (base model, widget, tags via `populate_model_card`) and how
    to load it."""
    base_model = args.pretrained_model_name_or_path
    hub_base = base_model if not Path(base_model).exists() else None
    widget = []
    for index, image in enumerate(images or []):
        image.save(Path(folder, f"image_{index}.png"))
        widget.append({"text": args.validation_prompt, "output": {"url": f"image_{index}.png"}})
    if spec.family == "pixart":
        how_to_load = f"""```python
from diffusers import {spec.pipeline_class_name}
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

# Diffusers has no LoRA loader for PixArt: inject the adapter with PEFT and load the weights.
pipe = {spec.pipeline_class_name}.from_pretrained("{base_model}")
weights = load_file("pytorch_lora_weights.safetensors")  # from this repository
weights = {{k.removeprefix("transformer."): v for k, v in weights.items()}}
config = LoraConfig(r={args.rank}, lora_alpha={args.lora_alpha}, target_modules={args.lora_target_modules})
inject_adapter_in_model(config, pipe.transformer)
set_peft_model_state_dict(pipe.transformer, weights)
image = pipe("{args.validation_prompt or "a photo"}").images[0]
```"""
    else:
        how_to_load = f"""```python
from diffusers import {spec.pipeline_class_name}

pipe = {spec.pipeline_class_name}.from_pretrained("{base_model}")
pipe.load_lora_weights("{repo_id or args.output_dir}")
image = pipe("{args.validation_prompt or "a photo"}").images[0]
```"""
    hardware = (
        f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    description = f"""# TREAD LoRA for {base_model}

LoRA adapters (rank {args.rank}, alpha {args.lora_alpha}, on `{", ".join(args.lora_target_modules)}`) for the
`{spec.transformer_class_name}` of `{base_model}`, trained with [TREAD token routing](https://arxiv.org/abs/2501.04765)
by `training/train_tread_t2i_lora.py` of diffusers-tread. Routing only changes training (a random subset of image tokens
skips the routed blocks); the adapters are ordinary Diffusers LoRA weights, and inference uses every token.

## How to use

{how_to_load}

## Training

| | |
|---|---|
| routes | `{json.dumps(routes)}` |
| loss | {"flow matching, weighting " + args.weighting_scheme if spec.flow_matching else "epsilon/v MSE (DDPM)"}, on all tokens |
| data | {num_examples} image-caption pairs from `{args.dataset_name or Path(args.train_data_dir).name}`, {args.resolution} px |
| steps | {steps} at batch {total_batch_size} ({args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation) |
| learning rate | {args.learning_rate} ({args.lr_scheduler}) |
| mixed precision | {args.mixed_precision or "no"} |
| hardware, time | {hardware}, {seconds / 60:.1f} min |
| final loss | {final_loss:.4f} |

Command: `{hub.launch_command("training/train_tread_t2i_lora.py", argv, [args.hub_token])}`
"""
    # Diffusers' LoRA card metadata (as `load_or_create_model_card(..., from_training=True)` writes it), with our text
    # only: its template would add "TODO" sections, and its Hub lookup would keep an older card found there.
    card_data = ModelCardData(
        license=None,
        library_name="diffusers",
        inference=True,
        base_model=hub_base,
        instance_prompt=args.validation_prompt,
        widget=widget,
    )
    card = ModelCard.from_template(
        card_data, template_str="---\n{{ card_data }}\n---\n\n{{ model_description }}", model_description=description
    )
    tags = ["text-to-image", "diffusers-training", "diffusers", "lora", "tread", spec.family, "template:sd-lora"]
    card = populate_model_card(card, tags=tags)
    card.save(os.path.join(folder, "README.md"))


def push_output(args, repo_id: str) -> None:
    try:
        hub.upload_output(args.output_dir, repo_id, "End of training", token=args.hub_token)
    except Exception as error:
        raise RuntimeError(
            f"Uploading {args.output_dir} to {repo_id} failed: {error}. The folder is complete and unchanged; retry "
            f"with `huggingface-cli upload {repo_id} {args.output_dir}`."
        ) from error


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.time()

    # 1. Accelerator, logging, seed, the model (its family decides the rest), Hub repo.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # same data order on resume
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_warning()
    else:
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    spec = resolve_model(args)
    if args.max_sequence_length is None:
        args.max_sequence_length = spec.default_max_sequence_length()
    if args.lora_target_modules is None:
        args.lora_target_modules = DEFAULT_TARGET_MODULES[spec.family]
    else:
        args.lora_target_modules = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    args.lora_alpha = args.lora_alpha or args.rank
    logger.info(f"Model: {spec.pipeline_class_name} ({spec.family}, {spec.transformer_class_name}) from {spec.path}")
    check_routes(spec, args.routes)  # before the (slow) text encoding

    repo_id = None
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            clear_output_dir(args.output_dir, args.logging_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub and not args.precompute_only:
            repo_id = create_repo(
                args.hub_model_id or Path(args.output_dir).name,
                exist_ok=True,
                private=args.hub_private_repo,
                token=args.hub_token,
            ).repo_id

    # 2. Data, and every caption's text embedding, computed once (or read from --precomputed_embeddings_dir).
    data, captions, source = load_captioned_images(
        args.dataset_name,
        args.train_data_dir,
        args.image_column,
        args.caption_column,
        config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        max_samples=args.max_train_samples,
        seed=args.seed,
    )
    unique_captions, caption_indices = caption_table(captions)
    fingerprint = embeddings_fingerprint(
        model=args.pretrained_model_name_or_path,
        revision=args.revision,
        pipeline=spec.pipeline_class_name,
        model_path=spec.path,
        text_components=spec.text_components,
        max_sequence_length=args.max_sequence_length,
        captions=unique_captions,
    )
    # The main process first: with --precomputed_embeddings_dir the other processes then read what it wrote.
    with accelerator.main_process_first():
        table, validation_prompt_kwargs = None, None
        if args.precomputed_embeddings_dir:
            loaded = load_precomputed_embeddings(args.precomputed_embeddings_dir, fingerprint, args.validation_prompt)
            if loaded is not None:
                table, validation_prompt_kwargs = loaded
                logger.info(
                    f"Loaded the embeddings of {len(unique_captions)} captions from {args.precomputed_embeddings_dir}"
                )
        need_captions = table is None
        if need_captions or (args.validation_prompt and validation_prompt_kwargs is None):
            computed, validation_prompt_kwargs = compute_embeddings(
                spec, args, unique_captions if need_captions else [], accelerator, weight_dtype
            )
            if need_captions:
                table = computed
                if args.precomputed_embeddings_dir and accelerator.is_main_process:
                    save_precomputed_embeddings(
                        args.precomputed_embeddings_dir,
                        table,
                        fingerprint,
                        validation_prompt_kwargs,
                        args.validation_prompt,
                    )
                    logger.info(f"Wrote the embeddings to {args.precomputed_embeddings_dir}")
    accelerator.wait_for_everyone()
    if args.precompute_only:
        logger.info("--precompute_only: done.")
        accelerator.end_training()
        return
    vae = AutoencoderKL.from_pretrained(
        spec.path, subfolder="vae", revision=args.revision, variant=args.variant
    ).requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32)  # fp32: the SD3/SDXL VAEs overflow in fp16
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    dataset = CaptionedImageDataset(
        data,
        args.image_column,
        caption_indices,
        args.resolution,
        args.center_crop,
        args.random_flip,
        args.seed,
        bad_images=args.bad_images,
    )
    if args.cache_latents:
        parameters, kept_captions = [], []
        for start in tqdm(range(0, len(dataset), args.train_batch_size), desc="Caching latents",
                          disable=not accelerator.is_local_main_process):  # fmt: skip
            items = [dataset[i] for i in range(start, min(start + args.train_batch_size, len(dataset)))]
            items = [item for item in items if item is not None]  # unreadable images, with --bad_images skip
            if not items:
                continue
            kept_captions += [item["caption_index"] for item in items]
            pixel_values = torch.stack([item["pixel_values"] for item in items]).to(accelerator.device)
            with torch.no_grad():
                parameters.append(vae.encode(pixel_values).latent_dist.parameters.cpu())
        if len(kept_captions) < len(dataset):
            logger.warning(f"Skipped {len(dataset) - len(kept_captions)} unreadable images of the {source}.")
        if not kept_captions:
            raise ValueError(f"All {len(dataset)} images of the {source} were unreadable; check the dataset.")
        dataset = CachedLatentDataset(torch.cat(parameters), kept_captions)
        if not args.validation_prompt:
            vae = vae.to("cpu")  # only its config is needed from here on
            free_memory()

    # 3. Transformer, LoRA, TREAD routing.
    transformer = spec.transformer_class.from_pretrained(
        spec.path, subfolder="transformer", revision=args.revision, variant=args.variant
    )
    transformer.requires_grad_(False)
    transformer.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    add_lora(
        transformer,
        LoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=args.lora_target_modules,
        ),
    )
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]

    # One generator per process draws all training randomness (noise, timesteps, VAE samples, routed subsets), so a
    # checkpoint can carry it and a resumed run draws exactly what the uninterrupted run would have.
    train_generator = torch.Generator(device=accelerator.device).manual_seed(
        process_seed(args.seed, accelerator.process_index)  # no two (seed, process) pairs share a stream
    )
    router, routes = None, args.routes
    if routes:
        router = apply_tread(  # validates the routes
            transformer, routes=routes, generator=train_generator, route_reinsertion=args.route_reinsertion
        )
        routes = getattr(router, "routes", routes)
    latent_size = args.resolution // vae_scale_factor
    patch_size = 2 if spec.family == "flux" else transformer.config.patch_size
    num_tokens = (latent_size // patch_size) ** 2
    transformer.train()

    def save_weights(models, folder):  # only the adapters, never the frozen base weights
        for model in models:
            save_lora(spec, folder, model)

    def load_weights(models, folder):
        state_dict, _ = read_transformer_lora(folder)
        for model in models:
            result = set_peft_model_state_dict(model, state_dict, adapter_name="default")  # in place
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{folder}: LoRA weights that match no module: {result.unexpected_keys[:5]}")
            if accelerator.mixed_precision in ("fp16", "bf16"):
                cast_training_params(model, dtype=torch.float32)

    # Checkpoints carry the adapters and every process's generator (the library's hooks).
    register_checkpoint_hooks(accelerator, train_generator, args.seed, save_weights, load_weights)

    # 4. Optimizer, data loader, LR schedule.
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        lora_parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        collate_fn=collate_examples,  # drops (and counts) the unreadable images of --bad_images skip
    )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"The data set has {len(dataset)} examples, fewer than one batch of {args.train_batch_size}: lower "
            "--train_batch_size or add data."
        )
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, train_dataloader, lr_scheduler
    )
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if spec.flow_matching:
        # its training-time timesteps and sigmas (`set_timesteps` is never called on this instance)
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(spec.path, subfolder="scheduler")
    else:
        noise_scheduler = DDPMScheduler.from_pretrained(spec.path, subfolder="scheduler")
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if k != "hub_token"}
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}
        accelerator.init_trackers(args.tracker_project_name, config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Examples = {len(dataset)} ({len(unique_captions)} distinct captions), epochs = {num_train_epochs}")
    logger.info(f"  Batch per device = {args.train_batch_size}, total = {total_batch_size}")
    logger.info(f"  Optimization steps = {args.max_train_steps}, LoRA parameters = "
                f"{sum(p.numel() for p in lora_parameters) / 1e6:.3f}M")  # fmt: skip
    logger.info(f"  Image tokens per sample = {num_tokens}, routes = {json.dumps(routes) if routes else 'none'}")

    # 5. Resume (the main process picks the checkpoint; a finished run only says so).
    resume = resume_from_checkpoint(
        accelerator, args.output_dir, args.resume_from_checkpoint, num_update_steps_per_epoch,
        args.gradient_accumulation_steps,
    )  # fmt: skip
    global_step, first_epoch, resume_step = resume.global_step, resume.first_epoch, resume.skip_batches
    finished = finished_step(args.output_dir)
    if resume.checkpoint and finished is not None and finished >= args.max_train_steps:
        logger.info(
            f"{args.output_dir} holds a run that finished at step {finished} (--max_train_steps "
            f"{args.max_train_steps}): nothing to do. Raise --max_train_steps to train further."
        )
        accelerator.end_training()
        return
    uploads = hub.CheckpointUploads(repo_id, args.hub_token) if args.push_to_hub and args.push_checkpoints else None

    def save_state(step: int) -> None:
        """Crash-safe `checkpoint-<step>/`, pruned to --checkpoints_total_limit, pushed with --push_checkpoints."""
        save_checkpoint(
            accelerator,
            args.output_dir,
            step,
            args.checkpoints_total_limit,
            before_prune=uploads.wait if uploads else None,  # never delete a checkpoint that is being uploaded
            after_save=uploads.submit if uploads else None,
        )

    # 6. Training loop.
    stop = install_stop_handlers()
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    loss_log = Path(args.output_dir, LOSS_HISTORY)
    if resume.checkpoint and accelerator.is_main_process:
        resume_loss_history(loss_log, global_step)  # drop the rows written after the checkpoint
    step_started, last_loss, train_loss, routing_reported = time.time(), float("nan"), 0.0, False
    skipped_images = 0  # unreadable images dropped by --bad_images skip
    for epoch in range(first_epoch, num_train_epochs if global_step < args.max_train_steps else first_epoch):
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and resume_step:
            loader = accelerator.skip_first_batches(train_dataloader, resume_step)
        for batch in loader:
            skipped_images += int(batch["num_skipped"])
            with accelerator.accumulate(transformer):
                with torch.no_grad():
                    if "latent_parameters" in batch:
                        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(accelerator.device))
                    else:
                        posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
                    x0 = vae_latents(vae.config, posterior.sample(generator=train_generator)).float()
                indices = batch["caption_index"].cpu()
                embeds = {key: value[indices] for key, value in table.items()}
                loss = training_loss(
                    spec,
                    transformer,
                    noise_scheduler,
                    x0,
                    embeds,
                    args,
                    train_generator,
                    weight_dtype,
                    vae_scale_factor,
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"Loss is {loss.item()} at step {global_step}. The last checkpoint in {args.output_dir} is "
                        "untouched; resume from it with a lower --learning_rate, or bf16 instead of fp16."
                    )
                routing = describe_routing(router)
                train_loss += accelerator.gather(loss.detach()).mean().item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            last_loss, train_loss = train_loss, 0.0
            step_time = time.time() - step_started
            step_started = time.time()
            logs = {"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0], "step_time_s": step_time}
            if skipped_images:
                logs["skipped_images"] = skipped_images
            for route in routing:
                logs[f"tread/route_{route['route']}_bypassed_fraction"] = route["fraction"]
            if routing and not routing_reported:
                for route in routing:
                    logger.info(
                        f"TREAD routing: route {route['route']} (blocks {route['blocks']}): {route['bypassed']} of "
                        f"{route['tokens']} image tokens bypassed per sample"
                    )
                routing_reported = True
            progress_bar.set_postfix(loss=f"{last_loss:.4f}", lr=logs["lr"])
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                with loss_log.open("a") as f:
                    bypassed = ";".join(f"{route['fraction']:.4f}" for route in routing)
                    f.write(f"{global_step},{last_loss:.6f},{step_time:.4f},{bypassed}\n")

            checkpoint_due = global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps
            if checkpoint_due:
                save_state(global_step)
            if stop_requested(accelerator, stop):
                if not checkpoint_due:
                    save_state(global_step)
                logger.info(
                    f"Stopped by signal {stop['signal']} at step {global_step} after saving a checkpoint; continue "
                    "with --resume_from_checkpoint latest."
                )
                restore_stop_handlers(stop)
                accelerator.end_training()
                return
            if (
                accelerator.is_main_process
                and args.validation_prompt
                and args.validation_steps
                and global_step % args.validation_steps == 0
                and global_step < args.max_train_steps
            ):
                log_validation(accelerator, spec, args, unwrap(transformer), vae, validation_prompt_kwargs,
                               weight_dtype, global_step, f"step_{global_step:07d}")  # fmt: skip
            if global_step >= args.max_train_steps:
                break
        epoch_done = epoch + 1
        if (
            accelerator.is_main_process
            and args.validation_prompt
            and args.validation_epochs
            and epoch_done % args.validation_epochs == 0
            and global_step < args.max_train_steps
        ):
            log_validation(accelerator, spec, args, unwrap(transformer), vae, validation_prompt_kwargs,
                           weight_dtype, global_step, f"step_{global_step:07d}")  # fmt: skip

    # 7. Save the LoRA weights, check that they load into a fresh base pipeline, sample, write the card, push. The
    # files are staged and moved into --output_dir at the end (`final_output`): a kill never leaves half of them.
    restore_stop_handlers(stop)
    if skipped_images:
        logger.warning(f"Skipped {skipped_images} unreadable images of the {source} (--bad_images skip).")
    if uploads is not None:  # the checkpoints' uploads finish (or are reported) before the final one
        uploads.wait()
        logger.info(uploads.report())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with final_output(args.output_dir, global_step) as staging:
            final = unwrap(transformer)
            if router is not None:
                router.remove()
            lora_file = save_lora(spec, staging, final)
            logger.info(f"Saved the LoRA weights to {Path(args.output_dir, lora_file.name)}")
            images = None
            if args.validation_prompt:
                del final
                transformer, optimizer = accelerator.free_memory(transformer, optimizer)
                free_memory()
                base = spec.transformer_class.from_pretrained(
                    spec.path, subfolder="transformer", revision=args.revision, variant=args.variant,
                    dtype=weight_dtype,
                ).to(accelerator.device)  # fmt: skip
                pipeline = validation_pipeline(spec, args, base, vae, weight_dtype)
                load_lora(pipeline, staging)  # the saved file, exactly as users will load it
                pipeline.transformer.eval()
                images = generate(spec, pipeline, args, validation_prompt_kwargs, accelerator.device, weight_dtype)
                folder = Path(staging, "validation")
                folder.mkdir(parents=True, exist_ok=True)
                for index, image in enumerate(images):
                    image.save(folder / f"final_{index}.png")
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        tracker.writer.add_images(
                            "test", np.stack([np.asarray(image) for image in images]), global_step, dataformats="NHWC"
                        )
                del pipeline
            save_model_card(
                staging,
                args,
                argv,
                spec,
                repo_id,
                images,
                routes,
                global_step,
                total_batch_size,
                time.time() - started,
                last_loss,
                len(dataset),
            )
        if args.push_to_hub:
            push_output(args, repo_id)
    accelerator.end_training()


if __name__ == "__main__":
    main_with_messages(main)  # a message and exit status 1 for the failures main explains, not a traceback
