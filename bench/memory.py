"""Training memory per step, dense vs TREAD-routed, for DiT sizes up to XL/2 (issue #4), without a GPU.

Per step, a model needs its static state (fp32 weights, gradients and AdamW's two moments: 16 bytes per parameter)
plus the activations autograd saves for backward, which grow with the batch and which routing shrinks. The saved
activations are measured, not modelled: one forward pass at batch 1 on 4x32x32 latents (ImageNet 256 through the
SD VAE), fp32, CPU, with `saved_tensors_hooks` counting each saved storage once (bench/throughput.py). Every saved
tensor is per sample, so the estimate at batch B is static + B x per-image activations; it leaves out the allocator's
overhead and the temporaries of the backward pass, so read it as a lower bound of a GPU's peak.

    python bench/memory.py                                   # DiT-S/2, DiT-B/2, DiT-XL/2; ~2 minutes on 2 cores
    python bench/memory.py --models DiT-XL/2 --batch_size 32 --json bench/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from throughput import make_batch, saved_activation_bytes  # bench/ is sys.path[0] for `python bench/memory.py`

from diffusers_tread import PRESETS, TreadTransformer2DModel

GIB = 2**30


def measure(name: str, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = TreadTransformer2DModel.from_preset(name, routes="paper").train()
    parameters = sum(p.numel() for p in model.parameters())
    batch = make_batch(1, torch.device("cpu"), torch.float32)
    routed = saved_activation_bytes(model, batch)
    model.disable_routing()
    dense = saved_activation_bytes(model, batch)
    static = 16 * parameters  # fp32 weights + gradients + AdamW exp_avg and exp_avg_sq
    return {
        "model": name,
        "routes": model.config.routes,
        "parameters": parameters,
        "static_gib": static / GIB,
        "dense_activations_mib_per_image": dense / 2**20,
        "routed_activations_mib_per_image": routed / 2**20,
        "activation_ratio": routed / dense,
        "batch_size": batch_size,
        "dense_step_gib": (static + batch_size * dense) / GIB,
        "routed_step_gib": (static + batch_size * routed) / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2"], choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=32, help="per-device batch of the estimate (DiT: 256 / 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(name, args.batch_size) for name in args.models]
    print(
        f"| model | route | params (M) | static GiB | saved act. MiB/image dense / routed | ratio "
        f"| est. GiB/step at batch {args.batch_size} dense / routed |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        route = ",".join(f"{x['start_layer_idx']}..{x['end_layer_idx']}@{x['selection_ratio']}" for x in r["routes"])
        print(
            f"| {r['model']} | {route} | {r['parameters'] / 1e6:.1f} | {r['static_gib']:.2f} | "
            f"{r['dense_activations_mib_per_image']:.1f} / {r['routed_activations_mib_per_image']:.1f} | "
            f"{r['activation_ratio']:.3f} | {r['dense_step_gib']:.1f} / {r['routed_step_gib']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
