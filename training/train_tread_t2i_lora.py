#!/usr/bin/env python
"""LoRA text-to-image fine-tuning with TREAD token routing (Krause et al., arXiv 2501.04765) for PixArt, SD3 and Flux.

In the style of Diffusers' `train_dreambooth_lora_sd3.py` / `train_text_to_image_lora.py`: an image-caption data set (an
`imagefolder` with a `metadata.jsonl`, a local `datasets` folder, or a Hub data set), a Diffusers pipeline folder or Hub
id, LoRA adapters (PEFT) on the transformer, and TREAD routing on the transformer's image tokens while it trains.

    accelerate launch training/train_tread_t2i_lora.py \
        --pretrained_model_name_or_path PixArt-alpha/PixArt-Sigma-XL-2-512-MS --train_data_dir my-images \
        --resolution 512 --rank 16 --routes paper --validation_prompt "a photo of a red fox" --output_dir fox-lora

The story, top to bottom: `parse_args`, then `main()`, which runs the stages and holds the training loop; each stage
is a function defined below `main` (or in the library), in the order it runs: `start_run` (accelerator, seed, output
folder, Hub repo), `resolve_model_spec` (which model, from `model_index.json`) -> `load_captions`, `text_embeddings`
(every caption encoded ONCE, after which the text encoders are freed), `load_vae`, `build_dataset` (optionally VAE
latents cached) -> `build_transformer`, `add_routing`, `register_lora_hooks` (transformer + LoRA, TREAD routing,
checkpoint hooks) -> `prepare_optimization`, `load_noise_scheduler`, `start_logging` (optimizer, data loader, LR
schedule, trackers) -> `resume_from_checkpoint` -> the loop (`batch_loss`, `log_step`, `save_checkpoint`,
`log_validation`) -> `save_final_lora`, `final_validation`, `save_model_card` (LoRA weights in Diffusers' format, checked
by loading them into a fresh base pipeline), `hub.upload_final_output`.
What is not glue is the library's: the model families, the step's model call and loss, and the LoRA files are
`diffusers_tread.t2i_training`; the model card is `diffusers_tread.hub.save_lora_model_card`.

Routing (`diffusers_tread.models.tread_t2i.apply_tread`) is a set of hooks on the transformer's blocks: it runs only in
train mode, touches only image tokens (text tokens and the conditioning are never routed), and leaves the module tree
and state dict alone, so PEFT's LoRA layers and Diffusers' LoRA saving and loading are unaffected. Validation switches
the model to eval mode, which samples with every token.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm

from diffusers_tread import hub

# The library's crash-safe run folder (checkpoints, final save, resume, stop signals), shared with train_tread.py, so
# that both scripts behave the same way.
from diffusers_tread.checkpointing import (
    LOSS_HISTORY,
    check_run_arguments,
    final_output,
    install_stop_handlers,
    process_seed,
    record_run_settings,
    register_checkpoint_hooks,
    restore_stop_handlers,
    resume_from_checkpoint,
    save_checkpoint,
    settings_note,
    stop_requested,
)
from diffusers_tread.data import (
    BAD_IMAGE_POLICIES,
    BAD_IMAGES_HELP,
    CachedLatentDataset,
    CaptionedImageDataset,
    caption_table,
    collate_examples,
    embeddings_fingerprint,
    load_captioned_images,
    load_precomputed_embeddings,
    save_precomputed_embeddings,
)
from diffusers_tread.models.tread_t2i import apply_tread
from diffusers_tread.routing import ROUTE_REINSERTION_MODES

# What is not script glue (the model families, the step's model call and loss, the LoRA files) is the library's.
from diffusers_tread.t2i_training import (
    DEFAULT_TARGET_MODULES,
    ModelSpec,
    add_lora,
    check_routes,
    describe_routing,
    encode_prompts,
    load_lora,
    read_transformer_lora,
    resolve_model,
    save_lora,
    training_loss,
    unwrap,
    vae_latents,
)
from diffusers_tread.training_utils import (
    main_with_messages,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    parse_routes,
    start_run,
)

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # allow_abbrev=False: an abbreviation such as --hub_tok would escape the token's redaction (issue #14).
    parser = argparse.ArgumentParser(
        description="LoRA text-to-image fine-tuning with TREAD token routing.", allow_abbrev=False
    )
    # Model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="a Diffusers pipeline folder or Hub id (PixArt-Alpha/Sigma, Stable Diffusion 3, Flux)",
    )
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None, help='e.g. "fp16"')
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument(
        "--routes",
        type=parse_routes,
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
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
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
        "--train_data_dir", default=None, help="an imagefolder: images plus a metadata.jsonl with the captions"
    )
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--bad_images", choices=BAD_IMAGE_POLICIES, default="stop", help=BAD_IMAGES_HELP)
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
        help="encode every image with the VAE once, before training (crops and flips are then drawn once)",
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
        help="SD3/Flux: timestep density and loss weighting (SD3 paper)",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument("--mode_scale", type=float, default=1.29)
    parser.add_argument(
        "--precondition_outputs",
        type=int,
        default=1,
        help="SD3/Flux: 1 compares x0 = x_t - sigma * v with the clean latents (as Diffusers' SD3 examples); "
        "0 compares the velocity with noise - latents",
    )
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="Flux's guidance embedding while training")
    # Optimisation
    parser.add_argument("--output_dir", default="tread-t2i-lora")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="delete the checkpoints and outputs of an earlier run in --output_dir (otherwise such a folder is refused)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=4, help="per device")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true", help="multiply the LR by batch x accumulation x processes")
    parser.add_argument(
        "--lr_scheduler",
        default="constant",
        help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-4)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--allow_tf32", action="store_true")
    # Checkpoints, validation, logging, Hub
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    parser.add_argument("--validation_prompt", default=None)
    parser.add_argument("--num_validation_images", type=int, default=4)
    parser.add_argument("--validation_steps", type=int, default=None, help="validate every this many steps")
    parser.add_argument("--validation_epochs", type=int, default=None, help="validate every this many epochs")
    parser.add_argument("--validation_num_inference_steps", type=int, default=25)
    parser.add_argument("--validation_guidance_scale", type=float, default=None, help="default: the pipeline's")
    parser.add_argument("--report_to", default="tensorboard", help='tensorboard, wandb, all or "none"')
    parser.add_argument("--logging_dir", default="logs")
    parser.add_argument("--tracker_project_name", default="train_tread_t2i_lora")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--push_checkpoints", action="store_true", help="also upload checkpoints, in the background")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--hub_token", default=None, help="default (safer): HF_TOKEN or the `hf auth login` token")
    parser.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)

    for name in ("checkpointing_steps", "validation_steps", "validation_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (it is a step interval)")
    if (args.dataset_name is None) == (args.train_data_dir is None):
        parser.error("give exactly one of --dataset_name and --train_data_dir")
    if args.precompute_only and not args.precomputed_embeddings_dir:
        parser.error("--precompute_only writes to --precomputed_embeddings_dir: give it")
    if args.rank < 1:
        parser.error("--rank must be at least 1")
    check_run_arguments(parser, args)  # the output folder, the checkpoint limit, the Hub token
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
    spec = resolve_model_spec(args)

    # 2. Data, and every caption's text embedding, computed once (or read from --precomputed_embeddings_dir).
    captions = load_captions(args)
    table, validation_prompt_kwargs = text_embeddings(args, spec, accelerator, weight_dtype, captions.unique)
    if args.precompute_only:
        logger.info("--precompute_only: done.")
        accelerator.end_training()
        return
    vae = load_vae(args, spec, accelerator)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    dataset = build_dataset(args, accelerator, captions, vae)

    # 3. Transformer, LoRA, TREAD routing, and the checkpoint hooks that save the adapters with the training generator.
    transformer, lora_parameters = build_transformer(args, spec, accelerator, weight_dtype)
    # One generator per process draws all training randomness (noise, timesteps, VAE samples, routed subsets), so a
    # checkpoint can carry it and a resumed run draws exactly what the uninterrupted run would have.
    train_generator = torch.Generator(device=accelerator.device).manual_seed(
        process_seed(args.seed, accelerator.process_index)  # no two (seed, process) pairs share a stream
    )
    router, routes = add_routing(args, transformer, train_generator)
    transformer.train()
    register_lora_hooks(accelerator, args, spec, train_generator)

    # 4. Optimizer, data loader, LR schedule (all through `accelerator.prepare`), noise scheduler, trackers.
    transformer, optimizer, train_dataloader, lr_scheduler = prepare_optimization(
        args, accelerator, transformer, lora_parameters, dataset
    )
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    noise_scheduler = load_noise_scheduler(spec)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    start_logging(args, accelerator, spec, unwrap(transformer), lora_parameters, routes, dataset, captions,
                  vae_scale_factor, num_train_epochs, total_batch_size)  # fmt: skip

    # 5. Resume (the main process picks the checkpoint, refuses settings that would not continue its run; a finished
    # run only says so).
    record_run_settings(accelerator, **resume_settings(args, routes, captions, dataset, total_batch_size))
    resume = resume_from_checkpoint(
        accelerator, args.output_dir, args.resume_from_checkpoint, num_update_steps_per_epoch,
        args.gradient_accumulation_steps, args.max_train_steps,
    )  # fmt: skip
    if resume.finished:
        accelerator.end_training()
        return
    args.changed_settings = resume.changes  # for the model card
    global_step, first_epoch, resume_step = resume.global_step, resume.first_epoch, resume.skip_batches
    started -= resume.seconds_before  # the elapsed-time column of loss_history.csv continues from the checkpoint
    uploads = hub.CheckpointUploads(repo_id, args.hub_token) if args.push_to_hub and args.push_checkpoints else None

    # 6. Training loop.
    stop = install_stop_handlers()
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    loss_log = Path(args.output_dir, LOSS_HISTORY)
    step_started, last_loss, train_loss, routing_reported = time.time(), float("nan"), 0.0, False
    skipped_images = 0  # unreadable images dropped by --bad_images skip
    for epoch in range(first_epoch, num_train_epochs if global_step < args.max_train_steps else first_epoch):
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and resume_step:
            loader = accelerator.skip_first_batches(train_dataloader, resume_step)
        for batch in loader:
            skipped_images += int(batch["num_skipped"])
            with accelerator.accumulate(transformer):
                loss = batch_loss(args, spec, accelerator, transformer, vae, noise_scheduler, table, batch,
                                  global_step, train_generator, weight_dtype, vae_scale_factor)  # fmt: skip
                routing = describe_routing(router)
                train_loss += accelerator.gather(loss.detach()).mean().item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            last_loss, train_loss = train_loss, 0.0
            step_time = time.time() - step_started
            step_started = time.time()
            routing_reported = log_step(accelerator, progress_bar, lr_scheduler, loss_log, started, global_step,
                                        last_loss, step_time, skipped_images, routing, routing_reported)  # fmt: skip

            checkpoint_due = global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps
            if checkpoint_due:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, uploads)
            if stop_requested(accelerator, stop):
                if not checkpoint_due:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, uploads)
                logger.info(
                    f"Stopped by signal {stop['signal']} at step {global_step} after saving a checkpoint; continue "
                    "with --resume_from_checkpoint latest."
                )
                restore_stop_handlers(stop)
                accelerator.end_training()
                return
            if accelerator.is_main_process and validation_due(args, args.validation_steps, global_step, global_step):
                log_validation(accelerator, spec, args, unwrap(transformer), vae, validation_prompt_kwargs,
                               weight_dtype, global_step, f"step_{global_step:07d}")  # fmt: skip
            if global_step >= args.max_train_steps:
                break
        if accelerator.is_main_process and validation_due(args, args.validation_epochs, epoch + 1, global_step):
            log_validation(accelerator, spec, args, unwrap(transformer), vae, validation_prompt_kwargs,
                           weight_dtype, global_step, f"step_{global_step:07d}")  # fmt: skip

    # 7. Save the LoRA weights, check that they load into a fresh base pipeline, sample, write the card, push. The
    # files are staged and moved into --output_dir at the end (`final_output`): a kill never leaves half of them.
    restore_stop_handlers(stop)
    if skipped_images:
        logger.warning(f"Skipped {skipped_images} unreadable images of the {captions.source} (--bad_images skip).")
    if uploads is not None:  # the checkpoints' uploads finish (or are reported) before the final one
        uploads.wait()
        logger.info(uploads.report())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with final_output(args.output_dir, global_step) as staging:
            save_final_lora(spec, args, staging, unwrap(transformer), router)
            images = None
            if args.validation_prompt:
                # the training transformer and optimizer go before a fresh base transformer is loaded
                transformer, optimizer = accelerator.free_memory(transformer, optimizer)
                images = final_validation(accelerator, spec, args, staging, vae, validation_prompt_kwargs,
                                          weight_dtype, global_step)  # fmt: skip
            save_model_card(staging, args, argv, spec, repo_id, images, routes, global_step, total_batch_size,
                            time.time() - started, last_loss, len(dataset))  # fmt: skip
        if args.push_to_hub:
            hub.upload_final_output(args.output_dir, repo_id, args.hub_token)  # a failure says how to retry
    accelerator.end_training()


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
    args.lora_alpha = args.lora_alpha or args.rank
    logger.info(f"Model: {spec.pipeline_class_name} ({spec.family}, {spec.transformer_class_name}) from {spec.path}")
    check_routes(spec, args.routes)  # before the (slow) text encoding
    return spec


class Captions(NamedTuple):
    """What the data stage reads before any image is decoded: the image-caption set and its distinct captions."""

    images: object  # the `datasets` data set, with --image_column
    unique: list[str]  # the distinct captions, in the order of the embeddings table
    indices: list[int]  # each example's row of the embeddings table
    source: str  # the data set, in words (for messages)


def load_captions(args) -> Captions:
    """Stage 2a: the image-caption set (--train_data_dir, or --dataset_name: a Hub data set or a local `datasets`
    folder; --max_train_samples of it) and the table of its distinct captions."""
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


def text_embeddings(args, spec: ModelSpec, accelerator, weight_dtype, unique_captions: list[str]):
    """Stage 2b: every distinct caption's embedding (and the validation prompt's), read from
    --precomputed_embeddings_dir when it holds them for this model and these captions, else computed with the text
    encoders (which are freed afterwards) and written there. The main process goes first, so the other processes read
    what it wrote. Returns the embeddings table and the validation prompt's keyword arguments (or None)."""
    fingerprint = embeddings_fingerprint(
        model=args.pretrained_model_name_or_path,
        revision=args.revision,
        pipeline=spec.pipeline_class_name,
        model_path=spec.path,
        text_components=spec.text_components,
        max_sequence_length=args.max_sequence_length,
        captions=unique_captions,
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
            computed, validation_prompt_kwargs = compute_embeddings(
                spec, args, unique_captions if need_captions else [], accelerator, weight_dtype
            )
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
    return table, validation_prompt_kwargs


def load_vae(args, spec: ModelSpec, accelerator) -> AutoencoderKL:
    """Stage 2c: the pipeline's VAE, frozen, in fp32 on the device (the SD3/SDXL VAEs overflow in fp16)."""
    vae = AutoencoderKL.from_pretrained(
        spec.path, subfolder="vae", revision=args.revision, variant=args.variant
    ).requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32)  # fp32: the SD3/SDXL VAEs overflow in fp16
    return vae


