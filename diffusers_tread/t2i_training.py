"""Text-to-image and text-to-video LoRA fine-tuning with TREAD routing (arXiv 2501.04765) for Diffusers' PixArt, SD3,
Flux, Wan 2.1/2.2 (text-to-video) and LTX-Video pipelines.

What `training/train_tread_t2i_lora.py` runs, as a library (the script adds arguments, data, the accelerator and the
loop; `bench/t2i_lora_step.py` times the same step):

* the supported model families and what tells them apart (`FAMILIES`, `ModelSpec`, read from ``model_index.json``);
* each pipeline's own prompt encoding (`encode_prompts`) and latent normalisation (`normalize_latents`);
* each flow-matching family's training timestep shift (`training_flow_shift`, `training_noise_scheduler`);
* one training step's model call and loss (`model_prediction`, `training_loss`): the plain diffusion loss on all image
  (or video) tokens, routed or not; its noise and timesteps drawn ahead (`draw_noise`), the rest a function of those
  draws (`loss_from_draws`), as in the class-conditional step (`training_utils.draw_step_randomness`);
* LoRA adapters on the transformer, saved and loaded in Diffusers' format (`add_lora`, `save_lora`, `load_lora`).

Routing itself is `diffusers_tread.models.tread_t2i.apply_tread`. The options of `model_prediction` and
`training_loss` are read from any object with the script's argument names (an ``argparse.Namespace``):
``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale``, ``precondition_outputs`` (flow matching),
``guidance_scale`` (Flux) and ``fps`` (LTX's RoPE scale).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, LTXPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE, LoraBaseMixin
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open

from .compat import diffusers_class
from .routing import paper_routes, validate_routes

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
    # Video: rectified flow on (B, C, F, H, W) latents. Wan 2.1/2.2 text-to-video: UMT5, a per-channel normalised
    # causal 3D VAE (4x temporal, 8x spatial), 3D RoPE; LTX-Video: T5, a 1:192 VAE (8x temporal, 32x spatial) whose
    # latents the transformer takes as a packed sequence, with RoPE scaled by the frame rate.
    "WanTransformer3DModel": "wan",
    "LTXVideoTransformer3DModel": "ltx",
    # SkyReels-V2 text-to-video: Wan's architecture, text encoder and VAE (trained here as Wan, without diffusion
    # forcing: one timestep per sample).
    "SkyReelsV2Transformer3DModel": "skyreels_v2",
}
VIDEO_FAMILIES = ("wan", "ltx", "skyreels_v2")
WAN_LIKE = ("wan", "skyreels_v2")  # the same model call, prompt encoding and latents
# The video pipelines a family trains with: text-to-video only (the image-to-video pipelines share the transformer
# class but need an image condition this script does not build).
VIDEO_PIPELINES = {"wan": ("WanPipeline",), "ltx": ("LTXPipeline",), "skyreels_v2": ("SkyReelsV2Pipeline",)}
# The frame rate a family's videos are written (and LTX's RoPE scaled) at: Wan 2.1 generates 16 fps (its model card),
# LTX-Video 24/25 fps (its pipeline's `frame_rate` default, 25), SkyReels-V2 24 fps (its model cards).
DEFAULT_FPS = {"wan": 16, "ltx": 25, "skyreels_v2": 24}
DEFAULT_TARGET_MODULES = {
    "pixart": ["to_k", "to_q", "to_v", "to_out.0"],  # self- and cross-attention (attn1, attn2)
    "sd3": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
    "flux": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
    "wan": ["to_k", "to_q", "to_v", "to_out.0"],  # self- and cross-attention (attn1, attn2) of every block
    "skyreels_v2": ["to_k", "to_q", "to_v", "to_out.0"],
    "ltx": ["to_k", "to_q", "to_v", "to_out.0"],
}
# Which of a family's prompt embeddings (`encode_prompts`' keys) its transformer takes, as which argument.
TEXT_ARGUMENTS = {
    "pixart": {"prompt_embeds": "encoder_hidden_states", "prompt_attention_mask": "encoder_attention_mask"},
    "sd3": {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"},
    "flux": {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"},
    "wan": {"prompt_embeds": "encoder_hidden_states"},
    "skyreels_v2": {"prompt_embeds": "encoder_hidden_states"},
    "ltx": {"prompt_embeds": "encoder_hidden_states", "prompt_attention_mask": "encoder_attention_mask"},
}
# The pipelines' own defaults (PixArt-Alpha was trained with 120 T5 tokens, Sigma with 300); 77 for SD3 as in
# Diffusers' SD3 LoRA examples (the CLIP length; T5 may take more).
# Wan: 512 UMT5 tokens, LTX: 128 T5 tokens (their pipelines' `__call__` defaults).
DEFAULT_MAX_SEQUENCE_LENGTH = {
    "PixArtAlphaPipeline": 120,
    "PixArtSigmaPipeline": 300,
    "sd3": 77,
    "flux": 512,
    "wan": 512,
    "skyreels_v2": 512,
    "ltx": 128,
}


class ModelSpec:
    """What training needs to know about a base pipeline, read from its `model_index.json`."""

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
                f"TREAD LoRA training supports {supported}."
            )
        self.transformer_class_name = transformer_class
        self.family = FAMILIES[transformer_class]
        self.pipeline_class = diffusers_class(self.pipeline_class_name)
        if self.pipeline_class is None or not issubclass(self.pipeline_class, DiffusionPipeline):
            raise ValueError(
                f"{path}: unknown pipeline class {self.pipeline_class_name!r} in model_index.json (not in the "
                f"installed Diffusers {diffusers.__version__}; a newer release may have it)."
            )
        self.transformer_class = diffusers_class(transformer_class)
        if self.transformer_class is None:
            raise ValueError(
                f"{path}: the installed Diffusers {diffusers.__version__} has no {transformer_class}; upgrade Diffusers."
            )
        if self.is_video and self.pipeline_class_name not in VIDEO_PIPELINES[self.family]:
            raise ValueError(
                f"{path}: {self.pipeline_class_name} is not a text-to-video pipeline this script trains; for the "
                f"{transformer_class} it supports {', '.join(VIDEO_PIPELINES[self.family])}."
            )
        if self.family == "skyreels_v2" and importlib.util.find_spec("ftfy") is None:
            raise ValueError(
                f"{path}: SkyReelsV2Pipeline's prompt encoding calls ftfy (Diffusers 0.42 imports it only when it is "
                "installed, but calls it always): pip install ftfy (it is in diffusers-tread's train extra)."
            )
        second = model_index.get("transformer_2")
        if isinstance(second, (list, tuple)) and second and second[0] is not None:
            raise ValueError(
                f"{path}: a two-expert pipeline (transformer and transformer_2, Wan 2.2 A14B) is not supported: its "
                "experts split the noise levels, and one LoRA trained on `transformer` alone would see all of them."
            )
        # Every component from transformers (text encoders, tokenizers): loaded to encode captions, then freed.
        self.text_components = [
            name
            for name, value in model_index.items()
            if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == "transformers"
        ]

    @property
    def flow_matching(self) -> bool:
        return self.family in ("sd3", "flux", *VIDEO_FAMILIES)

    @property
    def is_video(self) -> bool:
        return self.family in VIDEO_FAMILIES

    def default_max_sequence_length(self) -> int:
        return DEFAULT_MAX_SEQUENCE_LENGTH.get(self.pipeline_class_name) or DEFAULT_MAX_SEQUENCE_LENGTH.get(
            self.family, 300
        )

    def embeddings_fingerprint(
        self, model: str, revision: str | None, max_sequence_length: int | None, captions: list[str]
    ) -> dict:
        """What this pipeline's caption embeddings depend on (`data.embeddings_fingerprint`: its pipeline class and
        text components' configs, the name and revision it was given as, the sequence length and the captions)."""
        from .data import embeddings_fingerprint

        return embeddings_fingerprint(
            model=model,
            revision=revision,
            pipeline=self.pipeline_class_name,
            model_path=self.path,
            text_components=self.text_components,
            max_sequence_length=max_sequence_length,
            captions=captions,
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


def resolve_model(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> ModelSpec:
    """A local pipeline folder, or a Hub id downloaded once (every later load reads the local snapshot)."""
    path = name_or_path
    if not Path(path).is_dir():
        path = DiffusionPipeline.download(path, revision=revision, variant=variant, cache_dir=cache_dir, token=token)
    index_file = Path(path, "model_index.json")
    if not index_file.is_file():
        raise ValueError(
            f"{name_or_path} is not a Diffusers pipeline (no model_index.json); pass a "
            "pipeline folder or Hub id, e.g. PixArt-alpha/PixArt-Sigma-XL-2-512-MS or "
            "stabilityai/stable-diffusion-3-medium-diffusers."
        )
    return ModelSpec(str(path), json.loads(index_file.read_text()))


# ----------------------------------------------------------------------------------------------------------------------
# Text embeddings (the script computes them once, before training; the cache is in diffusers_tread.data.captions)
# ----------------------------------------------------------------------------------------------------------------------


def encode_prompts(spec: ModelSpec, pipeline, prompts: list[str], max_sequence_length: int, device, negative=False):
    """Each pipeline's own `encode_prompt`, so training sees exactly the embeddings inference makes.

    Returns the keyword arguments the pipeline's `__call__` takes (with `negative=True`: also the negative ones, for
    classifier-free guidance at validation); the training loop uses the positive ones.
    """
    common = {"device": device, "max_sequence_length": max_sequence_length}
    guided = {**common, "do_classifier_free_guidance": negative}
    with torch.no_grad():
        if spec.family == "pixart":
            embeds, mask, negative_embeds, negative_mask = pipeline.encode_prompt(
                prompts, clean_caption=False, **guided
            )
            out = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
            if negative:
                out |= {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask}
        elif spec.family == "sd3":
            embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(prompts, None, None, **guided)
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            if negative:
                out |= {"negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled}
        elif spec.family == "flux":  # guidance-distilled, no negative prompt; text_ids are zeros for every prompt
            embeds, pooled, _ = pipeline.encode_prompt(prompts, None, **common)
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        elif spec.family in WAN_LIKE:  # UMT5 states, zero-padded to max_sequence_length; the negative prompt is ""
            embeds, negative_embeds = pipeline.encode_prompt(prompts, None, **guided)
            out = {"prompt_embeds": embeds}
            if negative:
                out["negative_prompt_embeds"] = negative_embeds
        else:  # ltx: T5 states and their attention mask
            embeds, mask, negative_embeds, negative_mask = pipeline.encode_prompt(prompts, None, **guided)
            out = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
            if negative:
                out |= {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask}
    return {key: value.detach() for key, value in out.items()}


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
    """Load `save_lora`'s file into a pipeline: `load_lora_weights` (SD3, Flux) or PEFT injection (PixArt)."""
    if hasattr(pipeline, "load_lora_weights"):
        pipeline.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME_SAFE)
    else:
        load_lora_into_transformer(pipeline.transformer, folder)


# ----------------------------------------------------------------------------------------------------------------------
# One training step's model call and loss
# ----------------------------------------------------------------------------------------------------------------------


def vae_latents(vae_config, sample: torch.Tensor) -> torch.Tensor:
    """An image VAE's sample as the transformer's latents: ``(sample - shift_factor) * scaling_factor``."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (sample - shift) * vae_config.scaling_factor


def normalize_latents(spec: ModelSpec, vae, sample: torch.Tensor) -> torch.Tensor:
    """A VAE posterior sample as the transformer's latents, as each pipeline maps them (the inverse of what it does
    before decoding): Wan, per channel ``(z - latents_mean) / latents_std`` (config lists); LTX,
    ``(z - latents_mean) * scaling_factor / latents_std`` (the VAE's buffers); the image families, `vae_latents`."""
    if spec.family in WAN_LIKE:
        shape = (1, -1) + (1,) * (sample.ndim - 2)
        mean = torch.tensor(vae.config.latents_mean, device=sample.device, dtype=sample.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=sample.device, dtype=sample.dtype).view(shape)
        return (sample - mean) / std
    if spec.family == "ltx":
        shape = (1, -1) + (1,) * (sample.ndim - 2)
        mean = vae.latents_mean.to(sample.device, sample.dtype).view(shape)
        std = vae.latents_std.to(sample.device, sample.dtype).view(shape)
        return (sample - mean) * vae.config.scaling_factor / std
    return vae_latents(vae.config, sample)


def vae_compression(spec: ModelSpec, vae) -> tuple[int, int]:
    """How many frames and pixels (per side) one latent covers: ``(temporal, spatial)``; (1, 2^(levels - 1)) for the
    image VAEs. A clip of F frames has ``(F - 1) // temporal + 1`` latent frames (the first frame alone, then groups)."""
    if spec.family in WAN_LIKE:
        return 2 ** sum(vae.config.temperal_downsample), 2 ** len(vae.config.temperal_downsample)
    if spec.family == "ltx":
        return vae.temporal_compression_ratio, vae.spatial_compression_ratio
    return 1, 2 ** (len(vae.config.block_out_channels) - 1)


def patch_sizes(spec: ModelSpec, config) -> tuple[int, int]:
    """The transformer's ``(temporal, spatial)`` patch size in latents (Flux packs 2x2 latents per token)."""
    if spec.family == "flux":
        return 1, 2
    if spec.family in WAN_LIKE:
        return config.patch_size[0], config.patch_size[1]
    if spec.family == "ltx":
        return config.patch_size_t, config.patch_size
    return 1, config.patch_size


def num_image_tokens(spec: ModelSpec, config, latent_frames: int, latent_size: int) -> int:
    """Image (video) tokens per sample: what routing splits."""
    temporal, spatial = patch_sizes(spec, config)
    return (latent_frames // temporal) * (latent_size // spatial) ** 2


def training_flow_shift(spec: ModelSpec, scheduler_config: dict, num_tokens: int) -> float | None:
    """The timestep shift a video family trains with: sigma -> shift * sigma / (1 + (shift - 1) * sigma), SD3's
    resolution-dependent shift (Esser et al. 2024, arXiv 2403.03206, Sec. 5.3.2: more tokens need more noise), at the
    value the family's pipeline samples with, read from its scheduler config. Wan (rectified flow, Wan report arXiv
    2503.20314): the scheduler's ``flow_shift`` (Diffusers' Wan docs: 3.0 for 480p, 5.0 for 720p). LTX-Video (arXiv
    2501.00103): its pipeline's token-count rule where the scheduler has ``use_dynamic_shifting`` (mu linear from
    ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len``, shift = e^mu, as
    `LTXPipeline` computes it for sampling), else its static ``shift``. Applying the sampling shift to training is
    this library's choice, as in Diffusers' SD3 examples (whose training sigmas are the scheduler's shifted ones).
    None for the image families, whose training scheduler carries its shift already."""
    if not spec.is_video:
        return None
    if spec.family == "ltx" and scheduler_config.get("use_dynamic_shifting"):
        slope = (scheduler_config["max_shift"] - scheduler_config["base_shift"]) / (
            scheduler_config["max_image_seq_len"] - scheduler_config["base_image_seq_len"]
        )
        mu = scheduler_config["base_shift"] + slope * (num_tokens - scheduler_config["base_image_seq_len"])
        return math.exp(mu)
    return float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0)


def training_noise_scheduler(spec: ModelSpec, shift: float | None = None):
    """The training-time noise schedule (`set_timesteps` is never called on it, so it keeps its 1000 training
    timesteps and sigmas): a video family's flow matching at ``shift`` (`training_flow_shift`); SD3/Flux, the
    pipeline's own FlowMatchEulerDiscreteScheduler; PixArt, its DDPM schedule."""
    from diffusers import DDPMScheduler

    if spec.is_video:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift or 1.0)
    if spec.flow_matching:
        return FlowMatchEulerDiscreteScheduler.from_pretrained(spec.path, subfolder="scheduler")
    return DDPMScheduler.from_pretrained(spec.path, subfolder="scheduler")


def model_prediction(spec: ModelSpec, transformer, noisy, timesteps, embeds, options, weight_dtype, vae_scale_factor):
    """The transformer's output for `noisy` latents `(B, C, H, W)` (video: `(B, C, F, H, W)`), in the same shape
    (PixArt: the epsilon/v half of a learned-sigma output). LTX reads ``options.vae_temporal_compression`` and
    ``options.fps`` for its RoPE scale."""
    noisy = noisy.to(weight_dtype)
    embeds = {
        key: value.to(noisy.device, weight_dtype if value.is_floating_point() else value.dtype)
        for key, value in embeds.items()
    }
    text = {argument: embeds[key] for key, argument in TEXT_ARGUMENTS[spec.family].items()}
    if spec.family == "pixart":
        config = unwrap(transformer).config
        batch, channels, height, width = noisy.shape
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(unwrap(transformer), "use_additional_conditions", False):  # PixArt-Alpha 1024: size conditioning
            pixels = [height * vae_scale_factor, width * vae_scale_factor]
            added["resolution"] = torch.tensor([pixels] * batch, dtype=weight_dtype, device=noisy.device)
            added["aspect_ratio"] = torch.tensor([[height / width]] * batch, dtype=weight_dtype, device=noisy.device)
        output = transformer(noisy, timestep=timesteps, added_cond_kwargs=added, return_dict=False, **text)[0]
        if config.out_channels == 2 * channels:  # learned sigma: [eps | variance]; Diffusers trains the first half
            output = output.chunk(2, dim=1)[0]
        return output
    if spec.family == "sd3" or spec.family in WAN_LIKE:  # Wan: (B, C, F, H, W) in and out, patches and RoPE inside
        return transformer(hidden_states=noisy, timestep=timesteps, return_dict=False, **text)[0]
    if spec.family == "ltx":  # a packed token sequence, RoPE over (frame, row, column) scaled as LTXPipeline does
        config = unwrap(transformer).config
        batch, channels, frames, height, width = noisy.shape
        packed = LTXPipeline._pack_latents(noisy, config.patch_size, config.patch_size_t)
        output = transformer(
            hidden_states=packed,
            timestep=timesteps,
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(
                options.vae_temporal_compression / options.fps,
                vae_scale_factor,
                vae_scale_factor,
            ),
            return_dict=False,
            **text,
        )[0]
        return LTXPipeline._unpack_latents(output, frames, height, width, config.patch_size, config.patch_size_t)
    # flux: 2x2 patches packed into tokens, RoPE ids for image and text tokens, guidance as an input
    batch, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, weight_dtype)
    text_ids = torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=noisy.device, dtype=weight_dtype)
    guidance = None
    if unwrap(transformer).config.guidance_embeds:
        guidance = torch.full((batch,), options.guidance_scale, device=noisy.device, dtype=torch.float32)
    output = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=guidance,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
        **text,
    )[0]
    return FluxPipeline._unpack_latents(output, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor)


