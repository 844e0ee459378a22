"""Representation alignment (REPA; Yu et al., arXiv 2410.06940) for TREAD training, with routes.

REPA aligns the hidden state ``h_t`` of one DiT block with the patch features ``y*`` of a frozen vision encoder
(DINOv2 in the paper) through a small trainable projector ``h_phi`` (a 3-layer MLP with SiLU), adding

    L_REPA = - E[ 1/N sum_n sim(y*_n, h_phi(h_t^[n])) ]        (Eq. 8; sim = cosine similarity, n over patches)

with weight lambda (0.5 in the paper) to the denoising loss. The pieces here:

- `RepaEncoder`: a `transformers` vision model (``AutoModel``) whose patch grid is matched to the DiT's token grid the
  way the paper's code does it: the image is resized (bicubic) to ``encoder_patch * token_grid`` pixels, so that the
  encoder's patches are exactly the DiT's tokens (224 px for DINOv2/14 and a 16x16 DiT grid at 256 px).
- `RepaProjector`: the MLP; training-only (saved in checkpoints, never in the pipeline).
- `repa_loss`: Eq. 8. Inside a TREAD route the aligned block runs on the kept tokens only; their targets are gathered
  with the same kept indices (as SPRINT and the REG+TREAD ablation do; ``../docs/PEERS.md``).
- Delayed routing (`RepaTerm.delayed_routing`): the route covering the alignment layer stores its pre-route state and
  draws its subset at its start as usual, but every token runs up to and including the alignment layer, which is
  aligned on all tokens; the bypassed tokens leave after it and re-enter after the route's end with the state they had
  entering the route (the ablation's "delayed" variant: FID 4.43 vs 4.67 for kept-token alignment).
- `check_precomputed_features`: features stored by ``training/extract_latents.py --repa_encoder`` are used only if
  they come from the same encoder, grid and extraction as the latents beside them.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .routing import gather_tokens

REPA_LOSS_WEIGHT = 0.5  # lambda, the paper's default
REPA_PROJECTOR_DIM = 2048  # the hidden width of the paper's projector MLP
# DINOv2's (and the paper's) input normalisation: ImageNet mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_FOLDER = "repa_projector"
FEATURES, FEATURES_FLIPPED = "repa_features", "repa_features_flipped"


def default_repa_layer(num_layers: int) -> int:
    """The paper's depth scaled to the model: the output of block 8 of SiT-XL's 28 (its default), i.e. block
    ``round(8/28 * depth)`` counted from 1; returned 0-indexed like route indices (7 for 28 layers, 1 for 8)."""
    return max(round(num_layers * 8 / 28), 1) - 1


def resolve_repa_layer(layer: int | None, num_layers: int) -> int:
    """``layer`` (0-indexed; negative counts from the end; None: `default_repa_layer`) checked against the model."""
    if layer is None:
        return default_repa_layer(num_layers)
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"--repa_layer {layer} is outside the model's {num_layers} blocks; give a block index 0..{num_layers - 1} "
            f"(or -{num_layers}..-1 from the end), e.g. {default_repa_layer(num_layers)} (the paper's depth, scaled)."
        )
    return layer % num_layers


def route_covering(routes: Sequence[Mapping], layer: int) -> Mapping | None:
    """The route whose blocks include ``layer``, or None."""
    return next((r for r in routes if r["start_layer_idx"] <= layer <= r["end_layer_idx"]), None)


def check_delayed_routing(routes: Sequence[Mapping], layer: int) -> None:
    """Delayed routing needs a route with ``start <= layer < end`` (there must be blocks left to route after it)."""
    route = route_covering(routes, layer)
    if route is None or route["end_layer_idx"] == layer:
        spans = ", ".join(f"{r['start_layer_idx']}..{r['end_layer_idx']}" for r in routes) or "none"
        raise ValueError(
            f"--repa_delayed_routing lets tokens leave a route only after the alignment layer {layer}, so it needs a "
            f"route that covers that layer and goes on past it (routes: {spans}); choose --repa_layer inside a route "
            "and before its end, change --routes, or drop --repa_delayed_routing."
        )


class RepaProjector(nn.Module):
    """REPA's projector h_phi: Linear -> SiLU -> Linear -> SiLU -> Linear, from the DiT width to the encoder's."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = REPA_PROJECTOR_DIM):
        super().__init__()
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim}
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden_states)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.config, f)

    def load_pretrained(self, folder: str | os.PathLike) -> None:
        """Load a checkpoint's projector in place (the optimizer keeps its parameters); a ValueError if its shape
        differs (e.g. another --repa_encoder or --repa_projector_dim than the run that saved it)."""
        path = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"{folder} holds no REPA projector; resume with the REPA settings it was trained with.")
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        if saved != self.config:
            raise ValueError(
                f"The checkpoint's REPA projector is {saved}, this run's is {self.config}: resume with the "
                "--repa_encoder and --repa_projector_dim it was trained with."
            )
        self.load_state_dict(load_file(path))


