"""Reliability of training/train_tread.py: exact resume, crash-safe checkpoints, signals, bad input, multi-process."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from conftest import REPO, SCRIPT, TINY, free_port, launch, load_script, transformer_weights
from safetensors.torch import load_file, save_file

from diffusers_tread import TreadDiTPipeline, TreadTransformer2DModel, hub
from diffusers_tread.checkpointing import checkpoint_step, find_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def checkpoint_state(folder):
    """Everything a checkpoint restores, as flat {name: tensor}: weights, EMA, optimizer moments and steps."""
    state = {
        f"model.{k}": v for k, v in load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors").items()
    }
    ema = load_file(folder / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    state |= {f"ema.{k}": v for k, v in ema.items()}
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    for index, moments in optimizer["state"].items():
        for name, value in moments.items():
            state[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
    return state


def test_exact_resume_bit_for_bit_with_accumulation_and_new_checkpointing_steps(tmp_path, accelerate_config):
    """N steps straight == N/2 steps, stop, resume N/2 (with another --checkpointing_steps): weights, EMA, optimizer."""
    common = ["--gradient_accumulation_steps=2", "--validation_steps=100", "--routes=1:3:0.5,4:5:0.25"]
    launch(accelerate_config, f"--output_dir={tmp_path / 'straight'}", "--max_train_steps=6", "--checkpointing_steps=3",
           *common)  # fmt: skip
    launch(accelerate_config, f"--output_dir={tmp_path / 'resumed'}", "--max_train_steps=3", "--checkpointing_steps=3",
           *common)  # fmt: skip
    launch(accelerate_config, f"--output_dir={tmp_path / 'resumed'}", "--max_train_steps=6", "--checkpointing_steps=2",
           "--resume_from_checkpoint=latest", *common)  # fmt: skip
    straight = checkpoint_state(tmp_path / "straight" / "checkpoint-6")
    resumed = checkpoint_state(tmp_path / "resumed" / "checkpoint-6")
    assert straight.keys() == resumed.keys() and any(k.startswith("optimizer.") for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    history = [row[:2] for row in csv.reader((tmp_path / "resumed" / "loss_history.csv").open())]
    assert history == [row[:2] for row in csv.reader((tmp_path / "straight" / "loss_history.csv").open())]


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import safetensors.torch

    sys.path.insert(0, str(Path(sys.argv[1]).resolve().parents[1] / "tests"))
    from conftest import load_module

    train_tread = load_module(sys.argv[1])
    original = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if ".incomplete-checkpoint-4" in str(filename):  # half a file, then die as SIGKILL would leave it
            with open(filename, "wb") as f:
                f.write(b"\\0" * 64)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_file
    train_tread.main(sys.argv[2:])
    """
)


def test_sigkill_while_saving_keeps_the_previous_checkpoint_and_latest_skips_the_partial_one(tmp_path):
    out = tmp_path / "out"
    wrapper = tmp_path / "kill_during_save.py"
    wrapper.write_text(KILL_DURING_SAVE)
    args = [*TINY, f"--output_dir={out}", "--max_train_steps=6", "--checkpointing_steps=2", "--validation_steps=100",
            "--checkpoints_total_limit=1"]  # fmt: skip
    result = subprocess.run([sys.executable, str(wrapper), str(SCRIPT), *args], env=ENV, cwd=REPO, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert not (out / "checkpoint-4").exists() and (out / ".incomplete-checkpoint-4").exists()
    # the survivor loads, and `latest` resumes from it and finishes the run
    TreadTransformer2DModel.from_pretrained(out / "checkpoint-2" / "transformer")
    result = subprocess.run([sys.executable, str(SCRIPT), *args, "--resume_from_checkpoint=latest"], env=ENV, cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-2" in result.stderr and (out / "model_index.json").exists()
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-6"]  # pruned to 1, leftovers cleaned


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, f"--output_dir={out}", "--max_train_steps=100000", "--checkpointing_steps=100000",
            "--validation_steps=100000"]  # fmt: skip
    log = (tmp_path / "stderr.log").open("w")  # a file, not a pipe: a full pipe would block the trainer
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=ENV, cwd=REPO, stdout=log, stderr=log)
    history = out / "loss_history.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stderr = (tmp_path / "stderr.log").read_text()
    assert process.returncode == 0, stderr[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "checkpoint_complete.json").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 3 and f"Stopped by signal {int(signal.SIGTERM)} at step {step}" in stderr
    # and the run continues from there
    resumed = [*args[:-3], f"--max_train_steps={step + 2}", "--resume_from_checkpoint=latest"]
    result = subprocess.run([sys.executable, str(SCRIPT), *resumed], env=ENV, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(history.read_text().splitlines()) == step + 2


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    script = load_script()
    original = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if ".incomplete-checkpoint-4" in str(filename):
            raise OSError(28, "No space left on device")
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"checkpoint-4 failed: .*No space left.*checkpoint-2\) is intact"):
        script.main([*TINY, f"--output_dir={out}", "--max_train_steps=6", "--checkpointing_steps=2",
                     "--validation_steps=100"])  # fmt: skip
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]
    assert find_checkpoint(str(out), "latest") == str(out / "checkpoint-2")


