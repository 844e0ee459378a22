"""The training toolkit both training scripts and the benchmarks use, in the spirit of ``diffusers.training_utils``:
small functions a training loop calls, no loop of its own.

- The TREAD training step (`tread_training_loss`, `drop_class_labels`, `scheduled_selection_ratios`, `make_optimizer`,
  `LossLog`; `NoiseFrom` for benchmarks whose arms must share their noise), written to keep the accelerator busy: no
  host synchronisation inside it (the loss stays on the device until `LossLog.flush`), an optimizer that updates all
  parameters in a few kernels, and nothing that breaks a compiled graph. The step's randomness is drawn ahead in one
  place (`draw_step_randomness` -> `StepDraws`), so that the rest (`tread_step_loss`) is a pure tensor function
  that `compile_step_loss` compiles with its backward as one graph (``train_tread.py --compile_scope step``).
- The command line: the ``--routes`` parser (`parse_routes`), the options both scripts share
  (`add_optimization_arguments`, `add_run_arguments`, `add_augmentation_arguments`) and their checks
  (`check_run_arguments`, `check_validation_sampling`, `check_step_intervals`), `image_dataset_options` (the options
  that name a class-labelled image dataset), and `main_with_messages` (the failures we explain end as one message, not
  a traceback).
- The prelude both scripts share: `start_run` (accelerator, logging, seed, output folder, Hub repo),
  `make_train_dataloader`, `train_steps_for` (``--max_train_steps`` or the epochs' worth) and `make_lr_scheduler`;
  `RunState`, what a run's stages share (and the run's training generator, checkpoint uploads and loss file),
  `resume_run` (record the run's settings, resume from a checkpoint), `checkpoint_or_stop` (a sync step's checkpoint
  and stop) and `card_training_fields` (what both model cards say of the run).

Checkpoints, the output folder and stop signals are in `diffusers_tread.checkpointing`; keeping the Hub token out of
what a run writes is `diffusers_tread.redaction`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .losses import tread_loss
from .objectives import Objective, ObjectiveDraws
from .redaction import redact_tokens
from .repa import RepaTerm
from .routing import draw_kept_indices


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
    drop = label_dropout_mask(class_labels, dropout_prob, generator)
    return torch.where(drop, torch.full_like(class_labels, null_class), class_labels)


def label_dropout_mask(
    class_labels: torch.LongTensor, dropout_prob: float, generator: torch.Generator | None = None
) -> torch.BoolTensor:
    """True where `drop_class_labels` drops a label: one uniform draw per sample, on the generator's device."""
    device = generator.device if generator is not None else class_labels.device
    return torch.rand(class_labels.shape, generator=generator, device=device).to(class_labels.device) < dropout_prob


