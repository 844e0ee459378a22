"""Training-step throughput, as `training/train_tread.py` runs a step: dense vs TREAD-routed, against stock Diffusers
DiT and (with ``--official_tread``) the official TREAD code, all arms interleaved in one process on the same batches.

Our arms run the library's training step (`diffusers_tread.training_utils`: label dropout, `tread_training_loss`,
backward, gradient clipping, the fused/multi-tensor AdamW of `make_optimizer`), the code the training script calls:

- ``stock``: Diffusers' ``DiTTransformer2DModel`` (a timestep + label embedder in every block), same step, no routes;
- ``per-block``: ours in Diffusers' layout (``shared_conditioning=False``), dense;
- ``dense`` / ``routed``: ours as ``from_preset`` builds it (one shared embedder), without / with the routes;
- ``official dense`` / ``official routed``: CompVis/tread's ``dit.py`` run from a checkout (``bench/official_tread.py``;
  its EDM loss and AdamW, the official train.py step).

With ``--model_type ssm`` the state-space backbone (`TreadSSM2DModel`) instead: ``dense`` / ``routed`` with the same
weights, each trained with a plain step (MSE against a target of the input's shape, ``torch.optim.AdamW``), on
``--in_channels`` x ``--sample_size``^2 inputs with 10 classes and patch ``--patch_size`` (the scan's elementwise
recurrence is not in the FLOP count, but it also scales with the number of tokens).

Per arm: median step time, ATen ops dispatched per step (forward + loss + backward + optimizer, counted eagerly with a
``TorchDispatchMode``; each is a dispatcher round trip and, on a GPU, a kernel launch), FLOPs per step
(``torch.utils.flop_counter``, forward + backward), MFU on a GPU (FLOPs / time / the card's dense bf16 peak), and the
routed / dense time against the FLOP ratio (issue #13's target: time ratio <= 1.05 x FLOP ratio).

    python bench/throughput.py                                                  # DiT-S/2, batch 8, CPU fp32, eager
    python bench/throughput.py --official_tread /path/to/tread --batch_size 2   # + the official code
    python bench/throughput.py --models DiT-B/2 DiT-XL/2 --batch_size 32 --precision bf16 --mode compile  # a GPU
    python bench/throughput.py --model_type ssm --device cpu --threads 2    # SSM-Tiny/2, SSM-S/2; 1x16x16, 64 tokens
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import DiTTransformer2DModel

# bench/'s own helper module, found as `python bench/throughput.py` puts bench/ first on sys.path
from official_tread import (
    edm_loss,
    load_official_dit,
    mse_loss,
    official_model,
    official_optimizer,
    official_train_step,
)
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import (
    PRESETS,
    SSM_PRESETS,
    TreadSSM2DModel,
    TreadTransformer2DModel,
    TreadTransformer2DModelOutput,
    paper_routes,
)
from diffusers_tread.models.ssm_tread import fused_selective_scan
from diffusers_tread.objectives import get_objective
from diffusers_tread.profiling import count_aten_ops
from diffusers_tread.training_utils import drop_class_labels, make_optimizer, tread_training_loss

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), TFLOP/s, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


class StockForTrainingStep(torch.nn.Module):
    """Stock ``DiTTransformer2DModel`` behind the call the training step makes (it takes no routing arguments)."""

    def __init__(self, model: DiTTransformer2DModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, hidden_states, timestep, class_labels, selection_ratio=None, route_generator=None):
        sample = self.model(hidden_states, timestep=timestep, class_labels=class_labels).sample
        return TreadTransformer2DModelOutput(sample=sample, route_masks=None)


def make_batch(
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    channels: int = 4,
    size: int = 32,
    target_channels: int = 8,
    num_classes: int = 1000,
):
    """Latents, a target, timesteps and labels; by default 4x32x32 latents with an 8-channel target and 1000 classes
    (the same draws as official_tread.make_batch)."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, channels, size, size, generator=generator)
    target = torch.randn(batch_size, target_channels, size, size, generator=generator)
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return latents.to(device, dtype), target.to(device, dtype), timestep.to(device), labels.to(device)


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


