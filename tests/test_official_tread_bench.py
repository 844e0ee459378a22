"""bench/official_tread.py without the official checkout: the torchvision stand-in, loading a dit.py from a folder
(a stand-in checkout written here), the ATen op counter and the EDM step on a tiny model."""

import collections
import importlib.util
import sys

import pytest
import torch
from conftest import REPO, load_module
from torch import nn


@pytest.fixture(scope="module")
def bench():
    return load_module(REPO / "bench" / "official_tread.py")


def _torchvision_modules():
    return [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]


def test_torchvision_stub_serves_placeholders_and_restores_state(bench, monkeypatch):
    for name in _torchvision_modules():  # a real torchvision, if loaded, comes back after the test
        monkeypatch.delitem(sys.modules, name)
    meta_path = list(sys.meta_path)
    missing_before = importlib.util.find_spec("torchvision") is None
    with bench.torchvision_stub():
        import torchvision.transforms as transforms
        from torchvision.ops.misc import FrozenBatchNorm2d

        transforms.Compose([transforms.ToTensor()])(object())  # constructible, callable
        assert isinstance(FrozenBatchNorm2d, type) and not isinstance(object(), FrozenBatchNorm2d)

        class Sub(FrozenBatchNorm2d):  # usable as a base class, as timm's norm layers do
            pass

        assert Sub().anything.at.all is not None
        with pytest.raises(AttributeError):
            getattr(transforms, "__version__")  # noqa: B009  dunders stay missing: introspection is not fooled
    assert sys.meta_path == meta_path
    assert _torchvision_modules() == []
    assert (importlib.util.find_spec("torchvision") is None) == missing_before


def test_torchvision_stub_sets_aside_and_restores_loaded_modules(bench, monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "torchvision.half_imported", sentinel)
    with bench.torchvision_stub():
        assert "torchvision.half_imported" not in sys.modules
    assert sys.modules["torchvision.half_imported"] is sentinel


STAND_IN_DIT = """
import torch
import torchvision.ops.misc  # served by the stand-in where torchvision does not import

from routing_module import Router


class TransformerBlock(torch.nn.Module):
    @torch.compile
    def forward(self, x):
        return x + 1


class FinalLayer(torch.nn.Module):
    @torch.compile
    def forward(self, x):
        return x * 2


DiT_models = {}
"""


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "dit.py").write_text(STAND_IN_DIT)
    (tmp_path / "routing_module.py").write_text("class Router:\n    pass\n")
    return tmp_path


@pytest.mark.parametrize("eager", [True, False])
def test_load_official_dit_eager_unwraps_compile_and_restores_sys(bench, checkout, monkeypatch, eager):
    previous_router = object()
    monkeypatch.setitem(sys.modules, "routing_module", previous_router)
    path = list(sys.path)
    module = bench.load_official_dit(checkout, eager=eager)
    assert sys.path == path
    assert sys.modules["routing_module"] is previous_router
    for cls in (module.TransformerBlock, module.FinalLayer):
        assert hasattr(cls.forward, "_torchdynamo_orig_callable") is not eager
    if eager:
        assert module.FinalLayer()(module.TransformerBlock()(torch.zeros(2))).tolist() == [2.0, 2.0]


def test_load_official_dit_rejects_a_folder_that_is_not_a_checkout(bench, tmp_path):
    with pytest.raises(FileNotFoundError):
        bench.load_official_dit(tmp_path)


def test_count_aten_ops(bench):
    a, b = torch.randn(2, 3), torch.randn(3, 4)
    assert bench.count_aten_ops(lambda: torch.mm(a, b)) == collections.Counter({"aten.mm": 1})
    w = torch.randn(3, 4, requires_grad=True)
    counts = bench.count_aten_ops(lambda: torch.mm(a, w).sum().backward())
    assert counts["aten.mm"] == 2  # forward, and the weight's gradient (a needs none)
    assert counts["aten.sum"] == 1


def test_edm_sigma_is_the_official_log_normal(bench):
    timestep = torch.arange(1000)
    batch = (torch.zeros(1000, 4, 2, 2), torch.randn(1000, 8, 2, 2), timestep, torch.zeros(1000, dtype=torch.long))
    sigma, noise = bench.edm_sigma_and_noise(batch)
    log_sigma = sigma.flatten().log()
    assert log_sigma.mean().item() == pytest.approx(bench.EDM_P_MEAN, abs=1e-4)
    assert log_sigma.std().item() == pytest.approx(bench.EDM_P_STD, rel=0.02)
    assert torch.equal(noise, batch[1][:, :4])


class Tiny(nn.Module):
    """Official call signature ``(x, t, y, class_drop_prob=...)``; a 1x1 convolution."""

    in_channels = 4

    def __init__(self, out_channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(4, out_channels, 1)

    def forward(self, x, t, y, class_drop_prob=0.0):
        return self.conv(x)


def _batch(batch_size=3):
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch_size, 4, 4, 4, generator=generator),
        torch.randn(batch_size, 8, 4, 4, generator=generator),
        torch.randint(0, 1000, (batch_size,), generator=generator),
        torch.randint(0, 1000, (batch_size,), generator=generator),
    )


def test_edm_loss_matches_the_edm_formulas_for_a_zero_network(bench):
    model = Tiny()
    nn.init.zeros_(model.conv.weight)
    nn.init.zeros_(model.conv.bias)
    batch = _batch()
    latents = batch[0]
    sigma, noise = bench.edm_sigma_and_noise(batch)
    noisy = latents + sigma * noise
    sd = bench.EDM_SIGMA_DATA
    denoised = sd**2 / (sigma**2 + sd**2) * noisy  # F = 0: only the skip connection
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    expected = (weight * (denoised - latents) ** 2).mean()
    torch.testing.assert_close(bench.edm_loss(model, batch), expected)


@pytest.mark.parametrize("loss", ["edm", "mse"])
@pytest.mark.parametrize("out_channels", [4, 8])
def test_official_train_step_updates_the_model(bench, loss, out_channels):
    torch.manual_seed(0)
    model = Tiny(out_channels)
    optimizer = bench.official_optimizer(model)
    assert optimizer.defaults["weight_decay"] == 0.0 and optimizer.defaults["lr"] == 1e-4
    before = model.conv.weight.detach().clone()
    value = bench.official_train_step(model, optimizer, _batch(), loss)
    assert value.ndim == 0 and torch.isfinite(value) and not value.requires_grad
    assert not torch.equal(model.conv.weight, before)


def test_parse_routes(bench):
    assert bench.parse_routes("paper", 12) == [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 8}]
    assert bench.parse_routes("1:3:0.25,5:7:0.5", 12)[1] == {
        "selection_ratio": 0.5,
        "start_layer_idx": 5,
        "end_layer_idx": 7,
    }