class NoiseFrom:
    """``objective`` with its training noise and timesteps drawn from ``generator``, whatever generator the caller
    passes. `tread_training_loss` draws noise and routes from one generator; wrapped, the noise comes from
    ``generator`` (e.g. the data's) and only the routes from the one passed to the step, so that a run's data and
    noise depend on the seed and the step alone, never on its routes: the benchmarks' dense and routed arms see the
    same batches and noise."""

    def __init__(self, objective: Objective, generator: torch.Generator):
        self.objective, self.generator = objective, generator

    def training_inputs(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        return self.objective.training_inputs(x0, generator=self.generator)

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        return self.objective.draw(x0, generator=self.generator)

    def __getattr__(self, name: str):
        return getattr(self.objective, name)


@dataclass
class StepDraws:
    """Everything random in one TREAD training step, drawn ahead of it (`draw_step_randomness`), so that the step
    itself (`tread_step_loss`) is a pure tensor function that ``torch.compile(fullgraph=True)`` can trace whole: a
    ``torch.Generator`` draw inside a compiled region breaks its graph.

    Args:
        time: ``(B,)`` the objective's time draw (`objectives.ObjectiveDraws`).
        noise: the objective's Gaussian noise, ``x0``'s shape.
        label_drop: ``(B,)`` bool, True where the sample's class label becomes the null class (CFG dropout); None
            when the labels were dropped before (or are kept).
        kept_indices: each active route's ``(B, num_kept)`` kept token positions (`routing.draw_kept_indices`); ``()``
            without routes.
    """

    time: torch.Tensor
    noise: torch.Tensor
    label_drop: torch.BoolTensor | None
    kept_indices: tuple[torch.LongTensor, ...]


def draw_step_randomness(
    model: torch.nn.Module,
    objective: Objective,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    class_dropout_prob: float | None = None,
    selection_ratio: list[float] | None = None,
) -> StepDraws:
    """Draw what one training step on clean data ``x0`` needs, from ``generator``, in one fixed order: the label
    dropout (when ``class_dropout_prob`` is given, as `drop_class_labels` draws it), the objective's time and noise
    (`Objective.draw`), then each route's subset (`routing.draw_kept_indices`, over ``model.active_routes`` at
    ``selection_ratio``). It is the order and the calls of the eager step that draws them as it goes, so a run's
    numbers, and its exact resume from a checkpointed generator, do not depend on where they are drawn.

    ``model`` is the unwrapped TREAD model (``active_routes``, ``config.patch_size``), in the mode the step runs in.
    """
    label_drop = None
    if class_dropout_prob is not None:
        label_drop = label_dropout_mask(x0.new_empty(x0.shape[0], dtype=torch.long), class_dropout_prob, generator)
    objective_draws = objective.draw(x0, generator=generator)
    patch_size = model.config.patch_size
    num_tokens = (x0.shape[-2] // patch_size) * (x0.shape[-1] // patch_size)
    routes = model.active_routes(selection_ratio=selection_ratio)
    kept_indices = draw_kept_indices(routes, x0.shape[0], num_tokens, generator=generator, device=x0.device)
    return StepDraws(objective_draws.time, objective_draws.noise, label_drop, kept_indices)


def tread_step_loss(
    model: torch.nn.Module,
    objective: Objective,
    x0: torch.Tensor,
    class_labels: torch.LongTensor,
    draws: StepDraws,
    null_class: int | None = None,
    selection_ratio: list[float] | None = None,
    patch_size: int = 2,
    loss_mode: str = "adapted",
    mae_loss_weight: float = 0.0,
    repa: RepaTerm | None = None,
) -> torch.Tensor:
    """One TREAD training loss from draws made ahead (`draw_step_randomness`): the labels dropped to ``null_class``
    where ``draws.label_drop`` says, ``x0`` noised with ``objective`` (`Objective.inputs_from_draws`), the routed
    forward on the drawn subsets (``route_kept_indices``) and the objective's per-element loss reduced by `tread_loss`
    (``loss_mode``: "plain" or the paper's "adapted" loss over every applied route, v1 Sec. 3.3, with its MAE term
    at ``mae_loss_weight``); with ``repa``, plus its alignment loss. Tensor operations only: no draw, no host
    synchronisation, no data-dependent shape, so `compile_step_loss` traces it (and its backward) as one graph."""
    if draws.label_drop is not None:
        class_labels = torch.where(draws.label_drop, torch.full_like(class_labels, null_class), class_labels)
    inputs = objective.inputs_from_draws(x0, ObjectiveDraws(time=draws.time, noise=draws.noise))
    output = model(
        inputs.model_input,
        timestep=inputs.timestep,
        class_labels=class_labels,
        selection_ratio=selection_ratio,
        route_kept_indices=draws.kept_indices,
        **(repa.forward_kwargs() if repa is not None else {}),
    )
    prediction = output.sample.float()
    per_element = objective.per_element_loss(prediction, x0, inputs)
    use_mae = loss_mode == "adapted" and mae_loss_weight > 0 and bool(output.route_masks)
    loss = tread_loss(
        per_element,
        output.route_masks,
        patch_size,
        mode=loss_mode,
        denoised=objective.denoised(prediction, inputs) if use_mae else None,
        noisy_input=inputs.noisy_sample if use_mae else None,
        mae_loss_weight=mae_loss_weight,
    )
    return loss if repa is None else loss + repa.loss(output)


def tread_training_loss(
    model: torch.nn.Module,
    objective: Objective,
    x0: torch.Tensor,
    class_labels: torch.LongTensor,
    generator: torch.Generator | None = None,
    selection_ratio: list[float] | None = None,
    **loss_options,
) -> torch.Tensor:
    """One TREAD training loss on clean data ``x0`` (labels already dropped): the objective's noise and the routes'
    subsets drawn from ``generator`` (`draw_step_randomness`, in that order), then `tread_step_loss` with
    ``loss_options`` (``patch_size``, ``loss_mode``, ``mae_loss_weight``, ``repa``)."""
    draws = draw_step_randomness(_unwrapped(model), objective, x0, generator, selection_ratio=selection_ratio)
    return tread_step_loss(model, objective, x0, class_labels, draws, selection_ratio=selection_ratio, **loss_options)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The TREAD model inside a ``DistributedDataParallel`` wrapper (what has ``active_routes``)."""
    return model.module if not hasattr(model, "active_routes") and hasattr(model, "module") else model


def compile_step_loss(
    loss_fn: Callable[..., torch.Tensor],
    backward_scale: float = 1.0,
    backend: str = "inductor",
    mode: str | None = None,
) -> Callable[..., torch.Tensor]:
    """``loss_fn`` (e.g. `tread_step_loss` with its model and settings bound) and its backward as one
    ``torch.compile(fullgraph=True)`` graph: calling the result runs the forward, the loss and
    ``(loss * backward_scale).backward()`` (gradients accumulate into ``.grad`` as usual) and returns the detached
    loss. ``fullgraph=True`` makes any graph break an error, so there is none: with the draws made ahead
    (`draw_step_randomness`) nothing in the step syncs with the host or has a data-dependent shape, and
    ``mode="reduce-overhead"`` can record the whole step as CUDA graphs.

    The optimizer stays outside: ``torch.optim``'s ``step`` graph-breaks on purpose (``_use_grad``, pytorch#104053),
    and so does gradient clipping's norm where it is read. Backward is traced with Dynamo's
    ``trace_autograd_ops``, set only while the step runs."""
    import torch._dynamo

    def step(*args, **kwargs) -> torch.Tensor:
        loss = loss_fn(*args, **kwargs)
        (loss * backward_scale).backward()
        return loss.detach()

    options = {"mode": mode} if mode not in (None, "default") else {}
    compiled = torch.compile(step, fullgraph=True, backend=backend, **options)

    def run(*args, **kwargs) -> torch.Tensor:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args, **kwargs)

    return run


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


def flush_loss_log(pending: LossLog, gather=None, output_dir: str | os.PathLike = ".") -> list[tuple[int, float]]:
    """`LossLog.flush`, with what to do about a non-finite loss in its message: a script flushes before every
    checkpoint, so the last checkpoint in ``output_dir`` predates the divergence."""
    try:
        return pending.flush(gather=gather)
    except FloatingPointError as error:
        raise FloatingPointError(
            f"{error} The last checkpoint in {output_dir} is untouched (none is saved after a non-finite "
            "loss); resume from it with a lower --learning_rate, --max_grad_norm, or bf16 instead of fp16 "
            "(--mixed_precision bf16)."
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' `argparse.ArgumentParser`: every message it prints (errors such as "unrecognized arguments: ...",
    which repeat the command line, usage and help) goes through `redact_tokens`, so a mistyped ``--hub_tok hf_...``
    never puts the token into a console, CI or cluster log. Abbreviations are off by default (an abbreviated
    ``--hub_tok`` would otherwise be taken for ``--hub_token``, and the launch command on the model card would then
    keep it, issue #14)."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def _print_message(self, message: str, file=None) -> None:
        # Every message argparse prints (usage, help, `error`, `exit`) goes through here.
        super()._print_message(redact_tokens(message) if message else message, file)


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


def read_model_config(path: str, model_cls: type, presets: Iterable[str] = ()) -> dict:
    """``--model_config`` given as a file: the model settings of a JSON object (a model's ``config.json``; a folder
    holding one works too), without Diffusers' ``_``-prefixed entries and with ``num_layers`` filled in from the
    class's default when not given. A missing file, invalid JSON, or JSON that is not a non-empty object (``{}``, a
    list) is a ValueError that says what to give instead."""
    import inspect

    instead = f'a preset ({", ".join(presets)}) or a JSON file of model settings, e.g. {{"num_layers": 12}}'
    file = Path(path, "config.json") if Path(path).is_dir() else Path(path)
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"--model_config {path!r} is neither a preset nor a file: give {instead}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--model_config {path!r} is not valid JSON ({error}): give {instead}.") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"--model_config {path!r} holds a JSON {type(config).__name__}, not an object: give {instead}."
        )
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    if not config:
        raise ValueError(f"--model_config {path!r} holds no model settings: give {instead}.")
    default = inspect.signature(model_cls.__init__).parameters.get("num_layers")
    if "num_layers" not in config and default is not None:
        config["num_layers"] = default.default
    return config


def check_run_arguments(parser, args) -> None:
    """The checks both training scripts make on the options they share, as ``parser.error`` (a message and exit
    status 2, no traceback) before anything is set up: the output folder, the checkpoint limit, the Hub token."""
    from .checkpointing import check_output_dir

    problem = check_output_dir(args.output_dir, bool(args.resume_from_checkpoint), args.overwrite_output_dir)
    if problem:
        parser.error(problem)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be at least 1 (the newest checkpoint is always kept)")
    if args.hub_token is not None:
        if args.report_to in ("wandb", "all"):  # as Diffusers' examples: the tracker would store the token
            parser.error(
                "--hub_token with --report_to wandb would record the token in the run's metadata; log in with "
                "`hf auth login` or set HF_TOKEN instead."
            )
        logging.getLogger(__name__).warning(
            "--hub_token puts the token in your shell history, in `ps` and in accelerate's error line if the run "
            "fails; prefer HF_TOKEN or `hf auth login` (used when --hub_token is not given)."
        )


def image_dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that name a class-labelled image dataset (``--dataset_name``, ``--train_data_dir``,
    ``--image_column``, ``--label_column``, ``--cache_dir``), as `data.load_image_dataset`'s keyword arguments: the
    DiT training script and the latent extraction read the same data from the same options."""
    names = ("dataset_name", "train_data_dir", "image_column", "label_column", "cache_dir")
    return {name: getattr(args, name) for name in names}


def check_validation_sampling(parser, args) -> None:
    """``--validation_num_inference_steps`` and ``--validation_guidance_scale`` checked as the pipeline checks them
    (`check_sampling_arguments`), as ``parser.error`` before training rather than at the first validation."""
    from .pipelines.pipeline_tread_dit import check_sampling_arguments

    try:
        check_sampling_arguments(
            args.validation_num_inference_steps, args.validation_guidance_scale, prefix="--validation_"
        )
    except ValueError as error:
        parser.error(str(error))


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

    from .checkpointing import clear_output_dir, hold_run_folder
    from .hub import uploads

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
            repo_id = uploads.create_repo(
                name, exist_ok=True, private=args.hub_private_repo, token=args.hub_token
            ).repo_id
    return accelerator, repo_id


@dataclass
class RunState:
    """What the stages of a training run share, so that each stage takes the run and the few things it works on.

    ``args`` and ``argv`` (the parsed and the given command line), the ``accelerator`` and Hub ``repo_id`` of
    `start_run`, the clock (``started``: ``time.time()`` at the start, moved back by the time a resumed checkpoint had
    already run), the training ``generator`` (every training draw; checkpoints carry it), the mixed-precision
    ``weight_dtype`` of frozen parts, the background checkpoint ``uploads`` (``--push_checkpoints``), the optimization
    step reached (``global_step``) and the script's ``data``. A script may subclass it for what only its stages share.
    """

    args: argparse.Namespace
    argv: list[str]
    accelerator: Any
    repo_id: str | None
    started: float
    generator: torch.Generator | None = None
    weight_dtype: torch.dtype = torch.float32
    uploads: Any = None  # a diffusers_tread.hub.CheckpointUploads
    global_step: int = 0
    data: Any = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def elapsed(self) -> float:
        """Seconds the run has trained, a resumed run's earlier time included."""
        return time.time() - self.started

    @property
    def total_batch_size(self) -> int:
        """Examples per optimization step, over all processes and accumulation micro-steps."""
        args = self.args
        return args.train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps

    @property
    def loss_history(self) -> Path:
        """The run's loss_history.csv (`checkpointing.LOSS_HISTORY`): one row per step, appended at every flush."""
        from .checkpointing import LOSS_HISTORY

        return Path(self.args.output_dir, LOSS_HISTORY)

    def start_generator(self) -> torch.Generator:
        """Sets and returns ``generator``: one per process, on the accelerator's device, seeded with ``--seed`` and
        the process index (`checkpointing.process_seed`: no two (seed, process) pairs share a stream). It draws all
        training randomness, so a checkpoint can carry it and a resumed run draws exactly what the uninterrupted run
        would have."""
        from .checkpointing import process_seed

        seed = process_seed(self.args.seed, self.accelerator.process_index)
        self.generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        return self.generator

    def start_uploads(self) -> None:
        """With ``--push_to_hub --push_checkpoints``, sets ``uploads``: the checkpoints then go to the Hub repo in the
        background as they are written (`hub.CheckpointUploads`)."""
        from .hub import CheckpointUploads

        if self.args.push_to_hub and self.args.push_checkpoints:
            self.uploads = CheckpointUploads(self.repo_id, self.args.hub_token)

    def finish_uploads(self) -> None:
        """At the end of training, before the final upload: wait for the checkpoints' uploads (retrying failed ones)
        and log what reached the Hub and what did not."""
        from accelerate.logging import get_logger

        if self.uploads is not None:
            self.uploads.wait()
            get_logger(__name__, log_level="INFO").info(self.uploads.report())


def resume_run(run: RunState, settings: dict, steps_per_epoch: int):
    """Stage 5 of both scripts: record the run's ``settings`` (``fixed`` and ``changeable``, see `run_settings`) in
    every checkpoint, then resume from ``--resume_from_checkpoint`` (`resume_from_checkpoint`, which refuses a
    checkpoint whose fixed settings differ). The changed settings go to ``args.changed_settings`` (for the model card)
    and the clock moves back by the time the checkpoint had run; a run that already finished ends the accelerator's
    trackers. Returns the `ResumePoint` (``finished``: the caller returns)."""
    from .checkpointing import record_run_settings, resume_from_checkpoint

    args, accelerator = run.args, run.accelerator
    record_run_settings(accelerator, **settings)
    resume = resume_from_checkpoint(
        accelerator, args.output_dir, args.resume_from_checkpoint, steps_per_epoch,
        args.gradient_accumulation_steps, args.max_train_steps,
    )  # fmt: skip
    if resume.finished:
        accelerator.end_training()
        return resume
    args.changed_settings = resume.changes
    run.started -= resume.seconds_before  # the elapsed-time column of loss_history.csv continues from the checkpoint
    return resume


def checkpoint_or_stop(run: RunState, step: int, stop: dict, checkpoint_due: bool, stop_due: bool) -> bool:
    """A step's checkpoint, written when due or when a stop signal came (``stop`` from `install_stop_handlers`,
    ``stop_due`` from `stop_requested`, which all processes agree on). On a stop the log says how to continue, the
    signal handlers are restored and the trackers end: returns True, and the training loop returns."""
    from accelerate.logging import get_logger

    from .checkpointing import restore_stop_handlers, save_checkpoint

    args, accelerator = run.args, run.accelerator
    if checkpoint_due or stop_due:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, run.uploads)
    if not stop_due:
        return False
    get_logger(__name__, log_level="INFO").info(
        f"Stopped by signal {stop['signal']} at step {step} after saving a checkpoint; continue with "
        "--resume_from_checkpoint latest."
    )
    restore_stop_handlers(stop)
    accelerator.end_training()
    return True


