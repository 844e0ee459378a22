"""Does ramping the selection ratio up help when routing starts on a pretrained dense model? (issue #6, item 5)

1. Pretrain a dense `DiT-Tiny/2` (no routes) on the 16x16 digits with rectified flow.
2. Fine-tune it with route 2..4 at 0.5 for `--finetune_steps`, three ways, same seed and data order:
   dense control (no routes), routing switched on at once, and the ratio ramped 0 -> 0.5 over `--warmup_steps`.
3. Report the training loss right after routing starts (the "spike") and the held-out denoising loss of each result
   (eval mode, all tokens: what sampling sees) on the digits' held-out split at fixed noise levels and noise.

    python bench/routing_warmup.py                       # ~10 minutes on 2 CPU cores
    python bench/routing_warmup.py --pretrain_steps 200 --finetune_steps 60 --warmup_steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from diffusers_tread import TreadDiTPipeline
from diffusers_tread.data import load_digits

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_tread.py"


def train(output_dir: Path, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), f"--output_dir={output_dir}", "--report_to=none", "--seed=0",
               "--validation_steps=1000000", "--checkpointing_steps=1000000", "--num_validation_images=2", *args]  # fmt: skip
    with tempfile.TemporaryFile(mode="w+") as log:
        result = subprocess.run(command, env=env, cwd=REPO, stdout=log, stderr=log)
        if result.returncode != 0:
            log.seek(0)
            raise RuntimeError(log.read()[-3000:])


@torch.no_grad()
def held_out_loss(pipeline_dir: Path, levels=(0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """Flow-matching velocity MSE on the held-out digits, every model with the same noise, all tokens."""
    model = TreadDiTPipeline.from_pretrained(pipeline_dir).transformer.eval()
    data, _ = load_digits(resolution=16, split="test")
    x0, labels = data.pixel_values, data.class_labels
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for t in levels:
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t) * x0 + t * noise
        timestep = torch.full((len(x0),), t * 1000.0)
        prediction = model(x_t, timestep=timestep, class_labels=labels).sample
        losses.append(((prediction - (noise - x0)) ** 2).mean().item())
    return statistics.mean(losses)


def loss_curve(output_dir: Path) -> list[float]:
    return [float(row[1]) for row in csv.reader((output_dir / "loss_history.csv").open())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain_steps", type=int, default=1500)
    parser.add_argument("--finetune_steps", type=int, default=300)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp, "dense")
        train(dense, "--routes=none", f"--max_train_steps={args.pretrain_steps}")
        arms = {
            "dense control": ["--routes=none"],
            "routing at once": ["--routes=2:4:0.5"],
            f"ratio ramp over {args.warmup_steps} steps": [
                "--routes=2:4:0.5",
                f"--selection_ratio_warmup_steps={args.warmup_steps}",
            ],
        }
        results = {"pretrained": {"held_out_loss": held_out_loss(dense)}}
        for name, extra in arms.items():
            out = Path(tmp, name.replace(" ", "_"))
            train(out, f"--pretrained_model_name_or_path={dense}", f"--max_train_steps={args.finetune_steps}",
                  "--learning_rate=2e-4", *extra)  # fmt: skip
            curve = loss_curve(out)
            window = max(1, args.warmup_steps // 4)
            results[name] = {
                "train_loss_first_steps": statistics.mean(curve[:window]),
                "train_loss_last_steps": statistics.mean(curve[-window:]),
                "held_out_loss": held_out_loss(out),
            }
            print(name, json.dumps(results[name]), flush=True)
        print(json.dumps({"settings": vars(args), "results": results}, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
