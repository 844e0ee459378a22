"""TREAD token routing as plain tensor functions (arXiv 2501.04765, Sec. 3; ICCV version Sec. 3.2).

A route ``{"start_layer_idx": i, "end_layer_idx": j, "selection_ratio": r}`` makes a random fraction ``r`` of each
sample's tokens bypass blocks ``i..j`` (both inclusive, 0-indexed). At block ``i`` the full sequence is stored and the
kept tokens are gathered; after block ``j`` they are scattered back to their original positions in the stored
sequence, so a bypassed token re-enters with the hidden state it had entering block ``i``.

Nothing here knows about a model: any backbone that runs a list of blocks over ``(batch, tokens, dim)`` sequences
calls ``validate_routes`` (or ``resolve_routes``, which also takes ``"paper"``) and `check_route_reinsertion` once
and `run_blocks` per forward (the
DiT and the state-space backbone do, through ``models.modeling_tread.TreadRoutingMixin``), or the primitives
``sample_kept_indices`` / ``gather_tokens`` at a route start and ``scatter_tokens`` / ``bypass_mask`` at its end (the
text-to-image hooks do). `draw_kept_indices` draws every route's subsets ahead of the forward, so that a compiled
training step takes them as tensors (a ``torch.Generator`` draw inside ``torch.compile`` breaks the graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

ROUTE_KEYS = ("start_layer_idx", "end_layer_idx", "selection_ratio")
# The state a bypassed token carries past its route: "pre_route", the state entering the route's first block (ICCV
# version); "pre_route_plus_input", that state plus the patch-embedded input tokens (v1's x_D_last + x_T).
ROUTE_REINSERTION_MODES = ("pre_route", "pre_route_plus_input")


def paper_routes(num_layers: int) -> list[dict]:
    """The paper's default single route: layers 2 .. depth-4 at selection ratio 0.5 (ICCV Sec. 4.1, Table 5)."""
    return [{"start_layer_idx": 2, "end_layer_idx": num_layers - 4, "selection_ratio": 0.5}]


def check_route_reinsertion(route_reinsertion: str) -> str:
    """``route_reinsertion`` if it is one of `ROUTE_REINSERTION_MODES`, else a ``ValueError``; a backbone checks it
    once, with its routes (`run_blocks` does not check it again on every forward)."""
    if route_reinsertion not in ROUTE_REINSERTION_MODES:
        raise ValueError(f"route_reinsertion must be one of {ROUTE_REINSERTION_MODES}, got {route_reinsertion!r}.")
    return route_reinsertion


def _check_ratio(selection_ratio: float, where: str) -> float:
    if isinstance(selection_ratio, bool) or not isinstance(selection_ratio, (int, float)):
        raise ValueError(f"{where}: selection_ratio must be a number in [0, 1), got {selection_ratio!r}.")
    if not 0.0 <= float(selection_ratio) < 1.0:
        raise ValueError(
            f"{where}: selection_ratio must be in [0, 1) (the fraction of tokens that bypass the route; "
            f"1 would leave no token inside it), got {selection_ratio}."
        )
    return float(selection_ratio)


