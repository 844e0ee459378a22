#!/usr/bin/env python
"""LoRA text-to-image and text-to-video fine-tuning with TREAD token routing (Krause et al., arXiv 2501.04765) for
PixArt, SD3, Flux, Wan 2.1/2.2 (text-to-video), SkyReels-V2 (text-to-video) and LTX-Video.

In the style of Diffusers' `train_dreambooth_lora_sd3.py` / `train_text_to_image_lora.py`: an image-caption data set (an
`imagefolder` with a `metadata.jsonl`, a local `datasets` folder, or a Hub data set) or, for a video pipeline, a folder
of clips (mp4, webm, gif) and images with a `metadata.jsonl`, a Diffusers pipeline folder or Hub id (its family comes
from its `model_index.json`), LoRA adapters (PEFT) on the transformer, and TREAD routing on the transformer's image
(video) tokens while it trains.

    accelerate launch training/train_tread_t2i_lora.py \
        --pretrained_model_name_or_path PixArt-alpha/PixArt-Sigma-XL-2-512-MS --train_data_dir my-images \
        --resolution 512 --lora_rank 16 --routes paper --validation_prompt "a photo of a red fox" --output_dir fox-lora
    accelerate launch training/train_tread_t2i_lora.py \
        --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --train_data_dir my-clips --num_frames 33 \
        --resolution 480 --lora_rank 32 --routes paper --validation_prompt "a red fox running" --output_dir fox-wan

The story, top to bottom: `parse_args`, then `main()`, which runs the stages and holds the training loop; each stage
is a function defined below `main` (or in the library) that takes the run's state (`LoraRun`, the library's
`RunState` plus this script's data) and its own inputs, in the order it runs: `start_run` (accelerator, seed, output
folder, Hub repo), `resolve_model_spec` (which model, from `model_index.json`) -> `load_captions`, `text_embeddings`
(every caption encoded ONCE, after which the text encoders are freed), `load_vae`, `build_dataset` (optionally VAE
latents cached) -> `build_transformer`, `add_routing`, `register_lora_checkpoint_hooks` (transformer + LoRA, TREAD
routing, the hooks that write and read the adapters in checkpoints) -> `prepare_optimization`, `load_noise_scheduler`, `start_logging` (optimizer, data loader, LR
schedule, trackers) -> `resume_run` -> the loop (`batch_loss`, `log_step`, `checkpoint_or_stop`,
`log_validation`) -> `save_final_lora`, `final_validation`, `save_model_card` (LoRA weights in Diffusers' format, checked
by loading them into a fresh base pipeline), `hub.upload_final_output`.
What is not glue is the library's: the model families, the step's model call and loss, and the LoRA files are
`diffusers_tread.t2i_training`; the clips are `diffusers_tread.data.videos`; the model card is
`diffusers_tread.hub.save_lora_model_card`. The loss stays on the device and is read back every --logging_steps (and
at checkpoints and validations), where stop signals are checked too: no host synchronisation in between.

Routing (`diffusers_tread.models.tread_t2i.apply_tread`) is a set of hooks on the transformer's blocks: it runs only in
train mode, touches only image tokens (text tokens and the conditioning are never routed), and leaves the module tree
and state dict alone, so PEFT's LoRA layers and Diffusers' LoRA saving and loading are unaffected. Validation switches
the model to eval mode, which samples with every token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import cast_training_params, free_memory
from diffusers.utils import export_to_video
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm

# parse_args declares and checks the options both training scripts share with `training_utils`' command-line toolkit.
from diffusers_tread import hub, training_utils

# The library's crash-safe run folder (checkpoints, final save, resume, stop signals), shared with train_tread.py, so
# that both scripts behave the same way.
from diffusers_tread.checkpointing import (
    final_output,
    install_stop_handlers,
    register_checkpoint_hooks,
    restore_stop_handlers,
    stop_requested,
)
from diffusers_tread.compat import dtype_kwarg
from diffusers_tread.data import (
    CachedLatentDataset,
    CaptionedImageDataset,
    CaptionedVideoDataset,
    caption_table,
    collate_examples,
    load_captioned_images,
    load_captioned_videos,
    load_precomputed_embeddings,
    save_precomputed_embeddings,
)
from diffusers_tread.models.tread_t2i import apply_tread
from diffusers_tread.routing import ROUTE_REINSERTION_MODES

# What is not script glue (the model families, the step's model call and loss, the LoRA files) is the library's.
from diffusers_tread.t2i_training import (
    DEFAULT_FPS,
    DEFAULT_TARGET_MODULES,
    ModelSpec,
    add_lora,
    check_routes,
    describe_routing,
    draw_noise,
    encode_prompts,
    load_lora,
    loss_from_draws,
    normalize_latents,
    num_image_tokens,
    read_transformer_lora,
    resolve_model,
    save_lora,
    training_flow_shift,
    training_noise_scheduler,
    unwrap,
    vae_compression,
)
from diffusers_tread.training_utils import (
    LossLog,
    RunState,
    card_training_fields,
    checkpoint_or_stop,
    flush_loss_log,
    main_with_messages,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    resume_run,
    start_run,
    train_steps_for,
)

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The library's parser: no abbreviations (issue #14) and every message it prints has its tokens redacted.
    parser = training_utils.ArgumentParser(description="LoRA text-to-image fine-tuning with TREAD token routing.")
    # Model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="a Diffusers pipeline folder or Hub id (PixArt-Alpha/Sigma, Stable Diffusion 3, Flux, Wan 2.1/2.2 "
        "text-to-video, SkyReels-V2 text-to-video, LTX-Video)",
    )
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None, help='e.g. "fp16"')
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument(
        "--routes",
        type=training_utils.parse_routes,
        default="paper",
        help='TREAD routes over the transformer blocks: "paper" (default), "none" (dense training), JSON, or '
        "start:end:ratio[,start:end:ratio] (end inclusive)",
    )
    parser.add_argument(
        "--route_reinsertion",
        choices=ROUTE_REINSERTION_MODES,
        default="pre_route",
        help="what a bypassed token carries past its route: its pre-route state (ICCV) or that plus the input tokens (v1)",
    )
    # LoRA
    # --lora_rank, as train_tread.py names it; --rank (Diffusers' LoRA examples' name) is kept as an alias.
    parser.add_argument("--lora_rank", "--rank", dest="lora_rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated module names; default: the attention projections (SD3/Flux: with the add_*_proj)",
    )
    # Data
    parser.add_argument("--dataset_name", default=None, help="a Hub data set, or a local `datasets` folder")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument(
        "--train_data_dir",
        default=None,
        help="an imagefolder: images plus a metadata.jsonl with the captions; for a video pipeline, clips (mp4, webm, "
        "gif) and/or images plus a metadata.jsonl",
    )
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=512, help="the side of the square crop, in pixels")
    parser.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="video pipelines: frames per clip (a window drawn per item; 1 + a multiple of the VAE's temporal "
        "compression, e.g. 4k+1 for Wan, 8k+1 for LTX; default 17 for Wan, 25 for LTX; images need 1)",
    )
    parser.add_argument("--fps", type=int, default=None, help="video: the validation videos' frame rate (and LTX's "
                        "RoPE scale); default: the family's (Wan 16, LTX 25)")  # fmt: skip
    training_utils.add_augmentation_arguments(parser)  # --center_crop, --random_flip, --bad_images
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens (default: the pipeline's own: PixArt-Alpha 120, PixArt-Sigma 300, SD3 77, Flux 512)",
    )
    parser.add_argument("--text_encoding_batch_size", type=int, default=8)
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode every image (clip) with the VAE once, before training (crops, flips and frames are then drawn "
        "once)",
    )
    parser.add_argument(
        "--precomputed_embeddings_dir",
        default=None,
        help="where the caption embeddings are kept: read if it holds them for this model and data, else written",
    )
    parser.add_argument(
        "--precompute_only",
        action="store_true",
        help="write the embeddings to --precomputed_embeddings_dir and exit (e.g. on a machine with more memory)",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    # Objective
    parser.add_argument(
        "--weighting_scheme",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        default="none",
        help="flow matching: timestep density and loss weighting (SD3 paper)",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument("--mode_scale", type=float, default=1.29)
    parser.add_argument(
        "--precondition_outputs",
        type=int,
        choices=[0, 1],
        default=None,
        help="flow matching: 1 compares x0 = x_t - sigma * v with the clean latents (the default for SD3/Flux, as "
        "Diffusers' SD3 examples); 0 compares the velocity with noise - latents (the default for Wan/LTX, their "
        "rectified-flow target)",
    )
    parser.add_argument(
        "--flow_shift",
        type=float,
        default=None,
        help="Wan/LTX: the training timestep shift (default: the pipeline's scheduler: Wan's flow_shift, LTX's "
        "token-count rule)",
    )
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="Flux's guidance embedding while training")
    # Optimisation, the run folder, checkpoints, logging and the Hub: the options both training scripts share
    training_utils.add_optimization_arguments(
        parser, train_batch_size=4, num_train_epochs=1, learning_rate=1e-4, adam_weight_decay=1e-4
    )
    training_utils.add_run_arguments(parser, output_dir="tread-t2i-lora", tracker_project_name="train_tread_t2i_lora")
    # Validation
    parser.add_argument("--validation_prompt", default=None)
    parser.add_argument("--num_validation_images", type=int, default=4, help="images (videos) per validation")
    parser.add_argument("--validation_steps", type=int, default=None, help="validate every this many steps")
    parser.add_argument("--validation_epochs", type=int, default=None, help="validate every this many epochs")
    parser.add_argument("--validation_num_inference_steps", type=int, default=25)
    parser.add_argument("--validation_guidance_scale", type=float, default=None, help="default: the pipeline's")
    args = parser.parse_args(argv)

    training_utils.check_step_intervals(
        parser, args, ("checkpointing_steps", "validation_steps", "validation_epochs", "logging_steps")
    )
    if (args.dataset_name is None) == (args.train_data_dir is None):
        parser.error("give exactly one of --dataset_name and --train_data_dir")
    if args.precompute_only and not args.precomputed_embeddings_dir:
        parser.error("--precompute_only writes to --precomputed_embeddings_dir: give it")
    if args.lora_rank < 1:
        parser.error("--lora_rank must be at least 1")
    if args.num_frames is not None and args.num_frames < 1:
        parser.error("--num_frames must be at least 1")
    if args.num_validation_images < 1:
        parser.error("--num_validation_images must be at least 1; for no validation, leave out --validation_prompt")
    training_utils.check_validation_sampling(parser, args)  # before training, not at the first validation
    training_utils.check_run_arguments(parser, args)  # the output folder, the checkpoint limit, the Hub token
    if args.resolution % 16:
        parser.error("--resolution must be a multiple of 16 (VAE downsampling x patch size)")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.time()

    # 1. Accelerator, logging, seed, output folder and Hub repo, then the model: its family decides the rest.
    accelerator, repo_id = start_run(args, push_to_hub=args.push_to_hub and not args.precompute_only)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    run = LoraRun(args, argv, accelerator, repo_id, started, weight_dtype=weight_dtype)
    run.spec = resolve_model_spec(args)

    # 2. Data, and every caption's text embedding, computed once (or read from --precomputed_embeddings_dir).
    run.captions = load_captions(args, run.spec)
    text_embeddings(run)
    if args.precompute_only:
        logger.info("--precompute_only: done.")
        accelerator.end_training()
        return
    run.vae = load_vae(run)
    vae_temporal, run.vae_scale_factor = vae_compression(run.spec, run.vae)
    check_num_frames(args, run.spec, vae_temporal)
    args.vae_temporal_compression = vae_temporal  # read by LTX's model call (its RoPE scale)
    run.dataset = build_dataset(run)

    # 3. Transformer, LoRA, TREAD routing, and the checkpoint hooks that save the adapters with the training generator.
    transformer, lora_parameters = build_transformer(run)
    run.start_generator()  # one per process: all training randomness (noise, timesteps, VAE samples, routes)
    add_routing(run, transformer)
    transformer.train()
    register_lora_checkpoint_hooks(run)

    # 4. Optimizer, data loader, LR schedule (all through `accelerator.prepare`), noise scheduler, trackers.
    transformer, optimizer, train_dataloader, lr_scheduler = prepare_optimization(run, transformer, lora_parameters)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    latent_frames = (args.num_frames - 1) // vae_temporal + 1
    latent_size = args.resolution // run.vae_scale_factor
    num_tokens = num_image_tokens(run.spec, unwrap(transformer).config, latent_frames, latent_size)
    noise_scheduler = load_noise_scheduler(run, num_tokens)
    start_logging(run, lora_parameters, num_tokens, num_train_epochs)

    # 5. Resume (the main process picks the checkpoint, refuses settings that would not continue its run; a finished
    # run only says so).
    resume = resume_run(
        run,
        resume_settings(args, run.routes, run.captions, run.dataset, run.total_batch_size),
        num_update_steps_per_epoch,
    )
    if resume.finished:
        return
    run.global_step, first_epoch, resume_step = resume.global_step, resume.first_epoch, resume.skip_batches
    run.start_uploads()  # --push_checkpoints

    # 6. Training loop.
    stop = install_stop_handlers()
    progress_bar = tqdm(
        range(args.max_train_steps), initial=run.global_step, desc="Steps",
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    step_started, last_loss, routing_reported = time.time(), float("nan"), False
    skipped = 0  # unreadable images (clips) dropped by --bad_images skip
    # The loss and the routes' bypassed fractions stay on the device until a sync step reads them back (`flush_log`).
    step_loss, pending = torch.zeros((), device=accelerator.device), PendingLog()
    for epoch in range(first_epoch, num_train_epochs if run.global_step < args.max_train_steps else first_epoch):
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and resume_step:
            loader = accelerator.skip_first_batches(train_dataloader, resume_step)
        for batch in loader:
            skipped += int(batch["num_skipped"])
            with accelerator.accumulate(transformer):
                loss = batch_loss(run, transformer, noise_scheduler, batch)
                # the logged loss: averaged over accumulation micro-steps (and processes, at the flush)
                step_loss += loss.detach() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            run.global_step += 1
            step = run.global_step
            progress_bar.update(1)
            pending.add(step, step_loss, route_fractions(run.router), run.elapsed)
            step_loss = torch.zeros_like(step_loss)
            if not routing_reported:  # the routes' token counts, once (one host sync)
                routing_reported = report_routing(run.router)
            step_time = time.time() - step_started
            step_started = time.time()
            log_step(accelerator, lr_scheduler, step, step_time, skipped)

            checkpoint_due = step % args.checkpointing_steps == 0 or step == args.max_train_steps
            validation_now = validation_due(args, args.validation_steps, step, step)
            # the same on every process (the stop check below is an all-reduce)
            sync_due = step % args.logging_steps == 0 or checkpoint_due or validation_now
            # Processes agree on a stop with an all-reduce (a host sync): only at the steps that sync anyway.
            stop_due = sync_due and stop_requested(accelerator, stop)
            if sync_due:  # before any checkpoint: none is written after a non-finite loss
                last_loss = flush_log(run, pending, progress_bar, lr_scheduler, last_loss)
            if checkpoint_or_stop(run, step, stop, checkpoint_due, stop_due):
                return
            if accelerator.is_main_process and validation_now:
                log_validation(run, unwrap(transformer))
            if step >= args.max_train_steps:
                break
        if accelerator.is_main_process and validation_due(args, args.validation_epochs, epoch + 1, run.global_step):
            log_validation(run, unwrap(transformer))

    # 7. Save the LoRA weights, check that they load into a fresh base pipeline, sample, write the card, push. The
    # files are staged and moved into --output_dir at the end (`final_output`): a kill never leaves half of them.
    last_loss = flush_log(run, pending, progress_bar, lr_scheduler, last_loss)
    restore_stop_handlers(stop)
    if skipped:
        kind = "clips" if run.spec.is_video else "images"
        logger.warning(f"Skipped {skipped} unreadable {kind} of the {run.captions.source} (--bad_images skip).")
    run.finish_uploads()  # the checkpoints' uploads finish (or are reported) before the final one
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with final_output(args.output_dir, run.global_step) as staging:
            save_final_lora(run, staging, unwrap(transformer))
            images = None
            if args.validation_prompt:
                # the training transformer and optimizer go before a fresh base transformer is loaded
                transformer, optimizer = accelerator.free_memory(transformer, optimizer)
                images = final_validation(run, staging)
            save_model_card(run, staging, images, last_loss)
        if args.push_to_hub:
            hub.upload_final_output(args.output_dir, repo_id, args.hub_token)  # a failure says how to retry
    accelerator.end_training()


class LoraRun(RunState):
    """The library's `RunState` (arguments, accelerator, dtype, Hub repo, clock, generator, uploads, step) and what
    this script's stages add to it, in the order they fill it in (plain attributes, not dataclass fields: a script
    loaded as a file is no importable module for `dataclasses`)."""

    spec: ModelSpec | None = None  # the model family (stage 1)
    captions: Captions | None = None  # the data and its distinct captions (stage 2a)
    table: dict[str, torch.Tensor] | None = None  # every distinct caption's embeddings (stage 2b)
    prompt_kwargs: dict[str, torch.Tensor] | None = None  # the validation prompt's, or None (stage 2b)
    vae: Any = None  # frozen (stage 2c)
    vae_scale_factor: int = 8  # pixels per latent, per side (stage 2c)
    dataset: Any = None  # the training examples (stage 2d)
    router: Any = None  # the TREAD router, or None (stage 3b)
    routes: Any = None  # the resolved routes (stage 3b)


def resolve_model_spec(args) -> ModelSpec:
    """Stage 1, end: which pipeline --pretrained_model_name_or_path holds (from its `model_index.json`), and the
    family's defaults for --max_sequence_length, --lora_target_modules (a comma-separated list becomes a list) and
    --lora_alpha (the rank); the routes are checked against the transformer before the (slow) text encoding."""
    spec = resolve_model(
        args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir, token=args.hub_token
    )
    if args.max_sequence_length is None:
        args.max_sequence_length = spec.default_max_sequence_length()
    if args.lora_target_modules is None:
        args.lora_target_modules = DEFAULT_TARGET_MODULES[spec.family]
    else:
        args.lora_target_modules = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    args.lora_alpha = args.lora_alpha or args.lora_rank
    if args.precondition_outputs is None:  # SD3/Flux: Diffusers' SD3 examples; Wan/LTX: the velocity target
        args.precondition_outputs = int(spec.family in ("sd3", "flux"))
    if spec.is_video:
        args.num_frames = args.num_frames or {"wan": 17, "skyreels_v2": 17, "ltx": 25}[spec.family]
        args.fps = args.fps or DEFAULT_FPS[spec.family]
        if args.dataset_name is not None:
            raise ValueError(
                f"{spec.pipeline_class_name} trains on a folder of clips: pass --train_data_dir (clips and/or images "
                "with a metadata.jsonl), not --dataset_name."
            )
    elif args.num_frames not in (None, 1):
        raise ValueError(f"--num_frames {args.num_frames}: {spec.pipeline_class_name} is a text-to-image pipeline.")
    else:
        args.num_frames = 1
    logger.info(f"Model: {spec.pipeline_class_name} ({spec.family}, {spec.transformer_class_name}) from {spec.path}")
    check_routes(spec, args.routes)  # before the (slow) text encoding
    return spec


class Captions(NamedTuple):
    """What the data stage reads before any image is decoded: the image-caption set and its distinct captions."""

    images: object  # the `datasets` data set, with --image_column; for a video pipeline, the clips' paths
    unique: list[str]  # the distinct captions, in the order of the embeddings table
    indices: list[int]  # each example's row of the embeddings table
    source: str  # the data set, in words (for messages)


def load_captions(args, spec: ModelSpec) -> Captions:
    """Stage 2a: the image-caption set (--train_data_dir, or --dataset_name: a Hub data set or a local `datasets`
    folder; --max_train_samples of it) or, for a video pipeline, the clips of --train_data_dir, and the table of their
    distinct captions."""
    if spec.is_video:
        clips, captions, source = load_captioned_videos(
            args.train_data_dir, args.caption_column, max_samples=args.max_train_samples, seed=args.seed
        )
        unique_captions, caption_indices = caption_table(captions)
        return Captions(clips, unique_captions, caption_indices, source)
    images, captions, source = load_captioned_images(
        args.dataset_name,
        args.train_data_dir,
        args.image_column,
        args.caption_column,
        config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        max_samples=args.max_train_samples,
        seed=args.seed,
    )
    unique_captions, caption_indices = caption_table(captions)
    return Captions(images, unique_captions, caption_indices, source)


def text_embeddings(run: LoraRun) -> None:
    """Stage 2b: every distinct caption's embedding (and the validation prompt's), read from
    --precomputed_embeddings_dir when it holds them for this model and these captions, else computed with the text
    encoders (which are freed afterwards) and written there. The main process goes first, so the other processes read
    what it wrote. Sets ``run.table`` and ``run.prompt_kwargs`` (the validation prompt's keyword arguments, or
    None)."""
    args, spec, accelerator, unique_captions = run.args, run.spec, run.accelerator, run.captions.unique
    fingerprint = spec.embeddings_fingerprint(
        args.pretrained_model_name_or_path, args.revision, args.max_sequence_length, unique_captions
    )
    with accelerator.main_process_first():
        table, validation_prompt_kwargs = None, None
        if args.precomputed_embeddings_dir:
            loaded = load_precomputed_embeddings(args.precomputed_embeddings_dir, fingerprint, args.validation_prompt)
            if loaded is not None:
                table, validation_prompt_kwargs = loaded
                logger.info(
                    f"Loaded the embeddings of {len(unique_captions)} captions from {args.precomputed_embeddings_dir}"
                )
        need_captions = table is None
        if need_captions or (args.validation_prompt and validation_prompt_kwargs is None):
            computed, validation_prompt_kwargs = compute_embeddings(run, unique_captions if need_captions else [])
            if need_captions:
                table = computed
                if args.precomputed_embeddings_dir and accelerator.is_main_process:
                    save_precomputed_embeddings(
                        args.precomputed_embeddings_dir,
                        table,
                        fingerprint,
                        validation_prompt_kwargs,
                        args.validation_prompt,
                    )
                    logger.info(f"Wrote the embeddings to {args.precomputed_embeddings_dir}")
    accelerator.wait_for_everyone()
    run.table, run.prompt_kwargs = table, validation_prompt_kwargs


def load_vae(run: LoraRun):
    """Stage 2c: the pipeline's VAE (its class from model_index.json: AutoencoderKL, AutoencoderKLWan,
    AutoencoderKLLTXVideo), frozen, in fp32 on the device (the SD3/SDXL VAEs overflow in fp16)."""
    args, spec, accelerator = run.args, run.spec, run.accelerator
    vae_class = getattr(diffusers, spec.model_index["vae"][1])
    vae = vae_class.from_pretrained(
        spec.path, subfolder="vae", revision=args.revision, variant=args.variant
    ).requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32)  # fp32: the SD3/SDXL VAEs overflow in fp16
    return vae


def check_num_frames(args, spec: ModelSpec, vae_temporal: int) -> None:
    """Stage 2c: --num_frames must be 1 + a multiple of the VAE's temporal compression (the first frame is encoded
    alone, then groups of ``vae_temporal``), as the pipelines generate them."""
    if spec.is_video and (args.num_frames - 1) % vae_temporal:
        below = (args.num_frames - 1) // vae_temporal * vae_temporal + 1
        raise ValueError(
            f"--num_frames {args.num_frames} does not fit the {spec.pipeline_class_name} VAE, which encodes 1 + "
            f"{vae_temporal}k frames: use {below} or {below + vae_temporal}."
        )


def build_dataset(run: LoraRun):
    """Stage 2d: the training examples: resized, cropped and flipped images (clips of --num_frames frames) with their
    caption rows, or with --cache_latents every item's VAE posterior, encoded once now (unreadable images and clips
    are skipped with --bad_images skip); the VAE then moves to the CPU unless validation needs it."""
    args, accelerator, spec, captions, vae = run.args, run.accelerator, run.spec, run.captions, run.vae
    augment = {  # crops, flips and (for clips) frames, drawn per (seed, epoch, item)
        "resolution": args.resolution,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "seed": args.seed,
        "bad_images": args.bad_images,
    }
    if spec.is_video:
        dataset = CaptionedVideoDataset(captions.images, captions.indices, args.num_frames, **augment)
    else:
        dataset = CaptionedImageDataset(captions.images, args.image_column, captions.indices, **augment)
    if not args.cache_latents:
        return dataset
    parameters, kept_captions = [], []
    for start in tqdm(range(0, len(dataset), args.train_batch_size), desc="Caching latents",
                      disable=not accelerator.is_local_main_process):  # fmt: skip
        items = [dataset[i] for i in range(start, min(start + args.train_batch_size, len(dataset)))]
        items = [item for item in items if item is not None]  # unreadable images, with --bad_images skip
        if not items:
            continue
        kept_captions += [item["caption_index"] for item in items]
        pixel_values = torch.stack([item["pixel_values"] for item in items]).to(accelerator.device)
        with torch.no_grad():
            parameters.append(vae.encode(pixel_values).latent_dist.parameters.cpu())
    if len(kept_captions) < len(dataset):
        logger.warning(
            f"Skipped {len(dataset) - len(kept_captions)} unreadable {'clips' if spec.is_video else 'images'} of the "
            f"{captions.source}."
        )
    if not kept_captions:
        raise ValueError(f"All {len(dataset)} images of the {captions.source} were unreadable; check the dataset.")
    if not args.validation_prompt:
        vae.to("cpu")  # only its config (and LTX's latent statistics) are needed from here on
        free_memory()
    return CachedLatentDataset(torch.cat(parameters), kept_captions)


def build_transformer(run: LoraRun):
    """Stage 3a: the base transformer, frozen, in the mixed-precision dtype on the device, with gradient checkpointing
    (--gradient_checkpointing) and LoRA adapters (--lora_rank, --lora_alpha, --lora_dropout, --lora_target_modules), which
    train in fp32. Returns the transformer and its trainable (LoRA) parameters."""
    args, spec, accelerator, weight_dtype = run.args, run.spec, run.accelerator, run.weight_dtype
    transformer = spec.transformer_class.from_pretrained(
        spec.path, subfolder="transformer", revision=args.revision, variant=args.variant
    )
    transformer.requires_grad_(False)
    transformer.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    add_lora(
        transformer,
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=args.lora_target_modules,
        ),
    )
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32
    return transformer, [p for p in transformer.parameters() if p.requires_grad]


def add_routing(run: LoraRun, transformer) -> None:
    """Stage 3b: TREAD routing hooks on the transformer's blocks (--routes, --route_reinsertion), drawing the routed
    subsets from ``run.generator``; none with --routes none. Sets ``run.router`` (or None) and ``run.routes``, the
    resolved routes."""
    args = run.args
    router, routes = None, args.routes
    if routes:
        router = apply_tread(  # validates the routes
            transformer, routes=routes, generator=run.generator, route_reinsertion=args.route_reinsertion
        )
        routes = getattr(router, "routes", routes)
    run.router, run.routes = router, routes


def register_lora_checkpoint_hooks(run: LoraRun) -> None:
    """Stage 3c: the checkpoint save/load hooks, i.e. how `accelerator.save_state`/`load_state` write and read the
    weights: only the adapters (never the frozen base weights), in Diffusers' LoRA format; the library's hooks also
    carry every process's training generator."""
    accelerator, args, spec = run.accelerator, run.args, run.spec

    def save_weights(models, folder):  # only the adapters, never the frozen base weights
        for model in models:
            save_lora(spec, folder, model)

    def load_weights(models, folder):
        state_dict, _ = read_transformer_lora(folder)
        for model in models:
            result = set_peft_model_state_dict(model, state_dict, adapter_name="default")  # in place
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{folder}: LoRA weights that match no module: {result.unexpected_keys[:5]}")
            if accelerator.mixed_precision in ("fp16", "bf16"):
                cast_training_params(model, dtype=torch.float32)

    weight_files = ("pytorch_lora_weights.safetensors",)
    register_checkpoint_hooks(accelerator, run.generator, args.seed, save_weights, load_weights, weight_files)


