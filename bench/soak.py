"""Soak test of training/train_tread.py: many SIGTERM stop / resume cycles against one uninterrupted run.

The interrupted run is stopped with SIGTERM (as a cluster scheduler does) every `--cycle_seconds`, at whatever step it
has reached, and resumed with `--resume_from_checkpoint latest` until it reaches `--steps`. Checks:
- the loss curve continues exactly: every logged step's loss equals the uninterrupted run's (exact resume);
- memory stays flat: the trainer's peak RSS does not grow from cycle to cycle, nor within the long reference run.

    python bench/soak.py                 # 3000 steps, ~25 s cycles (about 10 minutes on 2 CPU cores)
    python bench/soak.py --steps 400 --cycle_seconds 8   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_tread.py"


def trainer_args(output_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, str(SCRIPT), f"--output_dir={output_dir}", f"--max_train_steps={steps}", "--resolution=8",
        "--train_batch_size=32", "--checkpointing_steps=250", "--checkpoints_total_limit=2", "--validation_steps=1000000",
        "--num_validation_images=1", "--validation_num_inference_steps=2", "--report_to=none",
    ]  # fmt: skip


def run(command: list[str], stop_after: float | None) -> tuple[int, float, list[float]]:
    """Run the trainer, SIGTERM it after `stop_after` seconds; return its exit code, peak RSS (MiB), RSS samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe buffer would block the trainer
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
    handle, samples, started, signalled = psutil.Process(process.pid), [], time.time(), False
    while process.poll() is None:
        try:
            samples.append(handle.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        if stop_after is not None and not signalled and time.time() - started > stop_after:
            process.send_signal(signal.SIGTERM)
            signalled = True
        time.sleep(0.25)
    process.wait()
    log.seek(0)
    stderr = log.read()
    # A SIGTERM that lands before the loop installs its handler (start-up) or after it (final save) ends the process
    # the default way; the next cycle resumes from the last complete checkpoint all the same.
    if process.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"trainer failed ({process.returncode}):\n{stderr[-3000:]}")
    return process.returncode, max(samples, default=0.0), samples


def losses(output_dir: Path) -> dict[int, float]:
    return {int(row[0]): float(row[1]) for row in csv.reader((output_dir / "loss_history.csv").open())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--cycle_seconds", type=float, default=25.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        straight_dir, soak_dir = Path(tmp, "straight"), Path(tmp, "soak")
        started = time.time()
        _, straight_peak, straight_rss = run(trainer_args(straight_dir, args.steps), stop_after=None)
        straight_seconds = time.time() - started

        cycles, started = [], time.time()
        while not (soak_dir / "model_index.json").exists():
            command = trainer_args(soak_dir, args.steps) + ["--resume_from_checkpoint=latest"]
            _, peak, _ = run(command, stop_after=args.cycle_seconds)
            reached = max(losses(soak_dir)) if (soak_dir / "loss_history.csv").exists() else 0
            cycles.append({"reached_step": reached, "peak_rss_mib": round(peak, 1)})
            print(f"cycle {len(cycles)}: reached step {reached}, peak RSS {peak:.0f} MiB", flush=True)
        soak_seconds = time.time() - started

        reference, soaked = losses(straight_dir), losses(soak_dir)
        max_difference = max(abs(reference[step] - soaked[step]) for step in reference)
        # Within the long run: RSS over its 10-20% stretch vs its 70-80% stretch (the training loop; the end adds the
        # final save, sampling and the loss plot). Across cycles: the peaks of the cycles that stopped mid-training.
        n = len(straight_rss)
        early = statistics.median(straight_rss[n // 10 : max(n // 10 + 1, n // 5)])
        late = statistics.median(straight_rss[7 * n // 10 : max(7 * n // 10 + 1, 8 * n // 10)])
        peaks = [c["peak_rss_mib"] for c in cycles]
        mid_training_peaks = peaks[:-1] or peaks
        result = {
            "steps": args.steps,
            "cycles": len(cycles),
            "cycle_stops_at": [c["reached_step"] for c in cycles],
            "peak_rss_per_cycle_mib": peaks,
            "straight_run_peak_rss_mib": round(straight_peak, 1),
            "straight_run_rss_median_10_20_vs_70_80_percent_mib": [round(early, 1), round(late, 1)],
            "loss_steps_compared": len(reference),
            "same_steps_logged": sorted(reference) == sorted(soaked),
            "max_abs_loss_difference": max_difference,
            "straight_seconds": round(straight_seconds, 1),
            "soak_seconds": round(soak_seconds, 1),
        }
        print(json.dumps(result, indent=2))
        ok = result["same_steps_logged"] and max_difference == 0.0
        ok = ok and max(mid_training_peaks) <= 1.10 * min(mid_training_peaks)
        ok = ok and late <= 1.10 * early
        print("PASS" if ok else "FAIL: see above")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
