"""The suite does not depend on the working directory: it passes next to a finished quick-start run (issue #22)."""

import json
import os
import subprocess
import sys

from conftest import REPO

# Tests that parse the training script's default arguments, i.e. a relative ``--output_dir tread-digits``.
DEFAULT_OUTPUT_DIR_TESTS = [
    "tests/test_ssm_tread.py::test_training_arguments_for_the_ssm",
    "tests/test_train_tread.py::test_latents_options_the_extraction_did_not_store_are_refused",
]


def test_suite_passes_next_to_a_finished_quick_start_folder(tmp_path):
    # What `accelerate launch training/train_tread.py` leaves in the folder it ran in: a finished run that the
    # used-folder check refuses to train into again.
    run = tmp_path / "tread-digits"
    run.mkdir()
    (run / "model_index.json").write_text(json.dumps({"_class_name": "TreadDiTPipeline"}))
    (run / "training_complete.json").write_text(json.dumps({"global_step": 3000}))
    (run / "loss_history.csv").write_text("step,loss,elapsed_s\n1,1.0,0.1\n")
    tests = [str(REPO / test) for test in DEFAULT_OUTPUT_DIR_TESTS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO), *tests]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
    assert sorted(p.name for p in run.iterdir()) == ["loss_history.csv", "model_index.json", "training_complete.json"]