def resume_settings(args, routes, captions, dataset, total_batch_size: int) -> dict:
    """Stage 5: what every checkpoint records of the run (`record_run_settings`): a resume that changes a ``fixed``
    setting (base model, adapters, data, global batch) is refused in one line; ``changeable`` ones are logged and
    shown in the card."""
    fixed = {
        "--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "--revision": args.revision,
        "--variant": args.variant,
        "--lora_rank": args.lora_rank,
        "--lora_alpha": args.lora_alpha,
        "--lora_target_modules": args.lora_target_modules,
        "data": f"{captions.source}, {len(dataset)} examples at {args.resolution}px, captions {args.caption_column}",
        "--num_frames": getattr(args, "num_frames", None),
        "global batch (--train_batch_size x processes x --gradient_accumulation_steps)": total_batch_size,
    }
    changeable = {
        "--routes": routes,
        "--learning_rate": args.learning_rate,
        "--lr_scheduler": args.lr_scheduler,
        "--max_train_steps": args.max_train_steps,
        "--seed": args.seed,
    }
    return dict(fixed=fixed, changeable=changeable)


def prepare_optimization(run: LoraRun, transformer, lora_parameters: list):
    """Stage 4: AdamW on the LoRA parameters (--scale_lr multiplies the LR by batch x accumulation x processes), the
    shuffled data loader (`collate_examples` drops and counts the unreadable images of --bad_images skip), the LR
    schedule and --max_train_steps from --num_train_epochs when not given; all through `accelerator.prepare`.
    Returns the prepared transformer, optimizer, data loader and LR scheduler."""
    args, accelerator, dataset = run.args, run.accelerator, run.dataset
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(
        lora_parameters,
        args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    train_dataloader = make_train_dataloader(dataset, args, collate_examples)
    args.max_train_steps = train_steps_for(args, train_dataloader)
    lr_scheduler = make_lr_scheduler(optimizer, args, args.max_train_steps, accelerator.num_processes)
    return accelerator.prepare(transformer, optimizer, train_dataloader, lr_scheduler)


def load_noise_scheduler(run: LoraRun, num_tokens: int):
    """Stage 4: the training-time noise schedule (`t2i_training.training_noise_scheduler`): flow matching (SD3, Flux:
    the pipeline's scheduler; Wan, LTX: at --flow_shift, else the family's shift for ``num_tokens`` tokens, from the
    pipeline's scheduler config, `t2i_training.training_flow_shift`) or DDPM (PixArt)."""
    args, spec = run.args, run.spec
    shift = args.flow_shift
    if shift is None and spec.is_video:
        scheduler_class = getattr(diffusers, spec.model_index["scheduler"][1])
        config = scheduler_class.load_config(spec.path, subfolder="scheduler")
        shift = training_flow_shift(spec, config, num_tokens)
    if spec.is_video:
        logger.info(f"  Training timestep shift = {shift:.3f}")
    return training_noise_scheduler(spec, shift)


def start_logging(run: LoraRun, lora_parameters: list, num_tokens: int, num_train_epochs: int) -> None:
    """Stage 4, end: start the trackers with the arguments (less the Hub token) and log the run's size."""
    args, accelerator, spec, routes, dataset = run.args, run.accelerator, run.spec, run.routes, run.dataset
    captions, total_batch_size = run.captions, run.total_batch_size
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if k != "hub_token"}
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}
        accelerator.init_trackers(args.tracker_project_name, config)
    logger.info("***** Running training *****")
    logger.info(f"  Examples = {len(dataset)} ({len(captions.unique)} distinct captions), epochs = {num_train_epochs}")
    logger.info(f"  Batch per device = {args.train_batch_size}, total = {total_batch_size}")
    logger.info(f"  Optimization steps = {args.max_train_steps}, LoRA parameters = "
                f"{sum(p.numel() for p in lora_parameters) / 1e6:.3f}M")  # fmt: skip
    frames = f", {args.num_frames} frames" if spec.is_video else ""
    logger.info(
        f"  Image tokens per sample = {num_tokens}{frames}, routes = {json.dumps(routes) if routes else 'none'}"
    )


