"""Sample a class-balanced set of images from a TreadDiTPipeline and score it with FID (issue #4).

    accelerate launch training/evaluate.py --pipeline tread-dit-xl --num_samples 50000 --batch_size 125 \
        --num_inference_steps 250 --guidance_scale 1.5 --output_dir samples-xl \
        --inception_weights inception-2015-12-05.pt --reference_stats VIRTUAL_imagenet256_labeled.npz

Sample ``i`` has class ``i % num_classes`` and its own generator, seeded from ``(seed, i)``. The samples are cut into
global batches of ``batch_size`` consecutive indices, dealt round-robin to the processes, so the images do not depend
on the number of processes, and a batch always holds the same samples (Sparse Guidance draws its token subsets per
batch). Each image is written as ``<index>.png`` (atomically); a rerun skips batches whose PNGs all exist and
regenerates the rest identically (same ``--batch_size``). When all exist, the main process writes
``samples_<N>x<H>x<W>x3.npz`` (uint8 NHWC under ``arr_0``, the layout OpenAI's ADM evaluator reads) and, unless
``--skip_fid``, the FID against ``--reference_stats`` to ``fid.json``. Our FID uses NVIDIA's TorchScript port of
the TF Inception (see `diffusers_tread.metrics`): close to, not bit-identical with, ADM's TensorFlow evaluator; for
numbers to put next to papers, run ADM's ``evaluator.py`` on the ``.npz``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from diffusers_tread import TreadDiTPipeline
from diffusers_tread.metrics import (
    FeatureExtractor,
    fid_from_images,
    load_inception,
    load_reference_statistics,
)
from diffusers_tread.pipelines.pipeline_tread_dit import check_sampling_arguments
from diffusers_tread.training_utils import ArgumentParser, main_with_messages

logger = logging.getLogger(__name__)
CONFIG_NAME = "samples_config.json"
# Settings that change the images: a resumed run must use the same ones.
SAMPLE_SETTINGS = (
    "pipeline",
    "num_samples",
    "batch_size",
    "num_inference_steps",
    "guidance_scale",
    "guidance",
    "seed",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="A TreadDiTPipeline folder or Hub id.")
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--batch_size", type=int, default=32, help="Images per pipeline call (per process).")
    parser.add_argument("--num_inference_steps", type=int, default=250)
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--guidance", choices=("cfg", "sparse", "cfg+sparse"), default="cfg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True, help="Where <index>.png, the .npz and fid.json go.")
    parser.add_argument("--inception_weights", default=None, help="Local TorchScript inception-2015-12-05.pt.")
    parser.add_argument(
        "--inception_sha256",
        default=None,
        help="Expected SHA-256 of --inception_weights (none is published; default: the hash recorded next to the "
        "file on first use, <file>.sha256). A mismatch stops before the file is loaded.",
    )
    parser.add_argument("--reference_stats", default=None, help="Local .npz with mu/sigma, e.g. ADM's reference.")
    parser.add_argument("--skip_fid", action="store_true", help="Only write the samples and the .npz.")
    parser.add_argument("--fid_batch_size", type=int, default=200)
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num_samples and --batch_size must be positive.")
    try:  # before any sample is drawn: 0 steps would write the initial noise into the FID .npz
        check_sampling_arguments(args.num_inference_steps, args.guidance_scale, prefix="--")
    except ValueError as error:
        parser.error(str(error))
    return args


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index``, mixed from ``(seed, index)`` (no overlap between nearby seeds)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def process_batches(num_samples: int, batch_size: int, process_index: int, num_processes: int) -> list[range]:
    """This process's global batches: batch ``k`` is indices ``[k * batch_size, (k + 1) * batch_size)``; process
    ``p`` takes batches ``p, p + num_processes, ...``."""
    num_batches = math.ceil(num_samples / batch_size)
    return [
        range(k * batch_size, min((k + 1) * batch_size, num_samples))
        for k in range(process_index, num_batches, num_processes)
    ]


def png_path(output_dir: Path, index: int) -> Path:
    return output_dir / f"{index:06d}.png"


def check_settings(output_dir: Path, args: argparse.Namespace) -> None:
    """Write the sampling settings, or refuse to resume a folder sampled with different ones."""
    settings = {key: getattr(args, key) for key in SAMPLE_SETTINGS}
    path = output_dir / CONFIG_NAME
    if path.exists():
        saved = json.loads(path.read_text())
        changed = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
        if changed:
            raise ValueError(
                f"{output_dir} holds samples made with other settings ({changed}, as (saved, now)); "
                "use another --output_dir or the same settings."
            )
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


@torch.no_grad()
def generate(pipe: TreadDiTPipeline, args: argparse.Namespace, accelerator: Accelerator) -> int:
    """Write this process's missing PNGs; returns how many it wrote."""
    output_dir, written = Path(args.output_dir), 0
    for batch in process_batches(
        args.num_samples, args.batch_size, accelerator.process_index, accelerator.num_processes
    ):
        missing = [index for index in batch if not png_path(output_dir, index).exists()]
        if not missing:
            continue
        generators = [torch.Generator(pipe.device).manual_seed(sample_seed(args.seed, index)) for index in batch]
        images = pipe(
            class_labels=[index % pipe.num_classes for index in batch],
            generator=generators,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            guidance=args.guidance,
            output_type="np",
        ).images
        images = (images * 255).round().clip(0, 255).astype(np.uint8)
        for index, image in zip(batch, images, strict=True):
            if index in missing:
                path = png_path(output_dir, index)
                tmp = path.with_suffix(f".tmp{accelerator.process_index}.png")
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB").save(tmp)
                os.replace(tmp, path)  # atomic: a killed run never leaves a truncated PNG
                written += 1
        logger.info(f"process {accelerator.process_index}: wrote samples {batch.start}..{batch.stop - 1}")
    return written


