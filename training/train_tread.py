#!/usr/bin/env python
"""Train a class-conditional DiT with TREAD token routing (Krause et al., arXiv 2501.04765) using Accelerate.

`--model_type ssm` trains the state-space backbone (`TreadSSM2DModel`, bidirectional Mamba blocks) instead; everything
else (objectives, losses, routes, checkpoints, the saved `TreadDiTPipeline`) is the same.

With no arguments it trains a small TREAD model in pixel space on scikit-learn's bundled handwritten digits (16x16,
10 classes) and writes a `TreadDiTPipeline` folder with a sample grid; flags scale it to ImageNet-256 latents.

    accelerate launch training/train_tread.py
    accelerate launch training/train_tread.py --latents_dir imagenet-latents --model_config DiT-XL/2 ...  # see README

The story, top to bottom: `parse_args`, then `main()`, which runs the stages and holds the training loop; each stage
is a function defined below `main` (or in the library), in the order it runs: `start_run` (accelerator, seed, output
folder, Hub repo) -> `load_training_data` -> `build_model`, `build_ema`, `register_weight_hooks` (model, EMA, checkpoint
hooks) -> `prepare_optimization`, `start_logging` (optimizer, data loader, LR schedule, trackers) ->
`resume_run` -> the loop (`batch_loss`, `flush_losses`, `checkpoint_or_stop`) -> `save_final_pipeline`,
`hub.upload_final_output`.
The math lives in the library: `diffusers_tread.objectives` (noising, targets, samplers), `diffusers_tread.losses`
(route-aware reduction) and the model's forward (routing).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import math
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file
from tqdm.auto import tqdm

# training_utils: parse_args declares and checks the options both training scripts share with its command-line toolkit.
from diffusers_tread import (
    PRESETS,
    SSM_PRESETS,
    TreadDiTPipeline,
    TreadSSM2DModel,
    TreadTransformer2DModel,
    hub,
    model_class_for_config,
    training_utils,
)
from diffusers_tread.checkpointing import (
    final_output,
    install_stop_handlers,
    register_checkpoint_hooks,
    restore_stop_handlers,
    stop_requested,
)
from diffusers_tread.data import (
    LatentShardDataset,
    check_latents_match,
    check_latents_options,
    collate_examples,
    first_readable_example,
    load_digits,
    load_image_dataset,
    load_latents_metadata,
)
from diffusers_tread.losses import TREAD_LOSSES
from diffusers_tread.objectives import OBJECTIVES, get_objective
from diffusers_tread.repa import (
    PROJECTOR_FOLDER,
    REPA_LOSS_WEIGHT,
    REPA_PROJECTOR_DIM,
    RepaProjector,
    RepaTerm,
    prepare_repa,
)
from diffusers_tread.routing import ROUTE_REINSERTION_MODES, resolve_routes
from diffusers_tread.sharding import (
    full_model,
    gather_full_ema_state_dict,
    gather_full_state_dict,
    is_sharded,
    load_full_state_dict,
    save_full_pretrained,
    shard_ema_like,
)
from diffusers_tread.training_utils import (
    LossLog,
    RunState,
    card_training_fields,
    checkpoint_or_stop,
    compile_step_loss,
    draw_step_randomness,
    flush_loss_log,
    image_dataset_options,
    main_with_messages,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    read_model_config,
    resume_run,
    scheduled_selection_ratios,
    start_run,
    train_steps_for,
    tread_step_loss,
)

logger = get_logger(__name__, log_level="INFO")
# --model_type: the model class (with its presets, `model_cls.presets`), the preset used when --model_config is left
# at its default, and the default LoRA targets (DiT's attention projections; the SSM mixer's input and output
# projections).
MODEL_TYPES = {
    "dit": (TreadTransformer2DModel, "DiT-Tiny/2", "to_q,to_k,to_v,to_out.0"),
    "ssm": (TreadSSM2DModel, "SSM-Tiny/2", "in_proj,out_proj"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The library's parser: no abbreviations (issue #14) and every message it prints has its tokens redacted.
    parser = training_utils.ArgumentParser(
        description="Train a DiT (or, with --model_type ssm, a state-space model) with TREAD token routing."
    )
    # Model
    parser.add_argument(
        "--model_type",
        choices=sorted(MODEL_TYPES),
        default="dit",
        help="dit: TreadTransformer2DModel; ssm: TreadSSM2DModel (bidirectional Mamba blocks)",
    )
    parser.add_argument(
        "--model_config",
        default=None,
        help=f"a preset ({', '.join(PRESETS)}; with --model_type ssm: {', '.join(SSM_PRESETS)}) or a config.json "
        "(default: DiT-Tiny/2, or SSM-Tiny/2 with --model_type ssm)",
    )
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="DiT or TREAD checkpoint to fine-tune")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument(
        "--routes",
        type=training_utils.parse_routes,
        default=None,
        help='"paper" (2..depth-4 at 0.5, the default for new models; a TREAD checkpoint keeps its '
        'own), "none", JSON, or start:end:ratio[,start:end:ratio]',
    )
    parser.add_argument(
        "--route_reinsertion",
        choices=ROUTE_REINSERTION_MODES,
        default=None,
        help="pre_route (ICCV, default for new models) or pre_route_plus_input (v1)",
    )
    parser.add_argument(
        "--disable_routing_after_step",
        type=int,
        default=None,
        help='train without routing from this step on: the paper\'s final "(F)" fine-tune',
    )
    parser.add_argument(
        "--selection_ratio_warmup_steps",
        type=int,
        default=0,
        help="ramp every route's selection ratio up from 0 over this many steps (e.g. when routing "
        "starts on a pretrained dense model)",
    )
    parser.add_argument(
        "--selection_ratio_anneal_steps",
        type=int,
        default=0,
        help="ramp the selection ratios down to 0 over the last this-many steps",
    )
    # LoRA fine-tuning (PEFT adapters on a pretrained DiT/TREAD checkpoint, routes on)
    parser.add_argument(
        "--lora_rank", type=int, default=None, help="train LoRA adapters of this rank, not all weights"
    )
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated module names (default: to_q,to_k,to_v,to_out.0; for ssm: in_proj,out_proj)",
    )
    # Objective and loss
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="flow")
    parser.add_argument(
        "--tread_loss",
        choices=TREAD_LOSSES,
        default="plain",
        help="plain: ordinary loss on all tokens (ICCV); adapted: v1's loss over all routes + MAE",
    )
    parser.add_argument("--mae_loss_weight", type=float, default=0.1, help="lambda of the adapted loss's MAE term")
    parser.add_argument("--class_dropout_prob", type=float, default=0.1, help="CFG label dropout, once per sample")
    # Representation alignment (REPA, arXiv 2410.06940; diffusers_tread.repa)
    repa = parser.add_argument_group("REPA", "align a DiT block with a frozen vision encoder's patch features")
    repa.add_argument("--repa_encoder", default=None, help="a transformers vision model, e.g. facebook/dinov2-base")
    repa.add_argument(
        "--repa_layer", type=int, default=None, help="block aligned, 0-indexed (default: the paper's 8/28 of depth)"
    )
    repa.add_argument("--repa_loss_weight", type=float, default=REPA_LOSS_WEIGHT, help="lambda (paper: 0.5)")
    repa.add_argument("--repa_projector_dim", type=int, default=REPA_PROJECTOR_DIM, help="projector MLP width")
    repa.add_argument(
        "--repa_delayed_routing",
        action="store_true",
        help="the route covering --repa_layer drops its tokens only after that block (aligned on all tokens)",
    )
    # Data
    parser.add_argument("--dataset_name", default=None, help="datasets.load_dataset name or local path")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_data_dir", default=None, help="an imagefolder (one subfolder per class)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--resolution", type=int, default=None, help="image size; default 16 for digits, else 256")
    training_utils.add_augmentation_arguments(parser)  # --center_crop, --random_flip, --bad_images
    parser.add_argument("--vae", default=None, help="AutoencoderKL path or Hub id for latent training")
    parser.add_argument("--vae_subfolder", default=None)
    parser.add_argument(
        "--sample_posterior",
        action="store_true",
        help="encode with a VAE posterior sample instead of its mean (as extract_latents.py)",
    )
    parser.add_argument("--latents_dir", default=None, help="precomputed latents from training/extract_latents.py")
    parser.add_argument(
        "--skip_latents_checksum",
        action="store_true",
        help="do not check the latent shards' SHA-256 at start (one read of every shard: ~1 s per GB on a local SSD)",
    )
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    # Optimisation, the run folder, checkpoints, logging and the Hub: the options both training scripts share
    training_utils.add_optimization_arguments(
        parser, train_batch_size=64, num_train_epochs=100, learning_rate=None, adam_weight_decay=0.0,
        learning_rate_help="default 1e-4 (DiT); 5e-4 for the digits", adam_weight_decay_help="DiT uses 0",
    )  # fmt: skip
    training_utils.add_run_arguments(parser, output_dir="tread-digits", tracker_project_name="train_tread")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (see --compile_scope)",
    )
    parser.add_argument(
        "--compile_scope",
        choices=["blocks", "step"],
        default="blocks",
        help="blocks: the model's repeated blocks (regional compilation: routing stays eager, each block compiles once "
        "with fullgraph=True and is reused by all); step: forward, loss and backward as one fullgraph graph, the "
        "step's random draws made ahead of it (the optimizer and clipping stay eager)",
    )
    parser.add_argument(
        "--compile_mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode; reduce-overhead records CUDA graphs (on a GPU)",
    )
    parser.add_argument(
        "--compile_backend", default="inductor", help="torch.compile backend (e.g. aot_eager: no code generation)"
    )
    # EMA: DiT keeps a fixed 0.9999 decay (--no-ema_warmup); the default warms the decay up, 1 - (1 + step)^-0.75,
    # which matters for short runs and reaches 0.9999 after ~215k steps.
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument("--ema_warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ema_power", type=float, default=0.75)
    # Validation
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument(
        "--validation_class_labels", default=None, help="comma-separated ids or names (default: the first 10 classes)"
    )
    parser.add_argument("--num_validation_images", type=int, default=8, help="per class")
    parser.add_argument("--validation_num_inference_steps", type=int, default=50)
    parser.add_argument("--validation_guidance_scale", type=float, default=2.0)
    args = parser.parse_args(argv)

    if args.pretrained_model_name_or_path and args.model_config is not None:
        parser.error("give --model_config or --pretrained_model_name_or_path, not both")
    model_cls, default_preset, default_lora_targets = MODEL_TYPES[args.model_type]
    presets = model_cls.presets
    other_presets = {name for cls, _, _ in MODEL_TYPES.values() if cls is not model_cls for name in cls.presets}
    if args.model_config in other_presets:
        parser.error(
            f"--model_config {args.model_config} is not a --model_type {args.model_type} preset; choose one of "
            f"{', '.join(presets)}, a config.json, or the matching --model_type"
        )
    args.model_config = args.model_config or default_preset
    args.lora_target_modules = args.lora_target_modules or default_lora_targets
    if args.latents_dir and (args.dataset_name or args.train_data_dir):
        parser.error("--latents_dir replaces --dataset_name/--train_data_dir; give one data source")
    if args.latents_dir:
        # Extraction froze the crops, flips and posterior draws: refuse the options the latents cannot honour.
        try:
            latents_warnings = check_latents_options(
                load_latents_metadata(args.latents_dir),
                resolution=args.resolution,
                center_crop=args.center_crop,
                random_flip=args.random_flip,
                sample_posterior=args.sample_posterior,
            )
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"--latents_dir {args.latents_dir}: {error}")
        for message in latents_warnings:
            warnings.warn(f"--latents_dir {args.latents_dir}: {message}", stacklevel=2)
    if args.dataset_name and args.train_data_dir:
        parser.error("give --dataset_name or --train_data_dir, not both")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        parser.error("--class_dropout_prob must be in [0, 1)")
    if args.repa_encoder is None and (args.repa_layer is not None or args.repa_delayed_routing):
        parser.error("--repa_layer and --repa_delayed_routing need --repa_encoder")
    if args.repa_encoder and args.model_type != "dit":
        parser.error("--repa_encoder aligns a DiT block; use --model_type dit")
    if args.repa_encoder and (args.repa_loss_weight <= 0 or args.repa_projector_dim < 1):
        parser.error("--repa_loss_weight must be > 0 and --repa_projector_dim at least 1")
    if args.compile and args.compile_scope == "step":
        if args.repa_encoder:
            parser.error(
                "--compile_scope step does not cover REPA yet; use --compile_scope blocks with --repa_encoder"
            )
        if args.mixed_precision == "fp16":
            parser.error("--compile_scope step runs backward inside the graph, without fp16's loss scaler; use bf16")
    if args.lora_rank is not None and not args.pretrained_model_name_or_path:
        parser.error("--lora_rank fine-tunes a checkpoint: give --pretrained_model_name_or_path")
    training_utils.check_step_intervals(parser, args, ("logging_steps", "checkpointing_steps", "validation_steps"))
    if args.num_validation_images < 1:  # the validation grids and the final sample grid have one column per image
        parser.error("--num_validation_images must be at least 1 (images per class in the sample grids)")
    training_utils.check_validation_sampling(parser, args)  # before training, not at the first validation
    training_utils.check_run_arguments(parser, args)  # the output folder, the checkpoint limit, the Hub token
    # The built-in digits job (no data flag) is a ~10-minute CPU run of a 0.8M-parameter model: it wants a higher
    # learning rate than DiT's 1e-4 and a step budget rather than 100 epochs.
    builtin_digits = not (args.latents_dir or args.dataset_name or args.train_data_dir)
    if args.learning_rate is None:
        args.learning_rate = 5e-4 if builtin_digits else 1e-4
    if args.max_train_steps is None and builtin_digits:
        args.max_train_steps = 3000
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.time()

    # 1. Accelerator, logging, seed, output folder and Hub repo.
    accelerator, repo_id = start_run(args)  # accelerator, logging, seed, output folder, Hub repo
    run = RunState(args, argv, accelerator, repo_id, started)

    # 2. Data: precomputed latents, an image dataset (optionally through a VAE), or the built-in digits.
    data = run.data = load_training_data(args)

    # 3. Model, objective, EMA, and the checkpoint hooks that save them with the training generator.
    objective = get_objective(args.objective)
    model = build_model(args, data, objective)
    ema_model = build_ema(args, model)
    repa = build_repa(args, data, model)  # (encoder or None, projector, layer); refuses bad REPA input
    run.start_generator()  # one per process: all training randomness (noise, timesteps, label dropout, routes)
    register_weight_hooks(accelerator, args, run.generator, ema_model)

    # 4. Optimizer, data loader, LR schedule (all through `accelerator.prepare`), trackers.
    projector = accelerator.prepare(repa[1]) if repa else None  # trained with the model, saved in checkpoints only
    model, optimizer, train_dataloader, lr_scheduler = prepare_optimization(
        args, accelerator, model, ema_model, data, extra_parameters=list(projector.parameters()) if repa else []
    )
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if data.vae is not None:
        data.vae.to(accelerator.device, dtype=run.weight_dtype)
    if repa and repa[0] is not None:
        repa[0].to(accelerator.device, dtype=run.weight_dtype)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    unwrapped = accelerator.unwrap_model(model)
    start_logging(run, unwrapped, num_train_epochs)
    compiled_step = compile_training_step(run, model, unwrapped, objective)  # None unless --compile_scope step

    # 5. Resume (the main process picks the checkpoint, refuses settings that would not continue its run; a finished
    # run only says so).
    resume = resume_run(run, resume_settings(args, unwrapped, data, run.total_batch_size), num_update_steps_per_epoch)
    if resume.finished:
        return
    global_step, first_epoch, resume_step = resume.global_step, resume.first_epoch, resume.skip_batches
    run.start_uploads()  # --push_checkpoints

    # 6. Training loop.
    stop = install_stop_handlers()
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    step_started, steps_per_s, last_loss, skipped_images = time.time(), float("nan"), float("nan"), 0
    # The loss stays on the device: summed over accumulation micro-steps here, read back every --logging_steps.
    step_loss, pending_losses = torch.zeros((), device=accelerator.device), LossLog()
    for epoch in range(first_epoch, num_train_epochs if global_step < args.max_train_steps else first_epoch):
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and resume_step:
            loader = accelerator.skip_first_batches(train_dataloader, resume_step)
        for batch in loader:
            if args.disable_routing_after_step is not None and global_step >= args.disable_routing_after_step:
                unwrapped.disable_routing()
            with accelerator.accumulate(model, *([projector] if repa else [])):
                repa_term = None
                if repa:  # lambda * Eq. 8 on the aligned block, this batch's targets
                    targets = repa_targets(repa, batch)
                    repa_term = RepaTerm(projector, repa[2], args.repa_loss_weight, args.repa_delayed_routing, targets)
                loss = batch_loss(run, model, unwrapped, objective, batch, global_step, repa_term, compiled_step)
                # the logged loss: averaged over accumulation micro-steps (and processes, at the flush)
                step_loss += loss.detach() / args.gradient_accumulation_steps
                if compiled_step is None:  # the compiled step ran its backward
                    accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    clipped = itertools.chain(model.parameters(), projector.parameters()) if repa else None
                    accelerator.clip_grad_norm_(clipped or model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            skipped_images += int(batch["num_skipped"])

            if not accelerator.sync_gradients:
                continue
            if ema_model is not None:
                ema_model.step(model.parameters())
            global_step += 1
            progress_bar.update(1)
            pending_losses.add(global_step, step_loss)
            step_loss = torch.zeros_like(step_loss)
            steps_per_s = 1.0 / max(time.time() - step_started, 1e-9)
            step_started = time.time()
            logs = {"lr": lr_scheduler.get_last_lr()[0], "steps_per_s": steps_per_s}
            if ema_model is not None:
                logs["ema_decay"] = ema_model.cur_decay_value
            if skipped_images:
                logs["skipped_images"] = skipped_images
            accelerator.log(logs, step=global_step)

            checkpoint_due = global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps
            validation_due = global_step % args.validation_steps == 0 or global_step == args.max_train_steps
            sync_due = global_step % args.logging_steps == 0 or checkpoint_due or validation_due
            # Processes agree on a stop with an all-reduce (a host sync): only at the steps that sync anyway.
            stop_due = sync_due and stop_requested(accelerator, stop)
            if sync_due:  # before any checkpoint: none is written after a non-finite loss
                rows = flush_losses(run, pending_losses, progress_bar, lr_scheduler, steps_per_s)
                last_loss = rows[-1][1] if rows else last_loss
            if checkpoint_or_stop(run, global_step, stop, checkpoint_due, stop_due):
                return
            if validation_due:
                sampler, sampler_ema = main_process_weights(accelerator, unwrapped, ema_model)  # gathers if sharded
                if accelerator.is_main_process:
                    log_validation(run, sampler, sampler_ema, objective, global_step)
                del sampler, sampler_ema
            if global_step >= args.max_train_steps:
                break

    # 7. Save the final pipeline (EMA weights), model card, and push.
    rows = flush_losses(run, pending_losses, progress_bar, lr_scheduler, steps_per_s)
    last_loss = rows[-1][1] if rows else last_loss
    restore_stop_handlers(stop)
    run.finish_uploads()  # the checkpoints' uploads finish (or are reported) before the final one
    accelerator.wait_for_everyone()
    final_model, final_ema = main_process_weights(accelerator, unwrapped, ema_model)  # gathers if sharded (FSDP)
    if accelerator.is_main_process:
        save_final_pipeline(run, final_model, final_ema, objective, global_step, last_loss)
        if args.push_to_hub:
            hub.upload_final_output(args.output_dir, repo_id, args.hub_token)  # a failure says how to retry
    accelerator.end_training()


class TrainingData(NamedTuple):
    """What the data stage hands on: the examples, their classes, the VAE (if any) and the shape the model sees."""

    dataset: torch.utils.data.Dataset  # examples with "latents" or "pixel_values", "class_labels", "num_skipped"
    id2label: dict[int, str]
    description: str  # for the model card
    vae: AutoencoderKL | None  # encodes images to latents in the loop, decodes the samples
    channels: int  # of the model's input (latent channels when there is a VAE or --latents_dir)
    size: int  # of the model's input, square

    @property
    def num_classes(self) -> int:
        return len(self.id2label)


def load_training_data(args) -> TrainingData:
    """Stage 2: --latents_dir (with the VAE the extraction used, to decode samples), --dataset_name/--train_data_dir
    (encoded by --vae in the loop, if given), or the built-in digits; checks --validation_class_labels now, not at
    the first validation."""
    if args.latents_dir:
        dataset = LatentShardDataset(
            args.latents_dir,
            random_flip=args.random_flip,
            seed=args.seed,
            repa_features=bool(args.repa_encoder and load_latents_metadata(args.latents_dir).get("repa_encoder")),
            verify_checksums=not args.skip_latents_checksum,
        )
        id2label = dataset.id2label
        description = f"latents from {args.latents_dir}"
        vae = load_vae(
            args.vae or dataset.metadata.get("vae"),
            args.vae_subfolder or dataset.metadata.get("vae_subfolder"),
            args,
        )
    else:
        vae = load_vae(args.vae, args.vae_subfolder, args)
        image_channels = vae.config.in_channels if vae is not None else None
        if args.dataset_name or args.train_data_dir:
            dataset, id2label = load_image_dataset(
                **image_dataset_options(args),
                resolution=args.resolution or 256,
                center_crop=args.center_crop,
                random_flip=args.random_flip,
                num_channels=image_channels or 3,
                bad_images=args.bad_images,
                seed=args.seed,
            )
            description = args.dataset_name or args.train_data_dir
        else:
            dataset, id2label = load_digits(
                resolution=args.resolution or 16, split="train", num_channels=image_channels or 1
            )
            description = "scikit-learn handwritten digits (train split)"
    validation_class_ids(args, id2label)  # fail now, not at the first validation, on unknown classes
    example = first_readable_example(dataset)  # with --bad_images skip, item 0 may be a skipped image (None)
    if args.latents_dir:
        channels, size = example["latents"].shape[0], example["latents"].shape[-1]
    elif vae is not None:
        downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        channels, size = vae.config.latent_channels, example["pixel_values"].shape[-1] // downsample
    else:
        channels, size = example["pixel_values"].shape[0], example["pixel_values"].shape[-1]
    return TrainingData(dataset, id2label, description, vae, channels, size)


def build_model(args, data: TrainingData, objective):
    """Stage 3a: the model to train, checked against the data: --pretrained_model_name_or_path (a model or pipeline
    folder; a TREAD checkpoint keeps its routes unless --routes is given) or a new one from --model_config (a preset or
    a config.json) sized to the data. Then LoRA adapters (--lora_rank), gradient checkpointing, train mode and
    regional compilation (--compile --compile_scope blocks; the step scope compiles in `compile_training_step`)."""
    model_cls = MODEL_TYPES[args.model_type][0]
    tread_kwargs = {} if args.route_reinsertion is None else {"route_reinsertion": args.route_reinsertion}
    if args.pretrained_model_name_or_path:
        path = args.pretrained_model_name_or_path
        subfolder = None if Path(path, "config.json").is_file() else "transformer"  # a model or a pipeline folder
        load_kwargs = dict(subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)
        config = model_cls.load_config(path, **load_kwargs)
        checkpoint_cls = model_class_for_config(config)  # a ValueError names any class it cannot load
        if checkpoint_cls is not model_cls:
            model_type = next(kind for kind, (cls, _, _) in MODEL_TYPES.items() if cls is checkpoint_cls)
            raise ValueError(f"{path} holds a {config['_class_name']}; train it with --model_type {model_type}.")
        # Keep a TREAD checkpoint's routes unless --routes is given; a plain DiT gets the paper's route.
        routes = args.routes if args.routes is not None else config.get("routes") or "paper"
        routes = resolve_routes(routes, config["num_layers"])
        model = model_cls.from_pretrained(path, variant=args.variant, routes=routes, **load_kwargs, **tread_kwargs)
    else:
        overrides = dict(
            in_channels=data.channels,
            out_channels=objective.model_out_channels(data.channels),
            sample_size=data.size,
            num_embeds_ada_norm=data.num_classes,
            **tread_kwargs,
        )
        routes = "paper" if args.routes is None else args.routes
        if args.model_config in model_cls.presets:
            model = model_cls.from_preset(args.model_config, routes=routes, **overrides)
        else:
            config = read_model_config(args.model_config, model_cls, model_cls.presets) | overrides
            if args.routes is not None or "routes" not in config:
                config["routes"] = resolve_routes(routes, config["num_layers"])
            model = model_cls.from_config(config)
    check_model_matches_data(model, data.channels, data.size, data.num_classes, objective)
    if args.latents_dir:
        check_latents_match(
            data.dataset.metadata,
            in_channels=model.config.in_channels,
            sample_size=model.config.sample_size,
            vae=args.vae,
        )
    if args.lora_rank:
        # Only the adapters train; saved in Diffusers' LoRA format (`save_lora_adapter`), loaded with
        # `TreadDiTPipeline.load_lora_weights`. EMA is off for LoRA, as in Diffusers' LoRA examples.
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha or args.lora_rank,
                init_lora_weights="gaussian",
                target_modules=[name.strip() for name in args.lora_target_modules.split(",")],
            )
        )
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if args.compile and args.compile_scope == "blocks":
        # Diffusers' regional compilation (`_repeated_blocks`): the blocks are the compute; the routing's gather and
        # scatter and its generator draws stay eager around them.
        model.compile_repeated_blocks(fullgraph=True, mode=args.compile_mode)
    return model


def build_ema(args, model) -> EMAModel | None:
    """Stage 3b: the EMA of the weights (--use_ema; off for LoRA). min_decay == decay without warmup gives DiT's fixed
    decay (the first update copies the weights)."""
    if not args.use_ema or args.lora_rank:
        return None
    return EMAModel(
        model.parameters(),
        decay=args.ema_decay,
        min_decay=0.0 if args.ema_warmup else args.ema_decay,
        use_ema_warmup=args.ema_warmup,
        power=args.ema_power,
        foreach=True,  # one multi-tensor update per step instead of a loop over parameters
        model_cls=MODEL_TYPES[args.model_type][0],
        model_config=model.config,
    )


def register_weight_hooks(accelerator, args, train_generator: torch.Generator, ema_model: EMAModel | None) -> None:
    """Stage 3c: how `accelerator.save_state`/`load_state` write and read the weights: checkpoints are Diffusers
    folders (transformer/, or transformer_lora/ with --lora_rank, and transformer_ema/); the library's hooks also carry
    every process's training generator. Sharded (FSDP) models are gathered to full weights first, on every process
    (`diffusers_tread.sharding`), so the folders are the same as an unsharded run's."""
    model_cls = MODEL_TYPES[args.model_type][0]
    gathered = {}  # full weights of a sharded model, gathered by every process for the main process to write

    def gather_weights(models, weights, folder):  # registered before the library's hook, which saves on one process
        gathered.clear()
        if models and is_sharded(models[0]) and not args.lora_rank:
            gathered["transformer"] = gather_full_state_dict(models[0])
            if ema_model is not None:
                gathered["transformer_ema"] = gather_full_ema_state_dict(ema_model, models[0])

    def save_weights(models, folder):
        if gathered:
            for name, state_dict in gathered.items():
                config = ema_config(ema_model) if name == "transformer_ema" else None
                save_full_pretrained(models[0], state_dict, os.path.join(folder, name), config)
            gathered.clear()
            return
        if ema_model is not None:
            ema_model.save_pretrained(os.path.join(folder, "transformer_ema"))
        for saved_model in models:
            if isinstance(saved_model, RepaProjector):  # training-only: in checkpoints, never in the pipeline
                saved_model.save_pretrained(os.path.join(folder, PROJECTOR_FOLDER))
            elif args.lora_rank:
                saved_model.save_lora_adapter(os.path.join(folder, "transformer_lora"))
            else:
                saved_model.save_pretrained(os.path.join(folder, "transformer"))

    def load_weights(models, folder):  # in place, so the optimizer keeps its parameters
        if os.path.isdir(os.path.join(folder, PROJECTOR_FOLDER)) and not args.repa_encoder:
            raise ValueError(
                f"{folder} was trained with REPA: resume with the --repa_* arguments it was trained with."
            )
        if not args.lora_rank and not os.path.isdir(os.path.join(folder, "transformer")):  # else: a Hub look-up
            lora = os.path.isdir(os.path.join(folder, "transformer_lora"))
            hint = ": it is a LoRA run's checkpoint, resume it with its --lora_rank" if lora else ""
            raise ValueError(f"{folder} holds no transformer/ weights{hint}")
        if ema_model is not None:
            loaded_ema = EMAModel.from_pretrained(os.path.join(folder, "transformer_ema"), model_cls)
            ema_model.load_state_dict(loaded_ema.state_dict())
            ema_model.to(accelerator.device)
            if models and is_sharded(models[0]):
                shard_ema_like(ema_model, models[0])  # the loaded shadows are whole: keep this process's shards
        for loaded_into in models:
            if isinstance(loaded_into, RepaProjector):
                loaded_into.load_pretrained(os.path.join(folder, PROJECTOR_FOLDER))
            elif args.lora_rank:
                lora_file = os.path.join(folder, "transformer_lora", "pytorch_lora_weights.safetensors")
                set_peft_model_state_dict(loaded_into, load_file(lora_file), adapter_name="default")
            else:  # each process keeps its shard when sharded
                load_full_state_dict(
                    loaded_into, model_cls.from_pretrained(folder, subfolder="transformer").state_dict()
                )

    accelerator.register_save_state_pre_hook(gather_weights)
    weights = "transformer_lora/pytorch_lora_weights.safetensors" if args.lora_rank else "transformer/*.safetensors"
    weight_files = (weights, *(["transformer_ema/*.safetensors"] if ema_model is not None else []))
    register_checkpoint_hooks(accelerator, train_generator, args.seed, save_weights, load_weights, weight_files)


