"""Does the block after a route's end need fp32 under bf16 autocast? (issue #24, item 3)

The official TREAD code (``dit.py``, ``fp32_next``) runs the block right after each route end with autocast disabled,
i.e. in fp32, and says nothing about why. This measures, on the CPU with bf16 autocast (``torch.autocast("cpu",
torch.bfloat16)``, fp32 weights, as ``--mixed_precision bf16``), whether that block is any more sensitive to bf16 than
the others, and whether running it in fp32 changes anything that training sees:

1. **Per block**, at a few widths: each block's bf16 error in isolation. A routed fp32 forward records every block's
   input; each block then runs once more on that same input in fp32 and in bf16, and the error of its update is
   ``||y_bf16 - y_fp32|| / ||y_fp32 - x||`` (relative to what the block adds to the residual stream, not to the
   whole output, which the residual dominates). The re-entry block (``end_layer_idx + 1``) against the others.
2. **Whole step**, same models: the routed loss and the gradient in bf16, with and without the re-entry block in fp32,
   against fp32 (relative loss error, relative gradient error); controls run another block in fp32 instead (one before
   the route, one after the re-entry block), so "one block fewer in bf16, at that depth" is separated from "the
   re-entry block in fp32".
3. **A trained model** (``--train_steps``, 0 to skip): parts 1 and 2 again on a width-64 DiT trained in fp32 on the
   bundled digits (8x8, 16 tokens), whose weights are no longer random.

No bf16 loss curve: bf16 autocast ran about 5x slower than fp32 on the CPU this was written on (2.4 s against 0.47 s a
step for the width-64 model at batch 32, on a loaded VM), and a curve long
enough to tell the arms apart from run-to-run noise does not fit a 3-minute run on the shared 2-core VM. The gradient
error of part 2 is what any difference between the curves would come from.

The random models of 1 and 2 have DiT's zero-initialised adaLN-Zero modulations and output layer drawn instead
(N(0, 0.02^2), the std of the other weights): at DiT's own initialisation every block is the identity and every error 0.

    python bench/reentry_precision.py                   # widths 128, 256, 384 and the trained width-64 model
    python bench/reentry_precision.py --train_steps 0   # random models only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffusers_tread import TreadTransformer2DModel
from diffusers_tread.data import load_digits
from diffusers_tread.objectives import get_objective
from diffusers_tread.routing import paper_routes
from diffusers_tread.training_utils import tread_training_loss

NUM_LAYERS = 12
HEAD_DIM = 64


def make_model(
    width: int, sample_size: int, in_channels: int, seed: int, trained_like: bool, head_dim: int = HEAD_DIM
) -> TreadTransformer2DModel:
    """A DiT of ``width`` (heads of ``head_dim``) with the paper's route, one conditioning embedder (DiT's layout)."""
    torch.manual_seed(seed)
    model = TreadTransformer2DModel(
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=NUM_LAYERS,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=10,
        routes=paper_routes(NUM_LAYERS),
        shared_conditioning=True,
    )
    if trained_like:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad and not parameter.any():
                    parameter.normal_(0.0, 0.02)
    return model.train()


def reentry_blocks(model: TreadTransformer2DModel) -> list[int]:
    """The blocks the official code runs in fp32: the one right after each route's end."""
    return [route["end_layer_idx"] + 1 for route in model.config.routes if route["end_layer_idx"] + 1 < NUM_LAYERS]


