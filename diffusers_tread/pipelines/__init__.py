from .pipeline_tread_dit import TreadDiTPipeline

__all__ = ["TreadDiTPipeline"]