def load_samples(output_dir: Path, num_samples: int) -> np.ndarray:
    """All PNGs as one uint8 ``(N, H, W, 3)`` array, in index order."""
    return np.stack(
        [np.asarray(Image.open(png_path(output_dir, index)).convert("RGB")) for index in range(num_samples)]
    )


def main(args: argparse.Namespace, feature_extractor: FeatureExtractor | None = None) -> dict:
    """Sample, write the ``.npz`` and compute FID; ``feature_extractor`` replaces the Inception file (tests)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    output_dir = Path(args.output_dir)
    # Fail before hours of sampling, not after.
    reference = None
    if not args.skip_fid:
        if feature_extractor is None:
            feature_extractor = load_inception(args.inception_weights, accelerator.device, args.inception_sha256)
        reference = load_reference_statistics(args.reference_stats)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        check_settings(output_dir, args)
    accelerator.wait_for_everyone()

    pipe = TreadDiTPipeline.from_pretrained(args.pipeline).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    written = generate(pipe, args, accelerator)
    accelerator.wait_for_everyone()

    result = {"num_samples": args.num_samples, "written": written}
    if accelerator.is_main_process:
        samples = load_samples(output_dir, args.num_samples)
        count, height, width, channels = samples.shape
        npz_path = output_dir / f"samples_{count}x{height}x{width}x{channels}.npz"
        np.savez(npz_path, arr_0=samples)
        result["npz"] = str(npz_path)
        logger.info(f"wrote {npz_path}")
        if reference is not None:
            result["fid"] = fid_from_images(samples, feature_extractor, reference, args.fid_batch_size)
            fid = {key: getattr(args, key) for key in SAMPLE_SETTINGS} | {"fid": result["fid"]}
            (output_dir / "fid.json").write_text(json.dumps(fid, indent=2) + "\n")
            logger.info(f"FID {result['fid']:.4f} ({count} samples)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main_with_messages(lambda: main(parse_args()))
