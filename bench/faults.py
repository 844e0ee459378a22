#!/usr/bin/env python
"""Fault injection: kill `training/train_tread.py` at random points of its saves and uploads, many times, resume it
each time with ``--resume_from_checkpoint latest``, and count what was lost (issue #14).

Each run trains the built-in digits job with a checkpoint every step, ``--checkpoints_total_limit 1`` (the setting
where a bad save costs the most) and ``--push_checkpoints`` to a simulated Hub. Each attempt is killed with SIGKILL
(no handler runs, as in a power loss or an OOM kill) inside the n-th call of one of the functions a save or upload goes
through, chosen at random: writing a weights file (half written, then killed), `torch.save` (optimizer, RNG states),
`os.replace` (a rename into place), `os.fsync`, `shutil.rmtree` (pruning, clean-up) or a Hub upload. The faults are
installed by a ``sitecustomize`` module on the child's PYTHONPATH, so the script runs exactly as users run it.

Each run is then extended by 2 steps (``--max_train_steps`` raised, ``--resume_from_checkpoint latest``), as users
continue a finished run, its first attempt killed while the final pipeline's weights are written ("final_save"): the
folder already holds the previous pipeline, which must not end up mixed with the new one.

After every attempt the folder is checked:
- checkpoints lost: the newest checkpoint that verifies is older than before the attempt (must be 0);
- broken outputs: a ``model_index.json`` (or ``training_complete.json``) beside a pipeline that does not load (0);
- runs finished: every run must reach its last step, and its pipeline must load.

Two more cases (issue #21), each ``--rounds`` times:
- ``--case concurrent``: two runs started at once into one new folder, and one run resumed twice at once (a re-queued
  job while the first still runs). Counted: rounds where both ran, where one was refused (naming the other), where
  ``loss_history.csv`` holds anything but steps 1..n once, and complete checkpoints that do not verify.
- ``--case push_after_kill``: a run extended by 2 steps is killed while its final weights are written (the folder
  holds the old pipeline and ``.incomplete-final/``), and a fresh run is killed while writing its first checkpoint's
  weights (``.incomplete-checkpoint-1/``); `training/push_to_hub.py --save_to` is run on both. Counted: pushes
  refused, pushes made, and files from a staging folder among what would be uploaded.

    python bench/faults.py --runs 12 --json bench/results/faults.json
    python bench/faults.py --runs 12 --checkout /tmp/old --json bench/results/faults_7c4aea9.json  # another version
    python bench/faults.py --case concurrent --rounds 3 --json bench/results/faults_concurrent.json
    python bench/faults.py --case push_after_kill --rounds 2 --json bench/results/faults_push.json

The checks use this checkout's `diffusers_tread.checkpointing.verify_checkpoint` and `TreadDiTPipeline`, also when the
trainer comes from ``--checkout`` (a `git worktree` of an earlier commit, say).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_tread.py"
TRAINING_ARGS = ["--resolution=8", "--train_batch_size=16", "--report_to=none", "--num_validation_images=1",
                 "--validation_num_inference_steps=2", "--validation_class_labels=0,1", "--dataloader_num_workers=0",
                 "--validation_steps=1000", "--checkpointing_steps=1", "--checkpoints_total_limit=1",
                 "--push_to_hub", "--push_checkpoints", "--hub_model_id=user/faults"]  # fmt: skip
# where, and how many calls a 6-step run makes there (measured): the kill lands at a uniform call in 1..count, later
# ones may not be reached by a resumed run, which then finishes
KILL_POINTS = {"save_file": 13, "torch.save": 24, "os.replace": 14, "os.fsync": 129, "shutil.rmtree": 7, "upload": 7}

SITECUSTOMIZE = '''
"""Installed by bench/faults.py: a simulated Hub, and SIGKILL at the FAULT_AFTER-th call of FAULT_POINT."""
import os, shutil, signal, threading, time
from concurrent.futures import Future

_point, _after, _calls = os.environ.get("FAULT_POINT"), int(os.environ.get("FAULT_AFTER", "0")), [0]


def _maybe_die(point, before=None):
    if point != _point:
        return
    _calls[0] += 1
    if _calls[0] == _after:
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(module, name, point, partial_file=False):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        target = str(args[1] if len(args) > 1 else kwargs.get("filename"))

        def half_write():
            with open(target, "wb") as f:
                f.write(b"\\0" * 100)
        _maybe_die(point, half_write if partial_file else None)
        if partial_file and "checkpoint-" not in target:  # the end-of-run pipeline's weights
            _maybe_die("final_save", half_write)
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


if _point:
    import torch, safetensors.torch
    _wrap(safetensors.torch, "save_file", "save_file", partial_file=True)
    _wrap(torch, "save", "torch.save")
    _wrap(os, "replace", "os.replace")
    _wrap(os, "fsync", "os.fsync")
    _wrap(shutil, "rmtree", "shutil.rmtree")

import huggingface_hub

_hub = os.environ["FAULT_HUB"]


def upload_folder(**kwargs):
    future = Future()

    def run():
        time.sleep(0.05)  # a slow network: the kill can land while it runs
        _maybe_die("upload")
        target = os.path.join(_hub, kwargs.get("path_in_repo") or "main")
        try:
            shutil.copytree(kwargs["folder_path"], target, dirs_exist_ok=True)
        except Exception as error:  # e.g. the folder removed by another run: a failed upload, not a hang
            future.set_exception(error)
            return
        future.set_result(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if kwargs.get("run_as_future"):
        return future
    thread.join()
    return future.result()


class _Repo:
    def __init__(self, repo_id):
        self.repo_id = repo_id


huggingface_hub.upload_folder = upload_folder
huggingface_hub.create_repo = lambda repo_id, **kwargs: _Repo(repo_id)
'''


def best_checkpoint(output_dir: Path) -> int:
    from diffusers_tread.checkpointing import checkpoint_step, find_checkpoint

    found = find_checkpoint(output_dir, "latest") if output_dir.is_dir() else None
    return checkpoint_step(found) if found else 0


def outputs_load(output_dir: Path) -> bool:
    from diffusers_tread import TreadDiTPipeline

    try:
        TreadDiTPipeline.from_pretrained(output_dir)
        return True
    except Exception:  # noqa: BLE001 - any failure to load is what is counted
        return False


def _env(site: Path, checkout: Path, hub: Path, point: str = "", after: int = 0) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(checkout)]), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "FAULT_POINT": point, "FAULT_AFTER": str(after), "FAULT_HUB": str(hub)}  # fmt: skip


def _trainer(checkout: Path, output_dir: Path, steps: int, resume: bool) -> list[str]:
    command = [sys.executable, str(checkout / SCRIPT.relative_to(REPO)), *TRAINING_ARGS, f"--output_dir={output_dir}",
               f"--max_train_steps={steps}"]  # fmt: skip
    return command + (["--resume_from_checkpoint=latest"] if resume else [])


def _history_is_one_run(output_dir: Path) -> bool:
    history = output_dir / "loss_history.csv"
    if not history.is_file():
        return True
    steps = [int(line.split(",")[0]) for line in history.read_text().splitlines() if line.strip()]
    return steps == list(range(1, len(steps) + 1))


def _bad_checkpoints(output_dir: Path) -> int:
    from diffusers_tread.checkpointing import complete_checkpoints, verify_checkpoint

    return sum(verify_checkpoint(checkpoint) is not None for checkpoint in complete_checkpoints(output_dir))


def run_concurrent(args, site: Path, checkout: Path, workdir: str) -> dict:
    """Two trainers at once on one folder: both new, or both resuming the same run."""
    totals = dict(rounds=0, both_ran=0, one_refused=0, refusal_names_holder=0, history_mixed=0,
                  bad_checkpoints=0, outputs_broken=0)  # fmt: skip
    for round_index in range(args.rounds):
        for scenario in ("two_new_runs", "resumed_twice"):
            output_dir, hub = (
                Path(workdir, f"{scenario}-{round_index}"),
                Path(workdir, f"hub-{scenario}-{round_index}"),
            )
            env = _env(site, checkout, hub)
            if scenario == "resumed_twice":  # a run that checkpointed step 2 and was preempted
                subprocess.run(_trainer(checkout, output_dir, 2, False), env=env, cwd=checkout, capture_output=True,
                               check=True, timeout=600)  # fmt: skip
            resume = scenario == "resumed_twice"
            logs = [Path(workdir, f"{scenario}-{round_index}-{i}.log") for i in range(2)]
            processes = [
                subprocess.Popen(
                    _trainer(checkout, output_dir, args.steps, resume),
                    env=env,
                    cwd=checkout,
                    stdout=subprocess.DEVNULL,
                    stderr=log.open("w"),
                )  # fmt: skip
                for log in logs
            ]
            codes = [process.wait(timeout=600) for process in processes]
            stderr = [log.read_text() for log in logs]
            totals["rounds"] += 1
            refused = [code != 0 and ("in use by another training run" in err or "already holds" in err)
                       for code, err in zip(codes, stderr, strict=True)]  # fmt: skip
            if all(code == 0 for code in codes):
                totals["both_ran"] += 1
            elif sum(refused) == 1 and codes.count(0) == 1:
                totals["one_refused"] += 1
                other = processes[refused.index(False)].pid
                totals["refusal_names_holder"] += f"process {other} " in stderr[refused.index(True)]
            else:
                print(f"{scenario} round {round_index}: exit codes {codes}:\n" + "\n".join(e[-1500:] for e in stderr))
            totals["history_mixed"] += not _history_is_one_run(output_dir)
            totals["bad_checkpoints"] += _bad_checkpoints(output_dir)
            if (output_dir / "model_index.json").is_file() and not outputs_load(output_dir):
                totals["outputs_broken"] += 1
            print(f"{scenario} round {round_index}: exit codes {codes}", flush=True)
    return totals


def run_push_after_kill(args, site: Path, checkout: Path, workdir: str) -> dict:
    """Kill a final save and a checkpoint save, then push what is left."""
    totals = dict(pushes=0, refused=0, pushed=0, staging_files_pushed=0, killed=0)
    push = [sys.executable, str(checkout / "training" / "push_to_hub.py")]
    for round_index in range(args.rounds):
        output_dir, hub = Path(workdir, f"push-{round_index}"), Path(workdir, f"hub-push-{round_index}")
        subprocess.run(_trainer(checkout, output_dir, args.steps, False), env=_env(site, checkout, hub),
                       cwd=checkout, capture_output=True, check=True, timeout=600)  # fmt: skip
        killed = subprocess.run(_trainer(checkout, output_dir, args.steps + 2, True), cwd=checkout,
                                env=_env(site, checkout, hub, "final_save", 1), capture_output=True, timeout=600)  # fmt: skip
        fresh = Path(workdir, f"push-fresh-{round_index}")
        # the 2nd weights file of checkpoint-1 is the transformer's (the EMA's comes first): killed half-written
        killed_checkpoint = subprocess.run(_trainer(checkout, fresh, args.steps, False), cwd=checkout,
                                           env=_env(site, checkout, hub, "save_file", 2), capture_output=True,
                                           timeout=600)  # fmt: skip
        totals["killed"] += (killed.returncode == -9) + (killed_checkpoint.returncode == -9)
        for folder in (output_dir, fresh / ".incomplete-checkpoint-1"):
            target = Path(workdir, f"pushed-{round_index}-{folder.name}")
            objective = ["--objective=flow"] if folder.name.startswith(".") else []  # no finished run beside it
            result = subprocess.run([*push, str(folder), "--hub_model_id=user/faults", f"--save_to={target}", *objective],
                                    env=_env(site, checkout, hub), cwd=checkout, capture_output=True, text=True,
                                    timeout=600)  # fmt: skip
            totals["pushes"] += 1
            if result.returncode == 0 and target.is_dir():
                totals["pushed"] += 1
                staged = [
                    p for p in target.rglob("*") if p.is_file() and ".incomplete" in p.relative_to(target).as_posix()
                ]
                totals["staging_files_pushed"] += len(staged)
                print(f"round {round_index}: pushed {folder.name} ({len(staged)} files from a staging folder)")
            else:
                totals["refused"] += 1
                lines = result.stderr.strip().splitlines() or [""]
                message = next((line for line in lines if line.startswith("error:")), lines[-1])
                print(f"round {round_index}: refused {folder.name}: {message[:300]}")
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["kills", "concurrent", "push_after_kill"], default="kills")
    parser.add_argument("--rounds", type=int, default=3, help="--case concurrent / push_after_kill: repetitions")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max_attempts", type=int, default=12, help="per run, before it counts as not finished")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--checkout", default=None, help="run the training script and package of this source tree")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    checkout = Path(args.checkout).resolve() if args.checkout else REPO
    totals = dict(runs=0, runs_finished=0, attempts=0, kills=0, resumed_from_checkpoint=0, checkpoints_lost=0,
                  broken_outputs=0, kills_by_point={})  # fmt: skip
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tread-faults-") as workdir:
        site = Path(workdir, "site")
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        if args.case != "kills":
            case = run_concurrent if args.case == "concurrent" else run_push_after_kill
            totals = {"case": args.case, **case(args, site, checkout, workdir)}
        for run in range(args.runs if args.case == "kills" else 0):
            output_dir, hub = Path(workdir, f"run-{run}"), Path(workdir, f"hub-{run}")
            totals["runs"] += 1
            best, finished, attempts = 0, False, 0
            # (max_train_steps, the first attempt's kill point or None for a random one, resume on the first attempt)
            for steps, first_point, resume in ((args.steps, None, False), (args.steps + 2, "final_save", True)):
                for attempt in range(args.max_attempts):
                    if attempt == 0 and first_point:
                        point, after = first_point, 1
                    elif attempt < args.max_attempts - 1:
                        point = rng.choice(sorted(KILL_POINTS))
                        after = rng.randint(1, KILL_POINTS[point])
                    else:
                        point, after = "", 0
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(checkout)]),
                           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FAULT_POINT": point,
                           "FAULT_AFTER": str(after), "FAULT_HUB": str(hub)}  # fmt: skip
                    command = [sys.executable, str(checkout / SCRIPT.relative_to(REPO)), *TRAINING_ARGS,
                               f"--output_dir={output_dir}", f"--max_train_steps={steps}"]  # fmt: skip
                    if attempt or resume:
                        command.append("--resume_from_checkpoint=latest")
                    result = subprocess.run(
                        command, env=env, cwd=checkout, capture_output=True, text=True, timeout=600
                    )
                    totals["attempts"] += 1
                    attempts += 1
                    killed = result.returncode == -9
                    if killed:
                        totals["kills"] += 1
                        totals["kills_by_point"][point] = totals["kills_by_point"].get(point, 0) + 1
                    elif result.returncode != 0:
                        raise SystemExit(
                            f"run {run} attempt {attempt} failed without a kill:\n{result.stderr[-3000:]}"
                        )
                    if "Resuming from" in result.stderr:
                        totals["resumed_from_checkpoint"] += 1
                    now = best_checkpoint(output_dir)
                    if now < best:
                        totals["checkpoints_lost"] += 1
                        print(f"run {run} attempt {attempt}: checkpoint-{best} lost (now {now}), killed at {point}")
                    best = max(best, now)
                    if (output_dir / "model_index.json").is_file() or (
                        output_dir / "training_complete.json"
                    ).is_file():
                        if not outputs_load(output_dir):
                            totals["broken_outputs"] += 1
                            print(f"run {run} attempt {attempt}: outputs do not load, killed at {point}")
                    if not killed:
                        finished = outputs_load(output_dir)  # exited 0 with a pipeline that loads
                        break
            totals["runs_finished"] += finished
            print(f"run {run}: {attempts} attempts, finished={finished}", flush=True)
    totals["seconds"] = round(time.time() - started, 1)
    totals["checkout"] = str(checkout)
    print(json.dumps(totals, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(totals, indent=2) + "\n")


if __name__ == "__main__":
    main()