def validate_routes(routes: Sequence[Mapping] | None, num_layers: int) -> list[dict]:
    """Check ``routes`` against a model with ``num_layers`` blocks and return them with negative indices resolved.

    Rules (each violation raises ``ValueError`` naming the route): exactly the keys ``start_layer_idx``,
    ``end_layer_idx``, ``selection_ratio``; integer layer indices inside ``[-num_layers, num_layers)``, negative ones
    counting from the end (``-4`` on 28 layers is 24); ``start <= end``; routes in order and non-overlapping
    (each starts after the previous one ends); ``selection_ratio`` in ``[0, 1)``.
    """
    if routes is None:
        return []
    if isinstance(routes, Mapping) or not isinstance(routes, Sequence) or isinstance(routes, str):
        raise ValueError(f"routes must be a list of route dicts, got {type(routes).__name__}: {routes!r}.")
    resolved: list[dict] = []
    for position, route in enumerate(routes):
        where = f"route {position} {dict(route) if isinstance(route, Mapping) else route!r}"
        if not isinstance(route, Mapping):
            raise ValueError(f"{where}: each route must be a dict with keys {list(ROUTE_KEYS)}.")
        missing = [key for key in ROUTE_KEYS if key not in route]
        unknown = [key for key in route if key not in ROUTE_KEYS]
        if missing or unknown:
            raise ValueError(
                f"{where}: a route needs exactly the keys {list(ROUTE_KEYS)}; missing {missing}, unknown {unknown}."
            )
        indices = []
        for key in ("start_layer_idx", "end_layer_idx"):
            value = route[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {key} must be an int, got {value!r}.")
            if not -num_layers <= value < num_layers:
                raise ValueError(
                    f"{where}: {key}={value} is outside the model's layers; valid indices are 0..{num_layers - 1} "
                    f"(or -{num_layers}..-1 counting from the end)."
                )
            indices.append(value % num_layers)
        start, end = indices
        if start > end:
            raise ValueError(
                f"{where}: start_layer_idx resolves to {start}, after end_layer_idx {end}; need start <= end."
            )
        if resolved and start <= resolved[-1]["end_layer_idx"]:
            previous = resolved[-1]
            raise ValueError(
                f"{where}: routes must be in order and must not overlap; this route starts at layer {start}, but the "
                f"previous route covers layers {previous['start_layer_idx']}..{previous['end_layer_idx']}."
            )
        ratio = _check_ratio(route["selection_ratio"], where)
        resolved.append({"start_layer_idx": start, "end_layer_idx": end, "selection_ratio": ratio})
    return resolved


def resolve_routes(routes: str | Sequence[Mapping] | None, num_layers: int) -> list[dict]:
    """``"paper"`` (the paper's route, `paper_routes`), a list of route dicts or ``None``/``[]`` (no route), checked
    against a model with ``num_layers`` blocks and resolved by `validate_routes`."""
    if isinstance(routes, str):
        if routes != "paper":
            raise ValueError(f"routes must be 'paper', a list of route dicts or None, got {routes!r}.")
        routes = paper_routes(num_layers)
    return validate_routes(routes, num_layers)


def num_kept_tokens(num_tokens: int, selection_ratio: float) -> int:
    """Tokens that go through a route: ``N - floor(N * r)`` (the reference router's ``int(N * r)`` bypass)."""
    _check_ratio(selection_ratio, "selection_ratio")
    kept = num_tokens - math.floor(num_tokens * selection_ratio)
    if kept < 1:
        raise ValueError(f"A route over {num_tokens} tokens at selection_ratio {selection_ratio} leaves no token.")
    return kept


def sample_kept_indices(
    batch_size: int,
    num_tokens: int,
    selection_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.LongTensor:
    """Draw, independently per sample, the token positions that go through a route: ``(batch, num_kept)``.

    Uniform without replacement: argsort of uniform noise, keep the first ``N - floor(N * r)`` (paper Sec. 3).
    The kept positions are returned in ascending order, so the routed sequence keeps the original token order
    (required by scan-order backbones; attention does not care) and ratio 0 is exactly the identity.
    The noise is drawn on ``generator``'s device when one is given, so a CPU generator reproduces a GPU run.
    """
    kept = num_kept_tokens(num_tokens, selection_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=noise_device)
    return noise.argsort(dim=1)[:, :kept].sort(dim=1).values.to(device)


def draw_kept_indices(
    routes: Sequence[Mapping],
    batch_size: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.LongTensor, ...]:
    """Each route's ``(batch, num_kept)`` kept positions for one forward over ``num_tokens`` tokens, drawn in route
    order exactly as `run_blocks` draws them itself (the same generator calls, so the same numbers): pass the result
    as ``run_blocks(kept_indices=...)`` to take the draws out of the forward, e.g. out of a compiled step."""
    return tuple(
        sample_kept_indices(batch_size, num_tokens, route["selection_ratio"], generator=generator, device=device)
        for route in routes
    )


def gather_tokens(hidden_states: torch.Tensor, kept_indices: torch.LongTensor) -> torch.Tensor:
    """Route start: ``(B, N, D)`` -> ``(B, N_keep, D)``, the kept tokens of each sample."""
    index = kept_indices.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
    return hidden_states.gather(1, index)


def scatter_tokens(routed: torch.Tensor, kept_indices: torch.LongTensor, reinsert_into: torch.Tensor) -> torch.Tensor:
    """Route end: put the processed kept tokens back at their positions in ``reinsert_into`` (out of place).

    Every other position keeps ``reinsert_into``'s value, i.e. the state the bypassed tokens carry past the route.
    """
    index = kept_indices.unsqueeze(-1).expand(-1, -1, reinsert_into.shape[-1])
    return reinsert_into.scatter(1, index, routed.to(reinsert_into.dtype))


def bypass_mask(kept_indices: torch.LongTensor, num_tokens: int) -> torch.BoolTensor:
    """``(B, N)`` bool mask, True where a token bypassed the route (the ``m_r`` of the v1 adapted loss)."""
    mask = torch.ones(kept_indices.shape[0], num_tokens, dtype=torch.bool, device=kept_indices.device)
    return mask.scatter(1, kept_indices, False)


def routes_for_call(routes: Sequence[Mapping], selection_ratio: float | Sequence[float] | None = None) -> list[dict]:
    """The routes of one forward call: ``routes`` with their selection ratios overridden by ``selection_ratio`` (one
    value for every route, or one per route, e.g. a training-time ratio schedule)."""
    if selection_ratio is None or not routes:
        return list(routes)
    ratios = selection_ratio if isinstance(selection_ratio, (list, tuple)) else [selection_ratio] * len(routes)
    if len(ratios) != len(routes):
        raise ValueError(f"selection_ratio has {len(ratios)} values for {len(routes)} routes.")
    return [{**route, "selection_ratio": ratio} for route, ratio in zip(routes, ratios, strict=True)]


def run_blocks(
    blocks: Sequence[torch.nn.Module],
    hidden_states: torch.Tensor,
    run_block: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    routes: Sequence[Mapping],
    reinsertion: str = "pre_route",
    input_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    drop_after_layer: int | None = None,
    on_block_output: Callable[[int, torch.Tensor, torch.LongTensor | None], None] | None = None,
    kept_indices: Sequence[torch.LongTensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.BoolTensor, ...] | None]:
    """Run ``blocks`` over ``hidden_states`` (batch, tokens, dim) with TREAD's routes (paper Fig. 2): at a route's
    start layer each sample keeps a random subset of its tokens, the route's blocks run on those, and after its end
    layer the bypassed tokens re-enter at their original positions, carrying the state they had entering the route
    (``reinsertion="pre_route"``) or that plus ``input_tokens`` (``"pre_route_plus_input"``, v1's x_D_last + x_T).

    ``run_block(block, hidden_states)`` runs one block (with its conditioning, checkpointing, ...). ``routes`` and
    ``reinsertion`` are taken as checked (`validate_routes`, `check_route_reinsertion`, once per model). Returns the
    final hidden states and one bypass mask per route, or None without routes.

    ``drop_after_layer`` (delayed routing, for representation alignment at that layer): a route with
    ``start <= drop_after_layer < end`` still draws its subset and stores the pre-route state at its start, but all
    tokens run blocks ``start..drop_after_layer``; the bypassed ones leave only after that block, and after ``end``
    they re-enter with the state they had entering ``start``, as usual. Other routes are unchanged.
    ``on_block_output(layer_idx, hidden_states, kept_indices)`` is called after every block with its output and the
    ``(B, N_keep)`` positions of its rows in the full sequence (None when all tokens ran the block).

    ``kept_indices``: each route's subset drawn ahead (`draw_kept_indices`), used instead of drawing from
    ``generator``; nothing random then happens inside, so a ``torch.compile(fullgraph=True)`` step can contain it.
    """
    if kept_indices is not None and len(kept_indices) != len(routes):
        raise ValueError(f"kept_indices has {len(kept_indices)} entries for {len(routes)} routes.")
    route_at_start = {route["start_layer_idx"]: position for position, route in enumerate(routes)}
    route_at_end = {route["end_layer_idx"] for route in routes}
    batch_size, num_tokens, _ = hidden_states.shape
    route_masks = []
    routed, gather_after = False, None
    for layer_idx, block in enumerate(blocks):
        if layer_idx in route_at_start:
            route = routes[route_at_start[layer_idx]]
            pre_route = hidden_states  # x_D_last: the full sequence entering the route
            if kept_indices is None:
                kept = sample_kept_indices(
                    batch_size, num_tokens, route["selection_ratio"], generator=generator, device=hidden_states.device
                )
            else:
                kept = kept_indices[route_at_start[layer_idx]]
                expected = (batch_size, num_kept_tokens(num_tokens, route["selection_ratio"]))
                if tuple(kept.shape) != expected:
                    raise ValueError(
                        f"kept_indices for the route at layer {layer_idx} have shape {tuple(kept.shape)}; this "
                        f"forward needs {expected} (batch, kept tokens)."
                    )
            delayed = drop_after_layer is not None and layer_idx <= drop_after_layer < route["end_layer_idx"]
            gather_after = drop_after_layer if delayed else layer_idx - 1
        if gather_after is not None and layer_idx == gather_after + 1:
            hidden_states, routed, gather_after = gather_tokens(hidden_states, kept), True, None
        hidden_states = run_block(block, hidden_states)
        if on_block_output is not None:
            on_block_output(layer_idx, hidden_states, kept if routed else None)
        if layer_idx in route_at_end:
            routed = False
            reinsert_into = pre_route + input_tokens if reinsertion == "pre_route_plus_input" else pre_route
            hidden_states = scatter_tokens(hidden_states, kept, reinsert_into)
            route_masks.append(bypass_mask(kept, num_tokens))
    return hidden_states, (tuple(route_masks) if routes else None)