def ema_config(ema_model: EMAModel) -> dict:
    """What ``EMAModel.save_pretrained`` adds to the model's config (decay, step, ...), which ``from_pretrained`` reads."""
    config = ema_model.state_dict()
    config.pop("shadow_params", None)
    return config


def main_process_weights(accelerator, model, ema_model: EMAModel | None):
    """The model (and EMA) with which the main process samples and saves. Sharded (FSDP): a collective, so call it on
    every process; the main process gets an ordinary copy holding the EMA weights (or the weights without EMA) and no
    EMA to swap in, the others (None, None). Not sharded: ``model`` and ``ema_model`` themselves."""
    if not is_sharded(model):
        return model, ema_model
    state = gather_full_ema_state_dict(ema_model, model) if ema_model is not None else gather_full_state_dict(model)
    if not accelerator.is_main_process:
        return None, None
    return full_model(model, state, accelerator.device), None


def prepare_optimization(
    args, accelerator, model, ema_model: EMAModel | None, data: TrainingData, extra_parameters=()
):
    """Stage 4: AdamW (--scale_lr multiplies the LR by batch x accumulation x processes), the shuffled data loader,
    the LR schedule and --max_train_steps from --num_train_epochs when not given; all through `accelerator.prepare`.
    Returns the prepared model, optimizer, data loader and LR scheduler."""
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(  # fused on CUDA, multi-tensor elsewhere
        [*model.parameters(), *extra_parameters],  # extra: e.g. the REPA projector
        args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    train_dataloader = make_train_dataloader(data.dataset, args, collate_examples)
    args.max_train_steps = train_steps_for(args, train_dataloader)
    lr_scheduler = make_lr_scheduler(optimizer, args, args.max_train_steps, accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)
        if is_sharded(model):  # FSDP: the EMA keeps shards laid out like the parameters it follows
            shard_ema_like(ema_model, model)
    if args.lora_rank and is_sharded(model):
        raise ValueError(
            "--lora_rank with FSDP is not supported (the adapters are saved unsharded); LoRA's few trainable "
            "parameters need no sharding: launch without --use_fsdp (plain data parallelism)."
        )
    return model, optimizer, train_dataloader, lr_scheduler


def resume_settings(args, model, data: TrainingData, total_batch_size: int) -> dict:
    """Stage 5: what every checkpoint records of the run (`record_run_settings`): a resume that changes a ``fixed``
    setting (objective, model, data, global batch) is refused in one line; ``changeable`` ones are logged and shown
    in the card."""
    config = {
        k: v for k, v in model.config.items() if not k.startswith("_") and k not in ("routes", "route_reinsertion")
    }
    pretrained = args.pretrained_model_name_or_path
    fixed = {
        "--objective": args.objective,
        "--model_type": args.model_type,
        "--pretrained_model_name_or_path" if pretrained else "--model_config": pretrained or args.model_config,
        "model config": config,
        "--lora_rank": args.lora_rank,
        "--lora_alpha": args.lora_alpha if args.lora_rank else None,
        "--lora_target_modules": args.lora_target_modules if args.lora_rank else None,
        "--use_ema": bool(args.use_ema and not args.lora_rank),
        "--repa_encoder": args.repa_encoder,
        "data": f"{data.description}, {len(data.dataset)} examples of {data.size}x{data.size}",
        "global batch (--train_batch_size x processes x --gradient_accumulation_steps)": total_batch_size,
    }
    changeable = {
        "--routes": model.config.routes,
        "--learning_rate": args.learning_rate,
        "--lr_scheduler": args.lr_scheduler,
        "--max_train_steps": args.max_train_steps,
        "--tread_loss": args.tread_loss,
        "--seed": args.seed,
        "--repa_layer": args.repa_layer,
        "--repa_loss_weight": args.repa_loss_weight,
    }
    return dict(fixed=fixed, changeable=changeable)


def start_logging(run: RunState, model, num_train_epochs: int) -> None:
    """Stage 4, end: start the trackers with the arguments (less the Hub token) and log the run's size."""
    args, accelerator, data = run.args, run.accelerator, run.data
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if k != "hub_token"}
        tracker_config = {
            k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in tracker_config.items()
        }
        accelerator.init_trackers(args.tracker_project_name, tracker_config)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("***** Running training *****")
    logger.info(f"  Examples = {len(data.dataset)}, classes = {data.num_classes}, epochs = {num_train_epochs}")
    logger.info(f"  Batch per device = {args.train_batch_size}, total = {run.total_batch_size}")
    logger.info(f"  Optimization steps = {args.max_train_steps}, parameters = {num_parameters / 1e6:.2f}M")
    logger.info(f"  Objective = {args.objective}, TREAD loss = {args.tread_loss}, routes = {model.config.routes}")