def build_dataset(args, accelerator, captions: Captions, vae: AutoencoderKL):
    """Stage 2d: the training examples: resized, cropped and flipped images with their caption rows, or with
    --cache_latents every image's VAE posterior, encoded once now (unreadable images are skipped with --bad_images
    skip); the VAE then moves to the CPU unless validation needs it."""
    dataset = CaptionedImageDataset(
        captions.images,
        args.image_column,
        captions.indices,
        args.resolution,
        args.center_crop,
        args.random_flip,
        args.seed,
        bad_images=args.bad_images,
    )
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
        logger.warning(f"Skipped {len(dataset) - len(kept_captions)} unreadable images of the {captions.source}.")
    if not kept_captions:
        raise ValueError(f"All {len(dataset)} images of the {captions.source} were unreadable; check the dataset.")
    if not args.validation_prompt:
        vae.to("cpu")  # only its config is needed from here on
        free_memory()
    return CachedLatentDataset(torch.cat(parameters), kept_captions)


def build_transformer(args, spec: ModelSpec, accelerator, weight_dtype):
    """Stage 3a: the base transformer, frozen, in the mixed-precision dtype on the device, with gradient checkpointing
    (--gradient_checkpointing) and LoRA adapters (--rank, --lora_alpha, --lora_dropout, --lora_target_modules), which
    train in fp32. Returns the transformer and its trainable (LoRA) parameters."""
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
            r=args.rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=args.lora_target_modules,
        ),
    )
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32
    return transformer, [p for p in transformer.parameters() if p.requires_grad]


