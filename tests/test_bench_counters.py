"""bench/throughput.py's saved-activation counter (also used by bench/memory.py): exact, and it frees what it counts."""

import gc
import importlib.util
import weakref
from types import SimpleNamespace

import torch
from conftest import REPO
from torch import nn


def load_throughput():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
