"""The TREAD router's former home (it routed PixArt, SD3 and Flux.1 only); kept so that existing imports work.

The router is ``diffusers_tread.models.router`` and the families it routes are ``diffusers_tread.models.families``.
"""

from .router import TreadRouter, apply_tread, attached_router

__all__ = ["TreadRouter", "apply_tread", "attached_router"]