def batch_loss(run: LoraRun, transformer, noise_scheduler, batch) -> torch.Tensor:
    """Stage 6, one micro-step's loss, on the device (no host sync): the clean latents (a sample of the cached
    posterior, or of the frozen VAE's encoding of the images or clips, normalised as the pipeline does), the batch's
    caption embeddings from the table, and the family's loss with routing on: its noise and timesteps drawn ahead
    (`t2i_training.draw_noise`), then `t2i_training.loss_from_draws`. All draws come from ``run.generator``, in this
    order (posterior sample, the loss's noise and timesteps, then the routes, drawn by the router's hooks). A
    non-finite loss is caught when the log is read back (`flush_log`), before any checkpoint after it."""
    args, spec, accelerator, vae, table, generator = (
        run.args,
        run.spec,
        run.accelerator,
        run.vae,
        run.table,
        run.generator,
    )
    with torch.no_grad():
        if "latent_parameters" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(accelerator.device))
        else:
            posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
        x0 = normalize_latents(spec, vae, posterior.sample(generator=generator)).float()
    indices = batch["caption_index"].cpu()
    embeds = {key: value[indices] for key, value in table.items()}
    draws = draw_noise(spec, noise_scheduler, x0, args, generator)
    return loss_from_draws(
        spec, transformer, noise_scheduler, x0, embeds, args, draws, run.weight_dtype, run.vae_scale_factor
    )


