"""The training toolkit both training scripts and the benchmarks use, in the spirit of ``diffusers.training_utils``:
small functions a training loop calls, no loop of its own.

- The TREAD training step (`tread_training_loss`, `drop_class_labels`, `scheduled_selection_ratios`, `make_optimizer`,
  `LossLog`), written to keep the accelerator busy: no host synchronisation inside it (the loss stays on the device
  until `LossLog.flush`), an optimizer that updates all parameters in a few kernels, and nothing that breaks a compiled
  graph inside the model's blocks.
- Crash-safe checkpoints (`save_checkpoint`, `find_checkpoint`, `complete_checkpoints`) and stop signals
  (`install_stop_handlers`, `stop_requested`), and the ``--routes`` parser.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from .losses import tread_loss
from .objectives import Objective


def scheduled_selection_ratios(
    routes: Sequence[dict], step: int, max_train_steps: int, warmup_steps: int = 0, anneal_steps: int = 0
) -> list[float] | None:
    """Each route's selection ratio at ``step``: a linear ramp from 0 over the first ``warmup_steps`` and back to 0
    over the last ``anneal_steps``; None (the configured ratios) outside the ramps or without routes."""
    factor = 1.0
    if warmup_steps > 0:
        factor = min(factor, step / warmup_steps)
    if anneal_steps > 0:
        factor = min(factor, (max_train_steps - step) / anneal_steps)
    if factor >= 1.0 or not routes:
        return None
    return [route["selection_ratio"] * max(factor, 0.0) for route in routes]


def drop_class_labels(
    class_labels: torch.LongTensor, null_class: int, dropout_prob: float, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Classifier-free guidance's label dropout, once per sample (DiT: ``class_dropout_prob`` 0.1, the null class being
    the label table's extra last row). Diffusers' embedders would draw it in every block; the models switch that off."""
    drop = torch.rand(class_labels.shape, generator=generator, device=class_labels.device)
    return torch.where(drop < dropout_prob, torch.full_like(class_labels, null_class), class_labels)


def tread_training_loss(
    model: torch.nn.Module,
    objective: Objective,
    x0: torch.Tensor,
    class_labels: torch.LongTensor,
    generator: torch.Generator | None = None,
    selection_ratio: list[float] | None = None,
    patch_size: int = 2,
    loss_mode: str = "adapted",
    mae_loss_weight: float = 0.0,
) -> torch.Tensor:
    """One TREAD training loss on clean data ``x0`` (labels already dropped): noise it with ``objective``, run the
    routed forward (the routes draw their subsets from ``generator``), and reduce the objective's per-element loss
    with `tread_loss` (``loss_mode``: "plain" or the paper's "adapted" loss over every applied route)."""
    inputs = objective.training_inputs(x0, generator=generator)
    output = model(
        inputs.model_input,
        timestep=inputs.timestep,
        class_labels=class_labels,
        selection_ratio=selection_ratio,
        route_generator=generator,
    )
    prediction = output.sample.float()
    per_element = objective.per_element_loss(prediction, x0, inputs)
    use_mae = loss_mode == "adapted" and mae_loss_weight > 0 and bool(output.route_masks)
    return tread_loss(
        per_element,
        output.route_masks,
        patch_size,
        mode=loss_mode,
        denoised=objective.denoised(prediction, inputs) if use_mae else None,
        noisy_input=inputs.noisy_sample if use_mae else None,
        mae_loss_weight=mae_loss_weight,
    )


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW (DiT's optimizer) as one fused kernel per step on CUDA, else the multi-tensor ("foreach") update: the
    per-parameter loop PyTorch uses on CPU by default dispatches ~10 ops per parameter tensor (~1800 for DiT-S/2)."""
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    fused = bool(parameters) and all(parameter.is_cuda for parameter in parameters)
    return torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=betas,
        weight_decay=weight_decay,
        eps=eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


class LossLog:
    """Per-step losses kept on the device and read back every few steps, so that logging costs one synchronisation
    per `flush` instead of one per step (``loss.item()`` waits for the whole step to finish on the GPU)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss.detach().float().reshape(()))

    def flush(self, gather=None) -> list[tuple[int, float]]:
        """``[(step, loss), ...]`` since the last flush, averaged over processes by ``gather`` (e.g.
        ``accelerator.gather``) if given. Raises ``FloatingPointError`` naming the first non-finite step."""
        if not self.losses:
            return []
        losses = torch.stack(self.losses)
        if gather is not None:
            losses = gather(losses[None]).reshape(-1, len(self.steps)).mean(0)
        values = losses.tolist()
        rows = list(zip(self.steps, values, strict=True))
        self.steps, self.losses = [], []
        for step, value in rows:
            if not math.isfinite(value):
                raise FloatingPointError(f"Loss is {value} at step {step}.")
        return rows


# ----------------------------------------------------------------------------------------------------------------------
# Command line, checkpoints, stop signals
# ----------------------------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)
CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last, just before the folder gets its final name