def repa_loss(
    projected: torch.Tensor, targets: torch.Tensor, token_indices: torch.LongTensor | None = None
) -> torch.Tensor:
    """Eq. 8 of the REPA paper: minus the cosine similarity of each projected token and its encoder patch feature,
    averaged over tokens and the batch. ``projected``: ``(B, n, D)``; ``targets``: ``(B, N, D)``, all patches;
    ``token_indices``: ``(B, n)`` positions of the ``n`` rows among the ``N`` when only the kept tokens of a route ran
    the aligned block (the targets are gathered with them), else None (``n == N``)."""
    if token_indices is not None:
        targets = gather_tokens(targets, token_indices)
    if projected.shape[:2] != targets.shape[:2] or projected.shape[-1] != targets.shape[-1]:
        raise ValueError(
            f"REPA: projected tokens {tuple(projected.shape)} do not match targets {tuple(targets.shape)}."
        )
    similarity = F.cosine_similarity(projected.float(), targets.float(), dim=-1)
    return -similarity.mean()


@dataclass
class RepaTerm:
    """REPA for one training loss: the projector, the aligned block (0-indexed), lambda, whether routes covering the
    block drop tokens only after it (delayed routing), and this batch's ``(B, N, D)`` encoder targets."""

    projector: nn.Module
    layer: int
    loss_weight: float
    delayed_routing: bool
    targets: torch.Tensor

    def forward_kwargs(self) -> dict[str, Any]:
        return {"capture_layer_idx": self.layer, "delay_routing_after": self.layer if self.delayed_routing else None}

    def loss(self, output) -> torch.Tensor:
        """lambda * Eq. 8 on the model output's captured block (kept tokens inside a route)."""
        projected = self.projector(output.captured_hidden_states)
        return self.loss_weight * repa_loss(projected, self.targets, output.captured_token_indices)


def _patch_size(config) -> int | None:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)) and len(set(patch)) == 1:
        patch = patch[0]
    return patch if isinstance(patch, int) and not isinstance(patch, bool) else None


def check_vision_config(config, name: str) -> int:
    """The encoder's patch size; a ValueError when ``config`` is not a single-tower patch vision model."""
    patch = _patch_size(config)
    if patch is None or not isinstance(getattr(config, "num_channels", None), int):
        raise ValueError(
            f"--repa_encoder {name}: a {type(config).__name__} is not a vision transformer with square patches "
            "(its config has no patch_size and num_channels); give a vision encoder such as facebook/dinov2-base "
            "(the paper's DINOv2) or its local folder."
        )
    return patch