def test_nan_loss_stops_with_the_step_and_a_hint_and_leaves_the_checkpoint(tmp_path):
    script = load_script()
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"Loss is (nan|inf) at step \d+\..*untouched.*--learning_rate"):
        script.main([*TINY, f"--output_dir={out}", "--max_train_steps=50", "--checkpointing_steps=1",
                     "--validation_steps=100", "--learning_rate=1e30", "--max_grad_norm=0"])  # fmt: skip
    last = find_checkpoint(str(out), "latest")
    weights = transformer_weights(last)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_latest_skips_incomplete_and_explicit_incomplete_is_refused(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:  # a marker without a manifest (earlier versions): the files on disk must be a checkpoint's
            save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
            for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
                (folder / name).write_bytes(b"x")
            (folder / "checkpoint_complete.json").write_text("{}")
    (tmp_path / "checkpoint-8-old").mkdir()
    assert find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-6"))
    assert find_checkpoint(str(tmp_path / "empty"), "latest") is None
    # Diffusers' convention: a bare name is looked up inside the output folder
    assert find_checkpoint(str(tmp_path), "checkpoint-4") == str(tmp_path / "checkpoint-4")
    assert checkpoint_step(find_checkpoint(str(tmp_path), "checkpoint-2")) == 2
    # a folder not named checkpoint-<step> gets a message, not an int parse error
    with pytest.raises(ValueError, match="not a checkpoint-<step> folder"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-8-old"))


def test_zero_intervals_and_abbreviated_options_are_refused(capsys):
    script = load_script()
    for option in ("--checkpointing_steps=0", "--validation_steps=0", "--logging_steps=0"):
        with pytest.raises(SystemExit):
            script.parse_args([option])
        assert "must be at least 1" in capsys.readouterr().err
    # an abbreviation (here of --hub_token) would escape the token's redaction: argparse must not accept it
    with pytest.raises(SystemExit):
        script.parse_args(["--hub_tok", "hf_secret"])
    assert "unrecognized arguments: --hub_tok" in capsys.readouterr().err


def test_bad_validation_labels_and_checkpoint_limit(tmp_path):
    script = load_script()
    with pytest.raises(ValueError, match=r"--validation_class_labels: unknown class 'eleven'.*'9'"):
        script.main([*TINY, f"--output_dir={tmp_path}", "--validation_class_labels=3,eleven", "--max_train_steps=1"])
    with pytest.raises(ValueError, match=r"--validation_class_labels: class id 10 is out of range \(0..9\)"):
        script.main([*TINY, f"--output_dir={tmp_path}", "--validation_class_labels=10", "--max_train_steps=1"])
    with pytest.raises(SystemExit):
        script.parse_args(["--checkpoints_total_limit=0"])


def test_failed_hub_push_keeps_the_folder_and_says_how_to_retry(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(
        hub.uploads, "create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": f"u/{repo_id}"})()
    )

    def failing_upload(**kwargs):
        raise ConnectionError("Hub unreachable")

    monkeypatch.setattr(hub.uploads, "upload_folder", failing_upload)
    out = tmp_path / "tread-x"
    with pytest.raises(RuntimeError, match=r"Uploading .*tread-x to u/tread-x failed: Hub unreachable.*retry"):
        script.main([*TINY, f"--output_dir={out}", "--max_train_steps=1", "--validation_steps=100", "--push_to_hub"])
    assert (out / "model_index.json").exists() and (out / "transformer" / "config.json").exists()
    TreadDiTPipeline.from_pretrained(out)


# --- multi-process (gloo on CPU) ---------------------------------------------------------------------------------------


def launch_two(*args):
    """`accelerate launch` with 2 CPU processes (torch.distributed over gloo)."""
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
               "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}"]  # fmt: skip
    result = subprocess.run([*command, str(SCRIPT), *TINY, *args], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(folder):
    return [float(row[1]) for row in csv.reader((folder / "loss_history.csv").open())]


def test_two_processes_match_one_at_the_same_global_batch_and_checkpoints_move_between_them(
    tmp_path, accelerate_config
):
    steps = ["--max_train_steps=8", "--checkpointing_steps=4", "--validation_steps=100"]
    result = launch_two(f"--output_dir={tmp_path / 'two'}", "--train_batch_size=8", *steps)
    assert "Num processes: 2" in result.stderr
    launch(accelerate_config, f"--output_dir={tmp_path / 'one'}", "--train_batch_size=16", *steps)
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 8
    # Same 16 samples per step (accelerate shards each global batch); the noise differs per process, so the losses
    # agree statistically: the 8-step means within 10%.
    assert abs(sum(two) - sum(one)) / sum(one) < 0.10
    # only the main process writes: one loss line per step, one pipeline, a generator state per process
    checkpoint = tmp_path / "two" / "checkpoint-8"
    assert sorted(p.name for p in checkpoint.glob("train_rng_*.pt")) == ["train_rng_0.pt", "train_rng_1.pt"]
    assert len(list((tmp_path / "two").rglob("model_index.json"))) == 1

    # a 2-process checkpoint resumes on 1 process, and a 1-process checkpoint on 2
    launch(accelerate_config, f"--output_dir={tmp_path / 'two'}", "--train_batch_size=16", "--max_train_steps=10",
           "--checkpointing_steps=100", "--validation_steps=100", "--resume_from_checkpoint=latest")  # fmt: skip
    assert len(losses(tmp_path / "two")) == 10
    launch_two(f"--output_dir={tmp_path / 'one'}", "--train_batch_size=8", "--max_train_steps=10",
               "--checkpointing_steps=100", "--validation_steps=100", "--resume_from_checkpoint=latest")  # fmt: skip
    assert len(losses(tmp_path / "one")) == 10


def test_resume_cuts_the_loss_history_back_to_the_checkpoint_and_continues_its_clock(tmp_path):
    script = load_script()
    out = tmp_path / "out"
    common = [*TINY, f"--output_dir={out}", "--checkpointing_steps=2", "--validation_steps=100"]
    script.main([*common, "--max_train_steps=2"])
    history = out / "loss_history.csv"
    rows = list(csv.reader(history.open()))
    # a run killed after its checkpoint had written two more rows (steps 3, 4) that the resumed run redoes
    with history.open("a", newline="") as f:
        csv.writer(f).writerows([["3", "9.0", "1000.0"], ["4", "9.0", "1001.0"]])
    script.main([*common, "--max_train_steps=4", "--resume_from_checkpoint=checkpoint-2"])
    resumed = list(csv.reader(history.open()))
    assert [row[0] for row in resumed] == ["1", "2", "3", "4"] and resumed[:2] == rows
    assert "9.0" not in {row[1] for row in resumed}
    elapsed = [float(row[2]) for row in resumed]
    assert elapsed == sorted(elapsed) and elapsed[2] >= elapsed[1]  # the clock continues, it does not restart


def test_leftover_incomplete_checkpoints_are_removed_at_start_and_never_pushed(tmp_path):

    script = load_script()
    out = tmp_path / "out"
    (out / ".incomplete-checkpoint-7" / "transformer").mkdir(parents=True)  # a kill mid-save, without a limit
    # the preempted job is restarted as schedulers do, with --resume_from_checkpoint latest (no complete checkpoint)
    script.main([*TINY, f"--output_dir={out}", "--max_train_steps=1", "--validation_steps=100",
                 "--resume_from_checkpoint=latest"])  # fmt: skip
    assert not list(out.glob(".incomplete-checkpoint-*"))
    # and the one ignore list both training scripts push with never uploads one
    patterns = hub.HUB_IGNORE_PATTERNS
    assert any(fnmatch(".incomplete-checkpoint-7/optimizer.bin", pattern) for pattern in patterns)
    assert any(fnmatch("validation/step_0000010/0.png", pattern) for pattern in patterns)


# --- issue #14: reused folders, finished runs, failed uploads, two processes ------------------------------------------


def test_a_used_output_dir_is_refused_and_overwrite_clears_only_that_run(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "out"
    common = [*TINY, f"--output_dir={out}", "--validation_steps=100", "--checkpointing_steps=2"]
    script.main([*common, "--max_train_steps=4", "--checkpoints_total_limit=1"])
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(SystemExit) as exit_info:  # a second run would prune the first run's checkpoints and mix logs
        script.main([*common, "--max_train_steps=2"])
    assert exit_info.value.code == 2
    assert "already holds a training run (checkpoint-4" in capsys.readouterr().err
    assert (out / "checkpoint-4").is_dir()  # untouched
    script.main([*common, "--max_train_steps=2", "--overwrite_output_dir"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert len((out / "loss_history.csv").read_text().splitlines()) == 2 and (out / "notes.txt").is_file()


def test_resuming_a_finished_run_does_nothing_but_say_so(tmp_path, caplog):
    script = load_script()
    out = tmp_path / "out"
    common = [*TINY, f"--output_dir={out}", "--validation_steps=100", "--checkpointing_steps=2", "--max_train_steps=2"]
    script.main(common)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    caplog.set_level("INFO")
    script.main([*common, "--resume_from_checkpoint=latest"])
    assert "finished at step 2" in caplog.text and "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing written again
    # a longer budget continues it
    script.main([*common[:-1], "--max_train_steps=3", "--resume_from_checkpoint=latest"])
    assert len((out / "loss_history.csv").read_text().splitlines()) == 3
    assert json.loads((out / "training_complete.json").read_text())["step"] == 3


def test_a_failing_checkpoint_upload_never_stops_training_and_is_reported(tmp_path, monkeypatch, caplog):
    script = load_script()
    monkeypatch.setattr(
        hub.uploads, "create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": f"u/{repo_id}"})()
    )
    sent = []

    def upload_folder(**kwargs):  # checkpoint-1 never gets through; everything else does
        sent.append(kwargs.get("path_in_repo") or "final")
        future = Future()
        if kwargs.get("path_in_repo") == "checkpoint-1":
            future.set_exception(ConnectionError("Hub unreachable"))
        else:
            future.set_result(None)
        return future if kwargs.get("run_as_future") else future.result()

    monkeypatch.setattr(hub.uploads, "upload_folder", upload_folder)
    caplog.set_level("INFO")
    out = tmp_path / "run"
    script.main([*TINY, f"--output_dir={out}", "--max_train_steps=3", "--checkpointing_steps=1",
                 "--checkpoints_total_limit=1", "--validation_steps=100", "--push_to_hub", "--push_checkpoints"])  # fmt: skip
    assert sent.count("checkpoint-1") == 3 and sent[-1] == "final"  # tried 3 times, then the final push
    assert (
        "2 done (checkpoint-2, checkpoint-3); 1 failed (checkpoint-1: ConnectionError: Hub unreachable)" in caplog.text
    )
    assert (out / "model_index.json").is_file() and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]


# Runs the training script with a simulated Hub and, on one process, scripted faults: the processes are real
# (`accelerate launch`, gloo), only huggingface_hub's network calls and the chosen failure are replaced.
FAULTY_TRAINER = textwrap.dedent(
    """
    import json, os, sys
    from concurrent.futures import Future
    from pathlib import Path

    import torch

    from diffusers_tread import hub

    sys.path.insert(0, str(Path(sys.argv[1]).resolve().parents[1] / "tests"))
    from conftest import load_module

    train_tread = load_module(sys.argv[1])
    record = Path(os.environ["FAKE_HUB_LOG"])

    def upload_folder(**kwargs):
        with record.open("a") as f:
            f.write(json.dumps({"rank": int(os.environ["RANK"]), "path": kwargs.get("path_in_repo")}) + "\\n")
        future = Future()
        future.set_result(None)
        return future if kwargs.get("run_as_future") else None

    hub.uploads.upload_folder = upload_folder
    hub.uploads.create_repo = lambda repo_id, **kw: type("Repo", (), {"repo_id": f"user/{repo_id}"})()
    failing_step = os.environ.get("FAIL_SAVE_ON_RANK_1")
    if failing_step and os.environ["RANK"] == "1":  # (a PartialState here would be made before accelerate's CPU flag)
        original = torch.save

        def save(obj, path, *args, **kwargs):
            if f".incomplete-checkpoint-{failing_step}" in str(path):
                raise OSError(28, "No space left on device")
            return original(obj, path, *args, **kwargs)

        torch.save = save
    train_tread.main(sys.argv[2:])
    """
)


def launch_two_faulty(tmp_path, *args, env=None, check=True):
    wrapper = tmp_path / "faulty_trainer.py"
    wrapper.write_text(FAULTY_TRAINER)
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "FAKE_HUB_LOG": str(tmp_path / "hub.jsonl"), **(env or {})}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
               "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}"]  # fmt: skip
    result = subprocess.run([*command, str(wrapper), str(SCRIPT), *TINY, "--train_batch_size=8", *args], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "Num processes: 2" in result.stderr
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_processes_resume_bit_for_bit_and_push_checkpoints_from_the_main_process_only(tmp_path):
    common = ["--validation_steps=100", "--checkpointing_steps=2", "--routes=1:3:0.5"]
    launch_two_faulty(tmp_path, f"--output_dir={tmp_path / 'straight'}", "--max_train_steps=4", *common)
    launch_two_faulty(tmp_path, f"--output_dir={tmp_path / 'resumed'}", "--max_train_steps=2", *common,
                      "--push_to_hub", "--push_checkpoints", "--hub_model_id=user/resumed")  # fmt: skip
    launch_two_faulty(tmp_path, f"--output_dir={tmp_path / 'resumed'}", "--max_train_steps=4", *common,
                      "--resume_from_checkpoint=latest", "--push_to_hub", "--push_checkpoints",
                      "--hub_model_id=user/resumed")  # fmt: skip
    straight = checkpoint_state(tmp_path / "straight" / "checkpoint-4")
    resumed = checkpoint_state(tmp_path / "resumed" / "checkpoint-4")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    uploads = [json.loads(line) for line in (tmp_path / "hub.jsonl").read_text().splitlines()]
    assert {upload["rank"] for upload in uploads} == {0}  # only the main process talks to the Hub
    assert [upload["path"] for upload in uploads] == ["checkpoint-2", None, "checkpoint-4", None]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in /proc (Linux)")
def test_two_processes_stop_on_sigterm_with_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    wrapper = tmp_path / "faulty_trainer.py"
    wrapper.write_text(FAULTY_TRAINER)
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "FAKE_HUB_LOG": str(tmp_path / "hub.jsonl")}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
               "--dynamo_backend=no", f"--main_process_port={free_port()}", str(wrapper), str(SCRIPT), *TINY,
               "--train_batch_size=8", f"--output_dir={out}", "--max_train_steps=100000",
               "--checkpointing_steps=100000", "--validation_steps=100000", "--logging_steps=1"]  # fmt: skip
    log = (tmp_path / "stderr.log").open("w")
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log)
    history = out / "loss_history.csv"
    deadline = time.time() + 180
    while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 3):
        time.sleep(0.2)
    workers = children(process.pid)  # the training processes (the launcher's elastic agent has its own SIGTERM policy)
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker, signal.SIGTERM)
    process.wait(timeout=180)
    stderr = (tmp_path / "stderr.log").read_text()
    assert process.returncode == 0, stderr[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and sorted(p.name for p in checkpoints[0].glob("train_rng_*.pt")) == [
        "train_rng_0.pt",
        "train_rng_1.pt",
    ]
    assert "Stopped by signal" in stderr


def test_a_save_failure_on_one_process_ends_every_process_with_the_message(tmp_path):
    out = tmp_path / "out"
    result = launch_two_faulty(tmp_path, f"--output_dir={out}", "--max_train_steps=6", "--checkpointing_steps=2",
                               "--validation_steps=100", env={"FAIL_SAVE_ON_RANK_1": "4"}, check=False)  # fmt: skip
    assert result.returncode != 0
    assert (
        "Saving" in result.stderr
        and "checkpoint-4 failed" in result.stderr
        and "checkpoint-2) is intact" in result.stderr
    )
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]
    assert find_checkpoint(out, "latest") == str(out / "checkpoint-2")


