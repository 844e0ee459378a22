import ast
from pathlib import Path

import pytest
import torch

from diffusers_tread import routing


def route(start, end, ratio=0.5):
    return {"start_layer_idx": start, "end_layer_idx": end, "selection_ratio": ratio}


def test_validate_resolves_negative_indices():
    assert routing.validate_routes([route(2, -4)], num_layers=28) == [route(2, 24)]
    assert routing.validate_routes([route(-26, 24)], num_layers=28) == [route(2, 24)]
    assert routing.validate_routes(None, 28) == [] and routing.validate_routes([], 28) == []


def test_validate_accepts_adjacent_routes_and_full_span():
    routes = [route(0, 2), route(3, 5, 0.3)]
    assert routing.validate_routes(routes, 6) == [route(0, 2), route(3, 5, 0.3)]
    assert routing.validate_routes([route(0, 5, 0.0)], 6) == [route(0, 5, 0.0)]


@pytest.mark.parametrize(
    "routes, match",
    [
        ([route(5, 3)], r"route 0 .*after end_layer_idx 3; need start <= end"),
        ([route(2, 28)], r"route 0 .*end_layer_idx=28 is outside the model's layers; valid indices are 0..27"),
        ([route(-29, 4)], r"start_layer_idx=-29 is outside the model's layers"),
        ([route(2, 8), route(8, 10)], r"route 1 .*must not overlap; this route starts at layer 8.*covers layers 2..8"),
        ([route(10, 12), route(2, 8)], r"route 1 .*in order"),
        ([route(2, 8, 1.0)], r"route 0 .*selection_ratio must be in \[0, 1\).*leave no token"),
        ([route(2, 8, -0.1)], r"selection_ratio must be in \[0, 1\)"),
        ([route(2, 8, "0.5")], r"selection_ratio must be a number"),
        ([{"start_layer_idx": 2, "end_layer_idx": 8, "selection_rate": 0.5}], r"missing \['selection_ratio'\]"),
        ([route(2.0, 8)], r"start_layer_idx must be an int"),
        ([route(True, 8)], r"start_layer_idx must be an int"),
        ([(2, 8, 0.5)], r"each route must be a dict"),
        (route(2, 8), r"routes must be a list of route dicts"),
    ],
)
def test_invalid_routes_raise_naming_route_and_rule(routes, match):
    with pytest.raises(ValueError, match=match):
        routing.validate_routes(routes, num_layers=28)


def test_num_kept_tokens_matches_reference_rounding():
    # N - int(N * r): 256 tokens at 0.5 -> 128 kept; 64 at 0.3 -> 64 - 19 = 45.
    assert routing.num_kept_tokens(256, 0.5) == 128
    assert routing.num_kept_tokens(64, 0.3) == 45
    assert routing.num_kept_tokens(3, 0.99) == 1
    assert routing.num_kept_tokens(10, 0.0) == 10


def test_no_token_left_raises():
    with pytest.raises(ValueError, match="leaves no token"):
        routing.num_kept_tokens(0, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        routing.sample_kept_indices(2, 16, 1.0)


def test_sample_kept_indices_are_distinct_per_sample_and_seeded():
    idx = routing.sample_kept_indices(64, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (64, 8) and idx.dtype == torch.long
    assert all(len(set(row.tolist())) == 8 for row in idx)
    assert idx.min() >= 0 and idx.max() < 16
    assert torch.equal(idx, idx.sort(dim=1).values)  # original token order is kept
    # independent per sample: not every row the same subset
    assert len({tuple(sorted(row.tolist())) for row in idx}) > 1
    again = routing.sample_kept_indices(64, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def test_sample_kept_indices_is_uniform():
    # each position is kept with probability N_keep / N = 0.5
    idx = routing.sample_kept_indices(4000, 8, 0.5, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(idx.flatten(), minlength=8).float() / 4000
    assert torch.allclose(counts, torch.full((8,), 0.5), atol=0.03)


def test_gather_scatter_round_trip_and_mask():
    x = torch.randn(3, 10, 4)
    idx = routing.sample_kept_indices(3, 10, 0.3, generator=torch.Generator().manual_seed(0))
    kept = routing.gather_tokens(x, idx)
    assert kept.shape == (3, 7, 4)
    for b in range(3):
        assert torch.equal(kept[b], x[b, idx[b]])
    # scattering the unchanged subset back restores x exactly
    assert torch.equal(routing.scatter_tokens(kept, idx, x), x)
    # processed tokens land at their positions; the others keep the reinsertion state
    stored = torch.zeros_like(x)
    out = routing.scatter_tokens(kept + 1, idx, stored)
    mask = routing.bypass_mask(idx, 10)
    assert mask.shape == (3, 10) and mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 3, 3]
    assert torch.equal(out[mask], torch.zeros(9, 4))
    assert torch.equal(out[~mask], x[~mask] + 1)
    assert torch.equal(stored, torch.zeros_like(x))  # out of place


def test_scatter_gradients_flow_to_both_paths():
    x = torch.randn(2, 6, 3, requires_grad=True)
    idx = routing.sample_kept_indices(2, 6, 0.5, generator=torch.Generator().manual_seed(0))
    routed = routing.gather_tokens(x, idx) * 2
    out = routing.scatter_tokens(routed, idx, x)
    out.sum().backward()
    mask = routing.bypass_mask(idx, 6)
    assert torch.equal(x.grad[~mask], torch.full_like(x.grad[~mask], 2.0))
    assert torch.equal(x.grad[mask], torch.ones_like(x.grad[mask]))


def test_routing_knows_no_model():
    # The route loop is plain tensor code: the models' output type lives with the models (models/modeling_tread.py).
    tree = ast.parse(Path(routing.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert imported and not [name for name in imported if name.split(".")[0] in ("diffusers", "diffusers_tread")]
