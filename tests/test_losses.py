import pytest
import torch
from conftest import tiny_inputs, tiny_tread

from diffusers_tread import losses


def test_patchify_matches_dit_token_order():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert losses.patchify(x, 2)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # and DiT's own patch embedding: a conv whose weight picks one pixel of the patch sees the same tokens
    model = tiny_tread(in_channels=1, out_channels=1, sample_size=4)
    with torch.no_grad():
        model.pos_embed.proj.weight.zero_()
        model.pos_embed.proj.weight[0, 0, 1, 0] = 1.0  # pixel (row 1, col 0) of each patch -> channel 0
        model.pos_embed.proj.bias.zero_()
        tokens = model.pos_embed.proj(x).flatten(2).transpose(1, 2)[0, :, 0]
    assert tokens.tolist() == losses.patchify(x, 2)[0, :, 2].tolist()


def constant_patches(values):
    """A (2, 1, 4, 4) map whose 2x2 patches (tokens 0..3) hold the given constants, same for both samples."""
    grid = torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2)
    return torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest").repeat(2, 1, 1, 1)


def masks(*bypassed):
    out = []
    for tokens in bypassed:
        mask = torch.zeros(2, 4, dtype=torch.bool)
        mask[:, list(tokens)] = True
        out.append(mask)
    return tuple(out)


def test_per_token_loss_averages_patch_and_channels():
    error = torch.cat([constant_patches([1, 2, 3, 4]), constant_patches([3, 2, 1, 0])], dim=1)
    assert losses.per_token_loss(error, 2).tolist() == [[2.0, 2.0, 2.0, 2.0]] * 2


def test_no_route_and_plain_reduce_to_the_ordinary_loss():
    error = torch.rand(2, 3, 4, 4)
    for route_masks in (None, ()):
        assert losses.tread_loss(error, route_masks, 2, mode="adapted") == error.mean()
    assert losses.tread_loss(error, masks({0, 1}), 2, mode="plain") == error.mean()


def test_adapted_loss_hand_computed_two_routes():
    error = constant_patches([1, 2, 3, 4])  # per-token errors e = [1, 2, 3, 4]
    route_masks = masks({0, 1}, {3})  # route 1 keeps tokens {2, 3}; route 2 keeps {0, 1, 2}
    # denoising term: ((3 + 4) / 2 + (1 + 2 + 3) / 3) / 2 = (3.5 + 2) / 2 = 2.75
    dsm_only = losses.tread_loss(error, route_masks, 2, mode="adapted", mae_loss_weight=0.0)
    assert dsm_only.item() == pytest.approx(2.75)

    # MAE term: noisy patches [0, 0, 2, 2] normalise (unbiased var 4/3) to z = +-sqrt(3)/2, mean(z^2) = 3/4;
    # a constant prediction c gives error c^2 + 3/4: with c = [0, 1, 2, 3] -> [0.75, 1.75, 4.75, 9.75].
    # route 1 bypassed {0, 1}: 1.25; route 2 bypassed {3}: 9.75; MAE = (1.25 + 9.75) / 2 = 5.5
    noisy = torch.tensor([[0.0, 0.0], [2.0, 2.0]]).repeat(2, 1, 2, 2)  # every 2x2 patch is [[0, 0], [2, 2]]
    denoised = constant_patches([0, 1, 2, 3])
    loss = losses.tread_loss(error, route_masks, 2, "adapted", denoised=denoised, noisy_input=noisy)
    assert loss.item() == pytest.approx(2.75 + 0.1 * 5.5, rel=1e-5)
    loss = losses.tread_loss(error, route_masks, 2, "adapted", denoised, noisy, mae_loss_weight=0.5)
    assert loss.item() == pytest.approx(2.75 + 0.5 * 5.5, rel=1e-5)


def test_adapted_loss_with_model_masks_and_gradients():
    model = tiny_tread(routes=[{"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}]).train()
    x, t, y = tiny_inputs(model=model)
    out = model(x, t, y, route_generator=torch.Generator().manual_seed(0))
    error = (out.sample[:, :4] - x).square()
    loss = losses.tread_loss(error, out.route_masks, 2, "adapted", denoised=out.sample[:, :4], noisy_input=x)
    kept = ~out.route_masks[0]
    manual = (losses.per_token_loss(error, 2) * kept).sum() / kept.sum()
    assert loss > manual  # the MAE term adds a positive amount
    torch.testing.assert_close(
        losses.tread_loss(error, out.route_masks, 2, "adapted", mae_loss_weight=0), manual, rtol=1e-6, atol=0
    )
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_invalid_mode_and_missing_mae_inputs():
    error = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="must be one of"):
        losses.tread_loss(error, masks({0}), 2, mode="mae")
    with pytest.raises(ValueError, match="needs `denoised` and `noisy_input`"):
        losses.tread_loss(error, masks({0}), 2, mode="adapted")
