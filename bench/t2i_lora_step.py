"""LoRA training-step time of `training/train_tread_t2i_lora.py`: dense vs TREAD-routed, same weights, same batch.

One step is exactly the script's: `training_loss` of `diffusers_tread.t2i_training` (noising, the transformer forward
with precomputed text embeddings, the loss) + backward + AdamW on the LoRA parameters only (rank 16 on the attention
projections; the base weights are frozen, so backward computes no weight gradients for them, which changes the cost
mix compared with full training).
The text embeddings are random tensors of the shapes the text encoders produce: in the script they are computed once,
before training, so a step never runs a text encoder. Small-width transformers at a realistic token count: 512x512
images, i.e. 64x64 latents, 1024 image tokens at patch 2 (Flux: packed 2x2). Dense and routed steps alternate on one
model (`router.enabled` toggles routing); the medians of wall time and of this process's CPU time (`time.process_time`,
all threads: less sensitive than wall time to other processes on a shared machine) are reported with the FLOP ratio of
one step (`torch.utils.flop_counter`, forward + backward, CPU attention included).

    python bench/t2i_lora_step.py                               # PixArt, SD3 and Flux; width 128, 2 threads, batch 2
    python bench/t2i_lora_step.py --families sd3 --repeats 10 --json bench/results/t2i_lora_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import t2i_training
from diffusers_tread.models.tread_t2i import apply_tread
from diffusers_tread.profiling import CPU_SDPA_FLOPS

# Text tokens per prompt as the script feeds them: PixArt-Alpha's T5 length; SD3: 77 CLIP + 77 T5 (the script's
# default --max_sequence_length 77); Flux: 256 T5 tokens (schnell's length).
TEXT_TOKENS = {"pixart": 120, "sd3": 154, "flux": 256}
PIPELINES = {
    "pixart": ("PixArtSigmaPipeline", "PixArtTransformer2DModel"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "FluxTransformer2DModel"),
}


def make_transformer(family: str, args):
    """Random weights; width `args.width` (head dim 64), `args.depth` blocks, 4 latent channels."""
    heads = args.width // 64
    if family == "pixart":
        return PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=args.depth,
            sample_size=args.latent_size, patch_size=2, cross_attention_dim=args.width, caption_channels=args.width,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
            attention_bias=True, activation_fn="gelu-approximate", use_additional_conditions=False,
        )  # fmt: skip
    if family == "sd3":
        return SD3Transformer2DModel(
            sample_size=args.latent_size, patch_size=2, in_channels=4, out_channels=4, num_layers=args.depth,
            attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=args.width,
            caption_projection_dim=args.width, pooled_projection_dim=args.width, pos_embed_max_size=args.latent_size,
        )  # fmt: skip
    double = args.depth // 3  # Flux.1's 19 double- + 38 single-stream blocks, scaled down
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=double, num_single_layers=args.depth - double,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=args.width,
        pooled_projection_dim=args.width, guidance_embeds=False, axes_dims_rope=(16, 24, 24),
    )  # fmt: skip


def make_embeddings(family: str, args, generator) -> dict[str, torch.Tensor]:
    """Random tensors shaped like the script's precomputed embeddings for one batch."""
    batch, text = args.batch_size, TEXT_TOKENS[family]
    embeds = {"prompt_embeds": torch.randn(batch, text, args.width, generator=generator)}
    if family == "pixart":
        embeds["prompt_attention_mask"] = torch.ones(batch, text, dtype=torch.long)
    else:
        embeds["pooled_prompt_embeds"] = torch.randn(batch, args.width, generator=generator)
    return embeds


