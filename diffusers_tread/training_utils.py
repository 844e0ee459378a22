"""The training toolkit both training scripts and the benchmarks use, in the spirit of ``diffusers.training_utils``:
small functions a training loop calls, no loop of its own.

- The TREAD training step (`tread_training_loss`, `drop_class_labels`, `scheduled_selection_ratios`, `make_optimizer`,
  `LossLog`), written to keep the accelerator busy: no host synchronisation inside it (the loss stays on the device
  until `LossLog.flush`), an optimizer that updates all parameters in a few kernels, and nothing that breaks a compiled
  graph inside the model's blocks.
- The ``--routes`` parser. Checkpoints, the output folder and stop signals are in `diffusers_tread.checkpointing`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
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
# Command line
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# The prelude both training scripts share: accelerator, run folder and Hub repo, data loader, LR schedule
# ----------------------------------------------------------------------------------------------------------------------


def start_run(args: argparse.Namespace, push_to_hub: bool | None = None):
    """The Accelerator of a training run and its folder, from the options both scripts share (``output_dir``,
    ``logging_dir``, ``gradient_accumulation_steps``, ``mixed_precision``, ``report_to``, ``seed``, ``allow_tf32``,
    ``overwrite_output_dir``, the ``hub_*`` options): a seedable sampler (the same data order on resume), Diffusers'
    logging set-up of its examples, the global seed, the output folder (locked for the run, cleared with
    ``--overwrite_output_dir``) and,
    when pushing, the Hub repo. Returns ``(accelerator, repo_id)``; ``repo_id`` is None unless pushing, and on every
    process but the main one."""
    import diffusers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    from . import hub
    from .checkpointing import clear_output_dir, hold_run_folder

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    get_logger(__name__, log_level="INFO").info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_warning()
    else:
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)  # model initialisation: the same on every process
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    repo_id = None
    hold_run_folder(accelerator, args)  # one run per folder: the main process locks it until the run ends
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            clear_output_dir(args.output_dir, args.logging_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub if push_to_hub is None else push_to_hub:
            name = args.hub_model_id or Path(args.output_dir).name
            repo_id = hub.create_repo(name, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id
    return accelerator, repo_id


def make_train_dataloader(dataset, args: argparse.Namespace, collate_fn=None) -> torch.utils.data.DataLoader:
    """The shuffled training loader (``train_batch_size``, ``dataloader_num_workers``; the last partial batch dropped);
    a dataset smaller than one batch is a ValueError that says what to change."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        collate_fn=collate_fn,
    )
    if len(loader) == 0:
        raise ValueError(
            f"The dataset has {len(dataset)} examples, fewer than one batch of {args.train_batch_size}: lower "
            "--train_batch_size or add data."
        )
    return loader


def make_lr_scheduler(optimizer, args: argparse.Namespace, train_dataloader, num_processes: int):
    """Diffusers' `get_scheduler` (``lr_scheduler``, ``lr_warmup_steps``) over ``max_train_steps``, which it sets from
    ``num_train_epochs`` when not given. The scheduler steps once per process per update, as in Diffusers' examples
    (`accelerator.prepare` wraps it), hence the step counts times ``num_processes``."""
    from diffusers.optimization import get_scheduler

    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(
            len(train_dataloader) / args.gradient_accumulation_steps
        )
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


def main_with_messages(main: Callable[[], object]) -> None:
    """Run a script's ``main`` so that the failures it explains (bad data or settings, a diverging loss, a full disk,
    an unreachable Hub: ValueError, FloatingPointError, OSError, RuntimeError, each with a message that says what to
    change) end with that message and exit status 1 instead of a traceback. ``TREAD_TRACEBACK=1`` shows it."""
    try:
        main()
    except (ValueError, FloatingPointError, OSError, RuntimeError) as error:
        if os.environ.get("TREAD_TRACEBACK") == "1":
            raise
        print(f"error: {type(error).__name__}: {error}\n(set TREAD_TRACEBACK=1 to see where)", file=sys.stderr)
        raise SystemExit(1) from None
