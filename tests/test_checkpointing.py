"""The run-folder safety of `diffusers_tread.checkpointing` and the upload/redaction helpers of `diffusers_tread.hub`,
in process on one CPU (the training scripts' use of them is tested in test_reliability.py)."""

import argparse
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from diffusers_tread import checkpointing, hub
from diffusers_tread.checkpointing import (
    CHECKPOINT_COMPLETE,
    RUN_LOCK_HOLDER,
    TRAINING_COMPLETE,
    RunFolderInUse,
    check_output_dir,
    clear_output_dir,
    final_output,
    find_checkpoint,
    finished_step,
    hold_run_folder,
    lock_run_folder,
    process_seed,
    save_checkpoint,
    unlock_run_folder,
    verify_checkpoint,
)
from diffusers_tread.training_utils import check_run_arguments


def test_a_folder_with_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    assert check_output_dir(tmp_path / "new", resume=False, overwrite=False) is None
    (tmp_path / "notes.txt").write_text("mine")  # a folder with other files is not a run
    assert check_output_dir(tmp_path, resume=False, overwrite=False) is None
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "loss_history.csv").write_text("1,0.5,1.0\n")
    problem = check_output_dir(tmp_path, resume=False, overwrite=False)
    assert "already holds a training run (checkpoint-4, loss_history.csv)" in problem
    assert "--resume_from_checkpoint latest" in problem and "--overwrite_output_dir" in problem
    assert check_output_dir(tmp_path, resume=True, overwrite=False) is None
    assert check_output_dir(tmp_path, resume=False, overwrite=True) is None
    (tmp_path / "samples").mkdir()
    (tmp_path / "logs").mkdir()
    clear_output_dir(tmp_path, "logs")  # the run's files go, the user's stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_shared_option_checks_refuse_wandb_with_a_token_and_warn_about_the_option(tmp_path, capsys, caplog):
    parser = argparse.ArgumentParser()

    def args(**overrides):
        values = dict(output_dir=str(tmp_path), resume_from_checkpoint=None, overwrite_output_dir=False,
                      checkpoints_total_limit=None, hub_token=None, report_to="tensorboard")  # fmt: skip
        return argparse.Namespace(**{**values, **overrides})

    with pytest.raises(SystemExit) as exit_info:
        check_run_arguments(parser, args(hub_token="hf_x", report_to="wandb"))
    assert exit_info.value.code == 2 and "would record the token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_run_arguments(parser, args(checkpoints_total_limit=0))
    with caplog.at_level(logging.WARNING):
        check_run_arguments(parser, args(hub_token="hf_x"))
    assert "prefer HF_TOKEN" in caplog.text and "hf_x" not in caplog.text