def batch_loss(run: RunState, model, unwrapped, objective, batch, step: int, repa=None, compiled_step=None):
    """Stage 6, one micro-step's loss: the clean data x0 (fp32; encoded by the frozen VAE in the mixed-precision dtype
    when training on images through --vae), the class labels with CFG dropout (once per sample; Diffusers' per-block
    dropout is off in the model), and the TREAD loss at this step's selection ratios. All draws come from
    ``run.generator``, in this order (posterior sample, then `draw_step_randomness`: label dropout, the loss's
    timesteps and noise, the routes), made before the step, which is then tensor arithmetic only
    (`tread_step_loss`); with ``compiled_step`` (`compile_training_step`) it runs compiled, backward included."""
    args, data, generator = run.args, run.data, run.generator
    if args.latents_dir:
        x0 = batch["latents"].float()
    elif data.vae is not None:
        with torch.no_grad():
            x0 = encode_latents(data.vae, batch["pixel_values"].to(run.weight_dtype), args.sample_posterior, generator)
            x0 = x0.float()
    else:
        x0 = batch["pixel_values"].float()
    ratios = scheduled_selection_ratios(
        unwrapped.config.routes,
        step,
        args.max_train_steps,
        args.selection_ratio_warmup_steps,
        args.selection_ratio_anneal_steps,
    )
    draws = draw_step_randomness(unwrapped, objective, x0, generator, args.class_dropout_prob, ratios)
    if compiled_step is not None:
        return compiled_step(x0, batch["class_labels"], draws, selection_ratio=ratios)
    return tread_step_loss(
        model, objective, x0, batch["class_labels"], draws, null_class=data.num_classes, selection_ratio=ratios,
        patch_size=unwrapped.config.patch_size, loss_mode=args.tread_loss, mae_loss_weight=args.mae_loss_weight,
        repa=repa,
    )  # fmt: skip


