"""Convert an original DiT or TREAD checkpoint (``.pt``) into a `TreadDiTPipeline` folder.

    python training/convert_checkpoint.py --checkpoint DiT-XL-2-256x256.pt --output_dir dit-xl-2-256
    python training/convert_checkpoint.py --checkpoint tread-xl.pt --output_dir tread-xl --scheduler edm \\
        --routes paper --vae /path/to/sd-vae-ft-ema --id2label imagenet_id2label.json

Inputs. State dicts in the layout of facebookresearch/DiT's ``models.py`` (and CompVis/tread's ``dit.py``, which
shares it): ``x_embedder`` / ``t_embedder`` / ``y_embedder`` / ``pos_embed`` / ``blocks.{i}`` / ``final_layer``, with
adaLN conditioning, for every DiT size (S, B, L, XL; patch 2, 4, 8; 256 or 512 px, i.e. 32 or 64 latents) and any
other width given ``--num_attention_heads``. Found inside:

- a plain state dict (the released ``DiT-XL-2-256x256.pt``), or ``.safetensors``;
- wrapper dicts, opened by key: ``"ema"`` first, then ``"model"``, then ``"state_dict"`` (DiT's ``train.py`` saves
  ``{"model", "ema", "opt", "args"}``); ``--weights model`` picks the raw weights instead of the EMA;
- a common key prefix, e.g. ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``), ``model.`` / ``net.`` (EDM
  preconditioning wrappers); when several model copies sit under different prefixes (e.g. ``ema_model.`` and
  ``online_model.``), the one with "ema" in its prefix, or ``--prefix``.

Files are read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects; only
``argparse.Namespace`` (the ``args`` entry of DiT training checkpoints) is allowed besides tensors and containers.
A checkpoint holding other objects (e.g. an OmegaConf config) must be re-saved with only its weights.

Architecture. Width, input/output channels (learned sigma = twice the input), patch size, depth and class count come
from the tensor shapes; the latent size from ``pos_embed`` (or ``--sample_size``); the number of heads from DiT's
sizes (hidden 384: 6 heads, 768: 12, 1024: 16, 1152: 16), as heads do not show in the shapes.

Key map (Diffusers' ``scripts/convert_dit_to_diffusers.py``; reference notes, diffusers.md Sec. 1.8). DiT's single
timestep/label embedder is copied into every block (Diffusers gives each block its own); ``attn.qkv`` is split into
``to_q/to_k/to_v`` (rows ``[q; k; v]``, heads contiguous inside each). The adaLN chunk orders need no permutation:
DiT's block modulation is (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), the order Diffusers'
``AdaLayerNormZero`` splits ``norm1.linear`` into, and DiT's final layer gives (shift, scale), the order
``proj_out_1`` is split into. DiT's LayerNorms use eps 1e-6; Diffusers' second block norm takes ``norm_eps`` from the
config, so the converted config sets ``norm_eps=1e-6`` (Diffusers' own conversion kept 1e-5).

Timestep embedding: the one known difference. DiT embeds t with frequencies ``10000^(-k/128)``, k = 0..127
(``timestep_embedding``, dividing by half the width); Diffusers' DiT embedder (``Timesteps(256,
flip_sin_to_cos=True, downscale_freq_shift=1)``) uses ``10000^(-k/127)``; the cos/sin order is the same. A saved
Diffusers config cannot express DiT's frequencies, so the converted model uses Diffusers' (as every DiT checkpoint on
the Hub, e.g. facebook/DiT-XL-2-256, does). Everything else is exact. How far the embedding moves depends on the
range of t the model was trained on: over DDPM's t = 0..999 the 256 features differ by up to 1.98 (relative RMS
0.65, the high frequencies dephase), over EDM's c_noise = ln(sigma)/4 in [-1.55, 1.10] (TREAD's EDM checkpoints) by
at most 0.004 (relative RMS 0.001). For outputs identical to the original, call
`use_original_timestep_frequencies(model)` after loading (in memory only: ``save_pretrained`` does not keep it).
``tests/test_convert_checkpoint.py`` checks both equivalences against an independent original-layout forward.

Outputs: the pipeline (transformer, scheduler, VAE when it can be loaded, ``id2label`` when given) and
``conversion.json`` recording the source, the inferred architecture, the VAE the latents need and the timestep note.

- ``--scheduler``: ``ddim`` (default, as facebook/DiT-XL-2-256), ``ddpm`` (learned-range variance for learned-sigma
  models), ``edm`` (TREAD's EDM-trained models: timestep ``ln(sigma)/4``, EDM preconditioning) or ``flow``.
- ``--vae``: a Hub id (default ``stabilityai/sd-vae-ft-ema``, loaded from the local cache when offline), a local
  folder, or ``none``. A VAE that cannot be loaded is an error (exit status 2, nothing written): without a VAE the
  pipeline treats latents as pixels, so a typo would silently give a pipeline that returns latents as images. To
  convert without one on purpose, pass ``--vae none`` and add it at load time with
  ``TreadDiTPipeline.from_pretrained(output_dir, vae=AutoencoderKL.from_pretrained(...))``.
- ``--id2label``: class names, as a JSON object ``{"0": "tench, Tinca tinca", ...}``, a JSON list, or a
  ``model_index.json`` with an ``id2label`` entry (e.g. facebook/DiT-XL-2-256's). None ship with this script: the
  ImageNet names are not available offline here. Without them, sample with integer class ids.
- ``--routes``: TREAD routes for fine-tuning: ``paper`` (2 .. depth-4 at 0.5), a JSON list of route dicts (or a file
  holding one), or ``none`` (default). Sampling never routes unless asked (Sparse Guidance).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, SchedulerMixin
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import no_init_weights

from diffusers_tread import PRESETS, TreadDiTPipeline, TreadTransformer2DModel, paper_routes
from diffusers_tread.objectives import get_objective
from diffusers_tread.training_utils import ArgumentParser, main_with_messages

logger = logging.getLogger("convert_checkpoint")

# DiT sizes (Peebles & Xie 2023, Table 1): hidden size -> attention heads.
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
WRAPPER_KEYS = ("ema", "model", "state_dict")
SCHEDULERS = ("ddim", "ddpm", "edm", "flow")
# The defaults of `convert` and of the command line: facebook/DiT-XL-2-256's scheduler and VAE.
DEFAULT_SCHEDULER = "ddim"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
ANCHOR_KEY = "x_embedder.proj.weight"


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> object:
    """Read a ``.pt`` (``torch.load``, weights only) or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and containers, which torch.load(weights_only=True) refuses to "
            "unpickle (they could run code). If you trust the file, re-save only its weights, e.g. "
            "`torch.save(torch.load(path, weights_only=False)['ema'], 'ema.pt')`, and convert that.\n"
            f"torch said: {error}"
        ) from error


