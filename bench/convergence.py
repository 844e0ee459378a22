"""Convergence at laptop scale: dense DiT vs TREAD on the bundled digits, against steps and wall-clock (issue #4).

Every arm trains from the same seed on the same batches with the same noise (one data/noise generator per seed,
routing draws from its own generator), rectified flow, AdamW, EMA with warm-up. Arms with the same model size and
seed form a group: a dense arm (no routes) and routed arms (TREAD, plain or adapted loss). Arms run interleaved,
`--chunk_steps` steps at a time, so a noisy neighbour on a shared machine slows every arm alike. Every training step
is timed; an arm's "seconds" at step k are k times its median step time (a step's cost is fixed by the arm's shapes,
and the median ignores bursts from other processes; during a ratio warm-up, medians of 20-step windows); the raw sum of step times is kept as "wall_seconds".
Evaluation time is never counted.

At every `--eval_every` steps the EMA weights, in eval mode (all tokens, as sampling), are measured on the held-out
split of the digits, with a small CNN classifier trained once on the train split:
  - FD: Frechet distance between classifier features of class-balanced samples (`TreadDiTPipeline`, no guidance,
    the objective's Euler scheduler; DPM-Solver++ for DDPM) and of the held-out images; `floor` is the FD of as many real train images vs the held-out ones,
    the score of a perfect generator at this sample size.
  - accuracy: the classifier's accuracy on the samples, against the classes they were drawn for.
  - held-out loss: the flow loss on the held-out images at fixed noise levels and fixed noise.

Headline, the paper's definition of speedup (ICCV Sec. 4.2) at our scale: the steps and seconds a routed arm needs
to reach its dense arm's final FD (linear interpolation between evaluations), as ratios of the dense arm's.

    python bench/convergence.py                 # the default plan (main comparison, depth sweep), 24 min on 2 cores
    python bench/convergence.py --plan full     # + route placement/ratio, 256 tokens, adapted loss on 2 seeds: ~100 min
    python bench/convergence.py --quick         # the same code on tiny settings, ~2 minutes (a CI smoke test)
    python bench/convergence.py --plan objectives   # which objective gives the best dense baseline
    python bench/convergence.py --plan ssm          # the state-space backbone (compare with the depth-8 DiT group)
    python bench/convergence.py --plan ratio_ramp   # routing from step 0 vs the selection ratio ramped up (#6)
    python bench/convergence.py --plan repa         # REPA with and without routes (#25), 56 min on a loaded machine
    python bench/convergence.py --plan repa --quick # its smoke test (seconds of training)

`--plan repa` (issue #25): per seed, dense, TREAD, REPA (arXiv 2410.06940, `diffusers_tread.repa`: projector,
Eq. 8, lambda 0.5), TREAD+REPA aligning the kept tokens of the route's block (targets gathered with the same kept
indices) and TREAD+REPA with delayed routing (the route's tokens leave only after the aligned block). The REPA
targets are the patch features of a teacher that is not the judge: a small ViT classifier (another architecture and
seed than the judge's CNN) trained once on the train split only and cached under --teacher_dir (git-ignored),
loaded as a `RepaEncoder`; its features of every train image are computed once before training (as
``extract_latents.py --repa_encoder`` precomputes them), so no encoder runs in the timed steps. The projector is
training-only: it trains with the model's AdamW, outside the EMA, and plays no part in evaluation.

Each plan writes to bench/results/convergence_<plan>/ unless --output_dir says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from torch import nn

from diffusers_tread import TreadTransformer2DModel
from diffusers_tread.data import load_digits  # noqa: F401  (the tests read it from here)
from diffusers_tread.digits_judge import (  # noqa: F401  (DigitClassifier, train_classifier: defined here before)
    BenchRun,
    DigitClassifier,
    compare_to_baseline,
    crossing,
    fmt,
    machine_description,
    make_digits_judge,
    mean_over,
    sample_digits,
    score_samples,
    train_classifier,
    value_at,
)
from diffusers_tread.objectives import get_objective
from diffusers_tread.repa import (
    REPA_LOSS_WEIGHT,
    RepaEncoder,
    RepaProjector,
    RepaTerm,
    check_delayed_routing,
)
from diffusers_tread.training_utils import (
    NoiseFrom,
    drop_class_labels,
    make_optimizer,
    scheduled_selection_ratios,
    tread_training_loss,
)

RESOLUTION = 16  # the 8x8 digits upscaled 2x, as the README's main job
HELD_OUT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)  # flow times t of the held-out loss
MAE_LOSS_WEIGHT = 0.1  # the adapted (v1) loss's MAE term, as the paper's v1 and train_tread.py's default


@dataclass(frozen=True)
class Arm:
    """One training run. ``routes`` is ``((start, end, selection_ratio), ...)``; empty for the dense baseline."""

    num_layers: int
    patch_size: int
    routes: tuple[tuple[int, int, float], ...] = ()
    loss: str = "plain"
    seed: int = 0
    steps: int = 1000
    objective: str = "flow"
    backbone: str = "dit"
    width: int = 64  # 4 heads of 16, the width of DiT-Tiny/2
    ratio_warmup_steps: int = (
        0  # ramp every route's ratio linearly from 0 (train_tread.py --selection_ratio_warmup_steps)
    )
    repa_layer: int | None = None  # REPA on this block's output (0-indexed); inside a route: its kept tokens only
    repa_delayed: bool = False  # delayed routing: the route covering repa_layer lets tokens leave only after it

    @property
    def is_baseline(self) -> bool:
        """The dense arm of a group: no routes, no alignment."""
        return not self.routes and self.repa_layer is None

    @property
    def tokens(self) -> int:
        return (RESOLUTION // self.patch_size) ** 2

    @property
    def group(self) -> str:
        """Arms that are compared with each other: same backbone, size, tokens, objective and seed."""
        return f"{self.backbone}-d{self.num_layers}-w{self.width}-t{self.tokens}-{self.objective}-s{self.seed}"

    @property
    def config_name(self) -> str:
        return f"{self.backbone} depth {self.num_layers}, width {self.width}, {self.tokens} tokens"

    @property
    def method(self) -> str:
        repa = ""
        if self.repa_layer is not None:
            inside = any(start <= self.repa_layer <= end for start, end, _ in self.routes)
            repa = f"repa@{self.repa_layer}" + (" delayed" if self.repa_delayed else " kept" if inside else "")
        if not self.routes:
            return repa or "dense"
        spans = "+".join(f"{start}..{end}@{ratio:g}" for start, end, ratio in self.routes)
        ramp = f" ramp{self.ratio_warmup_steps}" if self.ratio_warmup_steps else ""
        return f"tread-{self.loss} {spans}{ramp}" + (f" +{repa}" if repa else "")

    @property
    def name(self) -> str:
        return f"{self.group}/{self.method}"


def route_dicts(arm: Arm) -> list[dict]:
    return [{"start_layer_idx": s, "end_layer_idx": e, "selection_ratio": r} for s, e, r in arm.routes]


def paper_route(num_layers: int, ratio: float = 0.5) -> tuple[tuple[int, int, float], ...]:
    """The paper's default route, layers 2 .. depth-4 at 0.5 (ICCV Sec. 4.1)."""
    return ((2, num_layers - 4, ratio),)