def compile_training_step(run: RunState, model, unwrapped, objective):
    """Stage 6, before the loop (--compile --compile_scope step): `tread_step_loss` with this run's model and settings
    and its backward compiled as one ``fullgraph=True`` graph (`training_utils.compile_step_loss`; the loss scaled by
    1 / --gradient_accumulation_steps, as ``accelerator.backward`` scales it); None otherwise. The optimizer, gradient
    clipping and EMA stay eager. A change of the selection ratios (warm-up, anneal) or of the routes (after
    --disable_routing_after_step) compiles the step again for the new token counts."""
    args, accelerator = run.args, run.accelerator
    if not (args.compile and args.compile_scope == "step"):
        return None
    if accelerator.num_processes > 1:
        raise ValueError(
            "--compile_scope step compiles backward into the step, which DDP's and FSDP's gradient hooks do not "
            "support in one graph; on several processes use --compile_scope blocks."
        )
    loss = partial(
        tread_step_loss, model, objective, null_class=run.data.num_classes, patch_size=unwrapped.config.patch_size,
        loss_mode=args.tread_loss, mae_loss_weight=args.mae_loss_weight,
    )  # fmt: skip
    return compile_step_loss(
        loss, backward_scale=1.0 / args.gradient_accumulation_steps, backend=args.compile_backend,
        mode=args.compile_mode,
    )  # fmt: skip


