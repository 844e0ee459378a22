from .ssm_tread import SSM_PRESETS, TreadSSM2DModel
from .transformer_tread import (
    PRESETS,
    TreadTransformer2DModel,
    TreadTransformer2DModelOutput,
    paper_routes,
)
from .tread_t2i import TreadRouter, apply_tread

__all__ = [
    "PRESETS",
    "SSM_PRESETS",
    "TreadRouter",
    "TreadSSM2DModel",
    "TreadTransformer2DModel",
    "TreadTransformer2DModelOutput",
    "apply_tread",
    "paper_routes",
]
