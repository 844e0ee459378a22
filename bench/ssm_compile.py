"""The state-space backbone's training step compiled whole (issue #24 item 1): eager before / eager now / compiled.

Before this change the selective scan was a ``torch.autograd.Function`` that ``torch.compile(fullgraph=True)`` could not
trace; now it and its backward are ``torch.library`` custom operators running the same code. Arms, on the same weights
and batches, interleaved (each repeat runs every arm once, so machine load hits all alike):

- ``eager before``: `TreadSSM2DModel` from ``--baseline_rev`` (the autograd.Function scan), loaded from git;
- ``eager now``: the current `TreadSSM2DModel` (the custom-operator scan), eager;
- ``compiled``: the same model, forward + loss under ``torch.compile(fullgraph=True)`` (inductor), the backward the
  compiled backward graph AOTAutograd made from it.

Each dense (no routes) and routed (the paper route, `paper_routes`). A step is zero_grad + forward + MSE loss +
backward (no optimizer: it is the same in every arm). Routed arms seed the global RNG before each step, so all three
draw the same subsets (``fallback_random``: the compiled graph draws with the eager RNG).

Reported: median step time over the repeats; compile time (the first compiled step minus a steady one; the inductor
cache starts empty unless ``--warm_cache``); saved-for-backward bytes per step (``saved_tensors_hooks``, each storage
once, weights excluded; eager arms); the loss / gradient differences of each arm against ``eager now`` on one step;
and the scan alone at ``--scan_size`` in fresh processes (``--scan_memory_only``: just these): the peak RSS growth of one forward + backward, before vs now
(and the autograd-through-the-loop reference, the memory the hand-written backward avoids).

    python bench/ssm_compile.py --json bench/results/ssm_compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SSM-Tiny/2", help="an SSM preset")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sample_size", type=int, default=16, help="input size (1 channel, 10 classes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each arm once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation")
    parser.add_argument("--baseline_rev", default="a7b4c10", help="git revision with the autograd.Function scan")
    parser.add_argument("--warm_cache", action="store_true", help="keep the inductor cache (default: a fresh one)")
    parser.add_argument(
        "--scan_size", type=int, nargs=4, default=[8, 128, 16, 512], metavar=("BATCH", "DIM", "STATE", "LENGTH")
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--scan_memory_only", action="store_true", help="only the scan-memory rows, written into the --json file"
    )
    parser.add_argument("--scan_rss", choices=["before", "now", "reference"], help=argparse.SUPPRESS)  # child mode
    return parser.parse_args(argv)


def load_baseline(rev: str) -> types.ModuleType:
    """``diffusers_tread/models/ssm_tread.py`` as it was at ``rev``, as a module beside the current one."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:diffusers_tread/models/ssm_tread.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = "diffusers_tread.models._ssm_tread_baseline"
    module = types.ModuleType(name)
    module.__package__ = "diffusers_tread.models"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:diffusers_tread/models/ssm_tread.py", "exec"), module.__dict__)
    return module


def scan_inputs(batch, dim, state, length, torch):
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(batch, dim, length, generator=generator),
        torch.rand(batch, dim, length, generator=generator) * 0.1,
        -torch.rand(dim, state, generator=generator) * 4 - 0.1,
        torch.randn(batch, state, length, generator=generator),
        torch.randn(batch, state, length, generator=generator),
        torch.randn(dim, generator=generator),
    ]
    return [tensor.requires_grad_() for tensor in tensors]


def scan_rss_child(args) -> None:
    """One scan forward + backward in this fresh process; prints the peak RSS growth (MiB) and the time."""
    import torch

    torch.set_num_threads(args.threads)
    from diffusers_tread.models import ssm_tread

    scan = {
        "before": lambda: load_baseline(args.baseline_rev).selective_scan,
        "now": lambda: ssm_tread.selective_scan,
        "reference": lambda: ssm_tread.selective_scan_reference,
    }[args.scan_rss]()
    inputs = scan_inputs(*args.scan_size, torch)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    small = [tensor.detach()[..., :16].requires_grad_() if tensor.dim() == 3 else tensor for tensor in inputs]
    torch.autograd.grad(scan(*small), small, grad_out[..., :16])  # lazy initialisation outside the measurement
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM): the imports' peak is not ours
    start = time.perf_counter()
    torch.autograd.grad(scan(*inputs), inputs, grad_out)
    seconds = time.perf_counter() - start
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    peak = int(status["VmHWM"].split()[0]) * 1024  # kB
    print(json.dumps({"peak_rss_growth_mib": (peak - rss_before) / 2**20, "seconds": seconds}))


def scan_memory(args) -> dict:
    rows = {}
    for arm in ("before", "now", "reference"):
        command = [sys.executable, __file__, "--scan_rss", arm, "--threads", str(args.threads)]
        command += ["--baseline_rev", args.baseline_rev, "--scan_size", *map(str, args.scan_size)]
        # glibc serves every allocation above 64 KiB by mmap and returns it on free, so RSS follows the live tensors
        # (with its adaptive threshold, freed blocks stay resident and repeated runs differed by 2x)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        rows[arm] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"scan {arm}: {rows[arm]}", flush=True)
    return rows