def card_training_fields(run: RunState, script: str, final_loss: float) -> dict[str, Any]:
    """What both scripts' model cards (`hub.ModelCardInfo`, `hub.LoraCardInfo`) say of how the run trained: global
    batch, learning rate and schedule, precision, hardware, time, final loss, and the command that ran ``script``
    (the Hub token redacted, the settings changed on resumes noted)."""
    import platform

    from .checkpointing import settings_note
    from .redaction import launch_command

    args = run.args
    hardware = (
        f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    return {
        "global_batch_size": run.total_batch_size,
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "mixed_precision": args.mixed_precision or "no",
        "hardware": hardware,
        "training_time": f"{run.elapsed / 60:.1f} min",
        "final_loss": f"{final_loss:.4f}",
        "command": launch_command(script, run.argv, [args.hub_token])
        + settings_note(getattr(args, "changed_settings", [])),
    }


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


def train_steps_for(args: argparse.Namespace, train_dataloader) -> int:
    """The run's number of optimization steps: ``max_train_steps`` when given, else ``num_train_epochs`` epochs of
    ``train_dataloader`` at ``gradient_accumulation_steps`` batches per update. The caller stores it (both scripts set
    ``args.max_train_steps`` with it, so the run's config and model card say what ran)."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    return args.num_train_epochs * math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)


def make_lr_scheduler(optimizer, args: argparse.Namespace, max_train_steps: int, num_processes: int):
    """Diffusers' `get_scheduler` (``lr_scheduler``, ``lr_warmup_steps``) over ``max_train_steps`` (see
    `train_steps_for`). The scheduler steps once per process per update, as in Diffusers' examples
    (`accelerator.prepare` wraps it), hence the step counts times ``num_processes``."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )


def _location(filename: str, lineno: int) -> str:
    """``file:line`` short enough for one line: from the installed package on (``torch/nn/functional.py:12``), else
    the file's folder and name (``training/train_tread.py:456``)."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        parts = parts[len(parts) - parts[::-1].index("site-packages") :]
    else:
        parts = parts[-2:]
    return f"{'/'.join(parts)}:{lineno}"


def _is_expected(error: BaseException, own_folders: Sequence[Path]) -> bool:
    """Whether ``error`` is a failure the scripts expect and explain (see `main_with_messages`)."""
    if isinstance(error, (ValueError, FloatingPointError, OSError)):
        return True
    if type(error) is not RuntimeError:  # torch.OutOfMemoryError, torch.AcceleratorError (kernel errors), any other
        return False
    # A message we wrote: a `raise` statement in this library or the script, not an operation that failed there
    # (a PyTorch op raises from C, so its innermost Python frame is the line that called it).
    frames = traceback.extract_tb(error.__traceback__)
    return (
        bool(frames)
        and (frames[-1].line or "").startswith("raise ")
        and any(Path(frames[-1].filename).resolve().is_relative_to(own) for own in own_folders)
    )


def main_with_messages(main: Callable[[], object]) -> None:
    """Run a script's ``main`` so that the failures it expects and explains end with that message (tokens redacted),
    the file and line it was raised at, and exit status 1 instead of a traceback: bad data or settings
    (``ValueError``), a diverging loss (``FloatingPointError``), a full disk, a missing file or an unreachable Hub
    (``OSError``), and the ``RuntimeError`` messages this library and the scripts raise themselves (e.g. a failed
    final upload). Anything else keeps its traceback: an out-of-memory or kernel error (``torch.OutOfMemoryError``,
    ``torch.AcceleratorError``), any other ``RuntimeError`` (a failed PyTorch operation: a bug, a shape mismatch),
    and every other exception. ``TREAD_TRACEBACK=1`` shows the traceback of every failure."""
    own_folders = [Path(__file__).resolve().parent]  # this library, and the script's folder
    if getattr(main, "__code__", None) is not None:
        own_folders.append(Path(main.__code__.co_filename).resolve().parent)
    try:
        main()
    except Exception as error:
        if os.environ.get("TREAD_TRACEBACK") == "1" or not _is_expected(error, own_folders):
            raise
        frames = traceback.extract_tb(error.__traceback__)
        where = f"raised at {_location(frames[-1].filename, frames[-1].lineno)}" if frames else "raised"
        own = [f for f in frames if any(Path(f.filename).resolve().is_relative_to(d) for d in own_folders)]
        if own and own[-1] is not frames[-1]:  # raised in another library: also where our code called it
            where += f", called from {_location(own[-1].filename, own[-1].lineno)}"
        message = redact_tokens(f"error: {type(error).__name__}: {error}")
        print(f"{message}\n({where}; set TREAD_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


# ----------------------------------------------------------------------------------------------------------------------
# The command-line options both training scripts share
# ----------------------------------------------------------------------------------------------------------------------


def add_optimization_arguments(
    parser: argparse.ArgumentParser,
    *,
    train_batch_size: int,
    num_train_epochs: int,
    learning_rate: float | None,
    adam_weight_decay: float,
    learning_rate_help: str | None = None,
    adam_weight_decay_help: str | None = None,
) -> None:
    """The optimisation options of both training scripts (seed, batch, steps, LR schedule, AdamW, clipping, precision),
    as Diffusers' training examples name them; the defaults that differ between the scripts are arguments."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--train_batch_size", type=int, default=train_batch_size, help="per device")
    group.add_argument("--num_train_epochs", type=int, default=num_train_epochs)
    group.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--learning_rate", type=float, default=learning_rate, help=learning_rate_help)
    group.add_argument("--scale_lr", action="store_true", help="multiply the LR by batch x accumulation x processes")
    group.add_argument(
        "--lr_scheduler",
        default="constant",
        help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup",
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=adam_weight_decay, help=adam_weight_decay_help)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    group.add_argument("--allow_tf32", action="store_true")