def route_fractions(router) -> torch.Tensor | None:
    """Stage 6: each route's bypassed fraction of the last forward, as one device tensor (no host sync)."""
    masks = getattr(router, "route_masks", None) if router is not None else None
    if not masks:
        return None
    return torch.stack([mask.float().mean() for mask in masks])


def report_routing(router) -> bool:
    """Stage 6, after the first step: log how many image tokens each route bypassed (`describe_routing`: one host
    sync, once). Returns whether there was anything to report (else it is tried again after the next step)."""
    routing = describe_routing(router)
    for route in routing:
        logger.info(
            f"TREAD routing: route {route['route']} (blocks {route['blocks']}): {route['bypassed']} of "
            f"{route['tokens']} image tokens bypassed per sample"
        )
    return bool(routing) or router is None


def log_step(accelerator, lr_scheduler, step: int, step_time: float, skipped_images: int) -> None:
    """Stage 6, after each optimization step: log what the host knows already (LR, step time, skipped images); the
    loss and routing follow at the next `flush_log`."""
    logs = {"lr": lr_scheduler.get_last_lr()[0], "step_time_s": step_time}
    if skipped_images:
        logs["skipped_images"] = skipped_images
    accelerator.log(logs, step=step)


class PendingLog(LossLog):
    """The library's `LossLog` (per-step losses on the device, read back at a flush) plus what loss_history.csv
    writes beside each loss: the routes' bypassed fractions (device tensors too) and the seconds since the start."""

    def __init__(self) -> None:
        super().__init__()
        self.routing: list[torch.Tensor | None] = []
        self.seconds: list[float] = []

    def add(self, step: int, loss: torch.Tensor, routing: torch.Tensor | None = None, seconds: float = 0.0) -> None:
        super().add(step, loss)
        self.routing.append(routing)
        self.seconds.append(seconds)

    def flush(self, gather=None) -> list[tuple[int, float, list[float], float]]:
        routing, seconds = self.routing, self.seconds
        self.routing, self.seconds = [], []
        rows = super().flush(gather)
        return [
            (step, loss, [] if fractions is None else fractions.tolist(), elapsed)
            for (step, loss), fractions, elapsed in zip(rows, routing, seconds, strict=True)
        ]


