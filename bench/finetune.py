"""Does routing help a fine-tune? Dense vs TREAD when fine-tuning a pretrained digits DiT, full and LoRA (issue #25).

Per seed, one dense base model (TreadTransformer2DModel, depth 8, width 64, 64 tokens: the convergence bench's depth-8
group) is pretrained on the bundled digits (scikit-learn, train split), rectified flow, AdamW, EMA with warm-up. Its
EMA weights are then fine-tuned to a shifted target, **inverted digits** (``x -> -x`` in [-1, 1]: white background,
dark strokes), on the same train split, in six arms:

    {full: every weight trains; LoRA: rank-r adapters on the attention projections (train_tread.py's --lora_rank
     and its default targets to_q, to_k, to_v, to_out.0), the base frozen}
  x {dense; routed at selection ratio A; routed at ratio B} on the paper-style route (layers 2 .. depth-4)

A style shift rather than held-out classes: every class stays reachable through the frozen label table, so LoRA needs
no trainable embedding and the same judge scores both tasks. The arms of a seed start from the same base weights and
see the same batches, label dropout and noise (one data/noise generator per seed, routes from their own generator),
and run interleaved, ``--chunk_steps`` at a time, so a noisy neighbour slows all alike. Routed arms train
``--routed_steps_factor`` times the dense steps. An arm's "seconds" at step k are k times its median step time
(evaluation never counted); the raw sum is kept as "wall_seconds".

Judge (`diffusers_tread.digits_judge`): the convergence bench's CNN classifier, trained once on the train split of the
(upright) digits. Every ``--eval_every`` steps the arm's EMA weights (of its trainable parameters: all for full, the
adapters for LoRA; warm-up EMA, so early on close to the raw weights) sample ``--num_samples`` class-balanced images;
they are un-inverted (negated) and scored against the held-out split's features: FD and accuracy. Negation is a
bijection, so this is the FD of the inverted samples against the inverted held-out images under the judge composed
with negation; no second judge is trained. The held-out flow loss on the inverted held-out images at fixed times and
noise is recorded too.

Headline: per arm, its final FD and the steps and seconds it needs to reach its dense arm's final FD (same seed, same
full/LoRA mode; linear interpolation between evaluations), and their ratios to the dense arm's.

    python bench/finetune.py            # 2 seeds x (pretrain + 6 fine-tune arms), 31.6 min on one core of a busy shared machine
    python bench/finetune.py --quick    # the same code at toy size (a smoke test, seconds)

Writes bench/results/finetune/ (results.json, results.md) unless --output_dir says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from peft import LoraConfig
from torch import nn

from diffusers_tread import TreadTransformer2DModel, digits_judge
from diffusers_tread.digits_judge import BenchRun, fmt, make_digits_judge
from diffusers_tread.objectives import get_objective
from diffusers_tread.training_utils import NoiseFrom, drop_class_labels, make_optimizer, tread_training_loss

RESOLUTION = 16
PATCH_SIZE = 2
HELD_OUT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # train_tread.py's default --lora_target_modules for DiTs


@dataclass(frozen=True)
class FinetuneArm:
    """One fine-tuning run from a seed's base model: ``mode`` "full" or "lora", ``ratio`` 0 for dense."""

    seed: int
    mode: str
    ratio: float
    steps: int

    @property
    def method(self) -> str:
        return "dense" if self.ratio == 0 else f"routed@{self.ratio:g}"

    @property
    def name(self) -> str:
        return f"s{self.seed}/{self.mode}/{self.method}"


@dataclass
class Run(BenchRun):
    arm: FinetuneArm
    trainable: list[nn.Parameter] = field(default_factory=list)  # what the optimizer and the EMA update


def paper_route(num_layers: int, ratio: float) -> list[dict]:
    """The paper's route placement, layers 2 .. depth-4 (ICCV Sec. 4.1), at ``ratio``; none for ratio 0."""
    return [{"start_layer_idx": 2, "end_layer_idx": num_layers - 4, "selection_ratio": ratio}] if ratio else []


def build_model(args, routes: list[dict]) -> TreadTransformer2DModel:
    return TreadTransformer2DModel(
        num_attention_heads=args.width // 16,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        num_layers=args.num_layers,
        sample_size=RESOLUTION,
        patch_size=PATCH_SIZE,
        num_embeds_ada_norm=10,
        routes=routes,
    )