def write_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint as `save_checkpoint` leaves it: files, then the marker with their sizes and what it requires."""
    checkpoint = folder / f"checkpoint-{step}"
    (checkpoint / "transformer").mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, checkpoint / "transformer" / "model.safetensors")
    (checkpoint / "optimizer.bin").write_bytes(b"x" * 100)
    for name in ("scheduler.bin", "random_states_0.pkl", "train_rng_0.pt"):
        (checkpoint / name).write_bytes(b"x" * 10)
    required = ["transformer/*.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "train_rng_0.pt"]
    (checkpoint / CHECKPOINT_COMPLETE).write_text(
        json.dumps({"step": step, "files": checkpointing._manifest(checkpoint), "required": required})
    )
    return checkpoint


def test_a_checkpoint_without_weights_or_optimizer_is_never_accepted(tmp_path, accelerator_and_model, caplog):
    """Issue #21: a `checkpoint-2` marked complete whose manifest lists only `random_states_0.pkl` and `scheduler.bin`
    (what was left after another run's clean-up) was accepted by `latest`: the manifest must require what a
    checkpoint needs, and `save_checkpoint` never marks such a folder complete."""
    write_checkpoint(tmp_path, 1)
    bare = tmp_path / "checkpoint-2"
    bare.mkdir()
    (bare / "random_states_0.pkl").write_bytes(b"x")
    (bare / "scheduler.bin").write_bytes(b"x")
    (bare / CHECKPOINT_COMPLETE).write_text(json.dumps({"step": 2, "files": checkpointing._manifest(bare)}))
    assert "lacks *.safetensors, optimizer.bin" in verify_checkpoint(bare)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path, "latest") == str(tmp_path / "checkpoint-1")
    assert "Skipping" in caplog.text and "checkpoint-2" in caplog.text
    # a save whose weights hook wrote nothing fails and leaves checkpoint-1 the latest
    accelerator, _ = accelerator_and_model
    checkpointing._WEIGHT_FILES[accelerator] = ("transformer/*.safetensors",)
    with pytest.raises(OSError, match="lacks transformer/\\*.safetensors"):
        save_checkpoint(accelerator, tmp_path / "run", 3)
    assert not (tmp_path / "run" / "checkpoint-3").exists()


def test_latest_falls_back_past_checkpoints_that_do_not_verify(tmp_path, caplog):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    truncated = write_checkpoint(tmp_path, 6)
    corrupt = write_checkpoint(tmp_path, 8)
    os.truncate(truncated / "optimizer.bin", 10)  # a power loss before the data reached the disk
    header = corrupt / "transformer" / "model.safetensors"
    header.write_bytes(b"\xff" * header.stat().st_size)  # same size, unreadable header
    assert "optimizer.bin has 10 bytes, 100 when saved" in verify_checkpoint(truncated)
    assert "model.safetensors does not load" in verify_checkpoint(corrupt)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path, "latest") == str(tmp_path / "checkpoint-4")
    assert "Skipping" in caplog.text and "checkpoint-8" in caplog.text and "checkpoint-6" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-6 does not load: optimizer.bin"):
        find_checkpoint(tmp_path, "checkpoint-6")
    (tmp_path / "checkpoint-4" / "optimizer.bin").unlink()
    assert find_checkpoint(tmp_path, "latest") == str(tmp_path / "checkpoint-2")


@pytest.fixture
def accelerator_and_model():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_save_checkpoint_fsyncs_before_the_marker_and_keeps_the_last_one_that_verifies(
    tmp_path, accelerator_and_model, monkeypatch
):
    accelerator, _ = accelerator_and_model
    events = []
    original_fsync, original_write = os.fsync, checkpointing._write_durably
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or original_fsync(fd))
    monkeypatch.setattr(checkpointing, "_write_durably", lambda p, t: events.append(p.name) or original_write(p, t))
    first = save_checkpoint(accelerator, tmp_path, 1, total_limit=1)
    assert events.index(CHECKPOINT_COMPLETE) > 0 and events[: events.index(CHECKPOINT_COMPLETE)].count("fsync") >= 3
    marker = json.loads((first / CHECKPOINT_COMPLETE).read_text())
    assert marker["step"] == 1 and "model.safetensors" in marker["files"]
    assert verify_checkpoint(first) is None

    # a new checkpoint that does not verify (here: simulated) never causes the older one to be pruned
    monkeypatch.setattr(checkpointing, "verify_checkpoint", lambda folder: "simulated damage")
    save_checkpoint(accelerator, tmp_path, 2, total_limit=1)
    assert first.is_dir() and (tmp_path / "checkpoint-2").is_dir()
    monkeypatch.undo()
    save_checkpoint(accelerator, tmp_path, 3, total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_pruning_keeps_the_new_checkpoint_after_resuming_an_older_one(tmp_path, accelerator_and_model):
    accelerator, _ = accelerator_and_model
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step)
    save_checkpoint(accelerator, tmp_path, 3, total_limit=2)  # resumed from checkpoint-2, now at step 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-6"]


def test_final_output_is_all_or_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "step_10.png").write_bytes(b"validation grid")

    def write(staging: Path, version: str) -> None:
        (staging / "transformer").mkdir()
        (staging / "transformer" / "weights.safetensors").write_text(version)
        (staging / "samples").mkdir()
        (staging / "samples" / "final_grid.png").write_text(version)
        (staging / "README.md").write_text(version)
        (staging / "model_index.json").write_text(json.dumps({"version": version}))

    with final_output(out, 10) as staging:
        write(staging, "first")
    assert json.loads((out / "model_index.json").read_text()) == {"version": "first"}
    assert finished_step(out) == 10 and (out / "samples" / "step_10.png").is_file()  # merged, not replaced
    assert not (out / ".incomplete-final").exists()

    # killed halfway through moving the second save's files into place: no index, no marker, so nothing loads or
    # pushes the mixed folder, and the run is not taken as finished
    moved = []
    original = os.replace

    def dying_replace(source, target):
        if len(moved) == 2:
            raise KeyboardInterrupt("killed")
        moved.append(target)
        return original(source, target)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        with final_output(out, 20) as staging:
            write(staging, "second")
    monkeypatch.undo()
    assert not (out / "model_index.json").exists() and not (out / TRAINING_COMPLETE).exists()
    assert finished_step(out) is None
    with final_output(out, 20) as staging:  # the resumed run saves again
        write(staging, "second")
    assert json.loads((out / "model_index.json").read_text()) == {"version": "second"} and finished_step(out) == 20
    assert (out / "transformer" / "weights.safetensors").read_text() == "second"


class FakeUploads:
    """`upload_folder(run_as_future=True)` whose futures fail as scripted: {checkpoint name: failures before success}."""

    def __init__(self, failures: dict[str, int]):
        self.failures, self.calls = dict(failures), []

    def __call__(self, **kwargs):
        name = kwargs["path_in_repo"]
        self.calls.append(name)
        future = Future()
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            future.set_exception(ConnectionError(f"Hub unreachable for {name}"))
        else:
            future.set_result(None)
        return future


def test_failed_checkpoint_uploads_are_retried_and_reported_exactly(tmp_path, monkeypatch):
    fake = FakeUploads({"checkpoint-1": 1, "checkpoint-2": 10})  # the first recovers, the second never does
    monkeypatch.setattr(hub.uploads, "upload_folder", fake)
    uploads = hub.CheckpointUploads("user/run", retries=2)
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        uploads.submit(tmp_path / f"checkpoint-{step}")
    uploads.wait()  # never raises
    assert fake.calls.count("checkpoint-1") == 2 and fake.calls.count("checkpoint-2") == 3
    assert uploads.uploaded == ["checkpoint-3", "checkpoint-1"] and list(uploads.failed) == ["checkpoint-2"]
    report = uploads.report()
    assert report.startswith("Checkpoint uploads to user/run: 2 done (checkpoint-3, checkpoint-1); 1 failed")
    assert "checkpoint-2: ConnectionError: Hub unreachable for checkpoint-2" in report


def test_tokens_are_redacted_by_value(monkeypatch):
    token, env_token = "hf_abcdefghijklmnopqrstuvwxyz0123", "hf_ENVTOKENabcdefghijklmnopqrstu"
    monkeypatch.setenv("HF_TOKEN", env_token)
    command = hub.launch_command("training/train_tread.py", ["--hub_tok", token, f"--note={env_token}"], [token])
    assert token not in command and env_token not in command and command.count("<redacted>") == 2
    assert hub.redact("--hub_token=abc and --hub_token xyz", []) == "--hub_token=<redacted> and --hub_token <redacted>"


def test_process_seeds_never_collide_across_seeds_and_processes():
    assert process_seed(3, 0) == 3  # a single-process run keeps its seed
    seeds = {process_seed(seed, rank) for seed in range(50) for rank in range(8)}
    assert len(seeds) == 400  # seed + rank would give 57 distinct values
    assert process_seed(1, 0) != process_seed(0, 1) and process_seed(0, 1, 500) != process_seed(0, 1, 501)
    first = torch.Generator().manual_seed(process_seed(1, 0))
    second = torch.Generator().manual_seed(process_seed(0, 1))
    assert not torch.equal(torch.randn(8, generator=first), torch.randn(8, generator=second))


def test_a_failed_final_upload_names_the_command_that_retries_it(tmp_path, monkeypatch):
    def unreachable(**kwargs):
        raise ConnectionError("Hub unreachable")

    monkeypatch.setattr(hub.uploads, "upload_folder", unreachable)
    (tmp_path / "lora").mkdir()
    with pytest.raises(RuntimeError, match=r"lora to user/x failed: Hub unreachable\. .*retry with `hf upload user/x"):
        hub.upload_final_output(tmp_path / "lora", "user/x")  # LoRA weights: no pipeline folder
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(
        RuntimeError, match=r"retry with `python training/push_to_hub.py .*pipe --hub_model_id user/x`"
    ):
        hub.upload_final_output(tmp_path / "pipe", "user/x")


HOLD_LOCK = "import sys, time\nfrom diffusers_tread.checkpointing import lock_run_folder\n" \
    "lock_run_folder(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(120)\n"  # fmt: skip


def hold_lock_in_another_process(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(checkpointing.__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, env=env)
    assert process.stdout.readline().strip() == b"locked"
    return process


def test_one_run_per_folder_the_lock_names_its_holder_and_a_killed_holder_is_detected(tmp_path, caplog):
    """Issue #21 item 1: two runs in one folder (started at once, or a re-queued job resumed while the first still
    runs) are refused with the holder's name; a holder killed by SIGKILL never blocks the folder, and is named."""
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunFolderInUse, match=rf"in use by another training run \(process {holder.pid} on "):
            lock_run_folder(tmp_path)
        # what the scripts' start_run does: refused on every process before anything is written
        args = argparse.Namespace(
            output_dir=str(tmp_path), resume_from_checkpoint="latest", overwrite_output_dir=False
        )
        with pytest.raises(RunFolderInUse, match=str(holder.pid)):
            hold_run_folder(Accelerator(cpu=True), args)
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING):
        lock_run_folder(tmp_path)
    assert f"process {holder.pid} on" in caplog.text and "no such process now" in caplog.text
    unlock_run_folder(tmp_path)
    assert not (tmp_path / RUN_LOCK_HOLDER).exists()
    # two new runs started at once both pass the parse-time check; the second to take the lock finds the first's run
    (tmp_path / "loss_history.csv").write_text("1,0.5,1.0\n")
    args = argparse.Namespace(output_dir=str(tmp_path), resume_from_checkpoint=None, overwrite_output_dir=False)
    with pytest.raises(ValueError, match="already holds a training run"):
        hold_run_folder(Accelerator(cpu=True), args)
    lock_run_folder(tmp_path)  # and it let go of the lock
    unlock_run_folder(tmp_path)


def test_a_torn_loss_history_is_cut_back_with_a_warning(tmp_path, caplog):
    """Issue #21 item 5: a loss_history.csv ending in NUL bytes or a half-written row (a power loss) blocked the
    resume with a traceback; the torn tail is dropped with a warning."""
    history = tmp_path / "loss_history.csv"
    for torn in (b"3,0.41", b"3,0.41,2.0\r\n" + b"\0" * 300, b"\0" * 4096):
        history.write_bytes(b"1,0.500000,1.0\r\n2,0.450000,2.0\r\n" + torn)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            rows = checkpointing.resume_loss_history(history, 2)
        assert rows == [["1", "0.500000", "1.0"], ["2", "0.450000", "2.0"]]
        assert "dropped 1 torn or unreadable line(s)" in caplog.text
        assert history.read_bytes() == b"1,0.500000,1.0\r\n2,0.450000,2.0\r\n"