def add_routing(args, transformer, generator: torch.Generator):
    """Stage 3b: TREAD routing hooks on the transformer's blocks (--routes, --route_reinsertion), drawing the routed
    subsets from ``generator``; none with --routes none. Returns the router (or None) and the resolved routes."""
    router, routes = None, args.routes
    if routes:
        router = apply_tread(  # validates the routes
            transformer, routes=routes, generator=generator, route_reinsertion=args.route_reinsertion
        )
        routes = getattr(router, "routes", routes)
    return router, routes


def register_lora_hooks(accelerator, args, spec: ModelSpec, train_generator: torch.Generator) -> None:
    """Stage 3c: how `accelerator.save_state`/`load_state` write and read the weights: only the adapters (never the
    frozen base weights), in Diffusers' LoRA format; the library's hooks also carry every process's training
    generator."""

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

    register_checkpoint_hooks(accelerator, train_generator, args.seed, save_weights, load_weights,
                              weight_files=("pytorch_lora_weights.safetensors",))  # fmt: skip


def resume_settings(args, routes, captions, dataset, total_batch_size: int) -> dict:
    """Stage 5: what every checkpoint records of the run (`record_run_settings`): a resume that changes a ``fixed``
    setting (base model, adapters, data, global batch) is refused in one line; ``changeable`` ones are logged and
    shown in the card."""
    fixed = {
        "--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "--revision": args.revision,
        "--variant": args.variant,
        "--rank": args.rank,
        "--lora_alpha": args.lora_alpha,
        "--lora_target_modules": args.lora_target_modules,
        "data": f"{captions.source}, {len(dataset)} examples at {args.resolution}px, captions {args.caption_column}",
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


def prepare_optimization(args, accelerator, transformer, lora_parameters: list, dataset):
    """Stage 4: AdamW on the LoRA parameters (--scale_lr multiplies the LR by batch x accumulation x processes), the
    shuffled data loader (`collate_examples` drops and counts the unreadable images of --bad_images skip), the LR
    schedule and --max_train_steps from --num_train_epochs when not given; all through `accelerator.prepare`.
    Returns the prepared transformer, optimizer, data loader and LR scheduler."""
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
    lr_scheduler = make_lr_scheduler(optimizer, args, train_dataloader, accelerator.num_processes)
    return accelerator.prepare(transformer, optimizer, train_dataloader, lr_scheduler)


def load_noise_scheduler(spec: ModelSpec):
    """Stage 4: the pipeline's training-time noise schedule: flow matching (SD3, Flux; `set_timesteps` is never called
    on this instance, so it keeps its training timesteps and sigmas) or DDPM (PixArt)."""
    if spec.flow_matching:
        return FlowMatchEulerDiscreteScheduler.from_pretrained(spec.path, subfolder="scheduler")
    return DDPMScheduler.from_pretrained(spec.path, subfolder="scheduler")


def start_logging(
    args, accelerator, spec: ModelSpec, transformer, lora_parameters, routes, dataset, captions: Captions,
    vae_scale_factor: int, num_train_epochs: int, total_batch_size: int,
) -> None:  # fmt: skip
    """Stage 4, end: start the trackers with the arguments (less the Hub token) and log the run's size."""
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if k != "hub_token"}
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}
        accelerator.init_trackers(args.tracker_project_name, config)
    patch_size = 2 if spec.family == "flux" else transformer.config.patch_size  # Flux packs 2x2 latents per token
    num_tokens = (args.resolution // vae_scale_factor // patch_size) ** 2
    logger.info("***** Running training *****")
    logger.info(f"  Examples = {len(dataset)} ({len(captions.unique)} distinct captions), epochs = {num_train_epochs}")
    logger.info(f"  Batch per device = {args.train_batch_size}, total = {total_batch_size}")
    logger.info(f"  Optimization steps = {args.max_train_steps}, LoRA parameters = "
                f"{sum(p.numel() for p in lora_parameters) / 1e6:.3f}M")  # fmt: skip
    logger.info(f"  Image tokens per sample = {num_tokens}, routes = {json.dumps(routes) if routes else 'none'}")


def batch_loss(
    args, spec: ModelSpec, accelerator, transformer, vae, noise_scheduler, table: dict, batch, step: int,
    generator: torch.Generator, weight_dtype, vae_scale_factor: int,
) -> torch.Tensor:  # fmt: skip
    """Stage 6, one micro-step's loss: the clean latents (a sample of the cached posterior, or of the frozen VAE's
    encoding of the images), the batch's caption embeddings from the table, and the family's loss
    (`t2i_training.training_loss`) with routing on. All draws come from ``generator``, in this order (posterior sample,
    then the loss's timesteps, noise and routes). Fails on a non-finite loss, before anything is saved after it."""
    with torch.no_grad():
        if "latent_parameters" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(accelerator.device))
        else:
            posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
        x0 = vae_latents(vae.config, posterior.sample(generator=generator)).float()
    indices = batch["caption_index"].cpu()
    embeds = {key: value[indices] for key, value in table.items()}
    loss = training_loss(
        spec, transformer, noise_scheduler, x0, embeds, args, generator, weight_dtype, vae_scale_factor
    )
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"Loss is {loss.item()} at step {step}. The last checkpoint in {args.output_dir} is "
            "untouched; resume from it with a lower --learning_rate, or bf16 instead of fp16."
        )
    return loss


