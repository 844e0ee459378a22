"""Training-step time of the state-space backbone (`TreadSSM2DModel`): dense vs TREAD-routed, same weights.

For each preset it builds a model for 1x16x16 inputs (10 classes; ``--in_channels 4 --sample_size 32`` for
ImageNet-256 latents) and times full training steps (forward + backward +
AdamW step) alternately for the dense and the routed copy, reporting the median step time and the FLOP ratio of one
step (``torch.utils.flop_counter``: matmuls and convolutions only; the scan's elementwise recurrence is not counted,
but it also scales with the number of tokens). Routes default to the paper's 2 .. depth-4 at ratio 0.5.

    python bench/ssm_throughput.py                                  # SSM-Tiny/2, SSM-S/2; patch 2: 64 tokens
    python bench/ssm_throughput.py --patch_size 1 --threads 2       # 256 tokens
    python bench/ssm_throughput.py --device cuda --models SSM-S/2 SSM-B/2 --in_channels 4 --sample_size 32 --batch_size 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import SSM_PRESETS, TreadSSM2DModel, paper_routes
from diffusers_tread.models.ssm_tread import fused_selective_scan


def train_step(model, optimizer, batch) -> None:
    x, target, timestep, labels = batch
    loss = torch.nn.functional.mse_loss(model(x, timestep=timestep, class_labels=labels).sample, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(model, batch) -> int:
    x, target, timestep, labels = batch
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.mse_loss(model(x, timestep=timestep, class_labels=labels).sample, target)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_preset(name: str, args) -> dict:
    torch.manual_seed(0)
    size, channels, device = args.sample_size, args.in_channels, torch.device(args.device)
    config = dict(in_channels=channels, out_channels=channels, sample_size=size, num_embeds_ada_norm=10)
    config["patch_size"] = args.patch_size
    dense = TreadSSM2DModel.from_preset(name, routes=None, **config).train()
    routes = paper_routes(dense.config.num_layers)
    routed = TreadSSM2DModel.from_preset(name, routes=routes, **config).train()
    routed.load_state_dict(dense.state_dict())
    dense, routed = dense.to(device), routed.to(device)
    arms = {"dense": dense, "routed": routed}
    optimizers = {arm: torch.optim.AdamW(model.parameters(), lr=1e-4) for arm, model in arms.items()}
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.batch_size, channels, size, size, generator=generator).to(device),
        torch.randn(args.batch_size, channels, size, size, generator=generator).to(device),
        torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device),
        torch.randint(0, 10, (args.batch_size,), generator=generator).to(device),
    )
    flops = {arm: step_flops(model, batch) for arm, model in arms.items()}
    for arm, model in arms.items():
        for _ in range(args.warmup):
            train_step(model, optimizers[arm], batch)
    times = {arm: [] for arm in arms}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both arms alike
        for arm, model in arms.items():
            synchronize(device)
            start = time.perf_counter()
            train_step(model, optimizers[arm], batch)
            synchronize(device)
            times[arm].append(time.perf_counter() - start)
    dense_s, routed_s = statistics.median(times["dense"]), statistics.median(times["routed"])
    return {
        "model": name,
        "tokens": (size // args.patch_size) ** 2,
        "parameters_m": sum(p.numel() for p in dense.parameters()) / 1e6,
        "route": f"{routes[0]['start_layer_idx']}..{routes[0]['end_layer_idx']}@{routes[0]['selection_ratio']}",
        "dense_s": dense_s,
        "routed_s": routed_s,
        "time_ratio": routed_s / dense_s,
        "flop_ratio": flops["routed"] / flops["dense"],
        "spread": {arm: (min(t), max(t)) for arm, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["SSM-Tiny/2", "SSM-S/2"], choices=sorted(SSM_PRESETS))
    parser.add_argument("--patch_size", type=int, default=2)
    parser.add_argument("--sample_size", type=int, default=16)
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, scan: {'mamba_ssm' if fused_selective_scan() else 'PyTorch'}"
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}), threads={torch.get_num_threads()}"
    print(
        f"# {machine}, fp32, torch={torch.__version__}, input {args.in_channels}x{args.sample_size}x{args.sample_size}, patch {args.patch_size}, batch {args.batch_size}, "
        f"median of {args.repeats} interleaved steps"
    )
    print(
        "| model | params | tokens | route | dense s/step (min-max) | routed s/step (min-max) | routed/dense time "
        "| FLOP ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench_preset(name, args)
        spread = r["spread"]
        print(
            f"| {r['model']} (patch {args.patch_size}) | {r['parameters_m']:.2f}M | {r['tokens']} | {r['route']} | "
            f"{r['dense_s']:.3f} ({spread['dense'][0]:.3f}-{spread['dense'][1]:.3f}) | "
            f"{r['routed_s']:.3f} ({spread['routed'][0]:.3f}-{spread['routed'][1]:.3f}) | "
            f"{r['time_ratio']:.3f} | {r['flop_ratio']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
