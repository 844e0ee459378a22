"""bench/reentry_precision.py (issue #24, item 3): its fp32 re-entry block is really fp32, and it runs end to end."""

import torch
from conftest import REPO, load_module

bench = load_module(REPO / "bench" / "reentry_precision.py")


def test_reentry_block_is_the_one_after_the_route_end():
    model = bench.make_model(64, 4, 4, 0, trained_like=True)
    assert bench.reentry_blocks(model) == [model.config.routes[0]["end_layer_idx"] + 1] == [9]


def test_run_in_fp32_disables_autocast_for_that_block_only():
    model = bench.make_model(64, 4, 4, 0, trained_like=True)
    block = model.transformer_blocks[9]
    x = torch.randn(2, 4, 64)
    conditioning = torch.randn(2, 64).bfloat16().float()  # exact in bf16, so the cast below loses nothing
    with torch.no_grad():
        exact = block(x, activated_conditioning=conditioning)
        with torch.autocast("cpu", torch.bfloat16):
            low = block(x, activated_conditioning=conditioning.bfloat16())
            undo = bench.run_in_fp32(block)
            fp32 = block(x, activated_conditioning=conditioning.bfloat16())
        undo()
        with torch.autocast("cpu", torch.bfloat16):
            restored = block(x, activated_conditioning=conditioning.bfloat16())
    # The residual stream stays fp32 under autocast (fp32 input + bf16 update); the update's error shows the bf16.
    assert not torch.equal(low, exact)
    torch.testing.assert_close(fp32, exact, rtol=0, atol=0)  # the same fp32 kernels, bit for bit
    assert torch.equal(restored, low)  # undone: the block is back under autocast


def test_bench_runs_on_tiny_settings():
    results = bench.main(
        ["--widths", "64", "--sample_size", "4", "--batch_size", "2", "--seeds", "0", "--train_steps", "0",
         "--control_blocks", "1"]
    )  # fmt: skip
    errors = results["blocks"]["64, random"]["errors"]
    assert len(errors) == bench.NUM_LAYERS and all(0 < e < 0.1 for e in errors)
    arms = results["steps"]["64, random"][0]
    assert set(arms) == {"bf16", "bf16 + re-entry block [9] fp32", "bf16 + block 1 fp32 (control)"}
    assert all(0 < arm["grad_rel_error"] < 0.1 for arm in arms.values())