class OursStep:
    """`train_tread.py`'s step with its defaults (flow matching, the plain loss, max grad norm 1); the official
    recipe is ``--objective edm --max_grad_norm 0``."""

    def __init__(self, model, args, device):
        self.model, self.args = model, args
        self.objective = get_objective(args.objective)
        self.optimizer = make_optimizer(model.parameters(), 1e-4)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def loss(self, batch) -> torch.Tensor:
        latents, _, _, labels = batch
        with torch.autocast(latents.device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            labels = drop_class_labels(labels, 1000, 0.1, self.generator)
            return tread_training_loss(
                self.model,
                self.objective,
                latents,
                labels,
                generator=self.generator,
                patch_size=self.model.config.patch_size,
                loss_mode=self.args.tread_loss,
                mae_loss_weight=self.args.mae_loss_weight,
            )

    def __call__(self, batch) -> None:
        self.loss(batch).backward()
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, batch) -> None:
        self.loss(batch).backward()
        self.model.zero_grad(set_to_none=True)

    def model_mse_forward_backward(self, batch) -> None:
        """The model alone under plain MSE (the same as OfficialStep's): the like-for-like op count."""
        latents, target, timestep, labels = batch
        prediction = self.model(latents, timestep=timestep, class_labels=labels).sample
        torch.nn.functional.mse_loss(prediction.float(), target.float()).backward()
        self.model.zero_grad(set_to_none=True)


class OfficialStep:
    """The official train.py step (EDM loss, AdamW) on the official DiT."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.optimizer = official_optimizer(model)

    def __call__(self, batch) -> None:
        with torch.autocast(batch[0].device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            official_train_step(self.model, self.optimizer, batch)

    def forward_backward(self, batch) -> None:
        with torch.autocast(batch[0].device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            loss = edm_loss(self.model, batch)
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def model_mse_forward_backward(self, batch) -> None:
        mse_loss(self.model, batch).backward()
        self.model.zero_grad(set_to_none=True)


class PlainStep:
    """A plain training step: MSE of the output against the batch target, backward, ``torch.optim.AdamW`` (the SSM
    arms)."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss(self, batch) -> torch.Tensor:
        latents, target, timestep, labels = batch
        with torch.autocast(latents.device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            prediction = self.model(latents, timestep=timestep, class_labels=labels).sample
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    def __call__(self, batch) -> None:
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, batch) -> None:
        self.loss(batch).backward()
        self.model.zero_grad(set_to_none=True)

    model_mse_forward_backward = forward_backward  # the step is plain MSE already


def build_ssm_arms(name: str, routes: list[dict], args, device: torch.device) -> dict:
    """Dense and routed `TreadSSM2DModel` with the same weights, each with its own `PlainStep`."""
    torch.manual_seed(0)
    config = dict(in_channels=args.in_channels, out_channels=args.in_channels, sample_size=args.sample_size)
    config.update(num_embeds_ada_norm=10, patch_size=args.patch_size)
    dense = TreadSSM2DModel.from_preset(name, routes=None, **config).train()
    routed = TreadSSM2DModel.from_preset(name, routes=routes, **config).train()
    routed.load_state_dict(dense.state_dict())
    return {arm: PlainStep(model.to(device), args) for arm, model in (("dense", dense), ("routed", routed))}


def build_arms(name: str, routes: list[dict], args, device: torch.device, official) -> dict:
    torch.manual_seed(0)
    dense = TreadTransformer2DModel.from_preset(name, routes=None).to(device).train()
    routed = TreadTransformer2DModel.from_dit(dense, routes=routes)  # the same parameters, routes on
    per_block = TreadTransformer2DModel.from_dit(dense, shared_conditioning=False)
    stock = StockForTrainingStep(dense.to_dit().to(device).train())
    models = {"stock": stock, "per-block": per_block, "dense": dense, "routed": routed}
    if args.mode != "eager":
        compile_kwargs = {"mode": "reduce-overhead" if args.mode == "cudagraphs" else "default"}
        for arm, model in models.items():
            blocks = model.model.transformer_blocks if arm == "stock" else model.transformer_blocks
            for block in blocks:  # regional compilation, as train_tread.py --compile
                block.compile(fullgraph=True, **compile_kwargs)
    arms = {arm: OursStep(model, args, device) for arm, model in models.items()}
    if official is not None:
        official_routes = [dict(route) for route in routes]
        for arm, arm_routes in (("official dense", None), ("official routed", official_routes)):
            if name in official.DiT_models:
                model = official_model(official, name, arm_routes)
            else:  # e.g. DiT-Tiny/2 (the default job's size): the official DiT class at our preset's dimensions
                dims = PRESETS[name]
                model = official.DiT(
                    depth=dims["num_layers"],
                    hidden_size=dims["num_attention_heads"] * dims["attention_head_dim"],
                    num_heads=dims["num_attention_heads"],
                    patch_size=dims["patch_size"],
                    learn_sigma=True,
                    enable_routing=bool(arm_routes),
                    routes=arm_routes,
                ).train()
            arms[arm] = OfficialStep(model.to(device), args)
    return arms