def start_run(arm: FinetuneArm, base_state: dict, args, data_seed: int) -> Run:
    """The arm's model: the base weights, its route, and for LoRA frozen weights plus fresh adapters (lora_B zero,
    so every arm starts from the base model's outputs)."""
    model = build_model(args, paper_route(args.num_layers, arm.ratio))
    model.load_state_dict(base_state)  # routes add no parameters: the dense base loads into a routed model
    learning_rate = args.full_learning_rate
    if arm.mode == "lora":
        torch.manual_seed(20_000 + arm.seed)  # the same adapter initialisation for the LoRA arms of a seed
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                       target_modules=LORA_TARGETS)
        )  # fmt: skip
        learning_rate = args.lora_learning_rate
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Run(
        arm,
        model,
        EMAModel(trainable, decay=0.9999, use_ema_warmup=True, power=2 / 3),
        make_optimizer(trainable, learning_rate),
        data_generator=torch.Generator().manual_seed(data_seed),
        route_generator=torch.Generator().manual_seed(10_000 + arm.seed),
        trainable=trainable,
    )


def train_steps(run: Run, train_x, train_y, num_steps: int, batch_size: int) -> None:
    """The library's step (`drop_class_labels`, `tread_training_loss` with the plain loss), AdamW, EMA; data and noise
    from the data generator (`NoiseFrom`), routes from the route generator."""
    objective = NoiseFrom(get_objective("flow"), run.data_generator)
    for _ in range(num_steps):
        started = time.perf_counter()
        batch = torch.randint(0, len(train_x), (batch_size,), generator=run.data_generator)
        labels = drop_class_labels(train_y[batch], 10, 0.1, run.data_generator)
        loss = tread_training_loss(run.model, objective, train_x[batch], labels, generator=run.route_generator,
                                   patch_size=PATCH_SIZE, loss_mode="plain")  # fmt: skip
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.ema.step(run.trainable)
        run.train_losses.append(loss.item())
        run.step += 1
        run.step_seconds.append(time.perf_counter() - started)


def ema_copy(run: Run) -> nn.Module:
    """A copy of the arm's model with its EMA weights, in eval mode (all tokens, as sampling)."""
    model = copy.deepcopy(run.model)
    run.ema.copy_to([p for p in model.parameters() if p.requires_grad])
    return model.eval()


@torch.no_grad()
def judge(model: nn.Module, judge_, target_x, target_y, inverted: bool, args) -> dict:
    """FD and accuracy of the model's samples (negated first when the task is inverted) and the held-out flow loss on
    ``target_x`` (already in the task's colours) at fixed times and noise."""
    objective = get_objective("flow")
    generator = torch.Generator().manual_seed(1234)
    held_out = {}
    for t_value in HELD_OUT_TIMES:
        noise = torch.randn(target_x.shape, generator=generator)
        t = torch.full((len(target_x),), t_value)
        prediction = model((1 - t_value) * target_x + t_value * noise, t * objective.num_train_timesteps, target_y)
        held_out[f"{t_value:g}"] = F.mse_loss(prediction.sample, noise - target_x).item()
    images, labels = digits_judge.sample_digits(
        model, objective.make_scheduler(), args.num_samples, args.num_inference_steps
    )
    fd, accuracy = digits_judge.score_samples(
        judge_.classifier, -images if inverted else images, labels, judge_.reference_stats
    )
    return {"fd": fd, "accuracy": accuracy, "held_out_loss": float(np.mean(list(held_out.values())))}


def evaluate(run: Run, judge_, target_x, target_y, args) -> dict:
    record = {
        "step": run.step,
        "seconds": round(run.step * float(np.median(run.step_seconds)), 2),
        "wall_seconds": round(sum(run.step_seconds), 2),
        **judge(ema_copy(run), judge_, target_x, target_y, True, args),
        "train_loss": float(np.mean(run.train_losses[-50:])),
    }
    run.evals.append(record)
    return record


