from __future__ import annotations

import os
from collections.abc import Mapping

from ..routing import paper_routes
from .modeling_tread import TreadRoutingMixin
from .router import TreadRouter, apply_tread
from .ssm_tread import SSM_PRESETS, TreadSSM2DModel
from .transformer_tread import (
    PRESETS,
    TreadTransformer2DModel,
    TreadTransformer2DModelOutput,
)

# The class that loads a checkpoint, by its config's `_class_name`; a stock Diffusers DiT loads as a TREAD DiT (the
# same weights, see `TreadTransformer2DModel.from_dit`).
_MODEL_CLASSES = {
    "TreadTransformer2DModel": TreadTransformer2DModel,
    "DiTTransformer2DModel": TreadTransformer2DModel,
    "TreadSSM2DModel": TreadSSM2DModel,
}


def model_class_for_config(
    config_or_path: Mapping | str | os.PathLike, **load_kwargs
) -> type[TreadTransformer2DModel] | type[TreadSSM2DModel]:
    """`TreadTransformer2DModel` or `TreadSSM2DModel`, whichever loads the checkpoint of this config.

    ``config_or_path``: a model's config as ``config.json`` holds it (a dict, e.g. from ``load_config``; a model's
    ``.config`` lacks ``_class_name``), or what ``load_config`` reads one from: a model folder, its ``config.json`` or
    a Hub id, with ``load_kwargs`` such as ``subfolder="transformer"`` or ``revision``. The config's ``_class_name``
    decides; a stock ``DiTTransformer2DModel`` gets `TreadTransformer2DModel`, any other class a ``ValueError`` naming
    it and the classes supported.
    """
    config = config_or_path
    if not isinstance(config, Mapping):
        config = TreadTransformer2DModel.load_config(config_or_path, **load_kwargs)
    class_name = config.get("_class_name")
    if class_name not in _MODEL_CLASSES:
        where = "" if config is config_or_path else f" in {os.fspath(config_or_path)}"
        raise ValueError(
            f"The model config{where} has _class_name {class_name!r}; diffusers_tread loads the classes "
            f"{', '.join(sorted(_MODEL_CLASSES))}."
        )
    return _MODEL_CLASSES[class_name]


__all__ = [
    "PRESETS",
    "SSM_PRESETS",
    "TreadRouter",
    "TreadRoutingMixin",
    "TreadSSM2DModel",
    "TreadTransformer2DModel",
    "TreadTransformer2DModelOutput",
    "apply_tread",
    "model_class_for_config",
    "paper_routes",
]
