"""TreadTransformer2DModel: Diffusers' DiT with TREAD token routing during training (arXiv 2501.04765).

The forward pass is DiT's (``DiTTransformer2DModel.forward``) with one addition, the paper's Fig. 2: at a route's
start layer a random subset of each sample's tokens leaves the sequence, the blocks of the route run on the rest, and
after the route's end layer the bypassed tokens re-enter at their original positions. No parameter is added, so a
TREAD checkpoint is a DiT checkpoint, and in eval mode (all tokens, all blocks) the output is stock DiT's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from .. import routing

ROUTE_REINSERTION_MODES = ("pre_route", "pre_route_plus_input")

# DiT model sizes (Peebles & Xie 2023, Table 1): depth, hidden size, heads. Hidden = heads * attention_head_dim.
DIT_SIZES = {
    "S": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64},
    "B": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},
    "L": {"num_layers": 24, "num_attention_heads": 16, "attention_head_dim": 64},
    "XL": {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72},
    # Not from the paper: a width-64, 8-block model for tests and CPU demos.
    "Tiny": {"num_layers": 8, "num_attention_heads": 4, "attention_head_dim": 16},
}
PRESETS = {
    f"DiT-{size}/{patch}": {**dims, "patch_size": patch}
    for size, dims in DIT_SIZES.items()
    for patch in ((2,) if size == "Tiny" else (2, 4, 8))
}


def paper_routes(num_layers: int) -> list[dict]:
    """The paper's default single route: layers 2 .. depth-4 at selection ratio 0.5 (ICCV Sec. 4.1, Table 5)."""
    return [{"start_layer_idx": 2, "end_layer_idx": num_layers - 4, "selection_ratio": 0.5}]


@dataclass
class TreadTransformer2DModelOutput(Transformer2DModelOutput):
    """DiT's output plus ``route_masks``: one ``(batch, num_tokens)`` bool mask per applied route, True where the
    token bypassed that route; ``None`` when routing was off (the output is then exactly DiT's)."""

    route_masks: tuple[torch.BoolTensor, ...] | None = None


