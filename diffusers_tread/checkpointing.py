"""A training run's folder, made safe against kills, power loss, full disks and reuse: both training scripts use it.

- `check_output_dir` / `clear_output_dir`: a run never writes into a folder that holds another run, unless it
  resumes it or the user asks for the folder to be cleared (``--overwrite_output_dir``); `lock_run_folder`: the main
  process holds an exclusive lock on the folder for the whole run, so two runs started at once (or one resumed twice at
  once) never share it.
- `save_checkpoint`: `checkpoint-<step>/` is written under a hidden name, fsync'ed, marked complete with a manifest of
  its files (which must include every file a checkpoint needs: weights, optimizer, LR scheduler, RNG states) and
  renamed into place; pruning never removes the last checkpoint that verifies, and a failure on any
  process stops every process with one message.
- `find_checkpoint` / `resume_from_checkpoint`: ``latest`` is the newest checkpoint that verifies (the main process
  decides and tells the others), and a finished run is recognised (`finished_step`).
- `final_output`: the end-of-run files are staged and moved into the folder with ``model_index.json`` and the
  `TRAINING_COMPLETE` marker last, so a kill mid-save never leaves a folder that looks complete.
- `register_checkpoint_hooks`: checkpoints carry each process's training generator, so a resumed run draws exactly
  what the uninterrupted run would have; `process_seed` gives every process of every seed its own stream.
- Stop signals (`install_stop_handlers`, `stop_requested`) and the ``loss_history.csv`` resume cut.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .hub import CheckpointUploads

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last, just before the folder gets its final name
TRAINING_COMPLETE = "training_complete.json"  # written last by `final_output`: the run finished and saved
LOSS_HISTORY = "loss_history.csv"
_STAGING = ".incomplete-final"
# What a training run writes at the top of its folder besides checkpoints (both scripts): `clear_output_dir` removes
# exactly these, never anything else a user may keep there.
RUN_FILES = (
    LOSS_HISTORY,
    TRAINING_COMPLETE,
    "model_index.json",
    "README.md",
    "tread_card.json",
    "pytorch_lora_weights.safetensors",
)
ABANDONED = "abandoned"  # where resuming an older checkpoint moves the newer ones (`set_aside_newer`)
RUN_FOLDERS = ("samples", "validation", "transformer", "vae", "scheduler", _STAGING, ABANDONED)
RUN_LOCK = ".tread-run.lock"  # held (`filelock`) by the main process for the whole run
RUN_LOCK_HOLDER = ".tread-run.lock.json"  # who holds it: process id, host, start time, script
# Everything a run writes while it works and never as a result (staging folders, temporary files, its lock, the
# abandoned timelines set aside by a resume from an older checkpoint): the Hub
# ignore list (`diffusers_tread.hub.HUB_IGNORE_PATTERNS`) includes every pattern, and `training/push_to_hub.py`
# refuses a folder that holds one of the staging folders.
STAGING_PATTERNS = (".incomplete-checkpoint-*", f"{_STAGING}*", "*.tmp", f"{RUN_LOCK}*", f"{ABANDONED}/*")
# The weights when a script does not declare its own (`register_checkpoint_hooks(weight_files=...)`), and what a
# checkpoint written before checkpoints declared what they need must hold at least.
DEFAULT_WEIGHT_FILES = ("*.safetensors",)
RUN_SETTINGS = "run_settings.json"  # in each checkpoint: the settings a resume must keep, and those it may change
_LEGACY_REQUIRED = ("*.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


# ----------------------------------------------------------------------------------------------------------------------
# Durable writes
# ----------------------------------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (a folder's fsync makes renames inside it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:  # folders cannot be opened on some platforms (Windows): nothing to flush there
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems do not support fsync on folders
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder``, then every folder bottom-up, then ``folder`` itself."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(root, name))
        for name in dirs:
            _fsync(Path(root, name))
    _fsync(folder)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------------------------


def previous_run(output_dir: str | os.PathLike) -> list[str]:
    """What in ``output_dir`` shows that a training run wrote there (checkpoints, loss history, outputs)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
    found += sorted(p.name for p in folder.glob(".incomplete-checkpoint-*"))
    found += [ABANDONED] if (folder / ABANDONED).is_dir() else []
    return found + [name for name in RUN_FILES if (folder / name).is_file()]


