from .transformer_tread import (
    PRESETS,
    TreadTransformer2DModel,
    TreadTransformer2DModelOutput,
    paper_routes,
)

__all__ = ["PRESETS", "TreadTransformer2DModel", "TreadTransformer2DModelOutput", "paper_routes"]