def build_repa(args, data: TrainingData, model) -> tuple | None:
    """Stage 3d (--repa_encoder): ``(encoder, projector, layer)``, the encoder None when the features were precomputed
    with the latents; every refusal (encoder, layer, grid, stored features) happens here, before training."""
    if not args.repa_encoder:
        return None
    return prepare_repa(
        args.repa_encoder, args.repa_layer, model.config.routes, model.config.num_layers, model.inner_dim,
        token_grid=model.config.sample_size // model.config.patch_size, delayed_routing=args.repa_delayed_routing,
        projector_dim=args.repa_projector_dim, latents_dir=args.latents_dir, cache_dir=args.cache_dir,
    )  # fmt: skip


def repa_targets(repa: tuple, batch) -> torch.Tensor:
    """This batch's REPA targets: the stored features, or the frozen encoder's on the batch's images."""
    return batch["repa_features"] if repa[0] is None else repa[0](batch["pixel_values"])


def flush_losses(
    run: RunState, pending: LossLog, progress_bar, lr_scheduler, steps_per_s: float
) -> list[tuple[int, float]]:
    """Stage 6: read the pending losses back (one host sync), fail on a non-finite one, show, log and append them to
    loss_history.csv (step, loss, seconds since the run started). Returns the (step, loss) rows read."""
    args, accelerator = run.args, run.accelerator
    rows = flush_loss_log(pending, accelerator.gather, args.output_dir)
    if not rows:
        return rows
    postfix = dict(loss=f"{rows[-1][1]:.4f}", lr=lr_scheduler.get_last_lr()[0], it_s=f"{steps_per_s:.2f}")
    progress_bar.set_postfix(**postfix)
    for step, value in rows:
        accelerator.log({"loss": value}, step=step)
    if accelerator.is_main_process:
        with run.loss_history.open("a", newline="") as f:
            csv.writer(f).writerows([step, f"{value:.6f}", f"{run.elapsed:.1f}"] for step, value in rows)
    return rows