def flush_log(run: LoraRun, pending: PendingLog, progress_bar, lr_scheduler, last_loss: float) -> float:
    """Stage 6, at a sync step (every --logging_steps, and before a checkpoint or validation): read the pending
    losses and routing back (one host sync), fail on a non-finite loss, show and log them, and append their rows to
    loss_history.csv (step, loss, seconds since the run started, the routes' bypassed fractions). Returns the last
    loss read (``last_loss`` if none was pending)."""
    accelerator, args, loss_log = run.accelerator, run.args, run.loss_history
    rows = flush_loss_log(pending, accelerator.gather, args.output_dir)
    if not rows:
        return last_loss
    progress_bar.set_postfix(loss=f"{rows[-1][1]:.4f}", lr=lr_scheduler.get_last_lr()[0])
    for step, loss, fractions, _ in rows:
        logs = {"loss": loss} | {f"tread/route_{i}_bypassed_fraction": value for i, value in enumerate(fractions)}
        accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with loss_log.open("a") as f:
            for step, loss, fractions, elapsed in rows:
                f.write(f"{step},{loss:.6f},{elapsed:.1f},{';'.join(f'{value:.4f}' for value in fractions)}\n")
    return rows[-1][1]


def validation_due(args, every: int | None, count: int, step: int) -> bool:
    """Stage 6: whether --validation_steps (``count``: the step) or --validation_epochs (``count``: the epochs done)
    asks for validation images now; the last step's are the final ones (stage 7)."""
    return bool(args.validation_prompt and every and count % every == 0 and step < args.max_train_steps)