def check_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> str | None:
    """Why a new run may not start in ``output_dir`` (a message naming what to change), or None when it may.

    Reusing a folder would mix two runs: pruning by step number deletes the other run's checkpoints, ``latest``
    resumes the wrong one, the final save replaces its pipeline and ``loss_history.csv`` mixes both."""
    if resume or overwrite:
        return None
    found = previous_run(output_dir)
    if not found:
        return None
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    return (
        f"--output_dir {output_dir} already holds a training run ({shown}). Continue it with "
        "--resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir to delete that "
        "run's checkpoints and outputs first."
    )


def clear_output_dir(output_dir: str | os.PathLike, logging_dir: str | None = None) -> None:
    """``--overwrite_output_dir``: delete what an earlier run wrote (`previous_run`, `RUN_FOLDERS`, its logs); leave
    every other file alone. Main process only."""
    folder = Path(output_dir)
    for name in previous_run(folder) + [*RUN_FOLDERS, *([logging_dir] if logging_dir else [])]:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if previous_run(folder):
        raise OSError(f"Could not clear {folder}: {previous_run(folder)} remain.")


# ----------------------------------------------------------------------------------------------------------------------
# One run per folder
# ----------------------------------------------------------------------------------------------------------------------


class RunFolderInUse(OSError):
    """Another training run holds the output folder's lock."""


_HELD_LOCKS: dict[str, object] = {}  # resolved folder -> the `filelock.FileLock` this process holds on it


