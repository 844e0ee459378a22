"""Sparse Guidance (arXiv 2601.01608), the combined rule and the guidance interval in TreadDiTPipeline."""

import inspect
import math

import pytest
import torch
from conftest import stock_twin, tiny_tread
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import TreadDiTPipeline, TreadTransformer2DModel
from diffusers_tread.pipelines.pipeline_tread_dit import noise_levels

NUM_CLASSES = 10
NUM_TOKENS = 16  # 8x8 latents, patch 2
ROUTES = [
    {"start_layer_idx": 1, "end_layer_idx": 2, "selection_ratio": 0.5},
    {"start_layer_idx": 3, "end_layer_idx": 4, "selection_ratio": 0.5},
]


def make_pipe(scheduler=None, routes=ROUTES, **overrides) -> TreadDiTPipeline:
    transformer = tiny_tread(routes=routes, num_embeds_ada_norm=NUM_CLASSES, **overrides).eval()
    pipe = TreadDiTPipeline(transformer=transformer, vae=None, scheduler=scheduler or DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs) -> torch.Tensor:
    kwargs = {"class_labels": [1, 7], "num_inference_steps": 4, "output_type": "latent", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def record_calls(pipe) -> list[dict]:
    """Every transformer call: its keyword arguments and the route masks it returned."""
    calls = []

    def before(module, args, kwargs):
        calls.append({**kwargs, "batch": args[0].shape[0]})

    def after(module, args, kwargs, output):
        calls[-1]["route_masks"] = output.route_masks

    pipe.transformer.register_forward_pre_hook(before, with_kwargs=True)
    pipe.transformer.register_forward_hook(after, with_kwargs=True)
    return calls


# --- the new arguments --------------------------------------------------------------------------------------------


def test_new_arguments_come_last_with_defaults():
    parameters = list(inspect.signature(TreadDiTPipeline.__call__).parameters.values())
    assert [(p.name, p.default) for p in parameters[-4:]] == [
        ("guidance", "cfg"),
        ("sparse_ratios", (0.3, 0.7)),
        ("sparse_guidance_scale", None),
        ("guidance_interval", None),
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance": "auto"}, "guidance must be one of"),
        ({"guidance": "sparse", "sparse_ratios": (0.7, 0.3)}, "gamma_strong <= gamma_weak"),
        ({"guidance": "sparse", "sparse_ratios": (0.3, 1.0)}, "gamma_weak < 1"),
        ({"guidance": "sparse", "sparse_ratios": (-0.1, 0.5)}, "0 <= gamma_strong"),
        ({"sparse_guidance_scale": 2.0}, "only used with guidance='sparse' or 'cfg\\+sparse'"),
        ({"guidance": "cfg+sparse"}, "needs two scales"),
        ({"guidance_interval": (5.0, 1.0)}, "sigma_low < sigma_high"),
        ({"guidance_interval": (-1.0, 1.0)}, "0 <= sigma_low"),
    ],
)
def test_invalid_guidance_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(make_pipe(), **kwargs)


def test_sparse_guidance_needs_routes():
    with pytest.raises(ValueError, match=r"no routes.*TreadTransformer2DModel.from_dit"):
        run(make_pipe(routes=[]), guidance="sparse")
    stock = TreadDiTPipeline(transformer=stock_twin(make_pipe().transformer), vae=None, scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="no routes"):
        run(stock, guidance="cfg+sparse", sparse_guidance_scale=2.0)
    # the fix the message suggests works
    stock.transformer = TreadTransformer2DModel.from_dit(stock.transformer, routes=ROUTES)
    assert torch.isfinite(run(stock, guidance="sparse", guidance_scale=2.0)).all()


# --- what the passes are ------------------------------------------------------------------------------------------


def test_passes_are_conditional_at_the_requested_ratios_on_nested_subsets():
    pipe = make_pipe()
    calls = record_calls(pipe)
    run(pipe, guidance="sparse", sparse_ratios=(0.25, 0.75), sparse_guidance_scale=2.0)
    assert len(calls) == 2 * 4  # strong and weak pass at each of the 4 steps
    for strong, weak in zip(calls[::2], calls[1::2], strict=True):
        for call, ratio in ((strong, 0.25), (weak, 0.75)):
            assert call["force_routing"] is True and call["selection_ratio"] == ratio and call["batch"] == 2
            assert call["class_labels"].tolist() == [1, 7]  # conditional: never the null class
            assert len(call["route_masks"]) == len(ROUTES)  # every configured route ran ...
            for mask in call["route_masks"]:  # ... with floor(N * ratio) tokens bypassing it, per sample
                assert mask.sum(dim=1).tolist() == [math.floor(NUM_TOKENS * ratio)] * 2
        # same random token order in both passes: what the weak pass keeps, the strong pass keeps too
        for strong_mask, weak_mask in zip(strong["route_masks"], weak["route_masks"], strict=True):
            assert not (strong_mask & ~weak_mask).any()
    # subsets are redrawn every step
    assert not torch.equal(calls[0]["route_masks"][0], calls[2]["route_masks"][0])