def save_final_pipeline(run: RunState, model, ema_model, objective, steps: int, last_loss: float) -> None:
    """Stage 7 (main process): the `TreadDiTPipeline` with the EMA weights and routing on (the config keeps the
    routes it was trained with), a sample grid, the loss plot and the model card; with --lora_rank the adapters in
    Diffusers' LoRA format beside the unchanged base pipeline. The files are staged and moved into --output_dir at the
    end (`final_output`): a kill never leaves new weights beside an old model_index.json."""
    args, data = run.args, run.data
    if ema_model is not None:
        ema_model.store(model.parameters())
        ema_model.copy_to(model.parameters())
    model.enable_routing()
    pipeline = TreadDiTPipeline(
        transformer=model, vae=data.vae, scheduler=objective.make_scheduler(), id2label=data.id2label
    )
    with final_output(args.output_dir, steps) as staging:
        save_sample_grid(pipeline, args, data.id2label, Path(staging, "samples", "final_grid.png"))
        if args.lora_rank:
            model.save_lora_adapter(staging)
            model.unload_lora()
        pipeline.save_pretrained(staging)
        plot_loss(run.loss_history, Path(staging, "samples", "loss.png"))
        save_model_card(staging, run, model, objective, steps, last_loss)
    logger.info(f"Saved the pipeline to {args.output_dir}; samples in {Path(args.output_dir, 'samples')}")
    if ema_model is not None:
        ema_model.restore(model.parameters())