def test_resumed_accelerator_state_is_unpickled_with_weights_only(tmp_path, monkeypatch, caplog):
    """setup.py's accelerate floor is the first release whose load_accelerator_state reads with weights_only=True
    (1.1.0; see the comment there), and the installed one refuses a code-running pickle in a checkpoint's RNG file."""
    import logging

    from accelerate import checkpointing
    from packaging.requirements import Requirement
    from unsafe_pickle import CodeRunningPayload

    (requirement,) = [
        Requirement(line.strip().strip('",'))
        for line in (REPO / "setup.py").read_text().splitlines()
        if line.strip().startswith('"accelerate')
    ]
    assert not requirement.specifier.contains("1.0.1") and requirement.specifier.contains("1.1.0")

    marker = tmp_path / "code-ran"
    torch.save({"random_state": CodeRunningPayload(marker)}, tmp_path / "random_states_0.pkl")
    # accelerate's logger needs an initialised state; a plain logger keeps this test free of that global
    monkeypatch.setattr(checkpointing, "logger", logging.getLogger("accelerate.checkpointing"))
    with caplog.at_level("INFO", logger="accelerate.checkpointing"):
        checkpointing.load_accelerator_state(
            tmp_path, models=[], optimizers=[], schedulers=[], dataloaders=[], process_index=0
        )
    assert not marker.exists() and "Could not load random states" in caplog.text