def main(args) -> dict:
    if not args.warm_cache:  # before inductor reads it: every compile starts cold
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssm_compile_inductor_")
    import torch
    import torch.nn.functional as F

    from diffusers_tread import TreadSSM2DModel, paper_routes

    torch.set_num_threads(args.threads)
    torch._inductor.config.fallback_random = True  # the compiled routed step draws the eager subsets
    baseline = load_baseline(args.baseline_rev)
    num_layers = TreadSSM2DModel.presets[args.model]["num_layers"]
    routes = paper_routes(num_layers)
    config = dict(in_channels=1, out_channels=1, sample_size=args.sample_size, num_embeds_ada_norm=10)

    generator = torch.Generator().manual_seed(0)
    size = args.sample_size
    x = torch.randn(args.batch_size, 1, size, size, generator=generator)
    target = torch.randn(args.batch_size, 1, size, size, generator=generator)
    t = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator)

    def forward_loss(model):
        def loss(x, t, y, target):
            return F.mse_loss(model(x, t, y).sample, target)

        return loss

    arms = {}
    for kind, kind_routes in (("dense", None), ("routed", routes)):
        torch.manual_seed(0)
        now = TreadSSM2DModel.from_preset(args.model, routes=kind_routes, **config).train()
        with torch.no_grad():  # random zero-initialised layers (adaLN-Zero, output): the scans then matter
            for param in now.parameters():
                if not param.any():
                    param.normal_(std=0.02)
        before = baseline.TreadSSM2DModel.from_preset(args.model, routes=kind_routes, **config).train()
        before.load_state_dict(now.state_dict())
        arms[f"{kind} eager before"] = (before, forward_loss(before))
        arms[f"{kind} eager now"] = (now, forward_loss(now))
        arms[f"{kind} compiled"] = (now, torch.compile(forward_loss(now), fullgraph=True))

    def step(name, seed):
        model, loss_fn = arms[name]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = loss_fn(x, t, y, target)
        loss.backward()
        return loss.detach()

    def timed(name, seed):
        start = time.perf_counter()
        step(name, seed)
        return time.perf_counter() - start

    results = {name: {} for name in arms}
    for name in arms:  # compile (and first steps), then record numerics at seed 0 against eager now
        if name.endswith("compiled"):
            first = timed(name, 0)
            steady = statistics.median(timed(name, 0) for _ in range(3))
            results[name]["compile_s"] = first - steady
            print(f"{name}: compile {first - steady:.1f} s", flush=True)
    for kind in ("dense", "routed"):
        reference_loss = step(f"{kind} eager now", 0)
        reference_grads = [p.grad.clone() for p in arms[f"{kind} eager now"][0].parameters()]
        for arm in ("eager before", "compiled"):
            loss = step(f"{kind} {arm}", 0)
            grads = [p.grad for p in arms[f"{kind} {arm}"][0].parameters()]
            results[f"{kind} {arm}"]["loss_abs_diff_vs_now"] = (loss - reference_loss).abs().item()
            results[f"{kind} {arm}"]["grad_max_rel_diff_vs_now"] = max(
                ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                for g, r in zip(grads, reference_grads, strict=True)
            )
    for name in arms:
        if "eager" in name:
            results[name]["saved_bytes"] = saved_bytes(arms[name][0], arms[name][1], (x, t, y, target), torch)

    for _ in range(args.warmup):
        for index, name in enumerate(arms):
            timed(name, index)
    samples = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name in arms:
            samples[name].append(timed(name, repeat))
    for name, times in samples.items():
        results[name].update(step_s=statistics.median(times), step_s_min=min(times), step_s_max=max(times))
        print(f"{name}: {results[name]}", flush=True)

    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, threads={args.threads}",
        "torch": torch.__version__,
        "model": args.model,
        "input": f"1x{size}x{size}, batch {args.batch_size}, tokens {(size // 2) ** 2}",
        "routes": routes,
        "baseline_rev": args.baseline_rev,
        "inductor_cache": "warm" if args.warm_cache else "fresh (cold compile)",
        "repeats": args.repeats,
        "arms": results,
        "scan_size": dict(zip(("batch", "dim", "state", "length"), args.scan_size, strict=True)),
        "scan_memory": scan_memory(args),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


def saved_bytes(model, loss_fn, batch, torch) -> int:
    """Bytes autograd saves for backward in one forward + loss (each storage once, the weights not counted)."""
    seen = {param.untyped_storage().data_ptr() for param in model.parameters()}
    kept, total = [], 0

    def pack(tensor):
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
        kept.append(tensor)  # alive until counted: no storage address reused mid-pass
        return len(kept) - 1

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, kept.__getitem__):
        loss_fn(*batch)
    kept.clear()
    return total


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.scan_rss:
        scan_rss_child(arguments)
    elif arguments.scan_memory_only:
        results = json.loads(arguments.json.read_text()) if arguments.json.exists() else {}
        results["scan_size"] = dict(zip(("batch", "dim", "state", "length"), arguments.scan_size, strict=True))
        results["scan_memory"] = scan_memory(arguments)
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    else:
        main(arguments)
