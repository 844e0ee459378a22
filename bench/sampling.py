"""Sampling time: TreadDiTPipeline vs stock DiTPipeline, same weights, scheduler, VAE, classes and noise (issue #4).

Both pipelines run the same dense transformer passes (TREAD routes are off at sampling), so the target is overhead
only: a median time ratio TreadDiTPipeline / DiTPipeline <= 1.02. The calls alternate (and swap order each repeat)
in one process, after one warm-up call each; besides the ratio of the medians, the median of the per-repeat ratios
(two calls back to back) is reported, which is robust to load that drifts during the run on a shared machine. The VAE is a tiny random AutoencoderKL (4x32x32 latents -> 3x64x64
images, 8 channels), the same instance in both pipelines: DiTPipeline always decodes, and sd-vae-ft-ema's decoder
would dominate a CPU run with work that is identical in both; its time is measured and reported separately.

    python bench/sampling.py                                           # DiT-S/2, batch 2, 4 DDIM steps, CFG 4, 9 repeats
    python bench/sampling.py --model DiT-XL/2 --batch_size 32 --num_inference_steps 50 --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffusers_tread import TreadDiTPipeline, TreadTransformer2DModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build(model: str, device: str, dtype: torch.dtype) -> tuple[TreadDiTPipeline, DiTPipeline]:
    torch.manual_seed(0)
    # The paper's route (inactive at sampling, eval mode), one shared conditioning embedding (from_preset's layout);
    # stock DiT gets the same weights in its per-block layout, as `to_dit` exports them.
    tread = TreadTransformer2DModel.from_preset(model)
    stock = tread.to_dit()
    assert type(stock) is DiTTransformer2DModel
    stock.eval()  # DiTPipeline does not switch modes; in train mode its blocks would drop labels at random
    vae = tiny_vae()
    pipes = (
        TreadDiTPipeline(transformer=tread, vae=vae, scheduler=DDIMScheduler()),
        DiTPipeline(transformer=stock, vae=vae, scheduler=DDIMScheduler()),
    )
    for pipe in pipes:
        pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
    return pipes


def timed_call(pipe, args, device: str) -> tuple[float, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    labels = list(range(args.batch_size))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe(
        class_labels=labels,
        guidance_scale=args.guidance_scale,
        generator=generator,
        num_inference_steps=args.num_inference_steps,
        output_type="pt",
    ).images
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, images.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_inference_steps", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()

    tread_pipe, stock_pipe = build(args.model, args.device, DTYPES[args.dtype])
    _, tread_images = timed_call(tread_pipe, args, args.device)  # warm-up
    _, stock_images = timed_call(stock_pipe, args, args.device)
    times = {"tread": [], "stock": []}
    for repeat in range(args.repeats):
        order = [("tread", tread_pipe), ("stock", stock_pipe)]
        for name, pipe in order if repeat % 2 == 0 else order[::-1]:
            times[name].append(timed_call(pipe, args, args.device)[0])

    latents = torch.randn(args.batch_size, 4, 32, 32, device=args.device, dtype=DTYPES[args.dtype])
    decode = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            tread_pipe.vae.decode(latents / tread_pipe.vae.config.scaling_factor)
            decode.append(time.perf_counter() - start)

    tread_s, stock_s = statistics.median(times["tread"]), statistics.median(times["stock"])
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "repeats": args.repeats,
        "device": args.device if args.device != "cpu" else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tread_times_s": times["tread"],
        "stock_times_s": times["stock"],
        "tread_median_s": tread_s,
        "stock_median_s": stock_s,
        "vae_decode_median_s": statistics.median(decode),
        "time_ratio": tread_s / stock_s,
        # each repeat's two calls ran back to back: robust to load drifting on a shared machine
        "paired_ratio_median": statistics.median(t / s for t, s in zip(times["tread"], times["stock"], strict=True)),
        "max_abs_image_diff": (tread_images - stock_images).abs().max().item(),
        "meets_target": tread_s / stock_s <= 1.02,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