class TreadTransformer2DModel(DiTTransformer2DModel, AttentionMixin, PeftAdapterMixin):
    """``DiTTransformer2DModel`` with TREAD routes.

    Extra config:
        routes (`list[dict]`, defaults to `[]`): ordered, non-overlapping ``{"start_layer_idx", "end_layer_idx",
            "selection_ratio"}`` dicts (end inclusive, negative indices count from the end); see `diffusers_tread.routing`.
        route_reinsertion (`str`, defaults to `"pre_route"`): the state a bypassed token carries past its route:
            ``"pre_route"``, the state entering the route's first block (ICCV version); ``"pre_route_plus_input"``,
            that state plus the patch-embedded input tokens (v1's ``x_D_last + x_T``).

    Routing runs when the model is in train mode and has routes (unless `disable_routing()` was called), or when
    ``force_routing=True``. The per-block
    class-label dropout of Diffusers' embedders is switched off: Diffusers draws it separately in every block, so a
    sample would almost never be fully unconditional; the training script drops labels once per sample instead.
    """

    _no_split_modules = ["BasicTransformerBlock"]
    _repeated_blocks = ["BasicTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        routes: list[dict] | None = None,
        route_reinsertion: str = "pre_route",
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        if route_reinsertion not in ROUTE_REINSERTION_MODES:
            raise ValueError(f"route_reinsertion must be one of {ROUTE_REINSERTION_MODES}, got {route_reinsertion!r}.")
        # Store the resolved routes (negative indices made absolute) so config.json says exactly what runs.
        self.register_to_config(routes=routing.validate_routes(routes, num_layers))
        # CFG label dropout happens once per sample in the training script (see the class docstring).
        for block in self.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        self.routing_enabled = True

    def disable_routing(self) -> None:
        """Train on all tokens from now on, e.g. the paper's final fine-tune without routing ("(F)", ICCV Table 1),
        keeping the configured routes for the record."""
        self.routing_enabled = False

    def enable_routing(self) -> None:
        self.routing_enabled = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> TreadTransformer2DModel:
        """`ModelMixin.from_pretrained`, loading only safetensors unless ``use_safetensors=False`` is passed (pickled
        ``.bin`` weights can run code when loaded)."""
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_preset(cls, name: str, routes: str | list[dict] | None = "paper", **overrides) -> TreadTransformer2DModel:
        """A freshly initialised model of a DiT size, e.g. ``"DiT-XL/2"``, with ``routes="paper"`` (2 .. depth-4 at
        0.5), an explicit route list, or ``None``/``[]`` for a dense model. ``overrides`` go to the config.

        Defaults follow DiT on ImageNet 256 latents: 4x32x32 input, learned sigma (8 output channels), 1000 classes.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        config = {"in_channels": 4, "out_channels": 8, "sample_size": 32, "num_embeds_ada_norm": 1000}
        config.update(PRESETS[name])
        config.update(overrides)
        if isinstance(routes, str):
            if routes != "paper":
                raise ValueError(f"routes must be 'paper', a list of route dicts or None, got {routes!r}.")
            routes = paper_routes(config["num_layers"])
        return cls(routes=routes, **config)

    @classmethod
    def from_dit(cls, model: DiTTransformer2DModel, **config_overrides) -> TreadTransformer2DModel:
        """Wrap a loaded ``DiTTransformer2DModel``'s weights (shared, not copied) in a TREAD model.

        ``config_overrides`` (e.g. ``routes=[...]``) change the config; the result keeps ``model``'s train/eval mode.
        """
        config = {key: value for key, value in model.config.items() if not key.startswith("_")}
        config.update(config_overrides)
        with torch.device("meta"):
            tread = cls.from_config(config)
        # assign=True adopts model's tensors (no copy); the fixed sin-cos table is a non-persistent buffer.
        tread.load_state_dict(model.state_dict(), assign=True)
        tread.pos_embed.pos_embed = model.pos_embed.pos_embed
        tread.register_to_config(_name_or_path=model.config.get("_name_or_path", ""))
        return tread.train(model.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        force_routing: bool = False,
        selection_ratio: float | list[float] | None = None,
        route_generator: torch.Generator | None = None,
    ) -> TreadTransformer2DModelOutput | tuple:
        """DiT's forward with TREAD routing.

        Args (beyond ``DiTTransformer2DModel.forward``'s):
            force_routing: route even in eval mode (e.g. for Sparse Guidance).
            selection_ratio: overrides the routes' selection ratios for this call: one value for every route, or a
                list with one per route (e.g. a training-time ratio schedule).
            route_generator: draws the routed subsets, for reproducible routing.

        Returns:
            ``TreadTransformer2DModelOutput(sample, route_masks)`` or ``(sample, route_masks)``; with routing off,
            ``route_masks`` is None and the tuple is ``(sample,)``, exactly as ``DiTTransformer2DModel`` returns.
        """
        routes = self.config.routes if (self.training and self.routing_enabled) or force_routing else []
        if selection_ratio is not None and routes:
            ratios = selection_ratio if isinstance(selection_ratio, (list, tuple)) else [selection_ratio] * len(routes)
            if len(ratios) != len(routes):
                raise ValueError(f"selection_ratio has {len(ratios)} values for {len(routes)} routes.")
            routes = [{**route, "selection_ratio": ratio} for route, ratio in zip(routes, ratios, strict=True)]
        route_at_start = {route["start_layer_idx"]: route for route in routes}
        route_at_end = {route["end_layer_idx"] for route in routes}

        # 1. Input: patchify and add the fixed sin-cos positions (once, so routed tokens keep their position).
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        hidden_states = self.pos_embed(hidden_states)
        input_tokens = hidden_states  # x_T in the v1 paper's notation
        batch_size, num_tokens, _ = hidden_states.shape

        # 2. Blocks; inside a route only the kept tokens run.
        route_masks = []
        for layer_idx, block in enumerate(self.transformer_blocks):
            if layer_idx in route_at_start:
                pre_route = hidden_states  # x_D_last: the full sequence entering the route
                kept_indices = routing.sample_kept_indices(
                    batch_size,
                    num_tokens,
                    route_at_start[layer_idx]["selection_ratio"],
                    generator=route_generator,
                    device=hidden_states.device,
                )
                hidden_states = routing.gather_tokens(hidden_states, kept_indices)

            if torch.is_grad_enabled() and self.gradient_checkpointing:
                # The subset was gathered above, outside the checkpoint, so recomputation sees the same tokens.
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, None, None, None, timestep, cross_attention_kwargs, class_labels
                )
            else:
                hidden_states = block(
                    hidden_states,
                    attention_mask=None,
                    encoder_hidden_states=None,
                    encoder_attention_mask=None,
                    timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs,
                    class_labels=class_labels,
                )

            if layer_idx in route_at_end:
                if self.config.route_reinsertion == "pre_route_plus_input":
                    reinsert_into = pre_route + input_tokens  # v1 (Jan 2025): x_D_last + x_T
                else:
                    reinsert_into = pre_route  # ICCV version: x_D_last
                hidden_states = routing.scatter_tokens(hidden_states, kept_indices, reinsert_into)
                route_masks.append(routing.bypass_mask(kept_indices, num_tokens))

        # 3. Output: DiT's final adaLN layer (conditioned through block 0's embedder, as in Diffusers) and unpatchify.
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)

        hidden_states = hidden_states.reshape(
            shape=(-1, height, width, self.patch_size, self.patch_size, self.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(
            shape=(-1, self.out_channels, height * self.patch_size, width * self.patch_size)
        )

        route_masks = tuple(route_masks) if routes else None
        if not return_dict:
            return (output,) if route_masks is None else (output, route_masks)
        return TreadTransformer2DModelOutput(sample=output, route_masks=route_masks)