def step_flops(step, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        step.forward_backward(batch)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, routes: list[dict], args, device: torch.device, official) -> dict:
    if args.model_type == "ssm":
        channels, size = args.in_channels, args.sample_size
        batch = make_batch(
            args.batch_size, device, channels=channels, size=size, target_channels=channels, num_classes=10
        )
        arms = build_ssm_arms(name, routes, args, device)
        tokens = (size // args.patch_size) ** 2
    else:
        batch = make_batch(args.batch_size, device)
        arms = build_arms(name, routes, args, device, official)
        tokens = (32 // PRESETS[name]["patch_size"]) ** 2
    parameters_m = sum(p.numel() for p in arms["dense"].model.parameters()) / 1e6
    result = {"model": name, "routes": routes, "batch_size": args.batch_size, "mode": args.mode}
    result.update(parameters_m=parameters_m, tokens=tokens, arms={})
    for arm, step in arms.items():
        # compiled arms dispatch what the generated code calls: not comparable, not counted; nor the SSM arms (the
        # scan's many small ops, at seconds per step on a CPU)
        eager_counts = arm.startswith("official") or (args.mode == "eager" and args.model_type == "dit")
        row = {"flops": step_flops(step, batch)}
        if eager_counts:
            step(batch)  # the optimizer's lazy state exists before counting, as in every step after the first
            row["aten_ops"] = sum(count_aten_ops(lambda step=step: step(batch)).values())
            row["aten_ops_fwd_bwd"] = sum(count_aten_ops(lambda step=step: step.forward_backward(batch)).values())
            row["aten_ops_model_mse"] = sum(
                count_aten_ops(lambda step=step: step.model_mse_forward_backward(batch)).values()
            )
        result["arms"][arm] = row
    for step in arms.values():
        for _ in range(args.warmup):
            step(batch)
    times = {arm: [] for arm in arms}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every arm alike
        for arm, step in arms.items():
            synchronize(device)
            start = time.perf_counter()
            step(batch)
            synchronize(device)
            times[arm].append(time.perf_counter() - start)
    peak = args.peak_tflops
    for arm, row in result["arms"].items():
        row["median_s"] = statistics.median(times[arm])
        row["images_per_s"] = args.batch_size / row["median_s"]
        row["mfu"] = row["flops"] / row["median_s"] / (peak * 1e12) if peak else None
    arms_ = result["arms"]
    result["flop_ratio"] = arms_["routed"]["flops"] / arms_["dense"]["flops"]
    result["time_ratio"] = arms_["routed"]["median_s"] / arms_["dense"]["median_s"]
    result["time_over_flop_ratio"] = result["time_ratio"] / result["flop_ratio"]
    result["meets_target"] = result["time_ratio"] <= 1.05 * result["flop_ratio"]
    if args.profile:  # one dense and one routed step: where the time goes (top kernels on a GPU, CPU time)
        activities = [torch.profiler.ProfilerActivity.CPU]
        sort_by = "self_cpu_time_total"
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            sort_by = "self_cuda_time_total"
        for arm in ("dense", "routed"):
            with torch.profiler.profile(activities=activities) as profiler:
                arms[arm](batch)
                synchronize(device)
            table = profiler.key_averages().table(sort_by=sort_by, row_limit=15)
            result["arms"][arm]["profile"] = table
            print(f"## profile: {name} {arm} step ({args.mode})\n{table}")
    if "official routed" in arms_:
        result["routed_over_official_routed_time"] = arms_["routed"]["median_s"] / arms_["official routed"]["median_s"]
    return result


def print_table(results: list[dict]) -> None:
    print(
        "| model | batch | arm | step ms | img/s | ATen ops: step / fwd+bwd / model fwd+bwd (MSE) | GFLOP/step | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for arm, row in r["arms"].items():
            ops = "compiled" if r["mode"] != "eager" else "not counted"
            if "aten_ops" in row:
                ops = f"{row['aten_ops']} / {row['aten_ops_fwd_bwd']} / {row['aten_ops_model_mse']}"
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            print(
                f"| {r['model']} | {r['batch_size']} | {arm} | {1000 * row['median_s']:.1f} | "
                f"{row['images_per_s']:.1f} | {ops} | {row['flops'] / 1e9:.1f} | {mfu} |"
            )
    print()
    for r in results:
        line = (
            f"{r['model']} ({r['parameters_m']:.2f}M parameters, {r['tokens']} tokens) batch {r['batch_size']} "
            f"({r['mode']}): routed/dense time {r['time_ratio']:.3f}, FLOP ratio "
            f"{r['flop_ratio']:.3f}, time/FLOP {r['time_over_flop_ratio']:.3f} "
            f"({'met' if r['meets_target'] else 'MISSED'})"
        )
        if "routed_over_official_routed_time" in r:
            line += f"; routed / official routed time {r['routed_over_official_routed_time']:.3f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", choices=["dit", "ssm"], default="dit", help="ssm: TreadSSM2DModel arms")
    parser.add_argument("--models", nargs="+", default=None, help="default: DiT-S/2; SSM-Tiny/2 SSM-S/2 for ssm")
    parser.add_argument("--routes", default="paper", help="'paper' (2..depth-4 at 0.5) or start:end:ratio[,...]")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--mode", choices=["eager", "compile", "cudagraphs"], default="eager")
    # our arms' recipe: train_tread.py's defaults
    parser.add_argument("--objective", default="flow", help="ddpm, flow or edm")
    parser.add_argument("--tread_loss", choices=["plain", "adapted"], default="plain")
    parser.add_argument("--mae_loss_weight", type=float, default=0.1, help="the adapted loss's MAE weight")
    parser.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="train_tread.py's default; 0 = no clipping (the official step)",
    )
    # --model_type ssm inputs (the DiT arms take 4x32x32 latents, the presets' patch size)
    parser.add_argument("--in_channels", type=int, default=1, help="ssm: input channels (4 for ImageNet-256 latents)")
    parser.add_argument("--sample_size", type=int, default=16, help="ssm: input size (32 for ImageNet-256 latents)")
    parser.add_argument("--patch_size", type=int, default=2, help="ssm: patch size")
    parser.add_argument("--official_tread", default=None, help="a CompVis/tread checkout: adds the official arms")
    parser.add_argument("--peak_tflops", type=float, default=None, help="for MFU (default: known GPUs' bf16 peak)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print a profile of one dense and one routed step")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    presets = SSM_PRESETS if args.model_type == "ssm" else PRESETS
    if args.models is None:
        args.models = ["SSM-Tiny/2", "SSM-S/2"] if args.model_type == "ssm" else ["DiT-S/2"]
    unknown = [name for name in args.models if name not in presets]
    if unknown:
        parser.error(f"--models {unknown}: not {args.model_type} presets {sorted(presets)}.")
    if args.model_type == "ssm" and (args.official_tread or args.mode != "eager"):
        parser.error("--model_type ssm runs eager and has no official arms (no --official_tread, --mode eager).")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in machine), None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    official = load_official_dit(args.official_tread, eager=args.mode == "eager") if args.official_tread else None
    print(
        f"# device={device} ({machine}), threads={torch.get_num_threads()}, precision={args.precision}, "
        f"mode={args.mode}, torch={torch.__version__}"
        + (f", SSM scan: {'mamba_ssm' if fused_selective_scan() else 'PyTorch'}" if args.model_type == "ssm" else "")
        + (f", input {args.in_channels}x{args.sample_size}x{args.sample_size}" if args.model_type == "ssm" else "")
    )
    results = []
    for name in args.models:
        if args.routes == "paper":
            routes = paper_routes(presets[name]["num_layers"])
        else:
            routes = []
            for part in args.routes.split(","):
                start, end, ratio = part.split(":")
                routes.append(
                    {"start_layer_idx": int(start), "end_layer_idx": int(end), "selection_ratio": float(ratio)}
                )
        results.append(bench_model(name, routes, args, device, official))
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
