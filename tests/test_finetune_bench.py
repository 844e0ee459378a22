"""bench/finetune.py: the --quick run's outputs, and what its LoRA and full arms train."""

import json
import math
import sys

import pytest
import torch
from conftest import REPO, load_module


@pytest.fixture(scope="module")
def finetune():
    module = load_module(REPO / "bench" / "finetune.py", register=True)  # dataclasses look their module up
    yield module
    del sys.modules["finetune"]


def test_quick_run_writes_every_arm_and_its_comparison(finetune, tmp_path):
    results = finetune.main(["--quick", f"--output_dir={tmp_path}"])
    names = [arm["name"] for arm in results["arms"]]
    assert names == [
        f"s0/{mode}/{method}" for mode in ("full", "lora") for method in ("dense", "routed@0.25", "routed@0.5")
    ]
    assert set(results["bases"]) == {"0"}
    base = results["bases"]["0"]
    for task in ("source", "target"):
        assert math.isfinite(base[task]["fd"]) and 0 <= base[task]["accuracy"] <= 1
    for arm in results["arms"]:
        steps = [record["step"] for record in arm["evals"]]
        assert steps == ([0, 5, 10] if arm["ratio"] == 0 else [0, 5, 10, 14])  # routed arms run 1.4x the dense steps
        assert arm["evals"][0]["fd"] == base["target"]["fd"]  # step 0 is the base model on the target
        for record in arm["evals"]:
            assert math.isfinite(record["fd"]) and record["fd"] > 0 and 0 <= record["accuracy"] <= 1
        assert arm["evals"][-1]["held_out_loss"] < arm["evals"][0]["held_out_loss"]  # it learns the target
    full = {arm["trainable_parameters"] for arm in results["arms"] if arm["mode"] == "full"}
    lora = {arm["trainable_parameters"] for arm in results["arms"] if arm["mode"] == "lora"}
    assert len(full) == len(lora) == 1 and lora.pop() < full.pop() / 5
    rows = results["comparisons"]
    assert [row["arm"] for row in rows] == names
    for row in rows:
        if row["method"] == "dense":
            assert row["step_time_ratio"] == 1.0 and row["steps_to_dense_fd"] <= row["dense_steps"]
    assert json.loads((tmp_path / "results.json").read_text())["comparisons"] == rows
    report = (tmp_path / "results.md").read_text()
    assert "| seed | mode | method |" in report and "Mean over seeds" in report


def base_key(name: str, state: dict) -> str:
    """Where a base weight lives in a model with peft adapters: an adapted Linear keeps it as ``<module>.base_layer.*``."""
    if name in state:
        return name
    module, _, leaf = name.rpartition(".")
    return f"{module}.base_layer.{leaf}"


def test_lora_arms_change_only_adapter_weights_and_full_arms_change_all(finetune):
    """A routed LoRA arm trains its adapters (on the attention projections) and leaves every base weight bit for bit
    as it was; a routed full arm changes (nearly) every weight. Both start from the same base state dict."""
    args = finetune.parse_args(["--quick"])
    judge = finetune.make_digits_judge(1)
    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in finetune.build_model(args, []).state_dict().items()}
    x, y = -judge.train_x, judge.train_y

    lora = finetune.start_run(finetune.FinetuneArm(0, "lora", 0.5, 3), base_state, args, data_seed=100)
    adapters = {name: p.detach().clone() for name, p in lora.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    adapted = {name.split(".lora_")[0] for name in adapters}
    assert {target for target in finetune.LORA_TARGETS for module in adapted if module.endswith("." + target)} == set(
        finetune.LORA_TARGETS
    )
    assert len(adapted) == len(finetune.LORA_TARGETS) * args.num_layers
    finetune.train_steps(lora, x, y, 3, batch_size=8)
    state = lora.model.state_dict()
    for name, value in base_state.items():
        assert torch.equal(state[base_key(name, state)], value), name
    assert all(not torch.equal(lora.model.get_parameter(name), value) for name, value in adapters.items())

    full = finetune.start_run(finetune.FinetuneArm(0, "full", 0.5, 3), base_state, args, data_seed=100)
    finetune.train_steps(full, x, y, 3, batch_size=8)
    state = full.model.state_dict()
    changed = [name for name, value in base_state.items() if not torch.equal(state[name], value)]
    assert len(changed) > 0.9 * len(base_state)