def add_run_arguments(parser: argparse.ArgumentParser, *, output_dir: str, tracker_project_name: str) -> None:
    """The run-folder, checkpoint, logging and Hub options of both training scripts (what `start_run`,
    `diffusers_tread.checkpointing` and `diffusers_tread.hub` read); check them with `check_step_intervals` and
    `check_run_arguments` after parsing."""
    group = parser.add_argument_group("run folder, checkpoints, logging, Hub")
    group.add_argument("--output_dir", default=output_dir)
    group.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="delete the checkpoints and outputs of an earlier run in --output_dir (otherwise such a folder is refused)",
    )
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    group.add_argument("--report_to", default="tensorboard", help='tensorboard, wandb, all or "none"')
    group.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="read the loss back from the device every N steps (one host sync each; it stays on the device between), "
        "and look for stop signals then",
    )
    group.add_argument("--logging_dir", default="logs")
    group.add_argument("--tracker_project_name", default=tracker_project_name)
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--push_checkpoints", action="store_true", help="also upload checkpoints, in the background")
    group.add_argument("--hub_model_id", default=None)
    group.add_argument("--hub_token", default=None, help="default (safer): HF_TOKEN or the `hf auth login` token")
    group.add_argument("--hub_private_repo", action="store_true")


def add_augmentation_arguments(parser: argparse.ArgumentParser) -> None:
    """The image (clip) augmentation options of both training scripts, as the datasets take them: ``--center_crop``,
    ``--random_flip`` and ``--bad_images`` (what an unreadable image does, `data.BAD_IMAGE_POLICIES`)."""
    from .data import BAD_IMAGE_POLICIES, BAD_IMAGES_HELP

    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--bad_images", choices=BAD_IMAGE_POLICIES, default="stop", help=BAD_IMAGES_HELP)


def check_step_intervals(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """``parser.error`` for a step interval below 1 (``--logging_steps 0`` would never log, and divide by zero)."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (it is a step interval)")