def pretrain(seed: int, judge_, args) -> tuple[dict, dict]:
    """The seed's dense base model on the upright digits; returns its EMA state dict and its scores on both tasks."""
    torch.manual_seed(seed)
    model = build_model(args, []).train()
    trainable = list(model.parameters())
    ema = EMAModel(trainable, decay=0.9999, use_ema_warmup=True, power=2 / 3)
    run = Run(FinetuneArm(seed, "pretrain", 0.0, args.pretrain_steps), model, ema,
              make_optimizer(trainable, args.pretrain_learning_rate), torch.Generator().manual_seed(seed),
              torch.Generator().manual_seed(10_000 + seed), trainable=trainable)  # fmt: skip
    started = time.perf_counter()
    train_steps(run, judge_.train_x, judge_.train_y, args.pretrain_steps, args.batch_size)
    base = ema_copy(run)
    scores = {
        "steps": args.pretrain_steps,
        "seconds": round(args.pretrain_steps * float(np.median(run.step_seconds)), 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "source": judge(base, judge_, judge_.test_x, judge_.test_y, False, args),
        "target": judge(base, judge_, -judge_.test_x, judge_.test_y, True, args),
    }
    return {k: v.detach().clone() for k, v in base.state_dict().items()}, scores


def compare(runs: list[Run]) -> list[dict]:
    """Every arm against the dense arm of its seed and mode: steps and seconds to the dense arm's final FD
    (`diffusers_tread.digits_judge.compare_to_baseline`)."""
    dense = {(run.arm.seed, run.arm.mode): run for run in runs if run.arm.ratio == 0}
    rows = []
    for run in runs:
        base = dense[(run.arm.seed, run.arm.mode)]
        rows.append(
            {
                "arm": run.arm.name,
                "seed": run.arm.seed,
                "mode": run.arm.mode,
                "method": run.arm.method,
                "steps": run.evals[-1]["step"],
                "final_fd": run.evals[-1]["fd"],
                "final_accuracy": run.evals[-1]["accuracy"],
                **digits_judge.compare_to_baseline(run.evals, base.evals),
            }
        )
    return rows


def write_report(results: dict, out: Path) -> None:
    lines = [
        *([] if results["finished"] else ["**Partial: the run stopped before its end.**", ""]),
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; torch threads {results['threads']}; total {results['total_minutes']:.1f} "
        "min.  ",
        f"Judge: classifier held-out accuracy {results['classifier_accuracy']:.3f}; FD floor (one half of the held-out "
        f"images vs the other) {results['fd_floor']:.2f}; {results['num_samples']} samples per evaluation, "
        "un-inverted before scoring.",
        "",
        "Base models (dense, pretrained on upright digits; EMA weights): FD on the source task / on the inverted target.",
        "",
        "| seed | pretrain steps | seconds | source FD | source accuracy | target FD | target accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, base in results["bases"].items():
        lines.append(
            f"| {seed} | {base['steps']} | {base['seconds']:.0f} | {base['source']['fd']:.2f} | "
            f"{base['source']['accuracy']:.3f} | {base['target']['fd']:.2f} | {base['target']['accuracy']:.3f} |"
        )
    lines += [
        "",
        "Fine-tune arms against the dense arm of the same seed and mode (same base, data and noise); the speedups "
        "are the dense arm's steps (seconds) over the steps (seconds) the arm needs to reach the dense arm's final FD.",
        "",
        "| seed | mode | method | steps | step time ratio | final FD | accuracy | FD at dense steps | dense final FD | "
        "steps to dense FD | seconds to dense FD | step speedup | time speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["comparisons"]:
        lines.append(
            f"| {row['seed']} | {row['mode']} | {row['method']} | {row['steps']} | {row['step_time_ratio']:.3f} | "
            f"{row['final_fd']:.2f} | {row['final_accuracy']:.3f} | {fmt(row['fd_at_dense_steps'])} | "
            f"{row['dense_final_fd']:.2f} | {fmt(row['steps_to_dense_fd'], 0)} | {fmt(row['seconds_to_dense_fd'], 0)} | "
            f"{fmt(row['step_speedup'])} | {fmt(row['time_speedup'])} |"
        )
    lines += ["", "Mean over seeds (a speedup's mean only where every seed reached the dense FD):", "",
              "| mode | method | seeds | step time ratio | final FD | step speedup | time speedup |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = results["comparisons"]
    for key in dict.fromkeys((row["mode"], row["method"]) for row in rows):
        group = [row for row in rows if (row["mode"], row["method"]) == key]

        def mean(name, group=group):
            return digits_judge.mean_over(group, name)

        lines.append(
            f"| {key[0]} | {key[1]} | {len(group)} | {mean('step_time_ratio'):.3f} | {mean('final_fd'):.2f} | "
            f"{fmt(mean('step_speedup'))} | {fmt(mean('time_speedup'))} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes and steps (a smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="the routed arms' ratios")
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--pretrain_learning_rate", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=120, help="dense fine-tune steps")
    parser.add_argument("--routed_steps_factor", type=float, default=1.4)
    parser.add_argument("--full_learning_rate", type=float, default=2e-4)
    parser.add_argument("--lora_learning_rate", type=float, default=1e-3)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_every", type=int, default=40)
    parser.add_argument("--chunk_steps", type=int, default=10)
    parser.add_argument("--num_samples", type=int, default=100, help="class-balanced samples per evaluation")
    parser.add_argument("--num_inference_steps", type=int, default=8)
    parser.add_argument("--classifier_epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default="bench/results/finetune")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in dict(seeds=[0], num_layers=6, width=32, pretrain_steps=20, steps=10, eval_every=5,
                                chunk_steps=5, num_samples=20, num_inference_steps=2, classifier_epochs=1,
                                batch_size=8).items():  # fmt: skip
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.num_samples % 10 or args.num_samples < 20:
        parser.error("--num_samples must be a multiple of 10 (class-balanced), at least 20")
    if args.num_layers < 6:
        parser.error("--num_layers must be at least 6 (the route is layers 2 .. depth-4)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    judge_ = make_digits_judge(args.classifier_epochs, resolution=RESOLUTION)
    print(f"classifier held-out accuracy {judge_.accuracy:.3f}; FD floor {judge_.fd_floor:.2f}", flush=True)
    target_x, target_y = -judge_.train_x, judge_.train_y  # the shifted task: inverted digits
    held_out_x = -judge_.test_x

    bases, runs = {}, []
    routed_steps = round(args.steps * args.routed_steps_factor)
    for seed in args.seeds:
        base_state, bases[str(seed)] = pretrain(seed, judge_, args)
        print(f"seed {seed} base: {json.dumps(bases[str(seed)])}", flush=True)
        start = {"step": 0, "seconds": 0.0, "wall_seconds": 0.0, **bases[str(seed)]["target"], "train_loss": None}
        for mode in ("full", "lora"):
            for ratio in (0.0, *args.ratios):
                arm = FinetuneArm(seed, mode, ratio, args.steps if ratio == 0 else routed_steps)
                run = start_run(arm, base_state, args, data_seed=100 + seed)
                run.evals.append(dict(start))  # step 0 is the base model, for every arm of the seed
                runs.append(run)

    # Interleave: every unfinished arm trains chunk_steps, evaluating at multiples of eval_every; the results are
    # rewritten after every round with an evaluation, so that a stopped run keeps what it measured.
    while not all(run.finished for run in runs):
        evaluated = False
        for run in runs:
            if run.finished:
                continue
            train_steps(run, target_x, target_y, run.next_chunk(args.chunk_steps, args.eval_every), args.batch_size)
            if run.evaluation_due(args.eval_every):
                record = evaluate(run, judge_, held_out_x, judge_.test_y, args)
                print(f"{run.arm.name}: step {record['step']} {record['seconds']:.0f}s FD {record['fd']:.2f} "
                      f"acc {record['accuracy']:.3f} held-out {record['held_out_loss']:.4f}", flush=True)  # fmt: skip
                evaluated = True
        if evaluated:
            write_results(runs, bases, judge_, args, argv, begun, out, finished=False)
    results = write_results(runs, bases, judge_, args, argv, begun, out, finished=True)
    print((out / "results.md").read_text())
    return results


def write_results(runs: list[Run], bases: dict, judge_, args, argv, begun: float, out: Path, finished: bool) -> dict:
    """results.json and results.md from what the runs have measured so far."""
    results = {
        "command": "python bench/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": digits_judge.machine_description(),
        "threads": args.threads,
        "total_minutes": (time.perf_counter() - begun) / 60,
        "finished": finished,
        "classifier_accuracy": judge_.accuracy,
        "fd_floor": judge_.fd_floor,
        "num_samples": args.num_samples,
        "args": vars(args),
        "bases": bases,
        "arms": [
            {
                "name": run.arm.name,
                **asdict(run.arm),
                "trainable_parameters": sum(p.numel() for p in run.trainable),
                "evals": run.evals,
            }
            for run in runs
        ],  # fmt: skip
        "comparisons": compare(runs),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return results


if __name__ == "__main__":
    main()
