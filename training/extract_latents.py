#!/usr/bin/env python
"""Encode an image dataset once with a VAE and store the latents as safetensors shards for training.

    accelerate launch training/extract_latents.py --dataset_name <imagenet-like dataset> \
        --vae stabilityai/sd-vae-ft-ema --resolution 256 --center_crop --flip --output_dir latents/imagenet-256

Each process encodes its own interleaved slice of the shards (shard k goes to process k % num_processes). A shard is
written to a temporary name and renamed when complete, with the extraction settings in its header: re-running the
same command skips every complete shard whose source images and labels are unchanged (`SourceFingerprint`: one
read of its images, no encoding) and redoes the rest. The main process writes metadata.json last, once every
shard exists; `diffusers_tread.data.LatentShardDataset` reads it. The format is described in
`diffusers_tread/data/latents.py`.
"""

import hashlib
import json
import logging
import math
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from safetensors import safe_open
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from diffusers_tread.data import load_digits, load_image_dataset
from diffusers_tread.data.latents import (
    METADATA_NAME,
    SourceFingerprint,
    file_sha256,
    posterior_generator,
    read_shard_settings,
    shard_file_name,
    write_metadata,
    write_shard,
)
from diffusers_tread.repa import FEATURES, FEATURES_FLIPPED, RepaEncoder
from diffusers_tread.training_utils import ArgumentParser, image_dataset_options, main_with_messages

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = ArgumentParser(description="Encode an image dataset into VAE latent shards.")
    parser.add_argument("--dataset_name", default=None, help="A Hub dataset or a local dataset path.")
    parser.add_argument("--train_data_dir", default=None, help="A folder of images, one subfolder per class.")
    parser.add_argument("--use_digits", action="store_true", help="Use scikit-learn's bundled digits (offline).")
    parser.add_argument(
        "--digits_split",
        default="train",
        choices=["train", "test", "all"],
        help="Which digits to encode; the default keeps the held-out 'test' digits unseen, for evaluation.",
    )
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    parser.add_argument("--resolution", type=int, default=256, help="Images are resized and cropped to this size.")
    parser.add_argument(
        "--center_crop",
        action="store_true",
        help="Center crop. Without it each image gets one random crop, drawn from (--seed, image index) and frozen "
        "into its latents.",
    )
    parser.add_argument(
        "--flip", action="store_true", help="Also store the latents of the horizontally flipped images."
    )
    parser.add_argument("--vae", required=True, help="An AutoencoderKL: a Hub id or a local path.")
    parser.add_argument("--vae_subfolder", default=None, help='e.g. "vae" for a full pipeline repo.')
    parser.add_argument("--revision", default=None, help="Revision of the VAE on the Hub.")
    parser.add_argument(
        "--sample_posterior",
        action="store_true",
        help="Store one sample of the VAE posterior (DiT's training code samples) instead of its mean. The mean is "
        "the default: deterministic, and no single noise draw gets frozen into the data; the posterior's std is "
        "small next to its mean for the usual KL-regularised VAEs.",
    )
    parser.add_argument("--output_dir", required=True, help="The latents directory.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per VAE forward pass.")
    parser.add_argument("--shard_size", type=int, default=4096, help="Images per shard (the unit of resuming).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Run the VAE in this precision (latents are stored as float32). Some VAEs overflow in fp16.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seeds random crops and posterior samples.")
    parser.add_argument(
        "--repa_encoder",
        default=None,
        help="Also store this frozen vision encoder's patch features for REPA (a transformers model, e.g. "
        "facebook/dinov2-base), so that no encoder runs during training (train_tread.py --repa_encoder).",
    )
    parser.add_argument(
        "--repa_token_grid",
        type=int,
        default=None,
        help="The DiT's token grid the features are matched to (latent size / DiT patch size; default: latent size "
        "/ 2, DiT's patch 2).",
    )

    args = parser.parse_args(input_args)
    sources = [args.dataset_name is not None, args.train_data_dir is not None, args.use_digits]
    if sum(sources) != 1:
        parser.error("Pass exactly one of --dataset_name, --train_data_dir and --use_digits.")
    return args