def bench_family(family: str, args) -> dict:
    torch.manual_seed(0)
    pipeline_class, transformer_class = PIPELINES[family]
    spec = t2i_training.ModelSpec(
        "(benchmark)", {"_class_name": pipeline_class, "transformer": ["diffusers", transformer_class]}
    )
    transformer = make_transformer(family, args).requires_grad_(False)
    t2i_training.add_lora(
        transformer,
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                   target_modules=t2i_training.DEFAULT_TARGET_MODULES[family]),
    )  # fmt: skip
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    router = apply_tread(transformer, routes=args.routes, generator=generator)
    transformer.train()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if spec.flow_matching else DDPMScheduler()
    options = argparse.Namespace(
        weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, precondition_outputs=1,
        guidance_scale=3.5,
    )  # fmt: skip
    x0 = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=generator)
    embeds = make_embeddings(family, args, generator)

    def step():
        loss = t2i_training.training_loss(
            spec, transformer, scheduler, x0, embeds, options, generator, torch.float32, 8
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def flops() -> int:
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            t2i_training.training_loss(
                spec, transformer, scheduler, x0, embeds, options, generator, torch.float32, 8
            ).backward()
        optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    times = {"dense": [], "routed": []}
    cpu_times = {"dense": [], "routed": []}
    counted = {}
    for arm in ("dense", "routed"):
        router.enabled = arm == "routed"
        counted[arm] = flops()
        for _ in range(args.warmup):
            step()
    for _ in range(args.repeats):  # interleaved, so that drift on a shared machine hits both arms alike
        for arm in ("dense", "routed"):
            router.enabled = arm == "routed"
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            times[arm].append(time.perf_counter() - started)
            cpu_times[arm].append(time.process_time() - cpu_started)
            if arm == "routed":
                assert router.route_masks is not None  # the step really routed
            else:
                assert router.route_masks is None
    dense, routed = statistics.median(times["dense"]), statistics.median(times["routed"])
    route = router.routes[0]
    image_tokens = (args.latent_size // 2) ** 2
    return {
        "family": family,
        "blocks": router.num_blocks,
        "width": args.width,
        "image_tokens": image_tokens,
        "text_tokens": TEXT_TOKENS[family],
        "route": f"{route['start_layer_idx']}..{route['end_layer_idx']} @ {route['selection_ratio']}",
        "batch": args.batch_size,
        "lora_parameters_m": sum(p.numel() for p in lora_parameters) / 1e6,
        "dense_s": dense,
        "routed_s": routed,
        "dense_times": times["dense"],
        "routed_times": times["routed"],
        "time_ratio": routed / dense,
        "dense_cpu_s": statistics.median(cpu_times["dense"]),
        "routed_cpu_s": statistics.median(cpu_times["routed"]),
        "cpu_time_ratio": statistics.median(cpu_times["routed"]) / statistics.median(cpu_times["dense"]),
        "dense_gflop": counted["dense"] / 1e9,
        "routed_gflop": counted["routed"] / 1e9,
        "flop_ratio": counted["routed"] / counted["dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="pixart,sd3,flux")
    parser.add_argument("--resolution", type=int, default=512, help="pixels; latents are 1/8 (SD VAE)")
    parser.add_argument("--width", type=int, default=128, help="transformer width (head dim 64)")
    parser.add_argument("--depth", type=int, default=12, help="transformer blocks (Flux: a third double-stream)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--routes", default="paper", help='"paper" (2..depth-4 at 0.5) or start:end:ratio')
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    args.latent_size = args.resolution // 8
    if args.routes != "paper":
        start, end, ratio = args.routes.split(":")
        args.routes = [{"start_layer_idx": int(start), "end_layer_idx": int(end), "selection_ratio": float(ratio)}]
    torch.set_num_threads(args.threads)
    results = []
    for family in args.families.split(","):
        results.append(bench_family(family.strip(), args))
        r = results[-1]
        print(f"{r['family']}: dense {r['dense_s']:.3f} s, routed {r['routed_s']:.3f} s per step", flush=True)

    print(f"\nMachine: {platform.processor() or platform.machine()}, torch {torch.__version__} ({args.threads} threads), "
          f"fp32; median of {args.repeats} interleaved steps after {args.warmup} warm-up\n")  # fmt: skip
    print("| model | blocks x width | image + text tokens | route | batch | dense s/step | routed s/step "
          "| routed / dense wall time | routed / dense CPU time | FLOP ratio | dense GFLOP/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['family']} | {r['blocks']} x {r['width']} | {r['image_tokens']} + {r['text_tokens']} | "
              f"{r['route']} | {r['batch']} | {r['dense_s']:.3f} | {r['routed_s']:.3f} | {r['time_ratio']:.3f} | "
              f"{r['cpu_time_ratio']:.3f} | "
              f"{r['flop_ratio']:.3f} | {r['dense_gflop']:.1f} |")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, **vars(args)}
        Path(args.json).write_text(json.dumps({"config": meta, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
