"""Routing stays compile-friendly: the routed training forward traces as one graph (``fullgraph=True`` raises on any
graph break), the compiled model computes what the eager one does, and the training step with Diffusers' regional
compilation (`train_tread.py --compile`) runs its blocks without a break."""

import pytest
import torch
from conftest import tiny_inputs, tiny_tread

from diffusers_tread.objectives import get_objective
from diffusers_tread.training_utils import drop_class_labels, make_optimizer, tread_training_loss

ROUTES = [
    {"start_layer_idx": 0, "end_layer_idx": 1, "selection_ratio": 0.5},
    {"start_layer_idx": 3, "end_layer_idx": 4, "selection_ratio": 0.25},
]


# Dynamo's caches and graph-break counters start empty in every test (conftest's fresh_dynamo).
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("shared_conditioning", [False, True])
@pytest.mark.parametrize("reinsertion", ["pre_route", "pre_route_plus_input"])
def test_routed_training_forward_and_backward_trace_as_one_graph(shared_conditioning, reinsertion):
    model = tiny_tread(routes=ROUTES, shared_conditioning=shared_conditioning, route_reinsertion=reinsertion).train()
    x, t, y = tiny_inputs(batch_size=4, model=model)
    # aot_eager traces forward and backward like inductor does, without generating code (seconds, not a minute)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out = compiled(x, t, y, selection_ratio=[0.5, 0.25])
    torch.manual_seed(0)
    eager = model(x, t, y, selection_ratio=[0.5, 0.25])
    # same draws from the global RNG, same subsets, same numbers (no code generation: the same kernels)
    assert [m.sum().item() for m in out.route_masks] == [m.sum().item() for m in eager.route_masks] == [32, 16]
    assert all(torch.equal(a, b) for a, b in zip(out.route_masks, eager.route_masks, strict=True))
    torch.testing.assert_close(out.sample, eager.sample, rtol=0, atol=1e-6)
    out.sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_inductor_compiled_eval_output_equals_eager():
    model = tiny_tread(routes=ROUTES, shared_conditioning=True).eval()
    x, t, y = tiny_inputs(model=model)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(x, t, y).sample
        eager = model(x, t, y).sample
    # generated kernels fuse and reorder float ops: equal up to float32 rounding (measured max 8e-7 here)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared_conditioning", [False, True])
def test_training_step_with_regional_compilation_has_no_graph_break(shared_conditioning):
    model = tiny_tread(routes=ROUTES, shared_conditioning=shared_conditioning).train()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")  # what train_tread.py --compile does
    objective, optimizer = get_objective("ddpm"), make_optimizer(model.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    x0, _, labels = tiny_inputs(batch_size=4, model=model)
    for _ in range(2):
        labels = drop_class_labels(labels, null_class=10, dropout_prob=0.1, generator=generator)
        loss = tread_training_loss(
            model, objective, x0, labels, generator=generator, patch_size=2, mae_loss_weight=0.1
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    assert not torch._dynamo.utils.counters["graph_break"]
    # the routed blocks run on fewer tokens: one recompilation per token count, then reused
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
