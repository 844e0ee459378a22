"""The whole training step as one compiled graph (issue #24, item 1): the step's random draws made ahead of it
(`draw_step_randomness`) are a fixed function of the generator and give the numbers the eager step draws as it goes;
`compile_step_loss` traces forward, loss and backward with ``fullgraph=True`` (which raises on any graph break) and
computes eager's loss and gradients; ``train_tread.py --compile --compile_scope step`` trains a routed model."""

import functools

import pytest
import torch
from conftest import launch, tiny_inputs, tiny_tread, transformer_weights

from diffusers_tread.losses import tread_loss
from diffusers_tread.objectives import get_objective
from diffusers_tread.routing import draw_kept_indices
from diffusers_tread.training_utils import (
    compile_step_loss,
    draw_step_randomness,
    drop_class_labels,
    make_optimizer,
    tread_step_loss,
)

ROUTES = [
    {"start_layer_idx": 0, "end_layer_idx": 1, "selection_ratio": 0.5},
    {"start_layer_idx": 3, "end_layer_idx": 4, "selection_ratio": 0.25},
]
NULL_CLASS = 10  # tiny_tread's label table: 10 classes + the null row


# Dynamo's caches and graph-break counters start empty in every test (conftest's fresh_dynamo).
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def step_loss(model, objective):
    return functools.partial(
        tread_step_loss, model, objective, null_class=NULL_CLASS, patch_size=2, loss_mode="adapted",
        mae_loss_weight=0.1,
    )  # fmt: skip


