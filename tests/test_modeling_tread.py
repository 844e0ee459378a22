"""What both TREAD backbones share (`TreadRoutingMixin`: presets, routes in the config, switching routing on and off)
and `model_class_for_config`, which picks the class that loads a checkpoint."""

import json
import re

import pytest
import torch
from diffusers import DiTTransformer2DModel

from diffusers_tread import (
    TreadSSM2DModel,
    TreadTransformer2DModel,
    model_class_for_config,
    paper_routes,
    routing,
)
from diffusers_tread.models import TreadRoutingMixin

SMALL = dict(in_channels=1, sample_size=8, num_embeds_ada_norm=4)
MODELS = [(TreadTransformer2DModel, "DiT-Tiny/2"), (TreadSSM2DModel, "SSM-Tiny/2")]
ROUTE = {"start_layer_idx": 1, "end_layer_idx": -3, "selection_ratio": 0.25}


def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([3, 500]), torch.tensor([0, 3])


@pytest.mark.parametrize("model_cls, preset", MODELS, ids=["dit", "ssm"])
def test_both_models_share_presets_and_routing_switches(model_cls, preset):
    assert issubclass(model_cls, TreadRoutingMixin) and preset in model_cls.presets
    for name in ("from_preset", "disable_routing", "enable_routing", "_register_routes", "_routes_for_call"):
        assert getattr(model_cls, name).__qualname__ == f"TreadRoutingMixin.{name}"

    model = model_cls.from_preset(preset, **SMALL)
    num_layers = model.config.num_layers
    assert model.config.routes == paper_routes(num_layers) and model.config.in_channels == 1
    assert {key: model.config[key] for key in model_cls.preset_defaults if key not in SMALL} == {
        key: value for key, value in model_cls.preset_defaults.items() if key not in SMALL
    }
    x, t, y = inputs()
    model.train()
    assert len(model(x, t, y).route_masks) == 1
    model.disable_routing()
    assert model(x, t, y).route_masks is None and model.config.routes == paper_routes(num_layers)
    assert model(x, t, y, force_routing=True).route_masks is not None
    model.enable_routing()
    assert model(x, t, y).route_masks is not None
    assert model.eval()(x, t, y).route_masks is None

    # routes: None and [] are dense, an explicit list is stored resolved
    assert model_cls.from_preset(preset, routes=None, **SMALL).config.routes == []
    assert model_cls.from_preset(preset, routes=[], **SMALL).config.routes == []
    explicit = model_cls.from_preset(preset, routes=[ROUTE], **SMALL)
    assert explicit.config.routes == [{**ROUTE, "end_layer_idx": num_layers - 3}]


@pytest.mark.parametrize("model_cls, preset", MODELS, ids=["dit", "ssm"])
def test_both_models_reject_bad_presets_and_routes_alike(model_cls, preset):
    with pytest.raises(ValueError, match=rf"Unknown preset 'XXL/2'; choose one of .*{preset}"):
        model_cls.from_preset("XXL/2")
    with pytest.raises(ValueError, match="routes must be 'paper', a list of route dicts or None, got 'default'"):
        model_cls.from_preset(preset, routes="default", **SMALL)
    with pytest.raises(ValueError, match="outside the model's layers"):
        model_cls.from_preset(preset, routes=[{**ROUTE, "end_layer_idx": 99}], **SMALL)
    with pytest.raises(ValueError, match="route_reinsertion must be one of"):
        model_cls.from_preset(preset, route_reinsertion="after", **SMALL)
    # the constructor takes route lists only (config.json always holds the resolved list)
    with pytest.raises(ValueError, match="routes must be a list of route dicts"):
        model_cls.from_config({**model_cls.presets[preset], **SMALL, "routes": "paper"})


@pytest.mark.parametrize("model_cls, preset", MODELS, ids=["dit", "ssm"])
def test_loading_overrides_routes_and_starts_with_routing_on(model_cls, preset, tmp_path):
    model = model_cls.from_preset(preset, **SMALL)
    model.disable_routing()
    model.save_pretrained(tmp_path)
    assert model_cls.from_pretrained(tmp_path).config.routes == model.config.routes
    loaded = model_cls.from_pretrained(tmp_path, routes=[ROUTE], route_reinsertion="pre_route_plus_input")
    assert loaded.config.routes == [{**ROUTE, "end_layer_idx": model.config.num_layers - 3}]
    assert loaded.config.route_reinsertion == "pre_route_plus_input" and loaded.routing_enabled
    assert model_cls.from_pretrained(tmp_path, routes=[]).config.routes == []
    with pytest.raises(ValueError, match="outside the model's layers"):
        model_cls.from_pretrained(tmp_path, routes=[{**ROUTE, "start_layer_idx": 99}])


def test_resolve_routes():
    assert routing.resolve_routes("paper", 12) == paper_routes(12)
    assert routing.resolve_routes(None, 12) == [] and routing.resolve_routes([], 12) == []
    assert routing.resolve_routes([ROUTE], 12) == [{**ROUTE, "end_layer_idx": 9}]
    with pytest.raises(ValueError, match="routes must be 'paper'"):
        routing.resolve_routes("Paper", 12)
    with pytest.raises(ValueError, match="start <= end"):
        routing.resolve_routes("paper", 4)  # too shallow for the paper's route (2 .. depth-4)


def test_model_class_for_config_from_configs_and_folders(tmp_path):
    dit = TreadTransformer2DModel.from_preset("DiT-Tiny/2", **SMALL)
    ssm = TreadSSM2DModel.from_preset("SSM-Tiny/2", **SMALL)
    stock = dit.to_dit()
    assert type(stock) is DiTTransformer2DModel
    for model, expected in ((dit, TreadTransformer2DModel), (ssm, TreadSSM2DModel), (stock, TreadTransformer2DModel)):
        assert model_class_for_config(json.loads(model.to_json_string())) is expected
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder / "transformer")
        assert model_class_for_config(folder / "transformer") is expected
        assert model_class_for_config(str(folder / "transformer" / "config.json")) is expected
        assert model_class_for_config(folder, subfolder="transformer") is expected
    assert (
        model_class_for_config(tmp_path / "DiTTransformer2DModel" / "transformer")
        .from_pretrained(tmp_path / "DiTTransformer2DModel" / "transformer")
        .config.routes
        == []
    )


def test_model_class_for_config_names_what_it_found_and_what_it_supports(tmp_path):
    supported = "DiTTransformer2DModel, TreadSSM2DModel, TreadTransformer2DModel"
    with pytest.raises(ValueError, match=rf"_class_name 'UNet2DModel'; diffusers_tread loads the classes {supported}"):
        model_class_for_config({"_class_name": "UNet2DModel", "sample_size": 32})
    with pytest.raises(ValueError, match="_class_name None"):
        model_class_for_config({"num_layers": 12})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ValueError, match=re.escape(f"config in {tmp_path} has _class_name 'FluxTransformer2DModel'")):
        model_class_for_config(tmp_path)