def check_model_matches_data(model, channels: int, size: int, num_classes: int, objective) -> None:
    """Fail before training, with what to change, when model and data disagree."""
    config = model.config
    problems = []
    if config.in_channels != channels:
        problems.append(f"the model takes {config.in_channels} input channels but the data has {channels}")
    if config.sample_size != size:
        problems.append(f"the model's sample_size is {config.sample_size} but the data is {size}x{size}")
    if size % config.patch_size:
        problems.append(f"the data size {size} is not divisible by the patch size {config.patch_size}")
    if config.num_embeds_ada_norm != num_classes:
        problems.append(f"the model has {config.num_embeds_ada_norm} classes but the data has {num_classes}")
    expected_out = objective.model_out_channels(config.in_channels)
    if model.out_channels != expected_out:
        problems.append(
            f"the {objective.name} objective needs {expected_out} output channels, the model has {model.out_channels}"
        )
    if problems:
        raise ValueError(
            "Model and data do not match: " + "; ".join(problems) + ". Adjust --resolution, the model "
            "config, or start from a checkpoint trained on this kind of data."
        )


def load_vae(vae_id: str | None, subfolder: str | None, args) -> AutoencoderKL | None:
    if not vae_id:
        return None
    kwargs = {"subfolder": subfolder} if subfolder else {}
    vae = AutoencoderKL.from_pretrained(
        vae_id, revision=args.revision, cache_dir=args.cache_dir, use_safetensors=True, **kwargs
    )
    return vae.requires_grad_(False).eval()