def save_final_lora(run: LoraRun, staging, transformer) -> None:
    """Stage 7 (main process): the routing hooks come off and the adapters are written to ``staging`` in Diffusers'
    LoRA format (pytorch_lora_weights.safetensors)."""
    spec, args, router = run.spec, run.args, run.router
    if router is not None:
        router.remove()
    lora_file = save_lora(spec, staging, transformer)
    logger.info(f"Saved the LoRA weights to {Path(args.output_dir, lora_file.name)}")


def final_validation(run: LoraRun, staging) -> list:
    """Stage 7 (main process, with --validation_prompt): a fresh base transformer in a pipeline, the saved LoRA file
    loaded exactly as users will load it, and the validation images (videos) sampled with every token (eval mode),
    saved under ``staging``/validation and logged to the trackers. Returns the images (the videos' first frames), for
    the model card's widget."""
    accelerator, spec, args, weight_dtype = run.accelerator, run.spec, run.args, run.weight_dtype
    free_memory()
    base = spec.transformer_class.from_pretrained(
        spec.path, subfolder="transformer", revision=args.revision, variant=args.variant, **dtype_kwarg(weight_dtype)
    ).to(accelerator.device)
    pipeline = validation_pipeline(run, base)
    load_lora(pipeline, staging)  # the saved file, exactly as users will load it
    pipeline.transformer.eval()
    samples = generate(run, pipeline)
    del pipeline
    return save_and_log_samples(run, samples, Path(staging, "validation"), "final", "test")


