"""Sharded training (FSDP2, PyTorch's ``fully_shard``) on 2 CPU processes over gloo: a routed TREAD step gives the
unsharded model's loss and gradients, and the full-weight save and load paths (`diffusers_tread.sharding`) write and
read whole, loadable Diffusers folders from sharded parameters (the README's FSDP recipe, ``FULL_STATE_DICT``).

The 2 processes run tests/fsdp_worker.py once per session (a few seconds); each test checks one of its findings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_worker.py")
WORLD_SIZE = 2
# fp32 on the CPU: the sharded step runs the same kernels on all-gathered (exact) weights; only the gradient
# reduce-scatter sums in another order than the reference's accumulation, hence a tolerance and not bit-exactness.
TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": str(WORLD_SIZE), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("the FSDP worker processes did not finish in 240 s")
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_parameters_are_sharded(ranks):
    for result in ranks:
        assert result["sharded"]
        assert result["dtensor_parameters"] == result["parameters"]


def test_routing_runs_under_fully_shard(ranks):
    # CONFIG's route keeps half of the 16 tokens of each of the 4 samples: 8 bypassed per sample.
    for result in ranks:
        assert result["route_masks"] == [4 * 8]
        assert result["routed_forward_error"] <= TOLERANCE


def test_sharded_step_matches_unsharded_loss_and_gradients(ranks):
    for result in ranks:
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["grad_scale"] > 1e-3  # the gradients compared are not all zero
        assert result["grad_error"] <= TOLERANCE * max(1.0, result["grad_scale"])


def test_shared_conditioning_layout_matches_too(ranks):
    for result in ranks:
        assert result["shared_grad_error"] <= TOLERANCE * max(1.0, result["grad_scale"])


def test_sharding_blocks_alone_breaks_diffusers_layout(ranks):
    # Why FSDP_WRAP_CLASSES names the embedders: the final layer calls block 0's embedder outside block 0's forward.
    for result in ranks:
        assert "mixed torch.Tensor and DTensor" in result["blocks_only_error"]


def test_full_state_dict_is_gathered_on_the_main_process(ranks):
    assert ranks[0]["state_error"] <= TOLERANCE
    assert ranks[1]["empty_elsewhere"]


def test_sharded_ema_gathers_to_the_unsharded_ema(ranks):
    assert ranks[0]["ema_error"] <= TOLERANCE


def test_saved_folder_loads_as_the_full_model(ranks):
    for result in ranks:
        assert result["saved_class"] == "TreadTransformer2DModel"  # not FSDP2's FSDPTreadTransformer2DModel
        assert result["saved_routes"] == [{"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}]
        assert result["loaded_error"] <= TOLERANCE


def test_full_state_dict_loads_into_a_sharded_model(ranks):
    for result in ranks:
        assert result["reloaded_error"] <= TOLERANCE