def run_in_fp32(block: torch.nn.Module) -> Callable[[], None]:
    """Run ``block`` with autocast disabled and its floating inputs cast to fp32 (``fp32_next``); returns the undo."""
    forward = block.forward

    def fp32_forward(*args, **kwargs):
        def cast(value):
            return value.float() if torch.is_tensor(value) and value.is_floating_point() else value

        with torch.autocast(args[0].device.type, enabled=False):
            return forward(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    block.forward = fp32_forward
    return lambda: delattr(block, "forward")


def batch(model: TreadTransformer2DModel, batch_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    size, channels = model.config.sample_size, model.config.in_channels
    x0 = torch.randn(batch_size, channels, size, size, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return x0, labels


def per_block_errors(model: TreadTransformer2DModel, batch_size: int, seed: int) -> list[float]:
    """Each block's bf16 update error on the input it gets in a routed fp32 forward (see the module docstring)."""
    objective = get_objective("flow")
    x0, labels = batch(model, batch_size, seed)
    inputs = objective.training_inputs(x0, generator=torch.Generator().manual_seed(seed + 1))
    recorded = []
    handles = [
        block.register_forward_pre_hook(lambda _m, a, k: recorded.append((a, k)), with_kwargs=True)
        for block in model.transformer_blocks
    ]
    with torch.no_grad():
        model(
            inputs.model_input,
            timestep=inputs.timestep,
            class_labels=labels,
            route_generator=torch.Generator().manual_seed(seed + 2),
        )
    for handle in handles:
        handle.remove()
    errors = []
    with torch.no_grad():
        for block, (args, kwargs) in zip(model.transformer_blocks, recorded, strict=True):
            exact = block(*args, **kwargs)
            with torch.autocast("cpu", torch.bfloat16):
                low = block(*args, **kwargs).float()
            errors.append(((low - exact).norm() / (exact - args[0]).norm()).item())
    return errors


def step(model: TreadTransformer2DModel, x0, labels, seed: int, bf16: bool, fp32_blocks: list[int]):
    """The routed loss and flattened gradient of one step (same draws for every precision)."""
    model.zero_grad(set_to_none=True)
    undo = [run_in_fp32(model.transformer_blocks[i]) for i in fp32_blocks]
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = tread_training_loss(
            model, get_objective("flow"), x0, labels, generator=torch.Generator().manual_seed(seed), patch_size=2
        )
    loss.backward()
    for u in undo:
        u()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grad


def step_arms(model: TreadTransformer2DModel, control_blocks: list[int]) -> dict[str, list[int]]:
    """Each arm's fp32 blocks: none, the re-entry blocks (``fp32_next``), and each control block alone."""
    arms = {"bf16": [], f"bf16 + re-entry block {reentry_blocks(model)} fp32": reentry_blocks(model)}
    arms.update({f"bf16 + block {index} fp32 (control)": [index] for index in control_blocks})
    return arms


def step_errors(
    model: TreadTransformer2DModel, batch_size: int, seed: int, control_blocks: list[int]
) -> dict[str, dict[str, float]]:
    x0, labels = batch(model, batch_size, seed)
    reference_loss, reference_grad = step(model, x0, labels, seed, bf16=False, fp32_blocks=[])
    found = {}
    for name, blocks in step_arms(model, control_blocks).items():
        loss, grad = step(model, x0, labels, seed, bf16=True, fp32_blocks=blocks)
        found[name] = {
            "loss_rel_error": abs(loss - reference_loss) / abs(reference_loss),
            "grad_rel_error": ((grad - reference_grad).norm() / reference_grad.norm()).item(),
        }
    return found


def train_on_digits(steps: int, batch_size: int, seed: int) -> tuple[TreadTransformer2DModel, float, float]:
    """A width-64 DiT (DiT-Tiny's width, heads of 16, depth 12, the paper's route) trained in fp32 on the bundled
    digits at 8x8 (16 tokens), rectified flow, AdamW 3e-4; returns it with its first and last 20 steps' mean loss."""
    train_set, _ = load_digits(resolution=8, split="train")
    images, labels = train_set.pixel_values, train_set.class_labels
    model = make_model(64, 8, 1, seed, trained_like=False, head_dim=16)
    objective = get_objective("flow")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = tread_training_loss(model, objective, images[index], labels[index], generator=generator, patch_size=2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, statistics.mean(losses[:20]), statistics.mean(losses[-20:])


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers (an empty string: none), parsed by argparse so that a typo is a usage
    error."""
    return [int(item) for item in text.split(",")] if text else []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--widths", type=int_list, default="128,256,384", help="hidden sizes (heads of 64); 384 is DiT-S"
    )
    parser.add_argument("--sample_size", type=int, default=16, help="latent side: 16 -> 64 tokens at patch 2")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seeds", type=int_list, default="0,1")
    parser.add_argument("--train_steps", type=int, default=100, help="fp32 steps of the trained model (0: none)")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument(
        "--control_blocks",
        type=int_list,
        default="1,10",
        help="blocks run in fp32 instead of the re-entry block, one arm each: the block's depth matters (an fp32 "
        "block also runs its backward in fp32, for every block below it), so compare blocks near the re-entry one",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    seeds, controls = args.seeds, args.control_blocks
    print(
        f"# cpu ({platform.processor() or 'cpu'}), threads={torch.get_num_threads()}, torch={torch.__version__}; "
        f"DiT depth {NUM_LAYERS}, route {paper_routes(NUM_LAYERS)}, {(args.sample_size // 2) ** 2} tokens, "
        f"batch {args.batch_size}, seeds {seeds}"
    )
    results = {"blocks": {}, "steps": {}}
    models = {}  # label -> one model per seed
    for width in args.widths:
        models[f"{width}, random"] = [make_model(width, args.sample_size, 4, seed, True) for seed in seeds]
    if args.train_steps:
        started = time.perf_counter()
        trained, first, last = train_on_digits(args.train_steps, args.train_batch_size, 0)
        label = f"64, digits ({args.train_steps} fp32 steps)"
        models[label] = [trained] * len(seeds)  # one trained model, measured on each seed's batch and draws
        print(
            f"# trained: width 64, depth 12, 16 tokens, batch {args.train_batch_size}, loss {first:.3f} (first 20 "
            f"steps) -> {last:.3f} (last 20), {time.perf_counter() - started:.0f} s"
        )

    print("\n1. bf16 error of each block's update, ||y_bf16 - y_fp32|| / ||y_fp32 - x||, mean over seeds")
    print(
        "| width, weights | re-entry block | re-entry error | other blocks: mean | min | max | routed blocks: mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, per_seed_models in models.items():
        per_seed = [per_block_errors(m, args.batch_size, s) for m, s in zip(per_seed_models, seeds, strict=True)]
        errors = [statistics.mean(column) for column in zip(*per_seed, strict=True)]
        reentry = reentry_blocks(per_seed_models[0])
        route = per_seed_models[0].config.routes[0]
        others = [e for i, e in enumerate(errors) if i not in reentry]
        routed = errors[route["start_layer_idx"] : route["end_layer_idx"] + 1]
        results["blocks"][label] = {"errors": errors, "reentry": reentry}
        print(
            f"| {label} | {reentry[0]} | {errors[reentry[0]]:.4f} | {statistics.mean(others):.4f} | "
            f"{min(others):.4f} | {max(others):.4f} | {statistics.mean(routed):.4f} |"
        )

    print("\n2. One routed step in bf16 against fp32: relative loss and gradient errors, mean over seeds")
    print("| width, weights | arm | loss rel. error | grad rel. error |")
    print("|---|---|---|---|")
    for label, per_seed_models in models.items():
        found = [step_errors(m, args.batch_size, s, controls) for m, s in zip(per_seed_models, seeds, strict=True)]
        results["steps"][label] = found
        for arm in found[0]:
            loss_error = statistics.mean(f[arm]["loss_rel_error"] for f in found)
            grad_error = statistics.mean(f[arm]["grad_rel_error"] for f in found)
            print(f"| {label} | {arm} | {loss_error:.2e} | {grad_error:.2e} |")

    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