def compute_embeddings(run: LoraRun, unique_captions: list[str]):
    """Encode every distinct caption (and the validation prompt) once; the text encoders are freed afterwards."""
    spec, args, accelerator, weight_dtype = run.spec, run.args, run.accelerator, run.weight_dtype
    logger.info(f"Encoding {len(unique_captions)} distinct captions with {', '.join(spec.text_components)}")
    pipeline = spec.pipeline_class.from_pretrained(
        spec.path, transformer=None, vae=None, variant=args.variant, **dtype_kwarg(weight_dtype)
    )
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(unique_captions), args.text_encoding_batch_size):
        batch = unique_captions[start : start + args.text_encoding_batch_size]
        for key, value in encode_prompts(spec, pipeline, batch, args.max_sequence_length, accelerator.device).items():
            chunks.setdefault(key, []).append(value.cpu())
    table = {key: torch.cat(values).contiguous() for key, values in chunks.items()}
    validation = None
    if args.validation_prompt:
        validation = encode_prompts(
            spec, pipeline, [args.validation_prompt], args.max_sequence_length, accelerator.device, negative=True
        )
        validation = {key: value.cpu() for key, value in validation.items()}
    del pipeline
    free_memory()
    return table, validation


def validation_pipeline(run: LoraRun, transformer):
    """The base pipeline around the training transformer, without text encoders (prompts come precomputed)."""
    spec, args, vae, weight_dtype = run.spec, run.args, run.vae, run.weight_dtype
    no_text = {name: None for name in spec.text_components}
    pipeline = spec.pipeline_class.from_pretrained(
        spec.path, transformer=transformer, vae=vae, variant=args.variant, **dtype_kwarg(weight_dtype), **no_text
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(run: LoraRun, pipeline) -> list:
    """--num_validation_images images (PIL) or videos (``(F, H, W, 3)`` arrays in [0, 1], --num_frames frames) of the
    validation prompt, one per call with seeds seed, seed + 1, ... (a batch of precomputed prompt embeddings is not
    expanded the same way by every pipeline), with all tokens (eval mode)."""
    spec, args, prompt_kwargs, device, weight_dtype = (
        run.spec,
        run.args,
        run.prompt_kwargs,
        run.device,
        run.weight_dtype,
    )
    kwargs = {key: value.to(device) for key, value in prompt_kwargs.items()}
    kwargs |= dict(
        height=args.resolution, width=args.resolution, num_inference_steps=args.validation_num_inference_steps
    )
    if args.validation_guidance_scale is not None:
        kwargs["guidance_scale"] = args.validation_guidance_scale
    if spec.family == "pixart":  # no aspect-ratio bins; the negative prompt comes as embeddings ("" by default)
        kwargs |= {"use_resolution_binning": False, "negative_prompt": None}
    if spec.family in ("pixart", "sd3"):
        kwargs["max_sequence_length"] = args.max_sequence_length
    if spec.is_video:
        kwargs |= {"num_frames": args.num_frames, "output_type": "np"}
    if spec.family == "ltx":
        kwargs["frame_rate"] = args.fps
    autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    samples = []
    with autocast:
        for index in range(args.num_validation_images):
            generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
            output = pipeline(**kwargs, generator=generator)
            samples += list(output.frames) if spec.is_video else output.images
    return samples


def save_and_log_samples(run: LoraRun, samples: list, folder: Path, name: str, tag: str) -> list:
    """Write ``folder``/``name``_<i>.png (images) or ``name``_<i>.mp4 (videos, at --fps, with Diffusers'
    `export_to_video`), and log them to TensorBoard (a video as its frames) and wandb under ``tag``. Returns the
    images, or the videos' first frames."""
    accelerator, args, step = run.accelerator, run.args, run.global_step
    folder.mkdir(parents=True, exist_ok=True)
    is_video = bool(samples) and not isinstance(samples[0], Image.Image)
    files = []
    for index, sample in enumerate(samples):
        if is_video:
            files.append(export_to_video(list(sample), str(folder / f"{name}_{index}.mp4"), fps=args.fps))
        else:
            sample.save(folder / f"{name}_{index}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            if is_video:  # TensorBoard's add_video needs moviepy; the frames show the same
                for index, video in enumerate(samples):
                    tracker.writer.add_images(f"{tag}/video_{index}", video, step, dataformats="NHWC")
            else:
                frames = np.stack([np.asarray(image) for image in samples])
                tracker.writer.add_images(tag, frames, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            if is_video:
                media = [wandb.Video(path, caption=args.validation_prompt, format="mp4") for path in files]
            else:
                media = [wandb.Image(image, caption=args.validation_prompt) for image in samples]
            tracker.log({tag: media}, step=step)
    if is_video:
        return [Image.fromarray((np.clip(video[0], 0, 1) * 255).round().astype(np.uint8)) for video in samples]
    return samples


def log_validation(run: LoraRun, transformer) -> list:
    """Stage 6 (main process): the validation images (videos) of the training transformer at this step, in eval
    mode, saved under --output_dir/validation as step_<step>_<i> and logged to the trackers."""
    transformer.eval()  # every token through every block: routing is training-only
    pipeline = validation_pipeline(run, transformer)
    samples = generate(run, pipeline)
    folder, name = Path(run.args.output_dir, "validation"), f"step_{run.global_step:07d}"
    images = save_and_log_samples(run, samples, folder, name, "validation")
    kind = "videos" if run.spec.is_video else "images"
    logger.info(f"Validation {kind} at step {run.global_step}: {folder}/{name}_*")
    del pipeline
    free_memory()
    transformer.train()
    return images


def save_model_card(run: LoraRun, folder, images: list | None, final_loss: float) -> None:
    """``folder``/README.md, rendered by `diffusers_tread.hub` from model_cards/tread_t2i_lora.md: Diffusers' LoRA card
    metadata (base model, widget of the final validation images, tags), how to load the adapters, the training."""
    args, spec, routes = run.args, run.spec, run.routes
    loss = f"flow matching, weighting {args.weighting_scheme}" if spec.flow_matching else "epsilon/v MSE (DDPM)"
    if spec.flow_matching:
        loss += ", x0 target" if args.precondition_outputs else ", velocity target"
    if spec.is_video:
        loss += f", {args.num_frames}-frame clips"
    info = hub.LoraCardInfo(
        base_model=args.pretrained_model_name_or_path,
        pipeline_class=spec.pipeline_class_name,
        transformer_class=spec.transformer_class_name,
        family=spec.family,
        rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        target_modules=args.lora_target_modules,
        repo_id=run.repo_id or args.output_dir,
        diffusers_loader=hasattr(spec.pipeline_class, "load_lora_weights"),  # as `load_lora` decides
        prompt=args.validation_prompt,
        routes=json.dumps(routes),
        objective=f"{loss}, on all tokens",
        dataset=args.dataset_name or Path(args.train_data_dir).name,
        num_examples=len(run.dataset),
        resolution=args.resolution,
        steps=run.global_step,
        batch_size_per_device=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        **card_training_fields(run, "training/train_tread_t2i_lora.py", final_loss),
    )
    hub.save_lora_model_card(folder, info, images)


if __name__ == "__main__":
    main_with_messages(main)  # a message and exit status 1 for the failures main explains, not a traceback