@pytest.mark.parametrize("objective_name", ["ddpm", "flow", "edm"])
def test_draws_made_ahead_give_the_eager_step_that_draws_as_it_goes(objective_name):
    """Same generator state -> same draws; and the loss from them is, bit for bit, the loss of the step that drops the
    labels, noises and routes drawing from the generator as it goes (`drop_class_labels`, `training_inputs`, the
    forward's ``route_generator``): the same calls in the same order, so checkpointed generators resume the same."""
    model = tiny_tread(routes=ROUTES, shared_conditioning=True).train()
    objective = get_objective(objective_name)
    x0, _, labels = tiny_inputs(batch_size=4, model=model)

    first = draw_step_randomness(model, objective, x0, torch.Generator().manual_seed(3), 0.5)
    again = draw_step_randomness(model, objective, x0, torch.Generator().manual_seed(3), 0.5)
    for name in ("time", "noise", "label_drop"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert [k.shape for k in first.kept_indices] == [(4, 8), (4, 12)]  # 16 tokens, floor(16 r) bypass
    assert all(torch.equal(a, b) for a, b in zip(first.kept_indices, again.kept_indices, strict=True))
    ahead = step_loss(model, objective)(x0, labels, first)

    generator = torch.Generator().manual_seed(3)
    dropped = drop_class_labels(labels, NULL_CLASS, 0.5, generator)
    inputs = objective.training_inputs(x0, generator=generator)
    output = model(inputs.model_input, timestep=inputs.timestep, class_labels=dropped, route_generator=generator)
    per_element = objective.per_element_loss(output.sample.float(), x0, inputs)
    denoised = objective.denoised(output.sample.float(), inputs)
    as_it_goes = tread_loss(per_element, output.route_masks, 2, "adapted", denoised, inputs.noisy_sample, 0.1)
    assert torch.equal(ahead, as_it_goes)
    # and the draws are where the generator stood: the next draw is the same in both
    assert torch.equal(torch.rand(3, generator=generator), _after_draws(model, objective, x0, 3))


def _after_draws(model, objective, x0, seed):
    generator = torch.Generator().manual_seed(seed)
    draw_step_randomness(model, objective, x0, generator, 0.5)
    return torch.rand(3, generator=generator)


def test_kept_indices_must_match_the_routes():
    model = tiny_tread(routes=ROUTES).train()
    x, t, y = tiny_inputs(batch_size=2, model=model)
    kept = draw_kept_indices(model.active_routes(), 2, 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="1 entries for 2 routes"):
        model(x, t, y, route_kept_indices=kept[:1])
    with pytest.raises(ValueError, match="need"):
        model(x, t, y, selection_ratio=[0.25, 0.25], route_kept_indices=kept)
    assert model.eval().active_routes() == []


def test_resume_after_steps_is_bit_exact_in_eager():
    """Four eager steps straight, or two, a save of model, optimizer and generator, a fresh start from them and two
    more: the same weights to the bit (the draws depend on the generator's state alone)."""
    objective = get_objective("flow")
    x0, _, labels = tiny_inputs(batch_size=4, model=tiny_tread())

    def train(model, optimizer, generator, steps):
        for _ in range(steps):
            draws = draw_step_randomness(model, objective, x0, generator, 0.1)
            step_loss(model, objective)(x0, labels, draws).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    straight = tiny_tread(routes=ROUTES).train()
    optimizer = make_optimizer(straight.parameters(), 1e-3)
    train(straight, optimizer, torch.Generator().manual_seed(0), 4)

    first = tiny_tread(routes=ROUTES).train()
    optimizer, generator = make_optimizer(first.parameters(), 1e-3), torch.Generator().manual_seed(0)
    train(first, optimizer, generator, 2)
    saved = (first.state_dict(), optimizer.state_dict(), generator.get_state())
    resumed = tiny_tread(seed=1, routes=ROUTES).train()
    resumed.load_state_dict(saved[0])
    optimizer = make_optimizer(resumed.parameters(), 1e-3)
    optimizer.load_state_dict(saved[1])
    generator = torch.Generator()
    generator.set_state(saved[2])
    train(resumed, optimizer, generator, 2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_whole_step_compiles_as_one_graph_with_eager_loss_and_gradients():
    """Forward, DDPM's hybrid loss with the adapted TREAD loss (MAE term) over two routes, and backward, under
    ``fullgraph=True`` (a break raises). aot_eager traces what inductor traces without generating code (seconds, not
    a minute); it runs the traced ATen ops, whose order can differ from eager's, so a stated float32 tolerance."""
    # 4 blocks, two one-block routes: the graph (and its compile time) grows with the depth, the code paths do not
    routes = [{"start_layer_idx": 0, "end_layer_idx": 0, "selection_ratio": 0.5}, {**ROUTES[1], "end_layer_idx": 3}]
    model = tiny_tread(routes=routes, shared_conditioning=True, num_layers=4).train()
    objective = get_objective("ddpm")
    x0, _, labels = tiny_inputs(batch_size=4, model=model)
    draws = draw_step_randomness(model, objective, x0, torch.Generator().manual_seed(0), 0.1)
    loss_fn = step_loss(model, objective)

    eager = loss_fn(x0, labels, draws)
    eager.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = compile_step_loss(loss_fn, backend="aot_eager")
    loss = compiled(x0, labels, draws)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)
    # a second micro-step accumulates into .grad (gradient accumulation), with no recompilation
    compiled(x0, labels, draws)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * reference[name], rtol=1e-5, atol=2e-7, msg=name)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_script_trains_a_routed_model_with_the_whole_step_compiled(tmp_path, accelerate_config):
    """``--compile --compile_scope step`` (aot_eager, to stay fast) trains the routed default model (the paper's route
    on DiT-Tiny/2) to the losses and weights the eager step reaches, within float32 rounding of the traced op order."""
    common = ["--max_train_steps=2", "--validation_steps=100", "--checkpointing_steps=100", "--logging_steps=1"]
    compiled = ["--compile", "--compile_scope=step", "--compile_backend=aot_eager"]
    for name, extra in (("eager", []), ("compiled", compiled)):
        launch(accelerate_config, f"--output_dir={tmp_path / name}", "--tread_loss=adapted", *common, *extra)
    losses = {name: _losses(tmp_path / name) for name in ("eager", "compiled")}
    assert len(losses["eager"]) == 2 and losses["eager"][0] != losses["eager"][1]  # it trained: the loss moved
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=0)
    eager, whole = transformer_weights(tmp_path / "eager"), transformer_weights(tmp_path / "compiled")
    for key in eager:
        torch.testing.assert_close(whole[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)


def _losses(folder) -> list[float]:
    rows = [row.split(",") for row in (folder / "loss_history.csv").read_text().splitlines()]
    return [float(row[1]) for row in rows if row[0].isdigit()]  # (step, loss, seconds), after a header
