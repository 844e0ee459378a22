"""TREAD training losses: per-token errors and the route-aware reduction. Knows no model, only masks.

- ``"plain"`` (ICCV version, Sec. 4): the objective's ordinary loss over all tokens; routing changes nothing here.
- ``"adapted"`` (v1, Jan 2025, Sec. 3.3, "adapted auxiliary loss that accounts for all applied routes"): for R routes
  with bypass masks m_r (1 = token bypassed route r) and per-token error e_k,

      L = 1/R sum_r [ sum_k (1 - m_rk) e_k / sum_k (1 - m_rk) ]                          denoising loss, kept tokens
        + lambda * 1/R sum_r [ sum_k m_rk ||D_k - norm(x_noisy)_k||^2 / sum_k m_rk ]        MAE loss, bypassed tokens

  The MAE term is MaskDiT's (Zheng et al. 2023): D is the model's denoised estimate and the target is the noisy
  input patch normalised per patch (MAE's norm_pix_loss). Sums run over the batch and the tokens, as in MaskDiT.
  With no route applied both modes reduce to the ordinary loss. lambda defaults to 0.1, the reference code's
  inner default (its training script left it at 0; the authors later called the paper's written formula a mistake
  and the code right: CompVis/tread issue #3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TREAD_LOSSES = ("plain", "adapted")


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)`` in DiT's token order (row-major over the ``H/p x W/p`` grid)."""
    batch, channels, height, width = x.shape
    p = patch_size
    x = x.reshape(batch, channels, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


def per_token_loss(per_element_loss: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average a ``(B, C, H, W)`` per-element loss over each token's patch and channels: ``(B, N)``."""
    return patchify(per_element_loss, patch_size).mean(dim=-1)


def normalized_patches(x: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Patches normalised to zero mean and unit variance each (MAE's norm_pix_loss target): ``(B, N, p*p*C)``."""
    patches = patchify(x, patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def tread_loss(
    per_element_loss: torch.Tensor,
    route_masks: Sequence[torch.Tensor] | None,
    patch_size: int,
    mode: str = "plain",
    denoised: torch.Tensor | None = None,
    noisy_input: torch.Tensor | None = None,
    mae_loss_weight: float = 0.1,
) -> torch.Tensor:
    """Reduce an objective's per-element loss to a scalar, accounting for the routes applied in the forward pass.

    Args:
        per_element_loss: ``(B, C, H, W)``, whose plain mean is the objective's ordinary loss.
        route_masks: the model output's ``route_masks`` (``(B, N)`` bool, True = bypassed), or None.
        patch_size: the model's patch size (maps pixels to tokens).
        mode: ``"plain"`` or ``"adapted"`` (see the module docstring).
        denoised, noisy_input: ``(B, C', H, W)`` model estimate D and noisy input, for the adapted loss's MAE term.
        mae_loss_weight: lambda of the MAE term; 0 disables it.
    """
    if mode not in TREAD_LOSSES:
        raise ValueError(f"tread loss mode must be one of {TREAD_LOSSES}, got {mode!r}.")
    if mode == "plain" or not route_masks:
        return per_element_loss.mean()

    token_loss = per_token_loss(per_element_loss, patch_size)
    loss = torch.stack([_masked_mean(token_loss, ~mask) for mask in route_masks]).mean()
    if mae_loss_weight > 0:
        if denoised is None or noisy_input is None:
            raise ValueError("the adapted loss's MAE term needs `denoised` and `noisy_input` (or mae_loss_weight=0).")
        mae_error = (patchify(denoised, patch_size) - normalized_patches(noisy_input, patch_size)).square().mean(-1)
        loss = loss + mae_loss_weight * torch.stack([_masked_mean(mae_error, mask) for mask in route_masks]).mean()
    return loss