class RepaEncoder:
    """A frozen `transformers` vision model that turns images in [-1, 1] into ``(B, token_grid**2, D)`` patch features
    on the DiT's token grid (the image resized to ``patch * token_grid`` px; the class/register tokens dropped).

    The constructor checks, with one forward on a blank image, that the encoder yields exactly that grid; a
    ValueError says what to change if it does not.
    """

    def __init__(self, model: nn.Module, token_grid: int, name: str):
        self.name, self.token_grid = name, token_grid
        self.model = model.requires_grad_(False).eval()
        config = model.config
        self.patch_size = check_vision_config(config, name)
        self.num_channels = config.num_channels
        self.image_size = self.patch_size * token_grid
        self._kwargs = {}
        if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            self._kwargs["interpolate_pos_encoding"] = True  # e.g. ViT; DINOv2 interpolates by itself
        blank = torch.zeros(1, self.num_channels, self.image_size, self.image_size, dtype=self.dtype)
        try:
            with torch.no_grad():
                tokens = self._tokens(blank.to(self.device))
        except Exception as error:  # noqa: BLE001 - any failure here means the grid cannot be matched
            raise ValueError(
                f"--repa_encoder {name} cannot encode {self.image_size}x{self.image_size} images (patch "
                f"{self.patch_size} x the DiT's {token_grid}x{token_grid} token grid): {error}. Use an encoder that "
                "interpolates its position embeddings (e.g. DINOv2), or change the model's sample_size/patch_size."
            ) from None
        extra = getattr(config, "num_register_tokens", 0) + 1  # at most a class token and the register tokens
        num_patches = token_grid * token_grid
        if tokens.dim() != 3 or not num_patches <= tokens.shape[1] <= num_patches + extra:
            raise ValueError(
                f"--repa_encoder {name} gives hidden states of shape {tuple(tokens.shape)} for a "
                f"{self.image_size}x{self.image_size} image, not the {token_grid}x{token_grid} patch grid of the DiT "
                "(plus class/register tokens); use a ViT-style encoder such as DINOv2."
            )
        self.feature_dim = tokens.shape[-1]

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, token_grid: int, revision: str | None = None, cache_dir: str | None = None
    ) -> RepaEncoder:
        """Load ``name_or_path`` with ``transformers.AutoModel``; an unknown name or a non-vision model is a
        ValueError naming what to pass instead."""
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                f"--repa_encoder {name_or_path}: not a transformers model name or folder ({error}). Give a vision "
                "encoder's Hub id, e.g. facebook/dinov2-base, or a folder saved with save_pretrained."
            ) from None
        check_vision_config(config, name_or_path)
        model = AutoModel.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
        return cls(model, token_grid, name_or_path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, *args, **kwargs) -> RepaEncoder:
        self.model.to(*args, **kwargs)
        return self

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, **self._kwargs).last_hidden_state

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images in [-1, 1] (1-channel images are repeated to the encoder's channels) ->
        ``(B, token_grid**2, D)`` float32 patch features, row-major like the DiT's tokens."""
        x = (images.float() + 1) / 2
        if x.shape[1] != self.num_channels:
            if x.shape[1] != 1:
                raise ValueError(f"REPA: {x.shape[1]}-channel images for a {self.num_channels}-channel encoder.")
            x = x.expand(-1, self.num_channels, -1, -1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        if self.num_channels == 3:
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        tokens = self._tokens(x.to(self.device, self.dtype))
        return tokens[:, -self.token_grid * self.token_grid :].float()


def _same_name(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


def check_precomputed_features(
    latents_dir: str, metadata: Mapping[str, Any], encoder: str | None, token_grid: int
) -> int:
    """Check the REPA features stored beside the latents for this run; returns their feature width.

    Refused, with what to change: no features; features from another encoder than ``encoder`` (None: take the
    stored one) or for another token grid; a shard whose header records another extraction than metadata.json (so its
    features, or latents, do not belong with the others).
    """
    stored = metadata.get("repa_encoder")
    if not stored:
        raise ValueError(
            f"--latents_dir {latents_dir} holds no REPA encoder features, and no image is at hand to encode: "
            f"re-extract with training/extract_latents.py --repa_encoder {encoder or 'facebook/dinov2-base'} "
            f"--repa_token_grid {token_grid}."
        )
    if encoder is not None and not _same_name(encoder, stored):
        raise ValueError(
            f"--latents_dir {latents_dir} holds features of the encoder {stored!r}, but this run asks for {encoder!r}: "
            f"use --repa_encoder {stored}, or re-extract with --repa_encoder {encoder}."
        )
    if metadata.get("repa_token_grid") != token_grid:
        raise ValueError(
            f"--latents_dir {latents_dir} holds features on a {metadata.get('repa_token_grid')}-wide token grid, but "
            f"the model's grid is {token_grid} (sample_size / patch_size): re-extract with --repa_token_grid "
            f"{token_grid}, or change the model's patch_size."
        )
    for shard in metadata["shards"]:
        path = os.path.join(latents_dir, shard["file"])
        with safe_open(path, framework="pt") as f:
            settings = json.loads(f.metadata()["settings"])
            names = set(f.keys())
        # (a shard's own source fingerprint is not an extraction setting: `metadata.json` records the whole source's)
        keys = (set(settings) - {"source_sha256"}) | {"repa_encoder"}
        differs = sorted(key for key in keys if settings.get(key) != metadata.get(key))
        needed = {FEATURES, FEATURES_FLIPPED} if metadata.get("flip") else {FEATURES}
        if differs or not needed <= names:
            why = f"its settings differ in {differs}" if differs else f"it lacks {sorted(needed - names)}"
            raise ValueError(
                f"{path} comes from another extraction than {latents_dir}/metadata.json ({why}): re-run "
                "training/extract_latents.py with the same arguments to redo it."
            )
    return int(metadata["repa_feature_dim"])


def prepare_repa(
    encoder: str,
    layer: int | None,
    routes: Sequence[Mapping],
    num_layers: int,
    hidden_size: int,
    token_grid: int,
    delayed_routing: bool = False,
    projector_dim: int = REPA_PROJECTOR_DIM,
    latents_dir: str | None = None,
    cache_dir: str | None = None,
) -> tuple[RepaEncoder | None, RepaProjector, int]:
    """Everything REPA training needs, checked before training: ``(encoder, projector, layer)``.

    ``encoder`` is None when ``latents_dir`` holds precomputed features (`check_precomputed_features`); else the
    frozen `RepaEncoder` loaded by name or path. ``layer`` is resolved (`resolve_repa_layer`) and, with
    ``delayed_routing``, must sit inside a route before its end. An alignment layer outside every route while routes
    exist is allowed with a warning: the REG+TREAD ablation found alignment stacks with routing only from inside.
    """
    layer = resolve_repa_layer(layer, num_layers)
    if delayed_routing:
        check_delayed_routing(routes, layer)
    elif routes and route_covering(routes, layer) is None:
        spans = ", ".join(f"{r['start_layer_idx']}..{r['end_layer_idx']}" for r in routes)
        warnings.warn(
            f"REPA aligns block {layer}, outside every route ({spans}); a public ablation found routing gains with "
            "alignment only when the aligned block sits inside the route (see --repa_layer).",
            stacklevel=2,
        )
    if latents_dir is not None:
        from .data.latents import load_latents_metadata

        feature_dim = check_precomputed_features(latents_dir, load_latents_metadata(latents_dir), encoder, token_grid)
        frozen = None
    else:
        frozen = RepaEncoder.from_pretrained(encoder, token_grid, cache_dir=cache_dir)
        feature_dim = frozen.feature_dim
    return frozen, RepaProjector(hidden_size, feature_dim, projector_dim), layer