def log_step(
    accelerator, progress_bar, lr_scheduler, loss_log: Path, started: float, step: int, loss: float,
    step_time: float, skipped_images: int, routing: list[dict], routing_reported: bool,
) -> bool:  # fmt: skip
    """Stage 6, after each optimization step: show and log the loss, LR, step time, skipped images and each route's
    bypassed fraction, and append a row to loss_history.csv (step, loss, seconds since the run started, the routes'
    bypassed fractions). The routes' token counts are logged once; returns whether they have been."""
    logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0], "step_time_s": step_time}
    if skipped_images:
        logs["skipped_images"] = skipped_images
    for route in routing:
        logs[f"tread/route_{route['route']}_bypassed_fraction"] = route["fraction"]
    if routing and not routing_reported:
        for route in routing:
            logger.info(
                f"TREAD routing: route {route['route']} (blocks {route['blocks']}): {route['bypassed']} of "
                f"{route['tokens']} image tokens bypassed per sample"
            )
        routing_reported = True
    progress_bar.set_postfix(loss=f"{loss:.4f}", lr=logs["lr"])
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with loss_log.open("a") as f:
            bypassed = ";".join(f"{route['fraction']:.4f}" for route in routing)
            f.write(f"{step},{loss:.6f},{time.time() - started:.1f},{bypassed}\n")
    return routing_reported