def _holder(folder: Path) -> dict | None:
    try:
        holder = json.loads((folder / RUN_LOCK_HOLDER).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a process that has not yet written its name"
    return (
        f"process {holder.get('pid')} on {holder.get('host')}, {holder.get('script')}, started {holder.get('started')}"
    )


def lock_run_folder(output_dir: str | os.PathLike) -> None:
    """Take the exclusive lock on ``output_dir`` for this run (main process), or raise `RunFolderInUse` naming the run
    that holds it. Two runs in one folder would interleave ``loss_history.csv``, prune each other's checkpoints and
    clean up each other's staging folders mid-save.

    The lock is `filelock`'s (``flock`` on POSIX, ``msvcrt`` on Windows): the operating system releases it when the
    holder dies, however it dies, so a killed run never blocks the folder. The holder writes its process id, host and
    start time beside it (`RUN_LOCK_HOLDER`) and removes them on release (`unlock_run_folder`, also at exit); finding
    them with the lock free means the previous holder was killed (SIGKILL, power loss), which is logged with its name.
    """
    import filelock

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD_LOCKS:  # an earlier run of this process (a main() called in-process) that raised: it is over
        unlock_run_folder(folder)
    lock = filelock.FileLock(str(folder / RUN_LOCK), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunFolderInUse(
            f"--output_dir {folder} is in use by another training run ({_describe_holder(_holder(folder))}). Two runs "
            "in one folder would mix their checkpoints and loss history: wait for that run to end (or stop it), or "
            "choose another --output_dir."
        ) from None
    stale = _holder(folder)
    if stale:
        alive = ""
        if stale.get("host") == socket.gethostname() and isinstance(stale.get("pid"), int):
            alive = " (no such process now)" if not _process_exists(stale["pid"]) else " (that process id is reused)"
        logger.warning(
            f"{folder}: the previous run ({_describe_holder(stale)}{alive}) ended without releasing the folder's lock, "
            "as a kill or a power loss leaves it; this run takes it over."
        )
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "script": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
    }
    _write_durably(folder / RUN_LOCK_HOLDER, json.dumps(holder))
    _HELD_LOCKS[key] = lock


def unlock_run_folder(output_dir: str | os.PathLike) -> None:
    """Release `lock_run_folder`'s lock (a no-op when this process does not hold it)."""
    folder = Path(output_dir)
    lock = _HELD_LOCKS.pop(str(folder.resolve()), None)
    if lock is None:
        return
    (folder / RUN_LOCK_HOLDER).unlink(missing_ok=True)
    lock.release()  # the lock file stays: deleting it would let a waiting opener lock an orphaned inode


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but is another user's
        return True
    return True


def hold_run_folder(accelerator, args) -> None:
    """`start_run`'s part: on the main process take the folder's lock (`lock_run_folder`) and check again, under the
    lock, that the folder holds no other run (two new runs started at once both passed `check_output_dir` at parse
    time); every process raises the same error. The lock is released by ``accelerator.end_training()`` (every way out
    of the scripts' ``main``) or at exit."""
    import atexit

    error = None
    if accelerator.is_main_process:
        try:
            lock_run_folder(args.output_dir)
            problem = check_output_dir(args.output_dir, bool(args.resume_from_checkpoint), args.overwrite_output_dir)
            if problem:
                unlock_run_folder(args.output_dir)
                error = ValueError(problem)
        except OSError as raised:
            error = raised
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = [None if error is None else (type(error).__name__, str(error))]
        broadcast_object_list(message)
        if message[0] is not None and error is None:
            error = (ValueError if message[0][0] == "ValueError" else RunFolderInUse)(message[0][1])
    if error is not None:
        raise error
    if accelerator.is_main_process:
        atexit.register(unlock_run_folder, args.output_dir)
        end_training = accelerator.end_training

        def end_training_and_unlock():
            end_training()
            unlock_run_folder(args.output_dir)

        accelerator.end_training = end_training_and_unlock


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The step of a `checkpoint-<step>` folder."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint-<step> folder; pass one, or 'latest'.")
    return int(match.group(1))


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` folders that finished saving (they have the marker), oldest first."""
    found = [
        path
        for path in Path(output_dir).glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", path.name) and (path / CHECKPOINT_COMPLETE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def _manifest(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_COMPLETE
    }


_WEIGHT_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # accelerator -> its script's weight files
_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # accelerator -> its run's settings


def record_run_settings(accelerator, fixed: dict, changeable: dict) -> None:
    """Record the run's settings (`run_settings`) in every checkpoint it saves (`RUN_SETTINGS`; call before
    `resume_from_checkpoint`, which checks them against the checkpoint's before anything loads)."""
    _SETTINGS[accelerator] = run_settings(fixed, changeable)


def settings_note(changes: list[str]) -> str:
    """The lines the model card's command gets for the settings changed on resumes (`ResumePoint.changes`)."""
    return "".join(f"\n# resumed with a changed setting: {change}" for change in changes)


def run_settings(fixed: dict, changeable: dict) -> dict:
    """A run's settings as its checkpoints record them (`RUN_SETTINGS`, through `record_run_settings`):
    ``fixed``, what a resume cannot change without breaking the run (objective, model, data, global batch: a
    different value is refused), and ``changeable``, what it legitimately may (routes, learning rate, steps: a
    different value is logged and recorded in ``changes``, which the model card shows). Keys are the options as the
    user writes them (``--objective``); values must be JSON (tuples become lists)."""
    return json.loads(json.dumps({"fixed": fixed, "changeable": changeable, "changes": []}, default=str))


def _differs(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        shown = ", ".join(f"{key} {old.get(key)} then, {new.get(key)} now" for key in keys[:3])
        return f"differs ({shown}{', ...' if len(keys) > 3 else ''})"
    return f"was {old}; this run has {new}"


def compare_run_settings(checkpoint: str, saved: dict, current: dict, step: int) -> tuple[str | None, list[str]]:
    """Check a resume's settings against its checkpoint's: the one-line refusal for the first ``fixed`` setting that
    differs (or None), and a line for each ``changeable`` one that does (``step <step>: <name> <old> -> <new>``)."""
    for name, new in current["fixed"].items():
        old = saved.get("fixed", {}).get(name, new)
        if old != new:
            return (
                f"Cannot resume {checkpoint}: its {name} {_differs(old, new)}. Changing it would not continue that "
                f"run: resume with the same {name}, or start a new run in another --output_dir.",
                [],
            )
    changes = []
    for name, new in current["changeable"].items():
        old = saved.get("changeable", {}).get(name, new)
        if old != new:
            changes.append(f"step {step}: {name} {old} -> {new}")
    return None, changes


def required_files(accelerator) -> list[str]:
    """The files (`fnmatch` patterns, relative to the checkpoint) a checkpoint of this run must hold to resume it: the
    weights its script declared (`register_checkpoint_hooks`), accelerate's optimizer and LR scheduler states (one per
    prepared object), every process's RNG states and, with our hooks, every process's training generator."""
    hooked = accelerator in _WEIGHT_FILES
    optimizers = len(getattr(accelerator, "_optimizers", []))
    schedulers = len(getattr(accelerator, "_schedulers", []))
    files = list(_WEIGHT_FILES.get(accelerator, DEFAULT_WEIGHT_FILES))
    files += ["optimizer.bin" if index == 0 else f"optimizer_{index}.bin" for index in range(optimizers)]
    files += ["scheduler.bin" if index == 0 else f"scheduler_{index}.bin" for index in range(schedulers)]
    for process in range(accelerator.num_processes):
        files += [f"random_states_{process}.pkl", *([f"train_rng_{process}.pt"] if hooked else [])]
    return files + ([RUN_SETTINGS] if accelerator in _SETTINGS else [])


def missing_files(names: list[str], required: list[str]) -> list[str]:
    """The patterns of ``required`` that no name in ``names`` matches."""
    from fnmatch import fnmatch

    return [pattern for pattern in required if not any(fnmatch(name, pattern) for name in names)]


def verify_checkpoint(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` would not load (missing marker, a file it needs missing from its manifest, a file missing or
    of another size than when it was saved, an unreadable safetensors header), or None. Cheap: sizes and headers, no
    tensor is read."""
    from safetensors import safe_open

    folder = Path(checkpoint)
    try:
        marker = json.loads((folder / CHECKPOINT_COMPLETE).read_text())
    except (OSError, ValueError) as error:
        return f"no readable {CHECKPOINT_COMPLETE} ({error})"
    if not isinstance(marker, dict):
        return f"{CHECKPOINT_COMPLETE} is not a manifest"
    files = marker.get("files")  # checkpoints of earlier versions have no manifest: what is on disk
    names = list(files) if files else [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    missing = missing_files(names, marker.get("required") or list(_LEGACY_REQUIRED))
    if missing:
        return (
            f"it lacks {', '.join(missing)} (a checkpoint needs its weights, optimizer, LR scheduler and RNG states)"
        )
    for name, size in (files or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved"
    for path in folder.rglob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as error:  # noqa: BLE001 - any failure means the file does not load
            return f"{path.relative_to(folder)} does not load ({error})"
    return None


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> str | None:
    """`--resume_from_checkpoint`: "latest" (the newest checkpoint that verifies, skipping and naming any that do
    not; None if there is none) or a checkpoint folder, given as a path or, as in Diffusers' examples, as a name inside
    ``output_dir`` (``checkpoint-500``)."""
    if which == "latest":
        for checkpoint in reversed(complete_checkpoints(output_dir)):
            problem = verify_checkpoint(checkpoint)
            if problem is None:
                return str(checkpoint)
            logger.warning(f"Skipping {checkpoint}: {problem}.")
        return None
    if not Path(which).is_dir() and Path(output_dir, which).is_dir():
        which = str(Path(output_dir, which))
    checkpoint_step(which)  # a clear error for a folder not named checkpoint-<step>
    if not Path(which, CHECKPOINT_COMPLETE).is_file():
        raise ValueError(
            f"{which} is not a complete checkpoint (no {CHECKPOINT_COMPLETE}); pass another checkpoint-<step> folder "
            "or --resume_from_checkpoint latest, which skips incomplete ones."
        )
    problem = verify_checkpoint(which)
    if problem is not None:
        raise ValueError(f"{which} does not load: {problem}. Pass an earlier checkpoint or 'latest'.")
    return which


def unpushable(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` must not be pushed to the Hub (`training/push_to_hub.py`), or None: a checkpoint whose save was
    interrupted (`.incomplete-checkpoint-<step>`), a marked `checkpoint-<step>` that does not verify, or an output folder
    holding the staging folder of an interrupted final save (its outputs are the previous ones, and the half-written
    new ones would go up with them)."""
    from fnmatch import fnmatch

    folder = Path(folder)
    if fnmatch(folder.name, ".incomplete-checkpoint-*"):
        return (
            f"{folder} is a checkpoint whose save was interrupted (no {CHECKPOINT_COMPLETE}): it may lack files or "
            "hold half-written ones. Push a complete checkpoint-<step> folder, or the finished output folder."
        )
    if re.fullmatch(r"checkpoint-\d+", folder.name) and (folder / CHECKPOINT_COMPLETE).is_file():
        problem = verify_checkpoint(folder)  # (one without the marker is of a version before markers: pushed as is)
        if problem is not None:
            return f"{folder} is not a complete checkpoint ({problem}): push another checkpoint-<step> folder."
    staging = sorted(path.name for path in folder.glob(f"{_STAGING}*") if path.is_dir())
    if staging:
        return (
            f"{folder} holds {staging[0]}/, left by a final save that was interrupted: the outputs beside it are those "
            "of the previous save. Finish the run (rerun it with --resume_from_checkpoint latest) and push then, or "
            f"delete {folder / staging[0]} to push the previous outputs."
        )
    return None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete the `.incomplete-checkpoint-*` folders that runs killed mid-save left behind (call at start, on the
    main process): they never load and would pile up with every preemption."""
    for leftover in Path(output_dir).glob(".incomplete-checkpoint-*"):
        logger.info(f"Removing {leftover}, left by a run killed while saving")
        shutil.rmtree(leftover, ignore_errors=True)


def _everyone_succeeded(accelerator, succeeded: bool) -> bool:
    """Whether every process succeeded; a collective, so it also synchronises like ``wait_for_everyone``."""
    if accelerator.num_processes == 1:
        return succeeded
    flag = torch.tensor([0.0 if succeeded else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    global_step: int,
    total_limit: int | None = None,
    uploads: CheckpointUploads | None = None,
) -> Path:
    """Write `checkpoint-<step>/` so that a crash, a kill, a power loss or a full disk never costs the last good one.

    `accelerator.save_state` writes into a hidden `.incomplete-checkpoint-<step>/`, which every process fsyncs; the
    main process then writes the `CHECKPOINT_COMPLETE` marker (with each file's size), renames the folder into place
    and fsyncs the output folder. Only if the new checkpoint verifies does it prune to ``total_limit`` (waiting first
    for the pending ``uploads``: a checkpoint being uploaded is never deleted), then it queues the new one for upload
    (`diffusers_tread.hub.CheckpointUploads`, ``--push_checkpoints``). A failure on any process raises on every process,
    so none waits forever at a barrier.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    partial = output_dir / f".incomplete-checkpoint-{global_step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(partial))
        fsync_tree(partial)
    except Exception as raised:  # noqa: BLE001 - every process must learn of the failure before anyone raises
        error = raised
    saved = _everyone_succeeded(accelerator, error is None)
    if saved and accelerator.is_main_process:
        try:
            files = _manifest(partial)
            required = required_files(accelerator)
            missing = missing_files(list(files), required)
            if missing:  # never mark complete what cannot resume the run
                raise OSError(f"{partial} lacks {', '.join(missing)} after saving")
            _write_durably(
                partial / CHECKPOINT_COMPLETE,
                json.dumps({"step": global_step, "files": files, "required": required}),
            )
            _fsync(partial)
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync(output_dir)
        except Exception as raised:  # noqa: BLE001
            error = raised
    if saved:
        saved = _everyone_succeeded(accelerator, error is None)
    if not saved:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        previous = complete_checkpoints(output_dir)
        cause = f"{error}" if error is not None else "another process failed to write its part"
        raise OSError(
            f"Saving {final} failed: {cause}. The previous checkpoint ({previous[-1] if previous else 'none'}) is "
            "intact; free disk space and resume with --resume_from_checkpoint latest."
        ) from error
    logger.info(f"Saved state to {final}")
    if accelerator.is_main_process:
        problem = verify_checkpoint(final)
        if problem is not None:
            logger.warning(f"{final} does not verify ({problem}); no older checkpoint is removed.")
        elif total_limit is not None:  # keep the new one and the newest others, up to the limit
            others = [checkpoint for checkpoint in complete_checkpoints(output_dir) if checkpoint != final]
            old_checkpoints = others[: max(len(others) - (total_limit - 1), 0)]
            if old_checkpoints and uploads is not None:
                uploads.wait()  # never delete a checkpoint that is still being uploaded
            for old in old_checkpoints:
                logger.info(f"Removing old checkpoint {old}")
                shutil.rmtree(old)
        if uploads is not None:
            uploads.submit(final)
    accelerator.wait_for_everyone()
    return final


@dataclass
class ResumePoint:
    """Where a run continues: the optimisation step, the epoch, how many batches of it to skip, and the seconds it had
    trained (the last ``loss_history.csv`` row kept). ``finished``: the run had already finished; do nothing.
    ``changes``: the changeable settings this run and the resumes before it changed (main process; for the card)."""

    global_step: int = 0
    first_epoch: int = 0
    skip_batches: int = 0
    checkpoint: str | None = None
    seconds_before: float = 0.0
    finished: bool = False
    changes: list[str] = field(default_factory=list)  # settings changed on resumes (`run_settings`)


def resume_from_checkpoint(
    accelerator,
    output_dir: str,
    which: str | None,
    steps_per_epoch: int,
    gradient_accumulation_steps: int = 1,
    max_train_steps: int | None = None,
) -> ResumePoint:
    """Remove leftovers of killed saves, pick the checkpoint on the main process (ranks on different machines could
    see different folders and disagree) and load it on every process; cut ``loss_history.csv`` (whose third column is
    the elapsed seconds) back to its step. ``which``: None, "latest" or a folder. A run that already finished at
    ``max_train_steps`` or later is not loaded: the result says ``finished`` (and the log says so)."""
    from accelerate.utils import broadcast_object_list

    if accelerator.is_main_process:
        remove_incomplete_checkpoints(output_dir)
    if not which:
        accelerator.wait_for_everyone()
        return ResumePoint()
    found = [None, None, None]  # checkpoint, finished step, error: decided on the main process, told to the others
    if accelerator.is_main_process:
        try:
            checkpoint, finished = find_checkpoint(output_dir, which), finished_step(output_dir)
            if checkpoint and which != "latest" and finished is not None and finished > checkpoint_step(checkpoint):
                finished = None  # an explicit older checkpoint: the run goes back to it (`set_aside_newer`)
            found = [checkpoint, finished, None]
            current, saved_file = _SETTINGS.get(accelerator), Path(checkpoint or "", RUN_SETTINGS)
            if checkpoint and current is not None and saved_file.is_file():
                saved = json.loads(saved_file.read_text())
                found[2], changes = compare_run_settings(checkpoint, saved, current, checkpoint_step(checkpoint))
                for change in changes:
                    logger.warning(
                        f"Resuming {checkpoint} with a changed setting ({change}); the model card records it."
                    )
                current["changes"] = [*saved.get("changes", []), *changes]  # carried by the next checkpoints
        except ValueError as error:  # raised on every process below, so that none waits at the broadcast
            found[2] = str(error)
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    checkpoint, finished, error = found
    if error is not None:
        raise ValueError(error)
    if checkpoint is None:
        logger.info(f"No checkpoint found for '{which}' in {output_dir}; starting a new run.")
        return ResumePoint()
    if finished is not None and max_train_steps is not None and finished >= max_train_steps:
        logger.info(
            f"{output_dir} holds a run that finished at step {finished} (--max_train_steps {max_train_steps}): "
            "nothing to do. Raise --max_train_steps to train further."
        )
        return ResumePoint(finished=True)
    step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:
        set_aside_newer(output_dir, step)
    logger.info(f"Resuming from {checkpoint}")
    try:
        accelerator.load_state(checkpoint)
    except (RuntimeError, ValueError, OSError, KeyError) as error:  # e.g. a state dict of another model's shapes
        first = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])[:300]
        raise ValueError(
            f"{checkpoint} does not load into this run: {first}. Resume with the settings it was trained with (its "
            f"{RUN_SETTINGS}, or the command in its run's model card), or start a new run in another --output_dir."
        ) from error
    seconds_before = 0.0
    if accelerator.is_main_process:
        kept = resume_loss_history(Path(output_dir, LOSS_HISTORY), step)
        seconds_before = float(kept[-1][2]) if kept else 0.0
    return ResumePoint(
        global_step=step,
        first_epoch=step // steps_per_epoch,
        skip_batches=(step % steps_per_epoch) * gradient_accumulation_steps,
        checkpoint=checkpoint,
        seconds_before=seconds_before,
        changes=list((_SETTINGS.get(accelerator) or {}).get("changes", [])),
    )