def plan_arms(plan: str, steps: int, routed_steps_factor: float) -> list[Arm]:
    """The arms of a plan. Routed arms run ``routed_steps_factor`` times the dense steps, so that they can reach the
    dense arm's final quality even if they need more steps, and be compared with it at equal wall-clock."""
    routed_steps = round(steps * routed_steps_factor)
    arms: list[Arm] = []

    def group(num_layers, patch_size, routed, seeds=(0,), **kw):
        for seed in seeds:
            arms.append(Arm(num_layers, patch_size, seed=seed, steps=steps, **kw))
            for routes, loss in routed:
                arms.append(Arm(num_layers, patch_size, routes, loss, seed=seed, steps=routed_steps, **kw))

    def repa_group(num_layers, route, layer, seeds, **kw):
        """Issue #25: dense, TREAD, REPA, TREAD+REPA aligning the kept tokens of the route's block ``layer``, and
        delayed routing (the route's tokens leave only after ``layer``)."""
        for seed in seeds:
            arms.append(Arm(num_layers, 2, seed=seed, steps=steps, **kw))
            arms.append(Arm(num_layers, 2, route, seed=seed, steps=routed_steps, **kw))
            arms.append(Arm(num_layers, 2, seed=seed, steps=steps, repa_layer=layer, **kw))
            for delayed in (False, True):
                arms.append(Arm(num_layers, 2, route, seed=seed, steps=routed_steps, repa_layer=layer,
                                repa_delayed=delayed, **kw))  # fmt: skip

    if plan == "quick":
        group(6, 2, [(paper_route(6), "plain"), (paper_route(6), "adapted")], width=32)
    elif plan == "repa":
        # Depth 8 (the paper route 2..4), REPA on block 2, the route's first: 3/8 of the depth, near the paper's
        # 8/28 (default_repa_layer(8) is block 1, outside the route; the ablation aligns inside it).
        repa_group(8, paper_route(8), 2, seeds=(0, 1))
    elif plan == "repa_quick":
        repa_group(6, ((1, 3, 0.5),), 1, seeds=(0,), width=32)
    elif plan == "objectives":
        for objective in ("flow", "ddpm", "edm"):
            arms.append(Arm(8, 2, steps=steps, objective=objective))
    elif plan == "ratio_ramp":
        # Issue #6: the paper route from the first step vs its ratio ramped up over the first 400 steps, from scratch.
        group(12, 2, [(paper_route(12), "plain")])
        arms.append(Arm(12, 2, paper_route(12), "plain", steps=routed_steps, ratio_warmup_steps=400))
    elif plan == "ssm":
        # The state-space backbone (bidirectional Mamba blocks), beside the default plan's depth-8 DiT group.
        group(8, 2, [(paper_route(8), "plain")], backbone="ssm")
    elif plan in ("default", "full"):
        # Main comparison: dense vs TREAD (paper route) with the plain loss on two seeds, the adapted loss on one
        # ("full": on both).
        group(12, 2, [(paper_route(12), "plain"), (paper_route(12), "adapted")])
        group(12, 2, [(paper_route(12), "plain")] + [(paper_route(12), "adapted")] * (plan == "full"), seeds=(1,))
        if plan == "full":
            # Route placement and ratio at the same size: longer route, higher ratio, two routes.
            for routes in (((1, 9, 0.5),), ((2, 8, 0.75),), ((1, 4, 0.5), (6, 9, 0.5))):
                arms.append(Arm(12, 2, routes, "plain", seed=0, steps=routed_steps))
        # Crossover sweep: depth 8 and 16 at 64 tokens ("full": and 256 tokens, patch 1, at depth 12).
        group(8, 2, [(paper_route(8), "plain")])
        group(16, 2, [(paper_route(16), "plain")])
        if plan == "full":
            group(12, 1, [(paper_route(12), "plain")])
    else:
        raise ValueError(f"unknown plan {plan!r}")
    return arms


