"""What the TREAD backbones (`TreadTransformer2DModel`, `TreadSSM2DModel`) share on the model side: routes checked and
stored in the config, routing switched on and off, the routes of one forward call, models built from presets, and the
output type of their forward (`TreadTransformer2DModelOutput`).

The route loop itself is `diffusers_tread.routing`, which knows nothing about models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..routing import check_route_reinsertion, resolve_routes, routes_for_call, validate_routes

_TreadModel = TypeVar("_TreadModel", bound="TreadRoutingMixin")


@dataclass
class TreadTransformer2DModelOutput(Transformer2DModelOutput):
    """DiT's output plus ``route_masks``: one ``(batch, num_tokens)`` bool mask per applied route, True where the
    token bypassed that route; ``None`` when routing was off (the output is then exactly DiT's)."""

    route_masks: tuple[torch.BoolTensor, ...] | None = None
    # With ``capture_layer_idx`` (e.g. for representation alignment): that block's output, ``(batch, n, dim)``, and the
    # ``(batch, n)`` positions of its rows among all tokens when it ran inside a route on the kept tokens (else None).
    captured_hidden_states: torch.Tensor | None = None
    captured_token_indices: torch.LongTensor | None = None


class TreadRoutingMixin:
    """TREAD routing for a Diffusers model (``ModelMixin`` + ``ConfigMixin``) with ``num_layers`` blocks and the config
    fields ``routes`` and ``route_reinsertion``.

    A model calls `_register_routes` in its ``__init__`` and `_routes_for_call` at the start of its forward, and sets
    `presets` (preset name -> config) and `preset_defaults` (the config every preset starts from) for `from_preset`.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    preset_defaults: ClassVar[dict[str, Any]] = {}

    def _register_routes(self, routes: Sequence[Mapping] | None, route_reinsertion: str, num_layers: int) -> None:
        check_route_reinsertion(route_reinsertion)
        # Store the resolved routes (negative indices made absolute) so config.json says exactly what runs.
        self.register_to_config(routes=validate_routes(routes, num_layers))
        self.routing_enabled = True

    def disable_routing(self) -> None:
        """Train on all tokens from now on, e.g. the paper's final fine-tune without routing ("(F)", ICCV Table 1),
        keeping the configured routes for the record."""
        self.routing_enabled = False

    def enable_routing(self) -> None:
        self.routing_enabled = True

    def active_routes(
        self, force_routing: bool = False, selection_ratio: float | Sequence[float] | None = None
    ) -> list[dict]:
        """The routes a forward with these arguments runs: the config's in train mode with routing enabled, or with
        ``force_routing``; none otherwise. ``selection_ratio`` overrides their ratios (`routes_for_call`). What
        `routing.draw_kept_indices` draws for when the subsets are drawn ahead (``route_kept_indices``)."""
        routes = self.config.routes if (self.training and self.routing_enabled) or force_routing else []
        return routes_for_call(routes, selection_ratio)

    def _routes_for_call(self, force_routing: bool, selection_ratio: float | Sequence[float] | None) -> list[dict]:
        return self.active_routes(force_routing, selection_ratio)

    @classmethod
    def from_preset(
        cls: type[_TreadModel], name: str, routes: str | list[dict] | None = "paper", **overrides
    ) -> _TreadModel:
        """A freshly initialised model of one of the class's `presets` (e.g. ``"DiT-XL/2"``), with ``routes="paper"``
        (2 .. depth-4 at 0.5), an explicit route list, or ``None``/``[]`` for a dense model. The config is the class's
        `preset_defaults`, then the preset, then ``overrides``."""
        if name not in cls.presets:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(cls.presets)}.")
        config = {**cls.preset_defaults, **cls.presets[name], **overrides}
        return cls(routes=resolve_routes(routes, config["num_layers"]), **config)