def recorded_shard_checksums(latents_dir: str) -> dict[str, str]:
    """The shard file checksums of the directory's last complete extraction (its metadata.json), if any."""
    try:
        with open(os.path.join(latents_dir, METADATA_NAME)) as f:
            return {shard["file"]: shard["sha256"] for shard in json.load(f)["shards"] if shard.get("sha256")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def shard_source_fingerprint(loader) -> str:
    """The `SourceFingerprint` of the images and labels ``loader`` gives (read and preprocessed, not encoded)."""
    fingerprint = SourceFingerprint()
    for batch in loader:
        fingerprint.update(batch["pixel_values"], batch["class_labels"])
    return fingerprint.hexdigest()


def main(args):
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)

    # The VAE, frozen, in the requested precision.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae = AutoencoderKL.from_pretrained(
        args.vae, subfolder=args.vae_subfolder, revision=args.revision, torch_dtype=weight_dtype, use_safetensors=True
    )
    vae.requires_grad_(False).eval().to(accelerator.device)
    scaling_factor = vae.config.scaling_factor
    repa_encoder = None
    if args.repa_encoder:  # refused here, before any encoding, if it is no vision encoder or cannot match the grid
        latent_size = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        token_grid = args.repa_token_grid or latent_size // 2
        repa_encoder = RepaEncoder.from_pretrained(args.repa_encoder, token_grid)
        repa_encoder.to(accelerator.device, dtype=weight_dtype)
    shift_factor = getattr(vae.config, "shift_factor", None) or 0.0

    # The images, unflipped (flipped copies are encoded separately). The main process loads (and caches) first.
    with accelerator.main_process_first():
        if args.use_digits:
            dataset, id2label = load_digits(
                args.resolution, split=args.digits_split, num_channels=vae.config.in_channels
            )
        else:
            dataset, id2label = load_image_dataset(
                **image_dataset_options(args),
                resolution=args.resolution,
                center_crop=args.center_crop,
                random_flip=False,
                num_channels=vae.config.in_channels,
                seed=args.seed,  # the random crops: drawn per (seed, image), whatever the shard or process
            )

    # Everything that determines a shard's content: a shard on disk with other settings is redone.
    settings = {
        "dataset": f"digits:{args.digits_split}" if args.use_digits else (args.dataset_name or args.train_data_dir),
        "image_column": args.image_column,
        "label_column": args.label_column,
        "num_samples": len(dataset),
        "resolution": args.resolution,
        "center_crop": args.center_crop,
        "flip": args.flip,
        "vae": args.vae,
        "vae_subfolder": args.vae_subfolder,
        "revision": args.revision,
        "sample_posterior": args.sample_posterior,
        "mixed_precision": accelerator.mixed_precision,
        "seed": args.seed,
        "shard_size": args.shard_size,
    }
    if repa_encoder is not None:  # only then, so that shards extracted without REPA keep matching
        settings.update(repa_encoder=args.repa_encoder, repa_token_grid=repa_encoder.token_grid)
    num_shards = math.ceil(len(dataset) / args.shard_size)
    shard_names = [shard_file_name(index, num_shards) for index in range(num_shards)]

    # metadata.json marks a complete, consistent directory: remove it until this run has finished (after every
    # process has read the shard checksums it recorded, which tell a shard damaged in place).
    os.makedirs(args.output_dir, exist_ok=True)
    metadata_path = os.path.join(args.output_dir, METADATA_NAME)
    recorded = recorded_shard_checksums(args.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and os.path.exists(metadata_path):
        os.remove(metadata_path)
    accelerator.wait_for_everyone()

    @torch.no_grad()
    def encode(pixel_values: torch.Tensor, indices: list[int], flipped: bool) -> torch.Tensor:
        posterior = vae.encode(pixel_values.to(accelerator.device, dtype=weight_dtype)).latent_dist
        if args.sample_posterior:
            latents = posterior.sample([posterior_generator(args.seed, index, flipped) for index in indices])
        else:
            latents = posterior.mean
        return ((latents - shift_factor) * scaling_factor).float().cpu()

    # This process's shards: k, k + N, k + 2N, ...
    my_shards = range(accelerator.process_index, num_shards, accelerator.num_processes)
    skipped = 0
    for shard_index in tqdm(my_shards, desc="Shards", disable=not accelerator.is_local_main_process):
        path = os.path.join(args.output_dir, shard_names[shard_index])
        indices = list(range(shard_index * args.shard_size, min((shard_index + 1) * args.shard_size, len(dataset))))
        loader = DataLoader(
            Subset(dataset, indices), batch_size=args.batch_size, num_workers=args.dataloader_num_workers
        )
        # A shard with these settings is kept only if its source (images and labels) is the same (one read of its
        # images, no encoding) and, when the last extraction recorded it, its file is byte-identical.
        existing = read_shard_settings(path)
        if existing is not None and {k: v for k, v in existing.items() if k != "source_sha256"} == settings:
            if existing.get("source_sha256") == shard_source_fingerprint(loader) and recorded.get(
                shard_names[shard_index], file_sha256(path)
            ) == file_sha256(path):
                skipped += 1
                continue
            logger.info(f"{path}: its images or labels changed since it was encoded, or it was damaged: redoing it.")

        fingerprint = SourceFingerprint()
        latents, latents_flipped, class_labels, features, features_flipped = [], [], [], [], []
        for step, batch in enumerate(loader):
            fingerprint.update(batch["pixel_values"], batch["class_labels"])
            batch_indices = indices[step * args.batch_size : (step + 1) * args.batch_size]
            latents.append(encode(batch["pixel_values"], batch_indices, flipped=False))
            if args.flip:
                latents_flipped.append(encode(batch["pixel_values"].flip(-1), batch_indices, flipped=True))
            if repa_encoder is not None:
                features.append(repa_encoder(batch["pixel_values"]).cpu())
                if args.flip:
                    features_flipped.append(repa_encoder(batch["pixel_values"].flip(-1)).cpu())
            class_labels.append(batch["class_labels"].long())

        tensors = {"latents": torch.cat(latents), "class_labels": torch.cat(class_labels)}
        if args.flip:
            tensors["latents_flipped"] = torch.cat(latents_flipped)
        if features:
            tensors[FEATURES] = torch.cat(features)
        if features_flipped:
            tensors[FEATURES_FLIPPED] = torch.cat(features_flipped)
        write_shard(path, tensors, {**settings, "source_sha256": fingerprint.hexdigest()})
    logger.info(f"Process {accelerator.process_index}: skipped {skipped} complete shards.", main_process_only=False)

    # Once every process is done, the main process describes the directory.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = []
        for name in shard_names:
            shard_path = os.path.join(args.output_dir, name)
            with safe_open(shard_path, framework="pt") as shard:
                shape = shard.get_slice("latents").get_shape()
            source = read_shard_settings(shard_path)["source_sha256"]
            shards.append({"file": name, "num_samples": shape[0], "sha256": file_sha256(shard_path),
                           "source_sha256": source})  # fmt: skip
        metadata = {
            **settings,
            # the source data's fingerprint: the images and labels every shard encodes (`SourceFingerprint`)
            "source_sha256": hashlib.sha256("".join(shard["source_sha256"] for shard in shards).encode()).hexdigest(),
            "scaling_factor": scaling_factor,
            "shift_factor": shift_factor,
            "latent_channels": shape[1],
            "latent_size": shape[2],
            "id2label": {str(label): name for label, name in id2label.items()},
            "shards": shards,
        }
        if repa_encoder is not None:
            metadata["repa_feature_dim"] = repa_encoder.feature_dim
        write_metadata(args.output_dir, metadata)
        logger.info(f"Wrote {len(dataset)} latents of shape {tuple(shape[1:])} in {num_shards} shards.")
    accelerator.end_training()


if __name__ == "__main__":
    main_with_messages(lambda: main(parse_args()))