def encode_latents(vae: AutoencoderKL, pixel_values: torch.Tensor, sample: bool, generator: torch.Generator):
    """Pixels in [-1, 1] -> scaled latents, as `extract_latents.py` writes them (posterior mean unless `sample`)."""
    posterior = vae.encode(pixel_values.to(vae.device)).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def validation_class_ids(args, id2label: dict[int, str]) -> list[int]:
    if args.validation_class_labels is None:
        return list(range(min(10, len(id2label))))
    names_to_ids = {name.strip(): i for i, names in id2label.items() for name in names.split(",")}
    ids = []
    for item in args.validation_class_labels.split(","):
        item = item.strip()
        if item.isdigit():
            if int(item) >= len(id2label):
                raise ValueError(
                    f"--validation_class_labels: class id {item} is out of range (0..{len(id2label) - 1})."
                )
            ids.append(int(item))
        elif item in names_to_ids:
            ids.append(names_to_ids[item])
        else:
            close = difflib.get_close_matches(item, list(names_to_ids), n=5, cutoff=0.0)
            raise ValueError(f"--validation_class_labels: unknown class {item!r}; closest names: {close}.")
    return ids


def save_sample_grid(pipeline: TreadDiTPipeline, args, id2label, path: Path) -> Path:
    """One row per validation class, --num_validation_images columns, fixed seed."""
    class_ids = validation_class_ids(args, id2label)
    labels = [c for c in class_ids for _ in range(args.num_validation_images)]
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        labels,
        guidance_scale=args.validation_guidance_scale,
        num_inference_steps=args.validation_num_inference_steps,
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    images = [ImageOps.expand(image.convert("RGB"), border=1, fill=(96, 96, 96)) for image in images]  # cell borders
    grid = make_image_grid(images, rows=len(class_ids), cols=args.num_validation_images)
    scale = max(1, 256 // images[0].width)  # make tiny images visible
    grid = grid.resize((grid.width * scale, grid.height * scale), resample=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def log_validation(run: RunState, model, ema_model, objective, step: int) -> None:
    """Sample a class-conditional grid with the EMA weights, in eval mode (all tokens), and log it."""
    args, accelerator, vae, id2label = run.args, run.accelerator, run.data.vae, run.data.id2label
    if ema_model is not None:
        ema_model.store(model.parameters())
        ema_model.copy_to(model.parameters())
    pipeline = TreadDiTPipeline(transformer=model, vae=vae, scheduler=objective.make_scheduler(), id2label=id2label)
    path = save_sample_grid(pipeline, args, id2label, Path(args.output_dir, "samples", f"step_{step:07d}.png"))
    if ema_model is not None:
        ema_model.restore(model.parameters())
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image(
                "validation", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(str(path))}, step=step)
    logger.info(f"Validation grid at step {step}: {path}")


def plot_loss(loss_log: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not loss_log.exists():
        return
    rows = list(csv.reader(loss_log.open()))
    steps, losses = [int(r[0]) for r in rows], [float(r[1]) for r in rows]
    window = max(1, len(losses) // 50)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_model_card(folder, run: RunState, model, objective, steps: int, final_loss: float) -> None:
    """Write ``folder``/README.md (rendered by `diffusers_tread.hub` from model_cards/tread_dit.md) and
    tread_card.json."""
    args, repo_id, data = run.args, run.repo_id, run.data
    num_classes = data.num_classes
    base_model = args.pretrained_model_name_or_path
    base_model = base_model if base_model and not Path(base_model).exists() else None
    card_data = ModelCardData(
        license="apache-2.0",
        base_model=base_model,
        datasets=[args.dataset_name] if args.dataset_name and not Path(args.dataset_name).exists() else None,
    )
    if args.validation_class_labels is None:
        example_labels = list(range(min(4, num_classes)))
    else:  # ids or class names, both of which the pipeline takes
        items = [item.strip() for item in args.validation_class_labels.split(",")]
        example_labels = [int(item) if item.isdigit() else item for item in items][:4]
    config = model.config
    if isinstance(model, TreadSSM2DModel):
        backbone = f"bidirectional Mamba, {config.num_layers} layers, width {config.hidden_size}"
    else:
        backbone = f"DiT, {config.num_layers} layers, width {model.inner_dim}"
    info = hub.ModelCardInfo(
        model_name=Path(repo_id or args.output_dir).name,
        repo_id=repo_id or args.output_dir,
        backbone=f"{backbone}, patch {config.patch_size}",
        model_class=type(model).__name__,
        num_parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        num_tokens=(config.sample_size // config.patch_size) ** 2,
        routes=json.dumps(config.routes),
        route_reinsertion=config.route_reinsertion,
        disable_routing_after_step=args.disable_routing_after_step or "never",
        objective=json.dumps(objective.config()),
        tread_loss=args.tread_loss + (f" (MAE weight {args.mae_loss_weight})" if args.tread_loss == "adapted" else ""),
        dataset=data.description,
        num_examples=len(data.dataset),
        num_classes=num_classes,
        data_space="VAE latents" if data.vae is not None or args.latents_dir else "pixel space",
        steps=steps,
        ema=(f"decay {args.ema_decay}" + (f", warmup power {args.ema_power}" if args.ema_warmup else ", fixed"))
        if args.use_ema and not args.lora_rank  # LoRA runs keep no EMA
        else "off",
        example_labels=example_labels,
        num_inference_steps=args.validation_num_inference_steps,
        guidance_scale=args.validation_guidance_scale,
        **card_training_fields(run, "training/train_tread.py", final_loss),
    )
    card: ModelCard = hub.save_model_card(folder, info, card_data)  # the template shipped with the package
    logger.info(f"Model card: {len(card.text)} characters")


if __name__ == "__main__":
    main_with_messages(main)  # a message and exit status 1 for the failures main explains, not a traceback
