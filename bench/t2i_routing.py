"""Training-step cost of TREAD routing on Diffusers' text-to-image transformers: stock vs `apply_tread`-routed.

Two tables, both at a realistic token count (1024 image tokens = a 512x512 image: SD3 and PixArt 64x64 latents at
patch 2, Flux 64x64 latents packed 2x2; ``--image_tokens 4096`` = 1024 px):

1. Time on CPU. Small-width PixArt / SD3 / Flux transformers (random weights, width 128, 12 blocks). Forward +
   backward steps, timed alternately for the stock model and the same weights with the paper's route (2..depth-4 at
   0.5); the time ratio uses each arm's fastest step (the least disturbed by other jobs), the median ratio is shown
   too. Plus the FLOPs of one step (``torch.utils.flop_counter``, CPU attention included). At width 128 attention
   dominates the FLOPs, more than in the real models.
2. FLOPs at full size. The published configs (PixArt-alpha XL/2, SD3-medium, Flux.1-dev) built on the meta device (no
   memory, no weights) and counted the same way: the FLOP share routing saves in the real models.

    python bench/t2i_routing.py                       # ~2-3 min on 2 CPU cores
    python bench/t2i_routing.py --image_tokens 4096   # 1024 px (much slower timing)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread.models.tread_t2i import apply_tread
from diffusers_tread.profiling import CPU_SDPA_FLOPS

TEXT_TOKENS = {"pixart": 120, "sd3": 333, "flux": 512}  # PixArt-alpha: T5 120; SD3: 77 CLIP + 256 T5; Flux: T5 512
FULL_SIZE = {  # the published configs (transformer/config.json of each model on the Hub)
    "pixart": "PixArt-alpha XL/2 (28 blocks, width 1152)",
    "sd3": "SD3-medium (24 blocks, width 1536)",
    "flux": "Flux.1-dev (19 + 38 blocks, width 3072)",
}


def make_model(name: str, image_tokens: int, width: int | None = None, depth: int | None = None):
    """A stock model for ``image_tokens`` (a square number): the published config, or width/depth overridden."""
    grid = math.isqrt(image_tokens)
    heads = {"num_attention_heads": width // 64, "attention_head_dim": 64} if width else {}
    if name == "pixart":
        width = width or 1152
        return PixArtTransformer2DModel(
            **heads,
            in_channels=4,
            out_channels=8,
            num_layers=depth or 28,
            cross_attention_dim=width,
            sample_size=2 * grid,
            patch_size=2,
            caption_channels=4096 if depth is None else width,
            use_additional_conditions=False,
        )
    if name == "sd3":
        return SD3Transformer2DModel(
            **(heads or {"num_attention_heads": 24, "attention_head_dim": 64}),
            sample_size=2 * grid,
            patch_size=2,
            in_channels=16,
            num_layers=depth or 24,
            joint_attention_dim=4096 if depth is None else width,
            caption_projection_dim=width or 1536,
            pooled_projection_dim=2048 if depth is None else width,
            out_channels=16,
            pos_embed_max_size=max(192, 2 * grid),
        )
    if depth is None:
        return FluxTransformer2DModel(guidance_embeds=True)  # the Flux.1-dev defaults
    double = depth // 3  # Flux.1 has 19 double-stream and 38 single-stream blocks: about 1 : 2
    return FluxTransformer2DModel(
        **heads,
        in_channels=64,
        num_layers=double,
        num_single_layers=depth - double,
        joint_attention_dim=width,
        pooled_projection_dim=width,
        axes_dims_rope=(8, 28, 28),
    )


def make_batch(model, image_tokens: int, text_tokens: int, batch_size: int, device="cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    b, grid, config = batch_size, math.isqrt(image_tokens), model.config

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    text_dim = config.get("joint_attention_dim") or config.get("caption_channels")
    batch = {"encoder_hidden_states": randn(b, text_tokens, text_dim)}
    if isinstance(model, FluxTransformer2DModel):
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        batch.update(
            hidden_states=randn(b, grid * grid, config.in_channels),
            pooled_projections=randn(b, config.pooled_projection_dim),
            timestep=torch.rand(b, generator=g).to(device),
            img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device),
            txt_ids=torch.zeros(text_tokens, 3, device=device),
        )
        if config.guidance_embeds:
            batch["guidance"] = torch.full((b,), 3.5, device=device)
    else:
        batch.update(
            hidden_states=randn(b, config.in_channels, 2 * grid, 2 * grid),
            timestep=torch.randint(0, 1000, (b,), generator=g).to(device),
        )
        if isinstance(model, SD3Transformer2DModel):
            batch["pooled_projections"] = randn(b, config.pooled_projection_dim)
    return batch


def train_step(model, batch) -> None:
    model(**batch).sample.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def step_flops(model, batch) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        train_step(model, batch)
    return counter.get_total_flops()


def time_model(name: str, args) -> dict:
    """Table 1: median forward + backward time on CPU, stock vs routed (same weights, same batch)."""
    torch.manual_seed(0)
    stock = make_model(name, args.image_tokens, width=args.width, depth=args.depth).train()
    model = copy.deepcopy(stock)
    router = apply_tread(model, "paper", generator=torch.Generator().manual_seed(0))
    batch = make_batch(stock, args.image_tokens, TEXT_TOKENS[name], args.batch_size)
    arms = ("stock", "hooks_off", "routed") if args.hooks_off else ("stock", "routed")

    def run(arm):
        router.enabled = arm == "routed"
        train_step(stock if arm == "stock" else model, batch)

    flops = {}
    for arm in ("stock", "routed"):
        router.enabled = arm == "routed"
        flops[arm] = step_flops(stock if arm == "stock" else model, batch)
    for arm in arms:
        for _ in range(args.warmup):
            run(arm)
    times = {arm: [] for arm in arms}
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every arm alike
        for arm in arms:
            start = clock()
            run(arm)
            times[arm].append(clock() - start)
    best = {arm: min(times[arm]) for arm in arms}
    median = {arm: statistics.median(times[arm]) for arm in arms}
    return {
        "model": type(stock).__name__,
        "blocks": router.num_blocks,
        "width": args.width,
        "routes": router.routes,
        "image_tokens": args.image_tokens,
        "text_tokens": TEXT_TOKENS[name],
        "batch_size": args.batch_size,
        "flops": flops,
        "times_s": times,
        "best_s": best,
        "median_s": median,
        "flop_ratio": flops["routed"] / flops["stock"],
        "time_ratio": best["routed"] / best["stock"],
        "median_time_ratio": median["routed"] / median["stock"],
    }


def full_size_flops(name: str, args) -> dict:
    """Table 2: FLOPs of one training step of the published config, counted on the meta device."""
    with torch.device("meta"):
        model = make_model(name, args.image_tokens).train()
    batch = make_batch(model, args.image_tokens, TEXT_TOKENS[name], 1, device="meta")
    dense = step_flops(model, batch)
    router = apply_tread(model, "paper")
    routed = step_flops(model, batch)
    return {
        "model": FULL_SIZE[name],
        "routes": router.routes,
        "image_tokens": args.image_tokens,
        "text_tokens": TEXT_TOKENS[name],
        "dense_tflops": dense / 1e12,
        "routed_tflops": routed / 1e12,
        "flop_ratio": routed / dense,
    }


def route_text(routes) -> str:
    return ",".join(f"{r['start_layer_idx']}..{r['end_layer_idx']}@{r['selection_ratio']}" for r in routes)


def print_timed(timed: list[dict], args, load_before: str) -> None:
    print(
        f"\n## Forward + backward on CPU, width {args.width}, batch {args.batch_size}, {args.threads} thread(s), "
        f"{args.clock} clock, best (min) of {args.repeats} interleaved steps; load average before: {load_before}\n"
    )
    hooks = " hooks off ms |" if args.hooks_off else ""
    print(
        f"| model | blocks | image + text tokens | route | stock ms |{hooks} routed ms | time ratio "
        "| time ratio of medians | FLOP ratio |"
    )
    print("|" + "---|" * (10 if args.hooks_off else 9))
    for r in timed:
        off = f" {1000 * r['best_s']['hooks_off']:.0f} |" if args.hooks_off else ""
        print(
            f"| {r['model']} | {r['blocks']} | {r['image_tokens']} + {r['text_tokens']} | {route_text(r['routes'])} | "
            f"{1000 * r['best_s']['stock']:.0f} |{off} {1000 * r['best_s']['routed']:.0f} | "
            f"{r['time_ratio']:.3f} | {r['median_time_ratio']:.3f} | {r['flop_ratio']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pixart", "sd3", "flux"], choices=["pixart", "sd3", "flux"])
    parser.add_argument("--image_tokens", type=int, default=1024, help="a square number (1024: 512 px, 4096: 1024 px)")
    parser.add_argument("--width", type=int, default=128, help="timed models: a multiple of 64 (head dim 64)")
    parser.add_argument("--depth", type=int, default=12, help="timed models: blocks (Flux: 1/3 double-stream)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps per arm after the FLOP-counting step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="'process': CPU time of this process, steadier than wall-clock on a busy machine (use with --threads 1)",
    )
    parser.add_argument("--flops_only", action="store_true", help="only the full-size FLOP table (no timing)")
    parser.add_argument("--hooks_off", action="store_true", help="also time the router attached with enabled=False")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# cpu ({platform.processor() or 'cpu'}), threads={torch.get_num_threads()}, fp32, torch={torch.__version__}"
    )

    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())  # other jobs on the machine skew wall-clock times
    timed = [] if args.flops_only else [time_model(name, args) for name in args.models]
    if timed:
        print_timed(timed, args, load_before)

    full = [full_size_flops(name, args) for name in args.models]
    print("\n## FLOPs of one training step (forward + backward, batch 1) at full size, meta device\n")
    print("| model | image + text tokens | route | dense TFLOP | routed TFLOP | FLOP ratio |")
    print("|" + "---|" * 6)
    for r in full:
        print(
            f"| {r['model']} | {r['image_tokens']} + {r['text_tokens']} | {route_text(r['routes'])} | "
            f"{r['dense_tflops']:.1f} | {r['routed_tflops']:.1f} | {r['flop_ratio']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timed": timed, "full_size": full}, f, indent=2)


if __name__ == "__main__":
    main()
