"""bench/convergence.py: the --quick smoke run, the fairness of its arms, and its speedup arithmetic."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_module

from diffusers_tread.losses import tread_loss
from diffusers_tread.objectives import get_objective


@pytest.fixture(scope="module")
def convergence():
    module = load_module(REPO / "bench" / "convergence.py", register=True)  # dataclasses look their module up
    yield module
    del sys.modules["convergence"]


def test_quick_run_writes_results_plots_and_grids(convergence, tmp_path):
    results = convergence.main(["--quick", "--threads=1", f"--output_dir={tmp_path}"])  # 1: pytest -n 2 on 2 cores
    methods = [arm["name"].split("/")[1] for arm in results["arms"]]
    assert methods == ["dense", "tread-plain 2..2@0.5", "tread-adapted 2..2@0.5"]
    dense, plain, _ = results["arms"]
    assert [r["step"] for r in dense["evals"]] == [30, 60]
    assert [r["step"] for r in plain["evals"]] == [30, 60, 84]  # routed arms run 1.4x the dense steps
    for arm in results["arms"]:
        for record in arm["evals"]:
            assert math.isfinite(record["fd"]) and record["fd"] > 0
            assert 0 <= record["accuracy"] <= 1
            assert set(record["held_out_loss_by_t"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
        assert arm["evals"][-1]["held_out_loss"] < arm["evals"][0]["held_out_loss"]  # it learns
    assert len(results["comparisons"]) == 2
    assert 0.5 < results["classifier_accuracy"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["comparisons"] == results["comparisons"]
    report = (tmp_path / "results.md").read_text()
    assert "| config | seed | method |" in report and "Crossover" in report
    for name in ("fd_vs_step.png", "fd_vs_seconds.png", "crossover.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert len(list(tmp_path.glob("samples_*.png"))) == 3

    # The report can be redone from results.json alone.
    again = convergence.main(["--from_results", str(tmp_path / "results.json"), f"--output_dir={tmp_path / 'again'}"])
    for row, redone in zip(results["comparisons"], again["comparisons"], strict=True):
        assert redone.keys() == row.keys()
        for key, value in row.items():
            if isinstance(value, float):
                assert redone[key] == pytest.approx(value, rel=1e-3), key
            else:
                assert redone[key] == value, key
    assert (tmp_path / "again" / "results.md").read_text().splitlines()[3:] == report.splitlines()[3:]


def test_arms_of_a_group_see_the_same_weights_data_and_noise(convergence):
    """A route at ratio 0 is the identity, so if data, noise and initial weights depend only on the seed (never on
    the routes or the loss), such an arm must train like the dense arm: bit for bit with the same (plain) loss, where
    the arithmetic is the same; up to float32 rounding with the adapted loss, whose masked mean (sum / count) reduces
    in another order than the plain mean (2.0532386 vs 2.0532389 on an Intel CPU)."""
    train_set, _ = convergence.load_digits(resolution=16, split="train")
    x, y = train_set.pixel_values, train_set.class_labels
    dense = convergence.Arm(4, 2, width=32, steps=4)
    identity_route = convergence.Arm(4, 2, ((1, 2, 0.0),), width=32, steps=4)
    identity_route_adapted = convergence.Arm(4, 2, ((1, 2, 0.0),), "adapted", width=32, steps=4)
    routed = convergence.Arm(4, 2, ((1, 2, 0.5),), width=32, steps=4)
    runs = [convergence.start_run(arm, 5e-4) for arm in (dense, identity_route, identity_route_adapted, routed)]
    for run in runs:
        convergence.train_steps(run, x, y, 4, batch_size=8)
    weights = [torch.cat([p.detach().flatten() for p in run.model.parameters()]) for run in runs]
    assert runs[0].train_losses == runs[1].train_losses
    assert torch.equal(weights[0], weights[1])
    # Relative loss differences of a few float32 ulps; Adam turns them into weight differences of at most ~lr * 1e-3.
    assert runs[2].train_losses == pytest.approx(runs[0].train_losses, rel=1e-5)
    torch.testing.assert_close(weights[2], weights[0], rtol=0, atol=1e-6)
    assert not torch.equal(weights[0], weights[3])


def reference_train_steps(convergence, run, train_x, train_y, num_steps, batch_size, class_dropout_prob=0.1):
    """The step bench/convergence.py ran before it used diffusers_tread.training_utils (its results were made with
    it), written out: data, label dropout and noise from the data generator, routes from the route generator,
    tread_loss with its default MAE weight, the ratio warm-up as ratio * step / warmup_steps."""
    arm, model, objective = run.arm, run.model, get_objective(run.arm.objective)
    for _ in range(num_steps):
        batch = torch.randint(0, len(train_x), (batch_size,), generator=run.data_generator)
        x0, labels = train_x[batch], train_y[batch]
        drop = torch.rand(batch_size, generator=run.data_generator) < class_dropout_prob
        labels = torch.where(drop, torch.full_like(labels, 10), labels)
        inputs = objective.training_inputs(x0, generator=run.data_generator)
        ratios = None
        if arm.ratio_warmup_steps and run.step < arm.ratio_warmup_steps:
            ratios = [ratio * run.step / arm.ratio_warmup_steps for _, _, ratio in arm.routes]
        output = model(inputs.model_input, inputs.timestep, labels, selection_ratio=ratios,
                       route_generator=run.route_generator)  # fmt: skip
        per_element = objective.per_element_loss(output.sample, x0, inputs)
        adapted = arm.loss == "adapted" and bool(output.route_masks)
        loss = tread_loss(per_element, output.route_masks, arm.patch_size, mode=arm.loss,
                          denoised=objective.denoised(output.sample, inputs) if adapted else None,
                          noisy_input=inputs.noisy_sample if adapted else None)  # fmt: skip
        convergence.update(run, loss)  # backward, optimiser and EMA step: shared


def test_the_library_step_reproduces_the_benchmarks_earlier_step(convergence, monkeypatch):
    """train_steps runs diffusers_tread.training_utils' step (label dropout, tread_training_loss, the ratio schedule,
    make_optimizer's multi-tensor AdamW) and reproduces the step the recorded results came from bit for bit, on this
    CPU: the same draws in the same order and the same arithmetic. One formula differs in rounding order: the warm-up
    ratio, ratio * (step / warmup) instead of (ratio * step) / warmup, equal for ratio 0.5 (a power of two, as every
    recorded ramp) and within one float32 ulp otherwise (which can move a kept-token count only at an exact tie)."""
    calls = []
    library_loss = convergence.tread_training_loss
    monkeypatch.setattr(convergence, "tread_training_loss", lambda *a, **k: calls.append(k) or library_loss(*a, **k))
    train_set, _ = convergence.load_digits(resolution=16, split="train")
    x, y = train_set.pixel_values, train_set.class_labels
    arms = [
        convergence.Arm(4, 2, width=32, steps=5),
        convergence.Arm(4, 2, ((1, 2, 0.5),), "adapted", width=32, steps=5),
        convergence.Arm(4, 2, ((1, 2, 0.5),), width=32, steps=5, ratio_warmup_steps=3),
        convergence.Arm(4, 2, ((1, 2, 0.5),), "adapted", width=32, steps=5, objective="edm"),
        convergence.Arm(2, 2, ((0, 0, 0.5),), backbone="ssm", width=16, steps=2),
    ]
    for arm in arms:
        ours, reference = convergence.start_run(arm, 5e-4), convergence.start_run(arm, 5e-4)
        reference.optimizer = torch.optim.AdamW(reference.model.parameters(), lr=5e-4, weight_decay=0.0)
        convergence.train_steps(ours, x, y, arm.steps, batch_size=8)
        reference_train_steps(convergence, reference, x, y, arm.steps, batch_size=8)
        assert ours.train_losses == reference.train_losses, arm.name
        for mine, theirs in zip(ours.model.parameters(), reference.model.parameters(), strict=True):
            assert torch.equal(mine, theirs), arm.name
    assert len(calls) == sum(arm.steps for arm in arms)
    assert [call["selection_ratio"] for call in calls[10:15]] == [[0.0], [0.5 / 3], [1.0 / 3], None, None]


def test_crossing_and_interpolation(convergence):
    evals = [{"step": 100, "seconds": 10.0, "fd": 50.0}, {"step": 200, "seconds": 20.0, "fd": 30.0},
             {"step": 300, "seconds": 30.0, "fd": 20.0}]  # fmt: skip
    assert convergence.crossing(evals, 40.0, "step") == pytest.approx(150.0)
    assert convergence.crossing(evals, 30.0, "seconds") == pytest.approx(20.0)
    assert convergence.crossing(evals, 60.0, "step") == 100.0  # already below at the first evaluation
    assert convergence.crossing(evals, 10.0, "step") is None  # never reached
    assert convergence.value_at(evals, 250, "step") == pytest.approx(25.0)
    assert convergence.value_at(evals, 350, "step") is None  # beyond the arm's run


@pytest.mark.parametrize("plan", ["default", "full"])
def test_plans_cover_the_sweep(convergence, plan):
    arms = convergence.plan_arms(plan, steps=1000, routed_steps_factor=1.4)
    configs = {(arm.num_layers, arm.tokens) for arm in arms}
    assert configs == {(8, 64), (12, 64), (16, 64)} | ({(12, 256)} if plan == "full" else set())
    main = [arm for arm in arms if (arm.num_layers, arm.tokens) == (12, 64)]
    assert {arm.seed for arm in main if arm.loss == "plain"} == {0, 1}
    assert {arm.seed for arm in main if arm.loss == "adapted"} == ({0, 1} if plan == "full" else {0})
    assert all(arm.steps == (1400 if arm.routes else 1000) for arm in arms)
    assert len({arm.name for arm in arms}) == len(arms)
    assert len(arms) == (15 if plan == "full" else 9)


def test_the_state_space_backbone_trains_and_is_judged(convergence):
    """`--plan ssm` builds TreadSSM2DModel arms; a routed step runs and the evaluation path accepts the model."""
    train_set, _ = convergence.load_digits(resolution=16, split="train")
    arm = convergence.Arm(2, 2, ((0, 0, 0.5),), backbone="ssm", width=16, steps=2)
    run = convergence.start_run(arm, 5e-4)
    assert type(run.model).__name__ == "TreadSSM2DModel"
    convergence.train_steps(run, train_set.pixel_values, train_set.class_labels, 2, batch_size=4)
    assert len(run.train_losses) == 2 and all(math.isfinite(loss) for loss in run.train_losses)
    assert {arm.backbone for arm in convergence.plan_arms("ssm", 1000, 1.4)} == {"ssm"}


def test_a_ratio_ramp_starts_dense(convergence):
    """`--plan ratio_ramp` (issue #6): at step 0 the ramped ratio is 0, so the first step is the dense one."""
    train_set, _ = convergence.load_digits(resolution=16, split="train")
    x, y = train_set.pixel_values, train_set.class_labels
    dense = convergence.Arm(4, 2, width=32, steps=3)
    ramp = convergence.Arm(4, 2, ((1, 2, 0.5),), width=32, steps=3, ratio_warmup_steps=2)
    runs = [convergence.start_run(arm, 5e-4) for arm in (dense, ramp)]
    for run in runs:
        convergence.train_steps(run, x, y, 3, batch_size=8)
    assert runs[0].train_losses[0] == runs[1].train_losses[0]
    assert runs[0].train_losses[1:] != runs[1].train_losses[1:]
    assert ramp.method == "tread-plain 1..2@0.5 ramp2"


def test_seconds_follow_a_ratio_ramps_falling_step_cost(convergence):
    """Steps times the median step time; during a ratio warm-up, per 20-step window (its steps get cheaper)."""
    from types import SimpleNamespace

    times = [1.0] * 20 + [0.6] * 20 + [0.5] * 59 + [9.0]  # 100 steps; the last one hit by a neighbour's burst
    plain = SimpleNamespace(arm=convergence.Arm(4, 2), step=100, step_seconds=times)
    assert convergence.seconds(plain) == pytest.approx(100 * 0.5)
    ramp = SimpleNamespace(arm=convergence.Arm(4, 2, ratio_warmup_steps=40), step=100, step_seconds=times)
    assert convergence.seconds(ramp) == pytest.approx(20 * 1.0 + 20 * 0.6 + 60 * 0.5)


def test_repa_quick_run_writes_every_arm_and_caches_the_teacher(convergence, tmp_path, monkeypatch):
    """`--plan repa --quick` (issue #25): dense, TREAD, REPA, TREAD+REPA kept and delayed, judged and tabulated; the
    ViT teacher is trained once on the train split and then loaded from its cache folder."""
    teacher_dir = tmp_path / "teacher"
    argv = ["--plan", "repa", "--quick", f"--output_dir={tmp_path / 'out'}", f"--teacher_dir={teacher_dir}"]
    results = convergence.main(argv)
    methods = [arm["name"].split("/")[1] for arm in results["arms"]]
    assert methods == ["dense", "tread-plain 1..3@0.5", "repa@1", "tread-plain 1..3@0.5 +repa@1 kept",
                       "tread-plain 1..3@0.5 +repa@1 delayed"]  # fmt: skip
    for arm in results["arms"]:
        assert arm["evals"] and all(math.isfinite(record["fd"]) for record in arm["evals"])
    assert [row["method"] for row in results["comparisons"]] == methods[1:]  # each against the dense arm
    teacher = results["teacher"]
    assert teacher["trained_on"] == "digits train split" and teacher["seed"] != 0  # the judge's CNN has seed 0
    assert (Path(teacher["folder"]) / "config.json").is_file() and Path(teacher["folder"]).parent == teacher_dir
    report = (tmp_path / "out" / "results.md").read_text()
    assert "REPA (issue #25)" in report and "| tread-plain 1..3@0.5 +repa@1 delayed | 1 |" in report

    def untrained(*args, **kwargs):
        raise AssertionError("the cached teacher was trained again")

    monkeypatch.setattr(convergence, "train_teacher", untrained)
    args = convergence.parse_args(argv)
    encoder, info = convergence.load_teacher(args, None, token_grid=8)
    assert info == teacher and encoder.feature_dim == 64


def _reference_repa_step(convergence, run, x, y, batch_size, delayed):
    """One REPA step written out, with the targets gathered by hand from the route's bypass mask (not from the
    model's captured indices): plain flow loss + 0.5 * minus the mean cosine similarity (REPA Eq. 8)."""
    objective = get_objective("flow")
    batch = torch.randint(0, len(x), (batch_size,), generator=run.data_generator)
    x0, labels = x[batch], y[batch]
    drop = torch.rand(batch_size, generator=run.data_generator) < 0.1
    labels = torch.where(drop, torch.full_like(labels, 10), labels)
    inputs = objective.training_inputs(x0, generator=run.data_generator)
    layer = run.arm.repa_layer
    output = run.model(inputs.model_input, inputs.timestep, labels, route_generator=run.route_generator,
                       capture_layer_idx=layer, delay_routing_after=layer if delayed else None)  # fmt: skip
    flow = tread_loss(objective.per_element_loss(output.sample, x0, inputs), output.route_masks, 2, mode="plain")
    targets = run.repa_targets[batch]
    if not delayed:  # only the tokens that did not bypass the route, in position order
        targets = torch.stack(
            [targets[b][(~mask).nonzero().squeeze(1)] for b, mask in enumerate(output.route_masks[0])]
        )
    projected = run.projector(output.captured_hidden_states)
    cosine = (projected * targets).sum(-1) / (projected.norm(dim=-1) * targets.norm(dim=-1))
    return flow, -cosine.mean(), output, targets


@pytest.mark.parametrize("delayed", [False, True])
def test_the_kept_token_arm_aligns_only_the_kept_tokens(convergence, delayed):
    """The kept-token arm aligns block 1 (inside route 1..2) on the kept half of the tokens only, against the
    teacher features of exactly those positions; the delayed arm aligns every token. Checked against the step
    written out with a hand-written gather (tolerance: the hand-written cosine reduces in another order than
    F.cosine_similarity, a few float32 ulps)."""
    train_set, _ = convergence.load_digits(resolution=16, split="train")
    x, y = train_set.pixel_values, train_set.class_labels
    features = torch.randn(len(x), 64, 8, generator=torch.Generator().manual_seed(0))
    arm = convergence.Arm(4, 2, ((1, 2, 0.5),), width=32, steps=2, repa_layer=1, repa_delayed=delayed)
    ours = convergence.start_run(arm, 5e-4, features, projector_dim=16)
    reference = convergence.start_run(arm, 5e-4, features, projector_dim=16)
    convergence.train_steps(ours, x, y, 1, batch_size=8)
    flow, alignment, output, targets = _reference_repa_step(convergence, reference, x, y, 8, delayed)
    assert output.captured_hidden_states.shape[1] == (64 if delayed else 32)
    assert ours.train_losses[0] == pytest.approx((flow + 0.5 * alignment).item(), rel=1e-6)
    # The alignment term depends on which targets are used: the first 32 tokens instead of the kept ones differ.
    if not delayed:
        wrong = reference.repa_targets[:8, :32]
        projected = reference.projector(output.captured_hidden_states)
        assert not torch.allclose(torch.nn.functional.cosine_similarity(projected, wrong, dim=-1).mean(),
                                  -alignment)  # fmt: skip
        assert not torch.equal(targets, wrong)
    # The projector trains (it is in the optimizer), the model's EMA does not hold it.
    assert ours.projector is not None and len(ours.ema.shadow_params) == len(list(ours.model.parameters()))


def test_repa_plan_arms(convergence):
    """`--plan repa`: per seed (two), the five arms on depth 8 with route 2..4 and REPA on block 2, inside it."""
    arms = convergence.plan_arms("repa", steps=300, routed_steps_factor=4 / 3)
    assert len(arms) == 10 and {arm.seed for arm in arms} == {0, 1}
    assert [arm.method for arm in arms[:5]] == ["dense", "tread-plain 2..4@0.5", "repa@2",
                                                "tread-plain 2..4@0.5 +repa@2 kept",
                                                "tread-plain 2..4@0.5 +repa@2 delayed"]  # fmt: skip
    assert [arm.steps for arm in arms[:5]] == [300, 400, 300, 400, 400]
    assert [arm.is_baseline for arm in arms[:5]] == [True, False, False, False, False]
    for arm in arms:
        if arm.repa_delayed:
            convergence.check_delayed_routing(convergence.route_dicts(arm), arm.repa_layer)  # raises if invalid
