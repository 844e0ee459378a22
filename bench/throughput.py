"""Training-step throughput: dense DiT vs TREAD-routed DiT, same weights, same batch, interleaved in one process.

For each model it times full training steps (forward + backward + AdamW step) alternately for the dense and the routed
model, reports the median images/s, the FLOPs of one step (``torch.utils.flop_counter``, forward + backward), the
activation memory saved for backward, and on CUDA the step's GPU memory: the peak during the step minus what was
allocated before it (weights and optimizer states), i.e. activations, gradients and temporaries. The target (issue #2): a routed step costs at most
1.05x its FLOP share of the dense step.

    python bench/throughput.py                                   # DiT-S/2 and DiT-B/2, 4x32x32 latents, CPU fp32
    python bench/throughput.py --models DiT-B/2 DiT-XL/2 --batch_size 64 --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import PRESETS, TreadTransformer2DModel, paper_routes


def parse_routes(text: str) -> list[dict]:
    """'2:8:0.5,10:12:0.3' -> route dicts."""
    routes = []
    for part in text.split(","):
        start, end, ratio = part.split(":")
        routes.append({"start_layer_idx": int(start), "end_layer_idx": int(end), "selection_ratio": float(ratio)})
    return routes


def make_batch(batch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, 4, 32, 32, generator=generator)
    target = torch.randn(batch_size, 8, 32, 32, generator=generator)
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, 1000, (batch_size,), generator=generator)
    return latents.to(device, dtype), target.to(device, dtype), timestep.to(device), labels.to(device)


def train_step(model, optimizer, batch) -> None:
    latents, target, timestep, labels = batch
    prediction = model(latents, timestep=timestep, class_labels=labels).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(model, batch) -> int:
    latents, target, timestep, labels = batch
    with FlopCounterMode(display=False) as counter:
        prediction = model(latents, timestep=timestep, class_labels=labels).sample
        torch.nn.functional.mse_loss(prediction.float(), target.float()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_activation_bytes(model, batch) -> int:
    """Bytes of tensors autograd saves for backward in one forward pass (what routing shrinks)."""
    latents, _, timestep, labels = batch
    # Weights are not activations: autograd may hand them to the hook as plain tensors, so skip by storage.
    seen = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    total = 0
    # The hook hands autograd an index, never the tensor: a saved *output* handed back as itself points to the node
    # that saves it, a reference cycle that leaked every counted activation (~10 GiB per call for XL/2 at batch 32).
    # `kept` holds the tensors until the count is done, so no storage is freed and its address reused mid-pass.
    kept = []

    def pack(tensor):
        nonlocal total
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        kept.append(tensor)
        return len(kept) - 1

    # The forward pass alone: autograd saves everything backward needs while the graph is built.
    with torch.autograd.graph.saved_tensors_hooks(pack, kept.__getitem__):
        model(latents, timestep=timestep, class_labels=labels).sample.float().mean()
    kept.clear()
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, routes: list[dict], args, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    dense = TreadTransformer2DModel.from_preset(name, routes=None).to(device).train()
    if dtype != torch.float32:
        dense = dense.to(dtype)
    routed = TreadTransformer2DModel.from_dit(dense, routes=routes)  # same parameters, routes on
    # Stock Diffusers DiT with the same parameters: shows that our dense path costs nothing extra. (In train mode it
    # also draws its per-block label dropout, which ours switches off.)
    config = {
        k: v for k, v in dense.config.items() if not k.startswith("_") and k not in ("routes", "route_reinsertion")
    }
    stock = DiTTransformer2DModel.from_config(config)
    stock.load_state_dict(dense.state_dict(), assign=True)
    stock.pos_embed.pos_embed = dense.pos_embed.pos_embed
    arms = {"stock": stock.train(), "dense": dense, "routed": routed}
    optimizers = {arm: torch.optim.AdamW(model.parameters(), lr=1e-4) for arm, model in arms.items()}
    batch = make_batch(args.batch_size, device, dtype)

    result = {"model": name, "routes": routes, "batch_size": args.batch_size, "compile": args.compile}
    for arm, model in arms.items():
        result[f"{arm}_flops"] = step_flops(model, batch)
        result[f"{arm}_saved_activation_mib"] = saved_activation_bytes(model, batch) / 2**20
    if args.compile:  # counted eager above; timed compiled (the warm-up steps compile)
        arms = {arm: torch.compile(model) for arm, model in arms.items()}
    for arm, model in arms.items():
        for _ in range(args.warmup):
            train_step(model, optimizers[arm], batch)
    times = {arm: [] for arm in arms}
    peak = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both arms alike
        for arm, model in arms.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # weights and optimizer states of all three arms
            synchronize(device)
            start = time.perf_counter()
            train_step(model, optimizers[arm], batch)
            synchronize(device)
            times[arm].append(time.perf_counter() - start)
            if device.type == "cuda":
                step_peak = (torch.cuda.max_memory_allocated() - resident) / 2**20  # activations, gradients
                peak[arm] = max(peak.get(arm, 0), step_peak)
    for arm in arms:
        result[f"{arm}_median_s"] = statistics.median(times[arm])
        result[f"{arm}_images_per_s"] = args.batch_size / result[f"{arm}_median_s"]
        result[f"{arm}_step_gpu_mib"] = peak.get(arm)
    result["dense_over_stock_time"] = result["dense_median_s"] / result["stock_median_s"]
    result["flop_ratio"] = result["routed_flops"] / result["dense_flops"]
    result["time_ratio"] = result["routed_median_s"] / result["dense_median_s"]
    result["time_over_flop_ratio"] = result["time_ratio"] / result["flop_ratio"]
    result["meets_target"] = result["time_ratio"] <= 1.05 * result["flop_ratio"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    parser.add_argument("--routes", default="2:8:0.5", help="start:end:ratio[,start:end:ratio]; 'paper' = 2..depth-4")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models (default: eager)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# device={device} ({machine}), threads={torch.get_num_threads()}, dtype={args.dtype}, torch={torch.__version__}"
        f", {'torch.compile' if args.compile else 'eager'}"
    )

    results = []
    for name in args.models:
        if args.routes == "paper":
            routes = paper_routes(PRESETS[name]["num_layers"])
        else:
            routes = parse_routes(args.routes)
        results.append(bench_model(name, routes, args, device, dtype))

    header = (
        "| model | route | batch | stock DiT img/s | dense img/s | routed img/s | dense/stock time | routed/dense time "
        "| FLOP ratio | time/FLOP | saved act. MiB dense / routed | step GPU MiB dense / routed | target |"
    )
    print(header)
    print("|" + "---|" * 13)
    for r in results:
        route = ",".join(f"{x['start_layer_idx']}..{x['end_layer_idx']}@{x['selection_ratio']}" for x in r["routes"])
        peak = f"{r['dense_step_gpu_mib']:.0f} / {r['routed_step_gpu_mib']:.0f}" if r["dense_step_gpu_mib"] else "n/a"
        print(
            f"| {r['model']} | {route} | {r['batch_size']} | {r['stock_images_per_s']:.2f} | "
            f"{r['dense_images_per_s']:.2f} | {r['routed_images_per_s']:.2f} | {r['dense_over_stock_time']:.3f} | "
            f"{r['time_ratio']:.3f} | {r['flop_ratio']:.3f} | "
            f"{r['time_over_flop_ratio']:.3f} | {r['dense_saved_activation_mib']:.0f} / "
            f"{r['routed_saved_activation_mib']:.0f} | {peak} | {'met' if r['meets_target'] else 'MISSED'} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