def extract_state_dict(
    checkpoint: object, weights: str | None = None, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Find the DiT-layout state dict in a loaded checkpoint; return it (prefix removed) and where it was found."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Expected a state dict or a dict of them, got a {type(checkpoint).__name__}.")
    where = []
    state = checkpoint
    while not any(str(key).endswith(ANCHOR_KEY) for key in state):
        candidates = [weights] if weights is not None else WRAPPER_KEYS
        key = next((key for key in candidates if isinstance(state.get(key), Mapping)), None)
        if key is None:
            sample = sorted(str(key) for key in state)[:8]
            raise ValueError(
                f"Not a DiT/TREAD checkpoint: found no `{ANCHOR_KEY}` (DiT's layout: x_embedder, t_embedder, "
                f"y_embedder, pos_embed, blocks.N, final_layer) nor a wrapper entry {list(candidates)} to open "
                f"{'under ' + '/'.join(where) if where else 'at the top level'}; keys there: {sample}."
            )
        where.append(key)
        state = state[key]
    if weights is not None and weights not in where:
        raise ValueError(f"--weights {weights!r} given, but the checkpoint has no such wrapper entry.")

    prefixes = sorted({str(key)[: -len(ANCHOR_KEY)] for key in state if str(key).endswith(ANCHOR_KEY)})
    if prefix is None:
        if len(prefixes) > 1:
            ema_prefixes = [p for p in prefixes if "ema" in p]
            if len(ema_prefixes) != 1:
                raise ValueError(f"Several model copies, under the prefixes {prefixes}: pick one with --prefix.")
            prefixes = ema_prefixes
        prefix = prefixes[0]
    elif prefix not in prefixes:
        raise ValueError(f"--prefix {prefix!r} does not hold a DiT model; found {prefixes}.")
    state_dict = {
        key[len(prefix) :]: value
        for key, value in state.items()
        if isinstance(key, str) and key.startswith(prefix) and torch.is_tensor(value)
    }
    return state_dict, "/".join(where + [f"{prefix}*" if prefix else "*"])