def unwrap(model):
    """The model inside DDP/compile wrappers (without needing the Accelerator)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


@dataclass
class NoiseDraws:
    """The random draws of one step's noising, made ahead of the step (`draw_noise`), so that `loss_from_draws` is
    tensor arithmetic and the model call: the Gaussian ``noise`` (``x0``'s shape), the model ``timesteps`` ``(B,)``
    and, for flow matching, the matching ``sigmas`` (``(B, 1, ...)``, float32; None for DDPM)."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None


def draw_noise(spec, noise_scheduler, x0, options, generator) -> NoiseDraws:
    """`training_loss`'s draws from ``generator``, in its order: the noise, then the timesteps (flow matching: Diffusers'
    SD3 timestep density, ``compute_density_for_timestep_sampling``, over the scheduler's shifted sigmas; DDPM: a
    uniform integer step). The scheduler's tables are indexed on the draws' device (no read back to the host)."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    if not spec.flow_matching:
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator, device=generator.device
        )
        return NoiseDraws(noise, timesteps.to(x0.device))
    u = compute_density_for_timestep_sampling(
        weighting_scheme=options.weighting_scheme,
        batch_size=batch,
        logit_mean=options.logit_mean,
        logit_std=options.logit_std,
        mode_scale=options.mode_scale,
        device=generator.device,
        generator=generator,
    )
    indices = (u * noise_scheduler.config.num_train_timesteps).long().clamp(max=len(noise_scheduler.timesteps) - 1)
    timesteps = noise_scheduler.timesteps.to(indices.device)[indices].to(x0.device)
    sigmas = noise_scheduler.sigmas.to(indices.device)[indices].to(x0.device, torch.float32)
    return NoiseDraws(noise, timesteps, sigmas.view(batch, *[1] * (x0.ndim - 1)))


def loss_from_draws(spec, transformer, noise_scheduler, x0, embeds, options, draws, weight_dtype, vae_scale_factor):
    """`training_loss` from draws made ahead (`draw_noise`): no generator draw inside, except the router's own
    subsets (`apply_tread` draws them in its block hooks, where the family's token layout is known)."""
    batch, noise, timesteps = x0.shape[0], draws.noise, draws.timesteps
    if spec.flow_matching:
        sigmas = draws.sigmas
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        prediction = model_prediction(
            spec, transformer, noisy, timesteps, embeds, options, weight_dtype, vae_scale_factor
        ).float()
        if options.precondition_outputs:
            prediction = prediction * (-sigmas) + noisy
            target = x0
        else:
            target = noise - x0
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=options.weighting_scheme, sigmas=sigmas).float()
        per_sample = (weighting * (prediction - target) ** 2).reshape(batch, -1).mean(dim=1)
        return per_sample.mean()
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    else:
        target = noise
    prediction = model_prediction(spec, transformer, noisy, timesteps, embeds, options, weight_dtype, vae_scale_factor)
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def training_loss(spec, transformer, noise_scheduler, x0, embeds, options, generator, weight_dtype, vae_scale_factor):
    """Noise the clean latents `x0`, run the (routed) transformer, and return the loss: `draw_noise`, then
    `loss_from_draws`.

    The loss is the plain diffusion loss on **all** image tokens, the TREAD paper's loss in its ICCV version (Sec. 3,
    "no additional losses"): routing only changes which blocks a token passes through; every token, bypassed or not,
    leaves the final layer with a prediction, so every token has a target and the loss is the one dense fine-tuning
    uses. (v1's adapted loss, kept-token denoising plus an MAE term on the bypassed tokens, is `--tread_loss adapted`
    of the class-conditional script.) PixArt: MSE to epsilon (or v, per its scheduler); SD3/Flux/Wan/LTX: rectified
    flow with Diffusers' SD3 timestep densities and loss weightings (`compute_density_for_timestep_sampling`,
    `compute_loss_weighting_for_sd3`) over the scheduler's shifted sigmas, to the velocity ``noise - x0`` or, with
    ``options.precondition_outputs``, to ``x0``.
    """
    draws = draw_noise(spec, noise_scheduler, x0, options, generator)
    return loss_from_draws(
        spec, transformer, noise_scheduler, x0, embeds, options, draws, weight_dtype, vae_scale_factor
    )


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
