"""Transformer FLOPs per image of one sampling run, for each guidance kind of `TreadDiTPipeline`, same step count.

The count follows the pipeline's real sampling loop, so it includes exactly the transformer passes the pipeline makes
(two dense passes for CFG, the routed passes of Sparse Guidance, fewer outside a guidance interval). The transformer
is a full-size DiT (default: DiT-B/2 and DiT-XL/2 with the paper's route 2..depth-4) built on PyTorch's ``meta``
device: no weights are allocated and nothing is computed, while `torch.utils.flop_counter` still sees every matmul,
convolution and attention product with its real shape. The pipeline itself (latents, scheduler) runs on the CPU; each
transformer call moves its inputs to ``meta`` and returns zeros, which the scheduler steps on (the values do not
matter to a FLOP count). A "model evaluation" is one image through the transformer once. VAE decoding is not counted:
it is the same for every guidance kind. The scales (1.5) and the interval are examples, not tuned values.

    python bench/guidance_flops.py                                   # DiT-B/2 and DiT-XL/2, 50 DDIM steps
    python bench/guidance_flops.py --models DiT-XL/2 --steps 250 --interval 0.3 5.0
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import TreadDiTPipeline, TreadTransformer2DModel, TreadTransformer2DModelOutput
from diffusers_tread.pipelines.pipeline_tread_dit import noise_levels


class CountingPipeline(TreadDiTPipeline):
    """The pipeline's loop on the CPU around a transformer on the meta device (see the module docstring)."""

    @property
    def _execution_device(self) -> torch.device:
        return torch.device("cpu")


def meta_transformer(name: str, calls: list[tuple[int, int]]) -> TreadTransformer2DModel:
    """A ``name`` model on the meta device whose calls append ``(batch size, FLOPs)`` to ``calls`` and return zeros.

    A call's FLOPs depend only on its shapes and routing (batch size, selection ratio), so each distinct kind of call
    is counted once and its count reused.
    """
    with torch.device("meta"):
        model = TreadTransformer2DModel.from_preset(name)  # ImageNet 256: 4x32x32 latents, 1000 classes, paper route
    meta_forward = model.forward
    counted: dict[tuple, int] = {}

    def forward(hidden_states, timestep=None, class_labels=None, **kwargs):
        key = (hidden_states.shape[0], kwargs.get("force_routing", False), kwargs.get("selection_ratio"))
        if key not in counted:
            with FlopCounterMode(display=False) as counter:
                meta_forward(
                    hidden_states.to("meta"),
                    timestep=timestep.to("meta"),
                    class_labels=class_labels.to("meta"),
                    **kwargs,
                )
            counted[key] = counter.get_total_flops()
        calls.append((hidden_states.shape[0], counted[key]))
        out_channels = model.config.out_channels or model.config.in_channels
        return TreadTransformer2DModelOutput(
            sample=torch.zeros(hidden_states.shape[0], out_channels, *hidden_states.shape[2:])
        )

    model.forward = forward
    return model


def guidance_settings(interval: tuple[float, float]) -> list[tuple[str, dict]]:
    scales = {"guidance_scale": 1.5, "sparse_guidance_scale": 1.5}
    return [
        ("unguided (dense)", {"guidance_scale": 1.0}),
        ("cfg", {"guidance_scale": 1.5}),
        ("sparse (0.3, 0.7)", {"guidance": "sparse", "sparse_ratios": (0.3, 0.7), "sparse_guidance_scale": 1.5}),
        ("sparse (0.0, 0.5)", {"guidance": "sparse", "sparse_ratios": (0.0, 0.5), "sparse_guidance_scale": 1.5}),
        ("cfg+sparse (0.3, 0.7)", {"guidance": "cfg+sparse", "sparse_ratios": (0.3, 0.7), **scales}),
        (f"cfg, interval {interval}", {"guidance_scale": 1.5, "guidance_interval": interval}),
        (
            f"sparse (0.3, 0.7), interval {interval}",
            {
                "guidance": "sparse",
                "sparse_ratios": (0.3, 0.7),
                "sparse_guidance_scale": 1.5,
                "guidance_interval": interval,
            },
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-B/2", "DiT-XL/2"])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM, trailing spacing)")
    parser.add_argument(
        "--interval", type=float, nargs=2, default=(0.3, 5.0), help="guidance interval (sigma_low, sigma_high)"
    )
    args = parser.parse_args()
    interval = tuple(args.interval)

    scheduler = DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    scheduler.set_timesteps(args.steps)
    sigmas = noise_levels(scheduler)
    guided_steps = int(((sigmas > interval[0]) & (sigmas <= interval[1])).sum())
    print(
        f"{args.steps} DDIM steps, sigma {sigmas[0]:.1f} .. {sigmas[-1]:.3f}; interval {interval} guides {guided_steps}"
    )
    print()
    print(
        "| model | guidance | model evaluations / step | GFLOP / image / step | TFLOP / image, whole run | x unguided | x cfg |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        rows = []
        for label, kwargs in guidance_settings(interval):
            calls: list[tuple[int, int]] = []
            pipe = CountingPipeline(transformer=meta_transformer(name, calls), vae=None, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            pipe([0], num_inference_steps=args.steps, output_type="latent", **kwargs)  # one image
            evaluations = sum(batch for batch, _ in calls) / args.steps
            rows.append((label, evaluations, sum(flops for _, flops in calls)))
        unguided, cfg = rows[0][2], rows[1][2]
        for label, evaluations, total in rows:
            print(
                f"| {name} | {label} | {evaluations:.2f} | {total / args.steps / 1e9:.1f} | {total / 1e12:.2f} | "
                f"{total / unguided:.3f} | {total / cfg:.3f} |"
            )


if __name__ == "__main__":
    main()