# ----------------------------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------------------------


def infer_config(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None, sample_size: int | None = None
) -> dict:
    """The `TreadTransformer2DModel` config of a DiT-layout state dict, from tensor shapes only."""
    for key in (
        ANCHOR_KEY,
        "final_layer.linear.weight",
        "y_embedder.embedding_table.weight",
        "t_embedder.mlp.0.weight",
    ):
        if key not in state_dict:
            raise ValueError(f"Not a class-conditional adaLN DiT checkpoint: `{key}` is missing.")
    hidden_size, in_channels, patch_size, patch_width = state_dict[ANCHOR_KEY].shape
    if patch_size != patch_width:
        raise ValueError(f"Non-square patches ({patch_size}x{patch_width}) are not supported.")
    block_ids = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}
    if not block_ids or block_ids != set(range(max(block_ids) + 1)):
        raise ValueError(f"Expected blocks.0 .. blocks.N-1, found block indices {sorted(block_ids)}.")
    final_rows = state_dict["final_layer.linear.weight"].shape[0]
    if final_rows % (patch_size * patch_size):
        raise ValueError(f"final_layer.linear has {final_rows} outputs, not a multiple of patch^2 = {patch_size**2}.")
    if state_dict["t_embedder.mlp.0.weight"].shape[1] != 256:
        raise ValueError("The timestep embedder must take 256 frequency features (DiT's and Diffusers' size).")
    if "blocks.0.mlp.fc1.weight" in state_dict and state_dict["blocks.0.mlp.fc1.weight"].shape[0] != 4 * hidden_size:
        raise ValueError("Only DiT's MLP ratio 4 is supported (Diffusers' FeedForward).")

    if num_attention_heads is None:
        if hidden_size not in DIT_HEADS:
            raise ValueError(
                f"Hidden size {hidden_size} is not a DiT size ({sorted(DIT_HEADS)}): pass --num_attention_heads."
            )
        num_attention_heads = DIT_HEADS[hidden_size]
    if hidden_size % num_attention_heads:
        raise ValueError(f"Hidden size {hidden_size} is not divisible by {num_attention_heads} heads.")

    if sample_size is None:
        if "pos_embed" not in state_dict:
            raise ValueError("No `pos_embed` to read the latent size from: pass --sample_size (image size / 8).")
        grid = math.isqrt(state_dict["pos_embed"].shape[1])
        if grid * grid != state_dict["pos_embed"].shape[1]:
            raise ValueError(f"pos_embed has {state_dict['pos_embed'].shape[1]} tokens, not a square grid.")
        sample_size = grid * patch_size

    return {
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": hidden_size // num_attention_heads,
        "in_channels": in_channels,
        "out_channels": final_rows // (patch_size * patch_size),
        "num_layers": len(block_ids),
        "sample_size": sample_size,
        "patch_size": patch_size,
        # the table holds the classes plus the null (CFG) row
        "num_embeds_ada_norm": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # DiT's LayerNorms (see the module docstring)
    }