# ----------------------------------------------------------------------------------------------------------------------
# The judge: a small CNN trained once on the train split (diffusers_tread.digits_judge)
# ----------------------------------------------------------------------------------------------------------------------


def make_judge(args):
    """The digits' splits, the classifier, its held-out accuracy, the held-out feature statistics and the FD floor
    (`diffusers_tread.digits_judge.make_digits_judge`)."""
    return make_digits_judge(args.classifier_epochs, resolution=RESOLUTION)


# ----------------------------------------------------------------------------------------------------------------------
# The REPA teacher: a small ViT classifier, another architecture and seed than the judge, trained on the train split
# ----------------------------------------------------------------------------------------------------------------------


def teacher_config(token_grid: int):
    """A 4-layer ViT (width 64, 4 heads) on 1-channel images, 2-pixel patches: ``token_grid`` patches a side."""
    from transformers import ViTConfig

    return ViTConfig(image_size=2 * token_grid, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=128)  # fmt: skip


def train_teacher(train_x: torch.Tensor, train_y: torch.Tensor, token_grid: int, epochs: int, seed: int):
    """The ViT with a linear head on the mean of its patch tokens, trained by cross-entropy on the train split only
    (Adam 1e-3, batch 64, fixed batch order), on the inputs `RepaEncoder` gives it (images in [0, 1]); returns the
    ViT without the head, frozen."""
    from transformers import ViTModel

    torch.manual_seed(seed)
    vit = ViTModel(teacher_config(token_grid))
    head = nn.Linear(vit.config.hidden_size, 10)
    optimizer = torch.optim.Adam([*vit.parameters(), *head.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=generator).split(64):
            tokens = vit(pixel_values=(train_x[batch] + 1) / 2).last_hidden_state[:, 1:]
            loss = F.cross_entropy(head(tokens.mean(1)), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    vit.eval().requires_grad_(False)
    head.eval()
    return vit, head


def load_teacher(args, judge, token_grid: int) -> tuple[RepaEncoder, dict]:
    """The trained teacher as a `RepaEncoder` (the library's encoder path, as ``train_tread.py --repa_encoder``),
    trained once and cached under ``--teacher_dir`` (git-ignored); its held-out accuracy (mean-pooled patch tokens,
    through the trained head) is recorded beside it."""
    folder = Path(args.teacher_dir) / f"digits_vit_g{token_grid}_e{args.teacher_epochs}_s{args.teacher_seed}"
    info_path = folder / "teacher.json"
    if not info_path.is_file():
        vit, head = train_teacher(judge.train_x, judge.train_y, token_grid, args.teacher_epochs, args.teacher_seed)
        with torch.no_grad():
            tokens = vit(pixel_values=(judge.test_x + 1) / 2).last_hidden_state[:, 1:]
            accuracy = (head(tokens.mean(1)).argmax(1) == judge.test_y).float().mean().item()
        vit.save_pretrained(folder)
        info = {"architecture": "ViT, 4 layers, width 64, 2-px patches", "epochs": args.teacher_epochs,
                "seed": args.teacher_seed, "trained_on": "digits train split", "held_out_accuracy": accuracy}  # fmt: skip
        info_path.write_text(json.dumps(info, indent=1))
    info = {**json.loads(info_path.read_text()), "folder": str(folder)}
    return RepaEncoder.from_pretrained(str(folder), token_grid), info


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Run(BenchRun):
    arm: Arm
    last_images: torch.Tensor | None = None  # the last evaluation's samples, for the grids
    projector: nn.Module | None = None  # REPA arms: the training-only projector (not in the EMA, not evaluated)
    repa_targets: torch.Tensor | None = None  # REPA arms: the teacher's (len(train_x), tokens, D) patch features


def build_model(arm: Arm) -> nn.Module:
    torch.manual_seed(arm.seed)  # the same initial weights for every arm of a group
    objective = get_objective(arm.objective)
    if arm.backbone == "ssm":
        from diffusers_tread import TreadSSM2DModel

        return TreadSSM2DModel(
            sample_size=RESOLUTION,
            patch_size=arm.patch_size,
            in_channels=1,
            out_channels=objective.model_out_channels(1),
            num_layers=arm.num_layers,
            hidden_size=arm.width,
            num_embeds_ada_norm=10,
            routes=route_dicts(arm),
        )
    if arm.backbone != "dit":
        raise ValueError(f"unknown backbone {arm.backbone!r}")
    return TreadTransformer2DModel(
        num_attention_heads=arm.width // 16,
        attention_head_dim=16,
        in_channels=1,
        out_channels=objective.model_out_channels(1),
        num_layers=arm.num_layers,
        sample_size=RESOLUTION,
        patch_size=arm.patch_size,
        num_embeds_ada_norm=10,
        routes=route_dicts(arm),
    )


def start_run(
    arm: Arm, learning_rate: float, repa_targets: torch.Tensor | None = None, projector_dim: int = 256
) -> Run:
    """A fresh arm. REPA arms need ``repa_targets`` (the teacher's features of every train image) and get a
    `RepaProjector` of hidden width ``projector_dim``, the same initial one for every REPA arm of a seed, trained by
    the same AdamW as the model."""
    model = build_model(arm).train()
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, power=2 / 3)
    parameters = list(model.parameters())
    projector = None
    if arm.repa_layer is not None:
        if repa_targets is None:
            raise ValueError(f"{arm.name} aligns block {arm.repa_layer}: give the teacher's features (repa_targets)")
        if arm.repa_delayed:
            check_delayed_routing(route_dicts(arm), arm.repa_layer)
        torch.manual_seed(20_000 + arm.seed)
        projector = RepaProjector(arm.width, repa_targets.shape[-1], projector_dim).train()
        parameters += list(projector.parameters())
    optimizer = make_optimizer(parameters, learning_rate)  # AdamW, no weight decay, as train_tread.py
    return Run(
        arm,
        model,
        ema,
        optimizer,
        data_generator=torch.Generator().manual_seed(arm.seed),
        route_generator=torch.Generator().manual_seed(10_000 + arm.seed),
        projector=projector,
        repa_targets=repa_targets if projector is not None else None,
    )


def train_steps(run: Run, train_x, train_y, num_steps: int, batch_size: int, class_dropout_prob: float = 0.1) -> None:
    """``num_steps`` optimiser steps of the library's training step (`diffusers_tread.training_utils`: label dropout,
    `tread_training_loss`, the ratio warm-up of `scheduled_selection_ratios`); the data and noise depend only on the
    seed and the step, never on the routes (`NoiseFrom`). REPA arms add `diffusers_tread.repa`'s term (lambda 0.5,
    Eq. 8) against the teacher's features of the batch: inside a route on the kept tokens, their targets gathered
    with the same kept indices; with delayed routing on every token."""
    arm, model = run.arm, run.model
    objective = NoiseFrom(get_objective(arm.objective), run.data_generator)
    routes = route_dicts(arm)
    for _ in range(num_steps):
        started = time.perf_counter()
        batch = torch.randint(0, len(train_x), (batch_size,), generator=run.data_generator)
        labels = drop_class_labels(train_y[batch], 10, class_dropout_prob, run.data_generator)
        repa = None
        if run.projector is not None:
            repa = RepaTerm(run.projector, arm.repa_layer, REPA_LOSS_WEIGHT, arm.repa_delayed, run.repa_targets[batch])
        loss = tread_training_loss(
            model,
            objective,
            train_x[batch],
            labels,
            generator=run.route_generator,
            selection_ratio=scheduled_selection_ratios(routes, run.step, arm.steps, arm.ratio_warmup_steps),
            patch_size=arm.patch_size,
            loss_mode=arm.loss,
            mae_loss_weight=MAE_LOSS_WEIGHT if arm.loss == "adapted" else 0.0,
            repa=repa,
        )
        update(run, loss)
        run.step_seconds.append(time.perf_counter() - started)


def update(run: Run, loss: torch.Tensor) -> None:
    """Backward, optimiser and EMA step, and the step's bookkeeping."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.ema.step(run.model.parameters())
    run.train_losses.append(loss.item())
    run.step += 1


def seconds(run: Run) -> float:
    """Training time to the current step: steps times the median step time (see the module docstring).

    During a selection-ratio warm-up a step's cost falls as the ratio grows, so those steps are timed in windows of
    20 (steps times each window's median); without a warm-up this is exactly steps times the median.
    """
    times = np.asarray(run.step_seconds)
    warmup = min(run.arm.ratio_warmup_steps, len(times))
    windows = np.array_split(times[:warmup], -(-warmup // 20)) if warmup else []
    ramp = sum(len(window) * float(np.median(window)) for window in windows)
    rest = times[warmup:]
    return ramp + (len(rest) * float(np.median(rest)) if len(rest) else 0.0)


@torch.no_grad()
def evaluate(
    run: Run, classifier, reference_stats, test_x, test_y, num_samples: int, num_inference_steps: int
) -> dict:
    objective = get_objective(run.arm.objective)
    ema_model = copy.deepcopy(run.model)
    run.ema.copy_to(ema_model.parameters())
    ema_model.eval()

    # Held-out loss at fixed flow times, with noise fixed across arms and evaluations.
    generator = torch.Generator().manual_seed(1234)
    held_out = {}
    if run.arm.objective == "flow":
        for t_value in HELD_OUT_TIMES:
            noise = torch.randn(test_x.shape, generator=generator)
            t = torch.full((len(test_x),), t_value)
            x_t = (1 - t_value) * test_x + t_value * noise
            prediction = ema_model(x_t, t * objective.num_train_timesteps, test_y).sample
            held_out[f"{t_value:g}"] = F.mse_loss(prediction, noise - test_x).item()

    scheduler = objective.make_scheduler()
    if run.arm.objective == "ddpm":  # ancestral DDPM needs far more than a few steps; DPM-Solver++ does not
        # variance_type=None: the pipeline drops the learned-variance channel (DPM-Solver's own drop assumes RGB)
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, variance_type=None)
    images, labels = sample_digits(ema_model, scheduler, num_samples, num_inference_steps, seed=4321)
    fd, accuracy = score_samples(classifier, images, labels, reference_stats)
    record = {
        "step": run.step,
        "seconds": round(seconds(run), 2),
        "wall_seconds": round(sum(run.step_seconds), 2),
        "fd": fd,
        "accuracy": accuracy,
        "held_out_loss": float(np.mean(list(held_out.values()))) if held_out else None,
        "held_out_loss_by_t": held_out,
        "train_loss": float(np.mean(run.train_losses[-50:])),
    }
    run.evals.append(record)
    run.last_images = images
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------------------


def ratio(value: float | None, reference: float) -> float | None:
    return None if value is None else value / reference


def compare(runs: list[Run]) -> list[dict]:
    """Each arm against the dense arm of its group (no routes, no REPA;
    `diffusers_tread.digits_judge.compare_to_baseline`)."""
    dense = {run.arm.group: run for run in runs if run.arm.is_baseline}
    rows = []
    for run in runs:
        base = dense.get(run.arm.group)
        if run.arm.is_baseline or base is None:
            continue
        row = compare_to_baseline(run.evals, base.evals)
        final = base.evals[-1]
        rows.append(
            {
                "arm": run.arm.name,
                "group": run.arm.group,
                "config": run.arm.config_name,
                "method": run.arm.method,
                "seed": run.arm.seed,
                "step_time_ratio": row.pop("step_time_ratio"),
                "dense_layers": base.arm.num_layers,
                **row,
                "fd_ratio_at_dense_steps": ratio(row["fd_at_dense_steps"], final["fd"]),
                "fd_ratio_at_dense_seconds": ratio(row["fd_at_dense_seconds"], final["fd"]),
            }
        )
    return rows


def write_report(runs: list[Run], rows: list[dict], info: dict, out: Path) -> None:
    lines = [
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']}; torch threads {info['threads']}; total {info['total_minutes']:.1f} min.  ",
        f"Judge: classifier held-out accuracy {info['classifier_accuracy']:.3f}; FD floor (one half of the held-out "
        f"images vs the other) {info['fd_floor']:.2f}; {info['num_samples']} samples per evaluation.",
        "",
        "| arm | steps | train s | median s/step | FD | accuracy | held-out loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        last = run.evals[-1]
        lines.append(
            f"| {run.arm.name} | {last['step']} | {last['seconds']:.0f} | {last['seconds'] / last['step']:.3f} | "
            f"{last['fd']:.2f} | "
            f"{last['accuracy']:.3f} | {fmt(last['held_out_loss'], 4, '-')} |"
        )
    lines += [
        "",
        "Routed arms against their dense arm (same size, seed, data and noise); speedups reach the dense arm's final FD.",
        "",
        "| config | seed | method | step time ratio | FD at dense steps | FD at dense seconds | dense final FD | "
        "step speedup | time speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['seed']} | {row['method']} | {row['step_time_ratio']:.3f} | "
            f"{fmt(row['fd_at_dense_steps'])} | {fmt(row['fd_at_dense_seconds'], missing='ran shorter')} | {row['dense_final_fd']:.2f} | "
            f"{fmt(row['step_speedup'])} | {fmt(row['time_speedup'])} |"
        )
    paper = [row for row in rows if row["method"] == f"tread-plain 2..{row['dense_layers'] - 4}@0.5"]
    if paper:
        lines += [
            "",
            "Crossover: the paper route with the plain loss against dense, per model size (mean over seeds; FD ratios "
            "below 1 and speedups above 1 mean TREAD is ahead).",
            "",
            "| config | seeds | step time ratio | FD ratio at equal steps | FD ratio at equal seconds | time speedup |",
            "|---|---|---|---|---|---|",
        ]
        for config in dict.fromkeys(row["config"] for row in paper):
            group = [row for row in paper if row["config"] == config]

            def mean(key, group=group):
                return mean_over(group, key)

            lines.append(
                f"| {config} | {len(group)} | {mean('step_time_ratio'):.3f} | {fmt(mean('fd_ratio_at_dense_steps'))} | "
                f"{fmt(mean('fd_ratio_at_dense_seconds'), missing='ran shorter')} | {fmt(mean('time_speedup'))} |"
            )
    lines += repa_table(runs, rows)
    (out / "results.md").write_text("\n".join(lines) + "\n")


def repa_table(runs: list[Run], rows: list[dict]) -> list[str]:
    """Issue #25: per size, every arm (dense, TREAD, REPA, TREAD+REPA kept / delayed) side by side, mean over seeds
    with the seeds' values in brackets: FD at the dense arm's evaluation steps and at its final seconds."""
    if not any(run.arm.repa_layer is not None for run in runs):
        return []
    speedups = {row["arm"]: row["time_speedup"] for row in rows}
    lines = ["", "REPA (issue #25): mean over seeds (per seed in brackets); FD interpolated at the dense arm's "
             "evaluation steps and at its final training seconds; time speedup to the dense arm's final FD."]  # fmt: skip

    def cell(values, digits=1, missing="ran shorter"):
        if any(value is None for value in values):
            return missing
        each = " / ".join(f"{value:.{digits}f}" for value in values)
        return f"{np.mean(values):.{digits}f}" + (f" ({each})" if len(values) > 1 else "")

    for config in dict.fromkeys(run.arm.config_name for run in runs if run.arm.repa_layer is not None):
        members = [run for run in runs if run.arm.config_name == config]
        dense = {run.arm.group: run for run in members if run.arm.is_baseline}
        steps = [record["step"] for record in next(iter(dense.values())).evals]
        lines += ["", f"{config}:", "",
                  "| method | seeds | step time ratio | " + " | ".join(f"FD at {s} steps" for s in steps)
                  + " | FD at dense final seconds | time speedup |",
                  "|---|---|---|" + "---|" * len(steps) + "---|---|"]  # fmt: skip
        for method in dict.fromkeys(run.arm.method for run in members):
            group = [run for run in members if run.arm.method == method and run.arm.group in dense]
            bases = [dense[run.arm.group].evals[-1] for run in group]
            step_ratio = [(run.evals[-1]["seconds"] / run.evals[-1]["step"]) / (base["seconds"] / base["step"])
                          for run, base in zip(group, bases, strict=True)]  # fmt: skip
            at_steps = [cell([value_at(run.evals, s, "step") for run in group]) for s in steps]
            at_seconds = cell([value_at(r.evals, b["seconds"], "seconds") for r, b in zip(group, bases, strict=True)])
            speedup = cell([1.0 if run.arm.is_baseline else speedups[run.arm.name] for run in group], 2, "not reached")
            lines.append(f"| {method} | {len(group)} | {cell(step_ratio, 3)} | " + " | ".join(at_steps)
                         + f" | {at_seconds} | {speedup} |")  # fmt: skip
    return lines


def plot(runs: list[Run], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({run.arm.config_name for run in runs})
    for key, label in (("step", "training steps"), ("seconds", "training seconds (threads: see the report)")):
        fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
        for ax, config in zip(axes[0], configs, strict=True):
            for run in runs:
                if run.arm.config_name != config:
                    continue
                style = "-" if run.arm.seed == 0 else "--"
                xs, ys = [r[key] for r in run.evals], [r["fd"] for r in run.evals]
                ax.plot(xs, ys, style, marker="o", markersize=3, label=f"{run.arm.method} s{run.arm.seed}")
            ax.set(title=config, xlabel=label, ylabel="FD (classifier features)", yscale="log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"fd_vs_{key}.png", dpi=90)
        plt.close(fig)

    # Crossover: per model size, the paper route with the plain loss against dense, averaged over seeds.
    paper = [row for row in rows if row["method"].startswith("tread-plain") and row["fd_at_dense_steps"] is not None]
    paper = [row for row in paper if row["method"].endswith(f"2..{row['dense_layers'] - 4}@0.5")]
    configs = sorted({row["config"] for row in paper}, key=lambda c: [int(n) for n in re.findall(r"\d+", c)])
    if not configs:
        return
    mean = {c: {k: float(np.mean([r[k] for r in paper if r["config"] == c and r[k] is not None] or [np.nan]))
                for k in ("step_time_ratio", "fd_ratio_at_dense_steps", "fd_ratio_at_dense_seconds")}
            for c in configs}  # fmt: skip
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(configs), 4))
    positions = np.arange(len(configs))
    for offset, key, label in ((-0.25, "step_time_ratio", "step time, routed / dense"),
                               (0.0, "fd_ratio_at_dense_steps", "FD at equal steps, routed / dense"),
                               (0.25, "fd_ratio_at_dense_seconds", "FD at equal seconds, routed / dense")):  # fmt: skip
        ax.bar(positions + offset, [mean[c][key] for c in configs], width=0.25, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(positions, [c.replace(", ", "\n") for c in configs], fontsize=7)
    ax.set(ylabel="ratio (below 1: TREAD better)", title="Where TREAD pays off (paper route, plain loss)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "crossover.png", dpi=90)
    plt.close(fig)


def save_grids(runs: list[Run], out: Path) -> None:
    """The last evaluation's first eight samples of every class (one row per class) for each arm."""
    from PIL import Image

    for run in runs:
        images = run.last_images.reshape(10, -1, *run.last_images.shape[1:])[:, :8].flatten(0, 1)
        pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        tiles = [Image.fromarray(p).resize((32, 32), Image.NEAREST) for p in pixels]
        slug = re.sub(r"[^A-Za-z0-9.]+", "_", run.arm.name).strip("_")
        make_image_grid(tiles, rows=10, cols=len(tiles) // 10).save(out / f"samples_{slug}.png")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--plan", default="default", choices=("default", "full", "quick", "objectives", "ssm", "ratio_ramp", "repa")
    )
    parser.add_argument("--quick", action="store_true", help="the quick plan and tiny settings (~2 minutes)")
    parser.add_argument("--arms", default=None, help="regex: run only the arms whose name matches (and their dense)")
    parser.add_argument("--steps", type=int, default=1000, help="dense steps; routed arms run --routed_steps_factor x")
    parser.add_argument("--routed_steps_factor", type=float, default=1.4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--eval_every", type=int, default=200)
    parser.add_argument("--chunk_steps", type=int, default=20, help="steps per arm per turn of the interleaving")
    parser.add_argument("--num_samples", type=int, default=200, help="class-balanced samples per evaluation")
    parser.add_argument("--num_inference_steps", type=int, default=16)
    parser.add_argument("--classifier_epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default=None, help="default: bench/results/convergence_<plan>")
    parser.add_argument("--teacher_dir", default=str(Path(__file__).resolve().parent / "cache"),
                        help="where the REPA teacher is trained once and cached (git-ignored)")  # fmt: skip
    parser.add_argument("--teacher_epochs", type=int, default=20)
    parser.add_argument("--teacher_seed", type=int, default=1, help="the judge's CNN uses seed 0")
    parser.add_argument("--repa_projector_dim", type=int, default=256,
                        help="REPA projector hidden width (the paper's 2048 is for width 1152; here 4x the width 64)")  # fmt: skip
    parser.add_argument("--from_results", default=None, help="a results.json: redo its tables and plots, no training")
    args = parser.parse_args(argv)
    if args.quick:  # the quick plan, or with --plan repa its quick variant
        args.plan = "repa_quick" if args.plan == "repa" else "quick"
        quick = dict(
            steps=60, eval_every=30, num_samples=50, num_inference_steps=4, classifier_epochs=2, chunk_steps=10
        )
        if args.plan == "repa_quick":  # a smoke test: seconds of training
            quick.update(steps=4, eval_every=4, num_samples=20, num_inference_steps=2, classifier_epochs=1,
                         chunk_steps=4, teacher_epochs=1, repa_projector_dim=32)  # fmt: skip
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    elif args.plan == "repa":  # what the recorded run used (planned ~35 min of a busy 2-core machine; took 56)
        for name, value in dict(steps=300, routed_steps_factor=4 / 3, eval_every=100, num_samples=100,
                                num_inference_steps=8, threads=1).items():  # fmt: skip
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.num_samples % 10 or args.num_samples < 20:
        parser.error("--num_samples must be a multiple of 10 (class-balanced), at least 20")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # One folder per plan, so that running one plan never overwrites another's results.
    default_out = Path(args.from_results).parent if args.from_results else f"bench/results/convergence_{args.plan}"
    out = Path(args.output_dir or default_out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        return rewrite_report(Path(args.from_results), out)
    begun = time.perf_counter()

    judge = make_judge(args)
    train_x, train_y, test_x, test_y, classifier, accuracy, reference_stats, fd_floor = judge
    print(f"classifier held-out accuracy {accuracy:.3f}; FD floor {fd_floor:.2f}", flush=True)

    arms = plan_arms(args.plan, args.steps, args.routed_steps_factor)
    if args.arms:
        wanted = {arm.group for arm in arms if re.search(args.arms, arm.name)}
        arms = [arm for arm in arms if arm.group in wanted and (arm.is_baseline or re.search(args.arms, arm.name))]
    # REPA arms: the teacher's features of every train image, computed once (as extract_latents.py --repa_encoder
    # precomputes them), so that no encoder runs in the timed steps.
    targets, teacher = {}, None
    for grid in sorted({RESOLUTION // arm.patch_size for arm in arms if arm.repa_layer is not None}):
        started = time.perf_counter()
        encoder, teacher = load_teacher(args, judge, grid)
        targets[grid] = torch.cat([encoder(chunk) for chunk in train_x.split(256)])
        print(f"REPA teacher {teacher['folder']}: held-out accuracy {teacher['held_out_accuracy']:.3f}, features "
              f"{tuple(targets[grid].shape)} in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    runs = [start_run(arm, args.learning_rate, targets.get(RESOLUTION // arm.patch_size), args.repa_projector_dim)
            for arm in arms]  # fmt: skip

    # Interleave: every unfinished arm trains chunk_steps, evaluating at multiples of eval_every.
    evaluated = False
    while not all(run.finished for run in runs):
        for run in runs:
            if run.finished:
                continue
            train_steps(run, train_x, train_y, run.next_chunk(args.chunk_steps, args.eval_every), args.batch_size)
            if run.evaluation_due(args.eval_every):
                record = evaluate(run, classifier, reference_stats, test_x, test_y, args.num_samples,
                                  args.num_inference_steps)  # fmt: skip
                print(f"{run.arm.name}: step {record['step']} {record['seconds']:.0f}s FD {record['fd']:.2f} "
                      f"acc {record['accuracy']:.3f} held-out {fmt(record['held_out_loss'], 4, '-')}", flush=True)  # fmt: skip
                evaluated = True
        if evaluated and all(run.evals for run in runs):
            write_results(runs, args, argv, accuracy, fd_floor, time.perf_counter() - begun, out, False, teacher)
            evaluated = False

    results = write_results(runs, args, argv, accuracy, fd_floor, time.perf_counter() - begun, out, True, teacher)
    print((out / "results.md").read_text())
    return results


def write_results(runs, args, argv, accuracy, fd_floor, elapsed, out: Path, finished: bool, teacher=None) -> dict:
    """results.json, results.md and the plots; called after every round, so a stopped run keeps what it measured."""
    rows = compare(runs)
    info = {
        "command": "python bench/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "threads": args.threads,
        "total_minutes": elapsed / 60,
        "finished": finished,
        "classifier_accuracy": accuracy,
        "fd_floor": fd_floor,
        "num_samples": args.num_samples,
        "args": vars(args),
        **({"teacher": teacher} if teacher else {}),
    }
    results = {
        **info,
        "arms": [{"name": r.arm.name, **asdict(r.arm), "evals": r.evals} for r in runs],
        "comparisons": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(runs, rows, info, out)
    plot(runs, rows, out)
    save_grids(runs, out)
    return results


def rewrite_report(path: Path, out: Path) -> dict:
    """Tables and plots from a saved results.json (sample grids need the samples, so they are not redone)."""
    results = json.loads(path.read_text())
    # The judge is deterministic: rebuild it for the floor (older results.json files measured it differently).
    judge_args = argparse.Namespace(classifier_epochs=results["args"]["classifier_epochs"])
    _, _, _, _, _, results["classifier_accuracy"], _, results["fd_floor"] = make_judge(judge_args)
    fields = set(Arm.__dataclass_fields__)
    runs = []
    for saved in results["arms"]:
        arm = Arm(**{k: (tuple(map(tuple, v)) if k == "routes" else v) for k, v in saved.items() if k in fields})
        runs.append(Run(arm, None, None, None, None, None, step=saved["evals"][-1]["step"], evals=saved["evals"]))
    results["comparisons"] = compare(runs)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(runs, results["comparisons"], results, out)
    plot(runs, results["comparisons"], out)
    return results


if __name__ == "__main__":
    main()