def test_cfg_plus_sparse_adds_an_unconditional_pass_on_the_strong_subsets():
    pipe = make_pipe()
    calls = record_calls(pipe)
    run(pipe, guidance="cfg+sparse", guidance_scale=3.0, sparse_guidance_scale=2.0, sparse_ratios=(0.25, 0.5))
    assert len(calls) == 3 * 4
    for strong, weak, uncond in zip(calls[::3], calls[1::3], calls[2::3], strict=True):
        assert [strong["selection_ratio"], weak["selection_ratio"], uncond["selection_ratio"]] == [0.25, 0.5, 0.25]
        assert strong["class_labels"].tolist() == weak["class_labels"].tolist() == [1, 7]
        assert uncond["class_labels"].tolist() == [NUM_CLASSES, NUM_CLASSES]
        for a, b in zip(strong["route_masks"], uncond["route_masks"], strict=True):
            assert torch.equal(a, b)


def test_cfg_stays_dense_and_batched():
    pipe = make_pipe()
    calls = record_calls(pipe)
    run(pipe, guidance_scale=3.0)
    assert len(calls) == 4
    assert all(call["batch"] == 4 and "force_routing" not in call and call["route_masks"] is None for call in calls)
    assert calls[0]["class_labels"].tolist() == [1, 7, NUM_CLASSES, NUM_CLASSES]


# --- exact reductions ---------------------------------------------------------------------------------------------


def test_equal_ratios_give_the_unguided_conditional_prediction():
    """gamma_strong == gamma_weak: both passes see the same tokens, so the difference is exactly zero and the result
    is the unguided routed sample D(c; gamma) (scale 1: only the strong pass runs), bit for bit, at any scale."""
    pipe = make_pipe()
    unguided = run(pipe, guidance="sparse", sparse_ratios=(0.5, 0.5), sparse_guidance_scale=1.0)
    for scale in (2.0, 7.5):
        guided = run(pipe, guidance="sparse", sparse_ratios=(0.5, 0.5), sparse_guidance_scale=scale)
        assert torch.equal(guided, unguided)
    # ... and the guidance does something when the ratios differ
    assert not torch.allclose(run(pipe, guidance="sparse", sparse_ratios=(0.3, 0.7), guidance_scale=2.0), unguided)