def set_aside_newer(output_dir: str | os.PathLike, step: int) -> Path | None:
    """Resuming from `checkpoint-<step>` while newer checkpoints exist abandons the run they belong to: move them (and,
    if that run had finished, its final outputs, with a copy of its ``loss_history.csv``) into
    ``abandoned/after-checkpoint-<step>-<time>/``, so that ``latest`` never resumes the abandoned run after a later
    crash; nothing is deleted. Returns that folder, or None when nothing is newer. Main process."""
    folder = Path(output_dir)
    newer = sorted(
        (path for path in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", path.name)),
        key=checkpoint_step,
    )
    newer = [path for path in newer if checkpoint_step(path) > step]
    finished = finished_step(folder)
    outputs = []
    if finished is not None and finished > step:
        kept = {LOSS_HISTORY}
        outputs = [folder / name for name in RUN_FILES if name not in kept and (folder / name).is_file()]
        outputs += [
            folder / name for name in RUN_FOLDERS if name not in (_STAGING, ABANDONED) and (folder / name).is_dir()
        ]
    if not newer and not outputs:
        return None
    target = folder / ABANDONED / f"after-checkpoint-{step}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    target.mkdir(parents=True)
    if (folder / LOSS_HISTORY).is_file():
        shutil.copy2(folder / LOSS_HISTORY, target / LOSS_HISTORY)  # the abandoned run's rows, before the cut
    # the finished marker first: a crash mid-move never leaves it beside moved outputs
    for path in [*(p for p in outputs if p.name == TRAINING_COMPLETE), *newer, *outputs]:
        if path.exists():
            os.replace(path, target / path.name)
    fsync_tree(target)
    _fsync(folder)
    moved = [path.name for path in [*newer, *outputs]]
    logger.warning(
        f"Resuming from checkpoint-{step} abandons the run that continued past it: moved {', '.join(moved)} to "
        f"{target} (so that --resume_from_checkpoint latest never resumes it). Delete that folder once you no longer "
        "need it."
    )
    return target


def finished_step(output_dir: str | os.PathLike) -> int | None:
    """The step at which the run in ``output_dir`` finished and saved its outputs (`final_output`), or None."""
    try:
        return int(json.loads(Path(output_dir, TRAINING_COMPLETE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def final_output(output_dir: str | os.PathLike, global_step: int) -> Iterator[Path]:
    """Stage the end-of-run files (pipeline, card, samples) in a hidden folder, then move them into ``output_dir``.

    The marker and ``model_index.json`` are removed first and written last: a kill at any point leaves either the
    previous complete outputs or a folder without ``model_index.json`` (which nothing loads or pushes), never new
    weights beside an old index. Existing folders are merged file by file (validation grids stay)."""
    folder = Path(output_dir)
    staging = folder / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    yield staging
    fsync_tree(staging)
    for name in (TRAINING_COMPLETE, "model_index.json"):
        (folder / name).unlink(missing_ok=True)
    _fsync(folder)
    index = staging / "model_index.json"
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path != index:
            target = folder / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    fsync_tree(folder)  # the moved files' folders
    if index.is_file():
        os.replace(index, folder / "model_index.json")
    _write_durably(folder / TRAINING_COMPLETE, json.dumps({"step": global_step}))
    _fsync(folder)
    shutil.rmtree(staging)


def _loss_row(line: str) -> list[str] | None:
    """A ``step,loss,seconds[,...]`` row of ``loss_history.csv`` (numbers; the t2i script adds the routes' kept
    fraction), or None for a torn or unreadable line."""
    fields = line.rstrip("\r\n").split(",")
    if len(fields) < 3 or "\0" in line:
        return None
    try:
        int(fields[0]), [float(field) for field in fields[1:]]
    except ValueError:
        return None
    return fields


def resume_loss_history(path: str | os.PathLike, step: int) -> list[list[str]]:
    """Cut a ``loss_history.csv`` (rows ``step,loss,seconds[,...]``) back to the rows up to ``step``, the checkpoint a run
    resumes from: the rows an interrupted run wrote after it would otherwise appear twice. A torn tail (NUL bytes or a
    half-written row, as a power loss or a kill mid-write leaves; every complete row ends with a newline) and any
    unreadable line are dropped with a warning. Returns the kept rows."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    rows, dropped = [], 0
    for line in lines:
        row = _loss_row(line) if line.endswith("\n") else None
        if row is None:
            dropped += line.strip("\0\r\n") != "" or "\0" in line
            continue
        if int(row[0]) <= step:
            rows.append(row)
    if dropped:
        logger.warning(
            f"{path}: dropped {dropped} torn or unreadable line(s) (a write cut short by a kill or a power loss); "
            f"kept {len(rows)} rows up to step {step}."
        )
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(temporary, path)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Randomness that survives a resume
# ----------------------------------------------------------------------------------------------------------------------


def process_seed(seed: int, process_index: int, *keys: int) -> int:
    """The seed of process ``process_index`` (and optional ``keys``, e.g. a step) of a run seeded ``seed``.

    Process 0 of a single-process run keeps ``seed`` itself; every other combination is hashed (numpy's SeedSequence),
    so that no two (seed, process) pairs share a stream: ``seed + rank`` would make seed 1 on process 0 repeat seed 0
    on process 1, correlating seed sweeps."""
    if process_index == 0 and not keys:
        return seed
    return int(np.random.SeedSequence([seed, process_index, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def register_checkpoint_hooks(
    accelerator,
    generator: torch.Generator,
    seed: int,
    save_weights: Callable[[list, str], None],
    load_weights: Callable[[list, str], None],
    weight_files: tuple[str, ...] = DEFAULT_WEIGHT_FILES,
) -> None:
    """Make `accelerator.save_state` / `load_state` write the models as Diffusers folders and carry ``generator``.

    ``save_weights(models, folder)`` runs on the main process and ``load_weights(models, folder)`` on every process,
    with the unwrapped models; accelerate's own weight files are not written. ``weight_files``: the files
    (`fnmatch` patterns) ``save_weights`` writes, which `save_checkpoint` requires before it marks a checkpoint
    complete (`required_files`); with `record_run_settings`, every checkpoint also holds the run's settings. Each process saves its generator state
    (`train_rng_<process>.pt`); a process that finds none (resuming on more processes) reseeds from (seed, process,
    step)."""

    def save_hook(models, weights, output_dir):
        os.makedirs(output_dir, exist_ok=True)
        torch.save(generator.get_state(), os.path.join(output_dir, f"train_rng_{accelerator.process_index}.pt"))
        if accelerator.is_main_process:
            save_weights([accelerator.unwrap_model(model) for model in models], output_dir)
            if accelerator in _SETTINGS:
                Path(output_dir, RUN_SETTINGS).write_text(json.dumps(_SETTINGS[accelerator], indent=1))
        weights.clear()  # the models are saved above, as Diffusers folders

    def load_hook(models, input_dir):
        rng_file = os.path.join(input_dir, f"train_rng_{accelerator.process_index}.pt")
        if os.path.exists(rng_file):
            generator.set_state(torch.load(rng_file, weights_only=True))
        else:
            step = checkpoint_step(input_dir) if re.fullmatch(r"checkpoint-\d+", Path(input_dir).name) else 0
            generator.manual_seed(process_seed(seed, accelerator.process_index, step))
            logger.warning(f"{rng_file} not found: process {accelerator.process_index} reseeds its generator.")
        unwrapped = [accelerator.unwrap_model(model) for model in models]
        models.clear()  # loaded here, in place (the optimizer keeps its parameters)
        load_weights(unwrapped, input_dir)

    _WEIGHT_FILES[accelerator] = tuple(weight_files)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------------------------------------


def install_stop_handlers() -> dict:
    """SIGTERM (cluster schedulers) and SIGINT (Ctrl-C) ask the loop to checkpoint and exit at its next check of
    `stop_requested`; a second SIGINT stops at once."""
    stop = {"signal": None}

    def request_stop(signum, _frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum

    stop["previous"] = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    return stop


def restore_stop_handlers(stop: dict) -> None:
    for sig, handler in stop["previous"].items():
        signal.signal(sig, handler)


def stop_requested(accelerator, stop: dict) -> bool:
    """Whether any process got a stop signal (all processes must agree, or the checkpoint would deadlock); with
    several processes an all-reduce, so a host sync: call it at steps that synchronise anyway."""
    requested = stop["signal"] is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(requested)], device=accelerator.device)
        requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    return requested
