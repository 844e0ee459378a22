"""Sharded training (FSDP2, PyTorch's ``fully_shard``) on 2 CPU processes over gloo: a routed TREAD step gives the
unsharded model's loss and gradients, and the full-weight save and load paths (`diffusers_tread.sharding`) write and
read whole, loadable Diffusers folders from sharded parameters (the README's FSDP recipe, ``FULL_STATE_DICT``).

The training script's checkpoint hooks, resume and final save run on the sharded model too (accelerate's FSDP does not
engage on CPU, so the worker calls the hooks as ``save_state``/``load_state`` would). The 2 processes run
tests/fsdp_worker.py once per module (10-60 s on the shared 2-core VM, by its load); each test checks one finding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

WORKER = Path(__file__).with_name("fsdp_worker.py")
WORLD_SIZE = 2
# fp32 on the CPU: the sharded step runs the same kernels on all-gathered (exact) weights; only the gradient
# reduce-scatter sums in another order than the reference's accumulation, hence a tolerance and not bit-exactness.
TOLERANCE = 1e-6


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


def test_bf16_mixed_precision_step_routes_and_saves_fp32(ranks):
    for result in ranks:
        assert result["bf16_loss_rel_error"] < 1e-2  # bf16 weights in the step: 4e-4 when written
        assert result["bf16_grads_finite"]
    assert ranks[0]["bf16_saved_dtypes"] == ["torch.float32"]  # the master weights, not the bf16 copies


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


def test_script_checkpoint_writes_full_weights_and_ema(ranks):
    for result in ranks:
        assert result["ema_sharded"]  # by prepare_optimization, after (accelerate's) sharding
        assert result["checkpoint_error"] <= TOLERANCE
        assert result["checkpoint_ema_error"] <= TOLERANCE
        assert result["checkpoint_ema_step"] == 1


def test_script_refuses_lora_with_fsdp(ranks):
    for result in ranks:
        assert "--lora_rank with FSDP is not supported" in result["lora_refused"]


def test_script_resume_loads_full_weights_into_shards(ranks):
    assert ranks[0]["resumed_error"] <= TOLERANCE
    assert ranks[0]["resumed_ema_error"] <= TOLERANCE
    for result in ranks:
        assert result["resumed_ema_step"] == 1


def test_script_final_pipeline_holds_the_full_ema_weights(ranks):
    for result in ranks:
        assert result["final_is_ordinary"]
        assert result["final_error"] <= TOLERANCE
        assert result["final_grid"]


def test_readme_wrap_classes_are_what_accelerate_finds():
    # accelerate's TRANSFORMER_BASED_WRAP looks classes up by name: the README's --fsdp_transformer_layer_cls_to_wrap
    # must name classes the model instantiates (its old BasicTransformerBlock did not: the blocks are TreadDiTBlock).
    from accelerate.utils.dataclasses import get_module_class_from_name

    from diffusers_tread import TreadTransformer2DModel
    from diffusers_tread.sharding import FSDP_WRAP_CLASSES

    model = TreadTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"--fsdp_transformer_layer_cls_to_wrap {','.join(FSDP_WRAP_CLASSES)}" in readme
    for name in FSDP_WRAP_CLASSES:
        assert get_module_class_from_name(model, name) is not None
    assert get_module_class_from_name(model, "BasicTransformerBlock") is None