def test_unguided_routed_sample_is_the_routed_conditional_model():
    """Scale 1 samples D(c; gamma_strong) with subsets seeded per step: reproduce one step by hand."""
    pipe = make_pipe()
    calls = record_calls(pipe)
    run(pipe, guidance="sparse", sparse_ratios=(0.5, 0.7), sparse_guidance_scale=1.0, num_inference_steps=1)
    (call,) = calls
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())  # the pipeline's routing seed, step 0
    by_hand = pipe.transformer(
        latents,
        timestep=call["timestep"],
        class_labels=torch.tensor([1, 7]),
        force_routing=True,
        selection_ratio=0.5,
        route_generator=torch.Generator().manual_seed(seed),
    )
    for a, b in zip(by_hand.route_masks, call["route_masks"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("guidance", ["sparse", "cfg+sparse"])
def test_ratio_zero_is_the_dense_model_bit_for_bit(guidance):
    """The router keeps tokens in order, so ratio 0 is the identity: sparse guidance at (0, 0) is plain sampling."""
    pipe = make_pipe()
    dense = run(pipe, guidance_scale=1.0)
    routed = run(pipe, guidance=guidance, sparse_ratios=(0.0, 0.0), guidance_scale=1.0, sparse_guidance_scale=4.0)
    assert torch.equal(routed, dense)


def test_cfg_plus_sparse_with_unit_sparse_scale_at_ratio_zero_is_cfg():
    pipe = make_pipe()
    kwargs = {"guidance_scale": 3.0, "num_inference_steps": 1}
    cfg = run(pipe, **kwargs)
    combined = run(pipe, guidance="cfg+sparse", sparse_ratios=(0.0, 0.5), sparse_guidance_scale=1.0, **kwargs)
    # Same math, rearranged (uncond + w (cond - uncond) vs cond + (w - 1) (cond - uncond)) and batched differently
    # (one batch of 2B vs two of B): equal up to float rounding. One step, as the sampler amplifies rounding over
    # steps (4 DDIM steps: 2e-5 on this random model).
    torch.testing.assert_close(combined, cfg, rtol=0, atol=1e-6)


def test_sparse_sampling_is_reproducible():
    pipe = make_pipe()
    kwargs = {"guidance": "sparse", "sparse_guidance_scale": 2.0}
    assert torch.equal(run(pipe, seed=3, **kwargs), run(pipe, seed=3, **kwargs))
    assert not torch.equal(run(pipe, seed=3, **kwargs), run(pipe, seed=4, **kwargs))
    torch.manual_seed(5)
    a = pipe([1], num_inference_steps=3, output_type="latent", **kwargs).images
    torch.manual_seed(5)
    assert torch.equal(a, pipe([1], num_inference_steps=3, output_type="latent", **kwargs).images)


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(variance_type="learned_range"),
        EulerDiscreteScheduler(),
        EDMEulerScheduler(),
        FlowMatchEulerDiscreteScheduler(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_sparse_guidance_with_other_schedulers(scheduler):
    pipe = make_pipe(scheduler)
    out = run(pipe, guidance="cfg+sparse", guidance_scale=2.0, sparse_guidance_scale=2.0, guidance_interval=(0.5, 50))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


# --- guidance interval --------------------------------------------------------------------------------------------


def test_noise_levels_agree_across_scheduler_types():
    ddim = DDIMScheduler(timestep_spacing="trailing")
    euler = EulerDiscreteScheduler(timestep_spacing="trailing")
    flow = FlowMatchEulerDiscreteScheduler()
    edm = EDMEulerScheduler()
    for scheduler in (ddim, euler, flow, edm):
        scheduler.set_timesteps(10)
    # variance preserving: sqrt((1 - abar) / abar), the same sigmas Euler samples at
    abar = ddim.alphas_cumprod[ddim.timesteps]
    torch.testing.assert_close(noise_levels(ddim), ((1 - abar) / abar).sqrt().double())
    torch.testing.assert_close(noise_levels(ddim), noise_levels(euler), rtol=1e-4, atol=0)
    torch.testing.assert_close(noise_levels(edm), edm.sigmas[:10].double())
    s = flow.sigmas[:10].double()
    torch.testing.assert_close(noise_levels(flow), s / (1 - s))
    for scheduler in (ddim, euler, flow, edm):
        levels = noise_levels(scheduler)
        assert (levels[1:] < levels[:-1]).all()  # from noise to data


@pytest.mark.parametrize(
    "guidance_kwargs, unguided_kwargs",
    [
        ({"guidance_scale": 3.0}, {"guidance_scale": 1.0}),
        ({"guidance": "sparse", "sparse_guidance_scale": 3.0}, {"guidance": "sparse", "sparse_guidance_scale": 1.0}),
    ],
    ids=["cfg", "sparse"],
)
def test_guidance_interval(guidance_kwargs, unguided_kwargs):
    pipe = make_pipe()
    pipe.scheduler.set_timesteps(4)
    sigmas = noise_levels(pipe.scheduler).tolist()  # about [8.5, 1.2, 0.35, 0.013] for DDIM's defaults

    everything = run(pipe, **guidance_kwargs)
    assert torch.equal(run(pipe, guidance_interval=(0.0, math.inf), **guidance_kwargs), everything)
    nothing = run(pipe, guidance_interval=(sigmas[0], math.inf), **guidance_kwargs)  # sigma_low is exclusive
    assert torch.equal(nothing, run(pipe, **unguided_kwargs))

    calls = record_calls(pipe)
    interval = (sigmas[2], sigmas[0])  # the first two steps: sigma_low < sigma <= sigma_high
    middle = run(pipe, guidance_interval=interval, **guidance_kwargs)
    passes = [0] * 4
    step_of_timestep = {t: i for i, t in enumerate(pipe.scheduler.timesteps.tolist())}
    for call in calls:
        passes[step_of_timestep[call["timestep"][0].item()]] += (
            1 if guidance_kwargs.get("guidance") else call["batch"] // 2
        )
    assert passes == [2, 2, 1, 1]
    assert not torch.equal(middle, everything) and not torch.equal(middle, nothing)


# --- cost ---------------------------------------------------------------------------------------------------------


def sampling_flops(pipe, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        run(pipe, **kwargs)
    return counter.get_total_flops()


def test_flops_ordering():
    pipe = make_pipe()
    steps = 4
    with FlopCounterMode(display=False) as counter:
        pipe.transformer(
            *[torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)]
        )
    dense_pass = counter.get_total_flops()

    def routed_pass(ratio):
        with FlopCounterMode(display=False) as counter:
            pipe.transformer(
                torch.zeros(2, 4, 8, 8),
                timestep=torch.zeros(2, dtype=torch.long),
                class_labels=torch.zeros(2, dtype=torch.long),
                force_routing=True,
                selection_ratio=ratio,
            )
        return counter.get_total_flops()

    unguided = sampling_flops(pipe, guidance_scale=1.0)
    cfg = sampling_flops(pipe, guidance_scale=3.0)
    sparse = sampling_flops(pipe, guidance="sparse", sparse_ratios=(0.3, 0.7), sparse_guidance_scale=3.0)
    combined = sampling_flops(
        pipe, guidance="cfg+sparse", sparse_ratios=(0.3, 0.7), guidance_scale=3.0, sparse_guidance_scale=3.0
    )
    assert unguided == steps * dense_pass and cfg == 2 * unguided
    assert sparse == steps * (routed_pass(0.3) + routed_pass(0.7))
    assert combined == steps * (2 * routed_pass(0.3) + routed_pass(0.7))
    assert unguided < sparse < cfg < combined < 3 * unguided
    assert routed_pass(0.0) == dense_pass
    # an interval that guides at half of the steps saves the extra passes elsewhere
    pipe.scheduler.set_timesteps(steps)
    interval = (noise_levels(pipe.scheduler)[2].item(), math.inf)
    assert sampling_flops(pipe, guidance_scale=3.0, guidance_interval=interval) == 3 * unguided // 2