def validation_due(args, every: int | None, count: int, step: int) -> bool:
    """Stage 6: whether --validation_steps (``count``: the step) or --validation_epochs (``count``: the epochs done)
    asks for validation images now; the last step's are the final ones (stage 7)."""
    return bool(args.validation_prompt and every and count % every == 0 and step < args.max_train_steps)


def save_final_lora(spec: ModelSpec, args, staging, transformer, router) -> None:
    """Stage 7 (main process): the routing hooks come off and the adapters are written to ``staging`` in Diffusers'
    LoRA format (pytorch_lora_weights.safetensors)."""
    if router is not None:
        router.remove()
    lora_file = save_lora(spec, staging, transformer)
    logger.info(f"Saved the LoRA weights to {Path(args.output_dir, lora_file.name)}")


def final_validation(accelerator, spec: ModelSpec, args, staging, vae, prompt_kwargs, weight_dtype, step) -> list:
    """Stage 7 (main process, with --validation_prompt): a fresh base transformer in a pipeline, the saved LoRA file
    loaded exactly as users will load it, and the validation images sampled with every token (eval mode), saved
    under ``staging``/validation and logged to TensorBoard. Returns the images (for the model card's widget)."""
    free_memory()
    base = spec.transformer_class.from_pretrained(
        spec.path, subfolder="transformer", revision=args.revision, variant=args.variant, dtype=weight_dtype
    ).to(accelerator.device)
    pipeline = validation_pipeline(spec, args, base, vae, weight_dtype)
    load_lora(pipeline, staging)  # the saved file, exactly as users will load it
    pipeline.transformer.eval()
    images = generate(spec, pipeline, args, prompt_kwargs, accelerator.device, weight_dtype)
    del pipeline
    save_and_log_images(accelerator, args, images, Path(staging, "validation"), "final", step, "test")
    return images