def parse_routes(text: str) -> list[dict] | str:
    """`--routes`: "paper", "none", JSON (a list of route dicts) or the shorthand "2:8:0.5,10:12:0.3"."""
    text = text.strip()
    if text in ("paper", "none", ""):
        return "paper" if text == "paper" else []
    if text.startswith("["):
        return json.loads(text)
    routes = []
    for part in text.split(","):
        fields = part.split(":")
        if len(fields) != 3:
            raise argparse.ArgumentTypeError(f"route {part!r} is not start:end:ratio (e.g. 2:8:0.5)")
        start, end, ratio = fields
        routes.append({"start_layer_idx": int(start), "end_layer_idx": int(end), "selection_ratio": float(ratio)})
    return routes


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` folders that finished saving, oldest first."""
    found = [
        path
        for path in Path(output_dir).glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", path.name) and (path / CHECKPOINT_COMPLETE).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The step of a `checkpoint-<step>` folder."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint-<step> folder; pass one, or 'latest'.")
    return int(match.group(1))


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> str | None:
    """`--resume_from_checkpoint`: "latest" (the newest complete checkpoint, or None) or a checkpoint folder, given
    as a path or, as in Diffusers' examples, as a name inside ``output_dir`` (``checkpoint-500``)."""
    if which == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return str(checkpoints[-1]) if checkpoints else None
    if not Path(which).is_dir() and Path(output_dir, which).is_dir():
        which = str(Path(output_dir, which))
    checkpoint_step(which)  # a clear error for a folder not named checkpoint-<step>
    if not Path(which, CHECKPOINT_COMPLETE).is_file():
        raise ValueError(
            f"{which} is not a complete checkpoint (no {CHECKPOINT_COMPLETE}); pass another checkpoint-<step> folder "
            "or --resume_from_checkpoint latest, which skips incomplete ones."
        )
    return which


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete the `.incomplete-checkpoint-*` folders that runs killed mid-save left behind (call at start, on the
    main process): they never load and would pile up with every preemption."""
    for leftover in Path(output_dir).glob(".incomplete-checkpoint-*"):
        logger.info(f"Removing {leftover}, left by a run killed while saving")
        shutil.rmtree(leftover, ignore_errors=True)


def resume_loss_history(path: str | os.PathLike, step: int) -> list[list[str]]:
    """Cut a ``loss_history.csv`` (rows starting ``step,loss,...``) back to the rows up to ``step``, the checkpoint a
    run resumes from: the rows an interrupted run wrote after it would otherwise appear twice. Returns the kept rows."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row and int(row[0]) <= step]
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(temporary, path)
    return rows


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    global_step: int,
    total_limit: int | None = None,
    before_prune: Callable[[], None] | None = None,
    after_save: Callable[[Path], None] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` so that a crash, a kill or a full disk never costs the last good checkpoint.

    `accelerator.save_state` writes into a hidden `.incomplete-checkpoint-<step>/`; once every process is done, the
    main process marks it complete and renames it (atomic), and only then prunes to ``total_limit`` (calling
    ``before_prune`` first, e.g. to wait for uploads of old checkpoints) and calls ``after_save`` (e.g. to push it).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    partial = output_dir / f".incomplete-checkpoint-{global_step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except OSError as error:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        previous = complete_checkpoints(output_dir)
        raise OSError(
            f"Saving {final} failed: {error}. The previous checkpoint "
            f"({previous[-1] if previous else 'none'}) is intact; free disk space and resume with "
            "--resume_from_checkpoint latest."
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / CHECKPOINT_COMPLETE).write_text(json.dumps({"step": global_step}))
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(partial, final)
        logger.info(f"Saved state to {final}")
        if total_limit is not None:
            old_checkpoints = complete_checkpoints(output_dir)[:-total_limit]
            if old_checkpoints and before_prune is not None:
                before_prune()  # e.g. never delete a checkpoint that is still being uploaded
            for old in old_checkpoints:
                logger.info(f"Removing old checkpoint {old}")
                shutil.rmtree(old)
        if after_save is not None:
            after_save(final)
    accelerator.wait_for_everyone()
    return final


def install_stop_handlers() -> dict:
    """SIGTERM (cluster schedulers) and SIGINT (Ctrl-C) ask the loop to checkpoint and exit at its next check of
    `stop_requested`; a second SIGINT stops at once."""
    stop = {"signal": None}

    def request_stop(signum, _frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum

    stop["previous"] = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    return stop


def restore_stop_handlers(stop: dict) -> None:
    for sig, handler in stop["previous"].items():
        signal.signal(sig, handler)


def stop_requested(accelerator, stop: dict) -> bool:
    """Whether any process got a stop signal (all processes must agree, or the checkpoint would deadlock); with
    several processes an all-reduce, so a host sync: call it at steps that synchronise anyway."""
    requested = stop["signal"] is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(requested)], device=accelerator.device)
        requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    return requested