def check_pos_embed(state_dict: Mapping[str, torch.Tensor], config: dict) -> None:
    """DiT stores its fixed 2D sin-cos table; Diffusers recomputes it. Make sure they are the same table."""
    if "pos_embed" not in state_dict:
        return
    grid = config["sample_size"] // config["patch_size"]
    hidden_size = config["num_attention_heads"] * config["attention_head_dim"]
    table = get_2d_sincos_pos_embed(hidden_size, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
    stored = state_dict["pos_embed"].reshape(-1, hidden_size).float()
    if stored.shape != table.shape or not torch.allclose(stored, table.float(), atol=1e-4):
        raise ValueError(
            "The checkpoint's pos_embed is not the fixed 2D sin-cos table DiT uses (and Diffusers recomputes); "
            "a learned or differently laid out position embedding cannot be converted."
        )


def architecture_name(config: dict) -> str | None:
    """``"DiT-XL/2"`` etc. when the config is one of DiT's sizes."""
    for name, preset in PRESETS.items():
        if all(config[key] == value for key, value in preset.items()):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------------


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Map DiT's keys to `TreadTransformer2DModel`'s; every input key must be used (``pos_embed`` is recomputed)."""
    remaining = {key: value for key, value in state_dict.items() if key != "pos_embed"}
    converted: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise ValueError(f"The checkpoint lacks `{key}`, which DiT's layout has.")
        return remaining.pop(key)

    def move(source: str, target: str) -> None:
        for suffix in ("weight", "bias"):
            converted[f"{target}.{suffix}"] = take(f"{source}.{suffix}")

    move("x_embedder.proj", "pos_embed.proj")
    # One shared embedder in DiT, a copy per block in Diffusers (separate tensors, so the copies can be fine-tuned).
    shared = {
        "norm1.emb.timestep_embedder.linear_1.weight": take("t_embedder.mlp.0.weight"),
        "norm1.emb.timestep_embedder.linear_1.bias": take("t_embedder.mlp.0.bias"),
        "norm1.emb.timestep_embedder.linear_2.weight": take("t_embedder.mlp.2.weight"),
        "norm1.emb.timestep_embedder.linear_2.bias": take("t_embedder.mlp.2.bias"),
        "norm1.emb.class_embedder.embedding_table.weight": take("y_embedder.embedding_table.weight"),
    }
    for i in range(num_layers):
        source, target = f"blocks.{i}", f"transformer_blocks.{i}"
        for key, value in shared.items():
            converted[f"{target}.{key}"] = value.clone()
        move(f"{source}.adaLN_modulation.1", f"{target}.norm1.linear")  # same 6-way chunk order
        for suffix in ("weight", "bias"):
            q, k, v = take(f"{source}.attn.qkv.{suffix}").chunk(3, dim=0)
            converted[f"{target}.attn1.to_q.{suffix}"] = q.clone()
            converted[f"{target}.attn1.to_k.{suffix}"] = k.clone()
            converted[f"{target}.attn1.to_v.{suffix}"] = v.clone()
        move(f"{source}.attn.proj", f"{target}.attn1.to_out.0")
        move(f"{source}.mlp.fc1", f"{target}.ff.net.0.proj")
        move(f"{source}.mlp.fc2", f"{target}.ff.net.2")
    move("final_layer.adaLN_modulation.1", "proj_out_1")  # (shift, scale) in both
    move("final_layer.linear", "proj_out_2")
    if remaining:
        raise ValueError(
            f"Unexpected keys, not part of DiT's layout (a modified architecture?): {sorted(remaining)[:10]}"
            + (f" and {len(remaining) - 10} more." if len(remaining) > 10 else ".")
        )
    return converted


def convert_transformer(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    sample_size: int | None = None,
    routes: list[dict] | None = None,
    shared_conditioning: bool = False,
) -> TreadTransformer2DModel:
    """A `TreadTransformer2DModel` (eval mode) holding a DiT-layout state dict's weights; with
    ``shared_conditioning`` in DiT's own layout (one timestep/label embedder), else in Diffusers' (a copy per block)."""
    config = infer_config(state_dict, num_attention_heads, sample_size)
    check_pos_embed(state_dict, config)
    converted = convert_state_dict(state_dict, config["num_layers"])
    with no_init_weights():  # every parameter is overwritten below
        model = TreadTransformer2DModel(**config, routes=routes)
    model.load_state_dict(converted, strict=True)
    if shared_conditioning:  # the copies are identical, so this is exact
        model = TreadTransformer2DModel.from_dit(model, shared_conditioning=True)
    return model.eval()


def use_original_timestep_frequencies(model: TreadTransformer2DModel) -> TreadTransformer2DModel:
    """Embed timesteps with DiT's frequencies ``10000^(-k/128)`` instead of Diffusers' ``10000^(-k/127)``, making a
    converted model compute exactly what the original checkpoint computes. In memory only: a saved config cannot
    express it, so call this again after every ``from_pretrained``."""
    for embedder in model.conditioning_embedders():
        embedder.time_proj.downscale_freq_shift = 0
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The other pipeline components
# ----------------------------------------------------------------------------------------------------------------------


def make_scheduler(kind: str, learned_sigma: bool) -> SchedulerMixin:
    if kind == "ddim":  # facebook/DiT-XL-2-256's scheduler
        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    if kind == "ddpm":
        scheduler = get_objective("ddpm").make_scheduler()  # DiT's training schedule, learned-range variance
        return scheduler if learned_sigma else DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")
    if kind in ("edm", "flow"):
        return get_objective(kind).make_scheduler()
    raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {kind!r}.")


class VAELoadError(ValueError):
    """``--vae`` names a VAE that cannot be loaded (the command line turns it into a usage error)."""


def load_vae(vae: str) -> AutoencoderKL | None:
    """The VAE ``vae`` names (Hub id or folder), or None for ``"none"``; `VAELoadError` when it cannot be loaded."""
    if vae.lower() == "none":
        return None
    try:
        return AutoencoderKL.from_pretrained(vae)
    except (OSError, ValueError) as error:
        raise VAELoadError(
            f"could not load the VAE {vae!r} given by --vae ({str(error).splitlines()[0]}). Without a VAE the "
            "pipeline would return latents as images. Pass a Hub id that is in the local cache (or reachable), a "
            "local folder holding an AutoencoderKL, or --vae none to convert without one on purpose (then add it "
            "when loading: TreadDiTPipeline.from_pretrained(output_dir, vae=AutoencoderKL.from_pretrained(...)))."
        ) from error


def load_id2label(path: str | Path, num_classes: int) -> dict[int, str]:
    """Class names from a JSON object (id -> name), a JSON list, or a ``model_index.json`` with ``id2label``."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and isinstance(data.get("id2label"), dict):
        data = data["id2label"]
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of id -> class name, or a list of names.")
    id2label = {int(key): str(value) for key, value in data.items()}
    out_of_range = [key for key in id2label if not 0 <= key < num_classes]
    if out_of_range:
        raise ValueError(f"{path}: class ids {out_of_range[:5]} are outside the model's 0..{num_classes - 1}.")
    if len(id2label) != num_classes:
        logger.warning("%s names %d of the model's %d classes.", path, len(id2label), num_classes)
    return id2label


def parse_routes(routes: str | None, num_layers: int) -> list[dict]:
    """``none``, ``paper``, a JSON list of route dicts, or a path to a JSON file holding one."""
    if routes is None or routes.lower() == "none":
        return []
    if routes == "paper":
        return paper_routes(num_layers)
    text = Path(routes).read_text() if Path(routes).is_file() else routes
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--routes must be 'none', 'paper', a JSON list of routes or a JSON file: {error}") from error


def timestep_note(scheduler: str) -> str:
    if scheduler == "edm":
        return (
            "Timesteps are embedded with Diffusers' frequencies 10000^(-k/127), not DiT's 10000^(-k/128); over EDM's "
            "c_noise range the features differ by at most 0.004. use_original_timestep_frequencies() restores DiT's."
        )
    return (
        "Timesteps are embedded with Diffusers' frequencies 10000^(-k/127), not DiT's 10000^(-k/128) (as in every "
        "Diffusers DiT, e.g. facebook/DiT-XL-2-256); over t = 0..999 the features differ by up to 1.98. "
        "use_original_timestep_frequencies() restores DiT's (in memory only)."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def convert(
    checkpoint: str | Path,
    output_dir: str | Path,
    weights: str | None = None,
    prefix: str | None = None,
    num_attention_heads: int | None = None,
    sample_size: int | None = None,
    scheduler: str = DEFAULT_SCHEDULER,
    vae: str = DEFAULT_VAE,
    id2label: str | Path | None = None,
    routes: str | None = None,
    shared_conditioning: bool = False,
) -> TreadDiTPipeline:
    """Convert ``checkpoint`` and save a `TreadDiTPipeline` to ``output_dir``; return the pipeline."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}.")
    autoencoder = load_vae(vae)  # first: a wrong --vae fails before the (long) conversion
    state_dict, found_at = extract_state_dict(load_checkpoint(checkpoint), weights, prefix)
    config = infer_config(state_dict, num_attention_heads, sample_size)
    transformer = convert_transformer(
        state_dict, num_attention_heads, sample_size, parse_routes(routes, config["num_layers"]), shared_conditioning
    )
    learned_sigma = config["out_channels"] == 2 * config["in_channels"]
    labels = load_id2label(id2label, config["num_embeds_ada_norm"]) if id2label else None

    pipe = TreadDiTPipeline(
        transformer=transformer, vae=autoencoder, scheduler=make_scheduler(scheduler, learned_sigma), id2label=labels
    )
    pipe.save_pretrained(output_dir)
    info = {
        "source": Path(checkpoint).name,
        "weights": found_at,
        "architecture": architecture_name(config) or "custom",
        "learned_sigma": learned_sigma,
        "transformer_config": {key: value for key, value in transformer.config.items() if not key.startswith("_")},
        "scheduler": scheduler,
        "vae": vae,
        "vae_included": autoencoder is not None,
        "id2label": str(id2label) if id2label else None,
        "timestep_embedding": timestep_note(scheduler),
    }
    (Path(output_dir) / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("Saved %s (%s, weights %s) to %s.", info["architecture"], scheduler, found_at, output_dir)
    logger.info(info["timestep_embedding"])
    return pipe


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the .pt (or .safetensors) file to convert")
    parser.add_argument("--output_dir", required=True, help="where to save the TreadDiTPipeline")
    parser.add_argument(
        "--weights", default=None, help="wrapper entry to read (default: ema, else model, else state_dict)"
    )
    parser.add_argument("--prefix", default=None, help="key prefix of the model copy to read, e.g. 'ema_model.'")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="for widths that are not DiT sizes")
    parser.add_argument(
        "--sample_size", type=int, default=None, help="latent size, when the checkpoint has no pos_embed"
    )
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=SCHEDULERS)
    parser.add_argument(
        "--vae",
        default=DEFAULT_VAE,
        help="Hub id, local folder, or 'none' to convert without a VAE (one that cannot be loaded is an error)",
    )
    parser.add_argument("--id2label", default=None, help="JSON file with the class names")
    parser.add_argument("--routes", default=None, help="'none' (default), 'paper', or routes as JSON (or a JSON file)")
    parser.add_argument(
        "--shared_conditioning",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep DiT's one timestep/label embedder (75M fewer parameters for XL/2, what train_tread.py trains) "
        "instead of Diffusers' copy per block (default; loads into DiTTransformer2DModel as is)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> TreadDiTPipeline:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return convert(**vars(args))
    except VAELoadError as error:
        parser.error(str(error))  # exit status 2 with the message, no traceback


if __name__ == "__main__":
    main_with_messages(main)
