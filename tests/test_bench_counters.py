"""bench/throughput.py's saved-activation counter (also used by bench/memory.py): exact, and it frees what it counts."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, load_module
from torch import nn


def load_throughput():
    return load_module(REPO / "bench" / "throughput.py")


class ScaledExp(nn.Module):
    """y = exp(x * scale): autograd saves x (for the scale's gradient) and the output y (exp's own gradient)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.output = None

    def forward(self, latents, timestep=None, class_labels=None):
        y = (latents * self.scale).exp()
        self.output = weakref.ref(y)
        return SimpleNamespace(sample=y)


def test_counter_counts_each_saved_storage_once_and_keeps_nothing_alive():
    throughput = load_throughput()
    model = ScaledExp()
    latents = torch.randn(2, 3)
    batch = (latents, None, torch.zeros(2), torch.zeros(2))
    assert throughput.saved_activation_bytes(model, batch) == 2 * latents.nbytes  # x and y; the weight is skipped
    gc.collect()
    # exp's saved output must not outlive the pass: handing it back to autograd as itself made a reference cycle
    # (output -> its node -> the saved output) that leaked every counted activation.
    assert model.output() is None


def test_throughput_runs_the_state_space_arms():
    """bench/throughput.py --model_type ssm (it replaced bench/ssm_throughput.py): dense and routed TreadSSM2DModel
    with the same weights, a plain MSE + AdamW step, the routed one cheaper in FLOPs."""
    throughput = load_throughput()
    assert not (REPO / "bench" / "ssm_throughput.py").exists()
    args = SimpleNamespace(
        model_type="ssm", in_channels=1, sample_size=16, patch_size=2, batch_size=2, precision="fp32", mode="eager",
        warmup=0, repeats=1, peak_tflops=None, profile=False,
    )  # fmt: skip
    routes = throughput.paper_routes(throughput.SSM_PRESETS["SSM-Tiny/2"]["num_layers"])
    arms = throughput.build_ssm_arms("SSM-Tiny/2", routes, args, torch.device("cpu"))
    dense, routed = arms["dense"].model, arms["routed"].model
    assert type(dense).__name__ == "TreadSSM2DModel" and not dense.config.routes and routed.config.routes == routes
    assert all(
        torch.equal(a, b) for a, b in zip(dense.state_dict().values(), routed.state_dict().values(), strict=True)
    )
    result = throughput.bench_model("SSM-Tiny/2", routes, args, torch.device("cpu"), None)
    assert set(result["arms"]) == {"dense", "routed"} and result["tokens"] == 64
    assert result["parameters_m"] == pytest.approx(0.82, abs=0.01)
    assert result["flop_ratio"] == pytest.approx(0.816, abs=0.001)  # BENCHMARKS.md's SSM-Tiny/2, 64 tokens