def compute_embeddings(spec: ModelSpec, args, unique_captions: list[str], accelerator, weight_dtype):
    """Encode every distinct caption (and the validation prompt) once; the text encoders are freed afterwards."""
    logger.info(f"Encoding {len(unique_captions)} distinct captions with {', '.join(spec.text_components)}")
    pipeline = spec.pipeline_class.from_pretrained(
        spec.path, transformer=None, vae=None, variant=args.variant, dtype=weight_dtype
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


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def validation_pipeline(spec: ModelSpec, args, transformer, vae, weight_dtype):
    """The base pipeline around the training transformer, without text encoders (prompts come precomputed)."""
    no_text = {name: None for name in spec.text_components}
    pipeline = spec.pipeline_class.from_pretrained(
        spec.path, transformer=transformer, vae=vae, variant=args.variant, dtype=weight_dtype, **no_text
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(spec: ModelSpec, pipeline, args, prompt_kwargs: dict, device, weight_dtype) -> list[Image.Image]:
    """--num_validation_images images of the validation prompt, one per call with seeds seed, seed + 1, ... (a batch
    of precomputed prompt embeddings is not expanded the same way by every pipeline), with all tokens (eval mode)."""
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
    autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    images = []
    with autocast:
        for index in range(args.num_validation_images):
            generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
            images += pipeline(**kwargs, generator=generator).images
    return images


def save_and_log_images(accelerator, args, images, folder: Path, name: str, step: int, tag: str) -> None:
    """Write ``folder``/``name``_<i>.png and log the images to TensorBoard / wandb under ``tag``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"{name}_{index}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=args.validation_prompt) for image in images]}, step=step)


def log_validation(accelerator, spec, args, transformer, vae, prompt_kwargs, weight_dtype, step, name) -> list:
    transformer.eval()  # every token through every block: routing is training-only
    pipeline = validation_pipeline(spec, args, transformer, vae, weight_dtype)
    images = generate(spec, pipeline, args, prompt_kwargs, accelerator.device, weight_dtype)
    folder = Path(args.output_dir, "validation")
    save_and_log_images(accelerator, args, images, folder, name, step, "validation")
    logger.info(f"Validation images at step {step}: {folder}/{name}_*.png")
    del pipeline
    free_memory()
    transformer.train()
    return images


def save_model_card(
    folder, args, argv, spec, repo_id, images, routes, steps, total_batch_size, seconds, final_loss, num_examples
) -> None:
    """``folder``/README.md, rendered by `diffusers_tread.hub` from model_cards/tread_t2i_lora.md: Diffusers' LoRA card
    metadata (base model, widget of the final validation images, tags), how to load the adapters, the training."""
    hardware = (
        f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    loss = f"flow matching, weighting {args.weighting_scheme}" if spec.flow_matching else "epsilon/v MSE (DDPM)"
    info = hub.LoraCardInfo(
        base_model=args.pretrained_model_name_or_path,
        pipeline_class=spec.pipeline_class_name,
        transformer_class=spec.transformer_class_name,
        family=spec.family,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        target_modules=args.lora_target_modules,
        repo_id=repo_id or args.output_dir,
        diffusers_loader=hasattr(spec.pipeline_class, "load_lora_weights"),  # as `load_lora` decides
        prompt=args.validation_prompt,
        routes=json.dumps(routes),
        objective=f"{loss}, on all tokens",
        dataset=args.dataset_name or Path(args.train_data_dir).name,
        num_examples=num_examples,
        resolution=args.resolution,
        steps=steps,
        global_batch_size=total_batch_size,
        batch_size_per_device=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        mixed_precision=args.mixed_precision or "no",
        hardware=hardware,
        training_time=f"{seconds / 60:.1f} min",
        final_loss=f"{final_loss:.4f}",
        command=hub.launch_command("training/train_tread_t2i_lora.py", argv, [args.hub_token])
        + settings_note(getattr(args, "changed_settings", [])),
    )
    hub.save_lora_model_card(folder, info, images)


if __name__ == "__main__":
    main_with_messages(main)  # a message and exit status 1 for the failures main explains, not a traceback