def test_data_and_hub_failures_end_with_a_message_not_a_traceback(tmp_path):
    """An empty dataset or an unreachable Hub: exit status 1 and the message, no traceback (TREAD_TRACEBACK=1 shows
    it), in both training scripts (they share `training_utils.main_with_messages`)."""
    (tmp_path / "empty").mkdir()
    cases = [
        [str(SCRIPT), f"--train_data_dir={tmp_path / 'empty'}", f"--output_dir={tmp_path / 'a'}"],
        [str(SCRIPT), *TINY, f"--output_dir={tmp_path / 'b'}", "--max_train_steps=1", "--push_to_hub"],  # offline
        [str(REPO / "training" / "train_tread_t2i_lora.py"), "--pretrained_model_name_or_path=/nonexistent/model",
         f"--train_data_dir={tmp_path / 'empty'}", f"--output_dir={tmp_path / 'c'}"],
    ]  # fmt: skip
    for case in cases:
        result = subprocess.run(
            [sys.executable, *case], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.rstrip().splitlines()[-2].startswith("error: "), result.stderr[-3000:]
    shown = subprocess.run([sys.executable, *cases[0]], env={**ENV, "TREAD_TRACEBACK": "1"}, cwd=REPO,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 1 and "Traceback" in shown.stderr


def test_a_checkpoint_that_cannot_be_resumed_ends_every_process_with_the_message(tmp_path):
    """The main process decides what to resume; its refusal reaches the other process instead of leaving it waiting."""
    result = launch_two_faulty(tmp_path, f"--output_dir={tmp_path / 'out'}", "--max_train_steps=2",
                               "--resume_from_checkpoint=checkpoint-9", check=False)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("checkpoint-9 is not a complete checkpoint") >= 2, result.stderr[-3000:]  # both ranks


# --- issue #21: one run per folder, checkpoints that hold what they need, abandoned timelines, torn logs -------------


def test_a_run_resumed_twice_at_once_is_refused_naming_the_running_one(tmp_path):
    """A re-queued job started while the first still runs used to append to the same loss_history.csv (steps
    1,2,1,2,3,4) and clean up the other's staging folder mid-save: the second is refused with the first's name."""
    out = tmp_path / "out"
    args = [*TINY, f"--output_dir={out}", "--max_train_steps=100000", "--checkpointing_steps=100000",
            "--validation_steps=100000"]  # fmt: skip
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=ENV, cwd=REPO, stdout=log, stderr=log)
    try:
        history = out / "loss_history.csv"
        deadline = time.time() + 120
        while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 2):
            time.sleep(0.2)
        second = subprocess.run([sys.executable, str(SCRIPT), *args, "--resume_from_checkpoint=latest"], env=ENV,
                                cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"is in use by another training run (process {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    steps = [int(row[0]) for row in csv.reader(history.open())]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows only


def test_push_refuses_an_interrupted_final_save_and_incomplete_checkpoints(tmp_path, monkeypatch):
    """A kill during a resumed run's final save leaves the old model_index.json beside `.incomplete-final/`, and the
    push uploaded `.incomplete-final/transformer/...` with it; an `.incomplete-checkpoint-N` was pushed as a pipeline.
    Both are refused with a message, and every staging folder is in the one ignore list."""
    from conftest import load_module

    script = load_script()
    out = tmp_path / "out"
    common = [*TINY, f"--output_dir={out}", "--validation_steps=100", "--checkpointing_steps=2"]
    script.main([*common, "--max_train_steps=2"])
    assert (out / "model_index.json").is_file()

    def killed(*args, **kwargs):  # the new weights are staged, then the process dies
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(script, "plot_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        script.main([*common, "--max_train_steps=4", "--resume_from_checkpoint=latest"])
    assert (out / "model_index.json").is_file() and (out / ".incomplete-final" / "transformer").is_dir()
    push = load_module(REPO / "training" / "push_to_hub.py")
    with pytest.raises(ValueError, match=r"holds \.incomplete-final/, left by a final save that was interrupted"):
        push.main([str(out), "--hub_model_id=u/m", f"--save_to={tmp_path / 'hub'}"])
    assert not (tmp_path / "hub").exists()
    assert any(fnmatch(".incomplete-final/transformer/config.json", p) for p in hub.HUB_IGNORE_PATTERNS)

    (out / "checkpoint-4").rename(out / ".incomplete-checkpoint-4")
    (out / ".incomplete-checkpoint-4" / "checkpoint_complete.json").unlink()  # as a kill mid-save leaves it
    with pytest.raises(ValueError, match="checkpoint whose save was interrupted"):
        push.main([str(out / ".incomplete-checkpoint-4"), "--hub_model_id=u/m", f"--save_to={tmp_path / 'hub'}"])
    (out / "checkpoint-2" / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match="checkpoint-2 is not a complete checkpoint"):
        push.main([str(out / "checkpoint-2"), "--hub_model_id=u/m", f"--save_to={tmp_path / 'hub'}"])
    assert not (tmp_path / "hub").exists()


def test_resuming_an_older_checkpoint_sets_the_abandoned_timeline_aside(tmp_path, caplog):
    """Resuming an explicit older checkpoint left the newer ones in place, so `latest` after a later crash resumed the
    abandoned run: they are moved into abandoned/ (said in the log), with the finished outputs of that run."""
    script = load_script()
    out = tmp_path / "out"
    common = [*TINY, f"--output_dir={out}", "--validation_steps=100", "--checkpointing_steps=2"]
    script.main([*common, "--max_train_steps=4"])  # checkpoint-2, checkpoint-4, finished at 4
    caplog.set_level("WARNING")
    script.main([*common, "--max_train_steps=3", "--resume_from_checkpoint=checkpoint-2"])  # back to step 2
    assert find_checkpoint(out, "latest") == str(out / "checkpoint-3")  # never the abandoned checkpoint-4
    (aside,) = (out / "abandoned").iterdir()
    assert aside.name.startswith("after-checkpoint-2-") and f"to {aside}" in caplog.text
    assert sorted(p.name for p in aside.glob("checkpoint-*")) == ["checkpoint-4"]
    assert json.loads((aside / "training_complete.json").read_text())["step"] == 4
    assert [row[0] for row in csv.reader((aside / "loss_history.csv").open())] == ["1", "2", "3", "4"]
    assert [row[0] for row in csv.reader((out / "loss_history.csv").open())] == ["1", "2", "3"]
    assert json.loads((out / "training_complete.json").read_text())["step"] == 3
    TreadDiTPipeline.from_pretrained(out)  # the new run's outputs
    assert any(fnmatch(f"abandoned/{aside.name}/checkpoint-4/optimizer.bin", p) for p in hub.HUB_IGNORE_PATTERNS)


def test_a_torn_loss_history_does_not_block_the_resume(tmp_path, caplog):
    script = load_script()
    out = tmp_path / "out"
    common = [*TINY, f"--output_dir={out}", "--validation_steps=100", "--checkpointing_steps=2"]
    script.main([*common, "--max_train_steps=2"])
    with (out / "loss_history.csv").open("ab") as f:  # a power loss while step 3's row was being written
        f.write(b"3,0.4" + b"\0" * 512)
    caplog.set_level("WARNING")
    script.main([*common, "--max_train_steps=3", "--resume_from_checkpoint=latest"])
    assert "dropped 1 torn or unreadable line(s)" in caplog.text
    assert [row[0] for row in csv.reader((out / "loss_history.csv").open())] == ["1", "2", "3"]


def test_a_resume_refuses_settings_that_break_the_run_and_records_the_legitimate_changes(tmp_path, caplog):
    """`--objective edm` on a flow checkpoint continued silently (4 flow steps, 2 EDM steps, an EDM scheduler saved);
    another --train_batch_size skipped batches at the new size; another --model_config printed a state-dict dump; a
    LoRA run resumed without --lora_rank said it could not connect to the Hub. Each breaking change is one line
    naming the old and new value; routes and learning rate may change, logged and recorded in the card."""
    script = load_script()
    out = tmp_path / "out"
    common = [*TINY, f"--output_dir={out}", "--validation_steps=100", "--checkpointing_steps=2"]
    script.main([*common, "--max_train_steps=2"])
    resume = [*common, "--max_train_steps=4", "--resume_from_checkpoint=latest"]
    config = json.loads((out / "checkpoint-2" / "transformer" / "config.json").read_text())
    other_config = tmp_path / "other.json"
    other_config.write_text(json.dumps({**config, "num_layers": config["num_layers"] + 2}))
    for option, expected in (
        ("--objective=edm", "its --objective was flow; this run has edm"),
        ("--train_batch_size=8", "its global batch (--train_batch_size x processes x --gradient_accumulation_steps) "
                                 "was 16; this run has 8"),
        (f"--model_config={other_config}", f"this run has {other_config}"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as error:
            script.main([*resume, option])
        message = str(error.value)
        assert expected in message and "\n" not in message and "size mismatch" not in message, message
    assert len((out / "loss_history.csv").read_text().splitlines()) == 2  # nothing trained
    caplog.set_level("WARNING")
    script.main([*resume, "--routes=1:3:0.25", "--learning_rate=1e-4"])
    assert "--routes" in caplog.text and "--learning_rate 0.0005 -> 0.0001" in caplog.text
    card = (out / "README.md").read_text()
    assert "# resumed with a changed setting: step 2: --learning_rate 0.0005 -> 0.0001" in card
    saved = json.loads((out / "checkpoint-4" / "run_settings.json").read_text())
    assert saved["fixed"]["--objective"] == "flow" and len(saved["changes"]) == 3  # routes, rate, steps

    # a LoRA run resumed without --lora_rank: one line, with or without recorded settings, never the Hub
    lora = tmp_path / "lora"
    lora_args = [*TINY, f"--output_dir={lora}", "--validation_steps=100", "--checkpointing_steps=2",
                 f"--pretrained_model_name_or_path={out}", "--max_train_steps=2"]  # fmt: skip
    script.main([*lora_args, "--lora_rank=4"])
    with pytest.raises(ValueError, match="its --lora_rank was 4; this run has None"):
        script.main([*lora_args[:-1], "--max_train_steps=4", "--resume_from_checkpoint=latest"])
    checkpoint = lora / "checkpoint-2"
    (checkpoint / "run_settings.json").unlink()  # as a checkpoint of an earlier version
    marker = json.loads((checkpoint / "checkpoint_complete.json").read_text())
    marker["files"].pop("run_settings.json")
    marker["required"].remove("run_settings.json")
    (checkpoint / "checkpoint_complete.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="it is a LoRA run's checkpoint, resume it with its --lora_rank") as error:
        script.main([*lora_args[:-1], "--max_train_steps=4", "--resume_from_checkpoint=latest"])
    assert "connect" not in str(error.value)
