"""A laptop-scale judge for models trained on scikit-learn's digits: a small CNN classifier, FD of its features.

FID's Inception network means nothing on 16x16 grey digits, so the benchmarks (``bench/convergence.py``,
``bench/finetune.py``) judge samples with a classifier trained once, deterministically, on the digits' train split
(`train_classifier`): FD is the Frechet distance (`diffusers_tread.metrics.frechet_distance`) between its 64-d
penultimate features of class-balanced samples and of the held-out split, and accuracy is how often it recognises the
class a sample was drawn for. `make_digits_judge` builds all of it, with the FD floor that real images score at about
an evaluation's sample size; `sample_digits` draws the samples with `TreadDiTPipeline` and `score_samples` scores
them; `crossing` and `value_at` read the resulting FD curves (the paper's speedup: the steps or seconds one run needs
to reach another's final FD, ICCV Sec. 4.2), `compare_to_baseline` puts one run's curve against its baseline's and
`fmt` writes the table cells, `mean_over` averages them over seeds, `machine_description` the machine line, and `BenchRun` holds an arm's
training state, for both benchmarks. Not imported by ``import diffusers_tread`` (it needs scikit-learn,
through `diffusers_tread.data.load_digits`).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch import nn

from .data import load_digits
from .metrics import feature_statistics, frechet_distance
from .pipelines import TreadDiTPipeline


class DigitClassifier(nn.Module):
    """Three convolutions and two linear layers; ``features`` is the 64-d penultimate layer (before its ReLU)."""

    def __init__(self, resolution: int = 16):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(64 * (resolution // 4) ** 2, 64)
        self.head = nn.Linear(64, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(images)))


def train_classifier(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int,
    seed: int = 0,
) -> tuple[DigitClassifier, float]:
    """Deterministic (fixed seed, fixed batch order); returns the classifier, frozen in eval mode, and its held-out
    accuracy."""
    torch.manual_seed(seed)
    classifier = DigitClassifier(resolution=train_x.shape[-1])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=generator).split(64):
            loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval().requires_grad_(False)
    accuracy = (classifier(test_x).argmax(1) == test_y).float().mean().item()
    return classifier, accuracy


class DigitsJudge(NamedTuple):
    """The digits' splits (images in [-1, 1]), the classifier, its held-out accuracy, the held-out feature statistics
    (FD's reference) and the FD floor."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classifier: DigitClassifier
    accuracy: float
    reference_stats: tuple[np.ndarray, np.ndarray]
    fd_floor: float


def make_digits_judge(classifier_epochs: int, resolution: int = 16) -> DigitsJudge:
    """The judge, trained on the train split for ``classifier_epochs`` epochs.

    The floor is the FD between the two halves of the held-out split (each class split in two, ~180 images a side):
    what real images score at about an evaluation's sample size. (Train images would not do: the classifier has
    fitted their features.) Samples can score below it: at these sample sizes FD's bias grows with the spread of
    the features, and samples vary less than real digits.
    """
    train_set, _ = load_digits(resolution=resolution, split="train")
    test_set, _ = load_digits(resolution=resolution, split="test")
    train_x, train_y = train_set.pixel_values, train_set.class_labels
    test_x, test_y = test_set.pixel_values, test_set.class_labels
    classifier, accuracy = train_classifier(train_x, train_y, test_x, test_y, classifier_epochs)
    with torch.no_grad():
        features = classifier.features(test_x).numpy()
    first_half = np.zeros(len(test_y), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(test_y.numpy() == c)
        first_half[members[: len(members) // 2]] = True
    fd_floor = frechet_distance(*feature_statistics(features[first_half]), *feature_statistics(features[~first_half]))
    return DigitsJudge(train_x, train_y, test_x, test_y, classifier, accuracy, feature_statistics(features), fd_floor)


@torch.no_grad()
def sample_digits(
    transformer: nn.Module, scheduler, num_samples: int, num_inference_steps: int, seed: int = 4321
) -> tuple[torch.Tensor, torch.LongTensor]:
    """``num_samples`` class-balanced samples (``num_samples // 10`` per class, class-major) in the data's [-1, 1],
    drawn with `TreadDiTPipeline` without guidance and with the same noise on every call; returns them and their
    classes. ``transformer`` should be in eval mode (all tokens, as sampling)."""
    pipe = TreadDiTPipeline(transformer=transformer, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(num_samples // 10)
    images = pipe(
        labels.tolist(),
        guidance_scale=1.0,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return images * 2 - 1, labels  # [0, 1] -> the data's [-1, 1]


@torch.no_grad()
def score_samples(
    classifier: DigitClassifier,
    images: torch.Tensor,
    labels: torch.LongTensor,
    reference_stats: tuple[np.ndarray, np.ndarray],
) -> tuple[float, float]:
    """FD of the classifier's features of ``images`` (in [-1, 1]) against ``reference_stats``, and the classifier's
    accuracy on them against ``labels``."""
    mu, sigma = feature_statistics(classifier.features(images).numpy())
    accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    return frechet_distance(mu, sigma, *reference_stats), accuracy


# ----------------------------------------------------------------------------------------------------------------------
# Reading FD curves: ``evals`` are a run's evaluation records, dicts with "fd" and the positions "step" and "seconds"
# ----------------------------------------------------------------------------------------------------------------------


def crossing(evals: list[dict], target: float, key: str) -> float | None:
    """``key`` (step or seconds) where FD first falls to ``target``, linearly interpolated between evaluations."""
    previous = None
    for record in evals:
        if record["fd"] <= target:
            if previous is None:
                return float(record[key])
            fraction = (previous["fd"] - target) / (previous["fd"] - record["fd"])
            return previous[key] + fraction * (record[key] - previous[key])
        previous = record
    return None


def value_at(evals: list[dict], position: float, key: str, metric: str = "fd") -> float | None:
    """``metric`` interpolated at ``key == position``; None beyond the arm's last evaluation."""
    points = [(r[key], r[metric]) for r in evals]
    if not points or position > points[-1][0] or position < points[0][0]:
        return None
    return float(np.interp(position, *zip(*points, strict=True)))


def compare_to_baseline(evals: list[dict], baseline_evals: list[dict]) -> dict:
    """One run's FD curve against its baseline's (same seed, data and noise): the step-time ratio, the FD at the
    baseline's final steps and seconds, and the steps and seconds the run needs to reach the baseline's final FD with
    their speedups (the paper's definition, ICCV Sec. 4.2; None where never reached)."""
    final, last = baseline_evals[-1], evals[-1]
    reach_step = crossing(evals, final["fd"], "step")
    reach_seconds = crossing(evals, final["fd"], "seconds")
    return {
        "step_time_ratio": (last["seconds"] / last["step"]) / (final["seconds"] / final["step"]),
        "dense_final_fd": final["fd"],
        "dense_steps": final["step"],
        "dense_seconds": final["seconds"],
        "fd_at_dense_steps": value_at(evals, final["step"], "step"),
        "fd_at_dense_seconds": value_at(evals, final["seconds"], "seconds"),
        "steps_to_dense_fd": reach_step,
        "seconds_to_dense_fd": reach_seconds,
        "step_speedup": final["step"] / reach_step if reach_step else None,
        "time_speedup": final["seconds"] / reach_seconds if reach_seconds else None,
    }


def fmt(value: float | int | None, digits: int = 2, missing: str = "not reached") -> str:
    """A table cell: ``missing`` for None, floats to ``digits`` decimals."""
    if value is None:
        return missing
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def mean_over(rows: list[dict], key: str) -> float | None:
    """The mean of ``key`` over ``rows`` (the seeds of an arm), or None where a row has none (a speedup not reached)."""
    values = [row[key] for row in rows]
    return None if any(value is None for value in values) else float(np.mean(values))


def machine_description() -> str:
    """The CPU, torch's thread count and version, for a benchmark's report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, torch {torch.__version__}"


@dataclass
class BenchRun:
    """One arm's training state in a digits benchmark: its model, EMA and optimizer, the generators of its data and
    noise and of its routes (separate, so that the arms of a group see the same data), and what it recorded."""

    arm: Any
    model: nn.Module
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    data_generator: torch.Generator
    route_generator: torch.Generator
    step: int = 0
    step_seconds: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.step >= self.arm.steps

    def next_chunk(self, chunk_steps: int, eval_every: int) -> int:
        """Steps to train on this arm's turn of the interleaving (the arms take turns, so that the machine's load
        falls on all alike): up to ``chunk_steps``, never past its next evaluation or its last step."""
        next_eval = (self.step // eval_every + 1) * eval_every
        return max(0, min(chunk_steps, self.arm.steps - self.step, next_eval - self.step))

    def evaluation_due(self, eval_every: int) -> bool:
        return self.step % eval_every == 0 or self.finished
