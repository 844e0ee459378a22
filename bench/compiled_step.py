"""Eager vs regional vs whole-step compiled training steps, dense and routed (issue #24, item 2), on the CPU.

Every arm runs `training/train_tread.py`'s step on the same batch: the step's draws made ahead
(`draw_step_randomness`: label dropout, the objective's times and noise, the routes' subsets), `tread_step_loss`
(flow matching, plain loss: the script's defaults) and backward, gradient clipping at 1, and `make_optimizer`'s
AdamW. What differs is the compilation:

- ``eager``: none;
- ``regional``: ``train_tread.py --compile`` (``--compile_scope blocks``): Diffusers' ``compile_repeated_blocks``,
  each block compiled with ``fullgraph=True``, routing, loss and backward's glue eager;
- ``step``: ``--compile --compile_scope step``: forward, loss and backward as one ``fullgraph=True`` graph
  (`compile_step_loss`); the optimizer and clipping stay eager (``torch.optim`` graph-breaks on purpose).

Per model and arm: the median step time over interleaved repeats (each repeat runs every arm once, so load on a
shared machine hits all alike), the first step's time (compilation included), the FLOPs per step (forward +
backward, ``torch.utils.flop_counter``), and the routed / dense time ratio in each mode against the FLOP ratio. The
first steps of the compiled arms also report their loss and gradients against the eager arm's (same weights, same
draws): the largest gradient difference over all parameters, relative to the largest eager gradient.

    python bench/compiled_step.py --json bench/results/compiled_step_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import time

import torch

from diffusers_tread import PRESETS, TreadTransformer2DModel, paper_routes
from diffusers_tread.objectives import get_objective
from diffusers_tread.profiling import count_flops
from diffusers_tread.training_utils import compile_step_loss, draw_step_randomness, make_optimizer, tread_step_loss

# The default job (train_tread.py without arguments): DiT-Tiny/2 on the 16x16 one-channel digits, 10 classes.
# DiT-S/2 at DiT's ImageNet-256 latent shape (4x32x32: 256 tokens), 1000 classes.
MODEL_INPUTS = {"DiT-Tiny/2": (1, 16, 10), "DiT-S/2": (4, 32, 1000)}
MODES = ("eager", "regional", "step")


def make_arm(base: TreadTransformer2DModel, routed: bool, mode: str, objective, backend: str):
    """A copy of ``base`` (routes on or off), its optimizer, and one training step as the script runs it."""
    model = copy.deepcopy(base)
    if not routed:
        model.disable_routing()  # the same weights, all tokens through every block
    model.train()
    optimizer = make_optimizer(model.parameters(), 1e-4)
    null_class = model.config.num_embeds_ada_norm
    loss_fn = functools.partial(
        tread_step_loss, model, objective, null_class=null_class, patch_size=model.config.patch_size, loss_mode="plain"
    )
    if mode == "regional":
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
    compiled = compile_step_loss(loss_fn, backend=backend) if mode == "step" else None
    generator = torch.Generator().manual_seed(0)

    def step(x0, labels, gradients: list | None = None):
        draws = draw_step_randomness(model, objective, x0, generator, class_dropout_prob=0.1)
        if compiled is not None:
            loss = compiled(x0, labels, draws)
        else:
            loss = loss_fn(x0, labels, draws)
            loss.backward()
        if gradients is not None:  # the first step's gradients, to compare the compiled arms with eager
            gradients.extend(p.grad.detach().clone() for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def forward_backward(x0, labels):  # for the FLOP count: the same draws, no update
        draws = draw_step_randomness(model, objective, x0, torch.Generator().manual_seed(0), class_dropout_prob=0.1)
        loss_fn(x0, labels, draws).backward()
        optimizer.zero_grad(set_to_none=True)

    return step, forward_backward


def bench_model(name: str, batch_size: int, args) -> dict:
    # Each model compiles from scratch: graphs compiled for the previous model's shapes would make Dynamo mark the
    # sizes that changed as dynamic (automatic dynamic shapes) and compile shape-generic graphs for this one.
    torch._dynamo.reset()
    channels, size, classes = MODEL_INPUTS[name]
    objective = get_objective("flow")
    torch.manual_seed(0)
    base = TreadTransformer2DModel.from_preset(
        name, routes=paper_routes(PRESETS[name]["num_layers"]), in_channels=channels, out_channels=channels,
        sample_size=size, num_embeds_ada_norm=classes,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch_size, channels, size, size, generator=generator)
    labels = torch.randint(0, classes, (batch_size,), generator=generator)

    arms, flops, first, grads = {}, {}, {}, {}
    for mode in MODES:
        for routed in (False, True):
            key = f"{mode} {'routed' if routed else 'dense'}"
            step, forward_backward = make_arm(base, routed, mode, objective, args.backend)
            if mode == "eager":
                flops["routed" if routed else "dense"] = count_flops(lambda fb=forward_backward: fb(x0, labels))
            started, gradients = time.perf_counter(), []
            loss = step(x0, labels, gradients)  # compiles the compiled arms
            first[key] = {"first_step_s": time.perf_counter() - started, "first_loss": loss.item()}
            eager = grads.setdefault(key.split()[1], gradients)  # the eager arm of this routing runs first
            scale = max(g.abs().max().item() for g in eager)
            first[key]["first_grad_max_abs_diff_over_max_abs"] = (
                max((g - e).abs().max().item() for g, e in zip(gradients, eager, strict=True)) / scale
            )
            print(f"{name} {key}: first step {first[key]['first_step_s']:.1f} s", flush=True)
            arms[key] = step
    for _ in range(args.warmup):
        for step in arms.values():
            step(x0, labels)
    times = {key: [] for key in arms}
    for _ in range(args.repeats):
        for key, step in arms.items():  # interleaved: every repeat runs every arm once
            started = time.perf_counter()
            step(x0, labels)
            times[key].append(time.perf_counter() - started)
    result = {"model": name, "batch_size": batch_size, "routes": base.config.routes, "flops": flops}
    result["flop_ratio"] = flops["routed"] / flops["dense"]
    result["arms"] = {}
    for key, values in times.items():
        median = statistics.median(values)
        mode = key.split()[0]
        eager_loss = first[f"eager {key.split()[1]}"]["first_loss"]
        result["arms"][key] = {
            "median_s": median,
            "times_s": values,
            **first[key],
            "compile_s_estimate": first[key]["first_step_s"] - median,
            "first_loss_minus_eager": first[key]["first_loss"] - eager_loss,
        }
        print(f"{name} {key}: median {median * 1e3:.1f} ms", flush=True)
    result["routed_over_dense"] = {
        mode: result["arms"][f"{mode} routed"]["median_s"] / result["arms"][f"{mode} dense"]["median_s"]
        for mode in MODES
    }
    print(f"{name}: routed/dense {result['routed_over_dense']}, FLOP ratio {result['flop_ratio']:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_INPUTS), choices=list(MODEL_INPUTS))
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[64, 2], help="one per model")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if len(args.batch_sizes) != len(args.models):
        parser.error("give one --batch_sizes value per model")
    torch.set_num_threads(args.threads)
    # Cold compiles: no FX-graph / AOT-autograd cache on disk from an earlier run shortens the first step.
    torch.compiler.config.force_disable_caches = True
    started = time.time()
    results = [bench_model(name, batch, args) for name, batch in zip(args.models, args.batch_sizes, strict=True)]
    report = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "args": vars(args),
        "wall_s": time.time() - started,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({r["model"]: r["routed_over_dense"] | {"flops": r["flop_ratio"]} for r in results}))


if __name__ == "__main__":
    main()
