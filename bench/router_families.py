"""LoRA training-step time, TREAD-routed vs dense, for every family the router routes (`apply_tread`), on CPU.

One step: the transformer forward on random inputs of the family's shapes, a mean-square loss on its output, backward
and AdamW on LoRA parameters only (rank 8 on ``to_q``/``to_k``/``to_v``; the base weights are frozen). Every family
runs at the same small width (4 heads x 16 = 64), 8 blocks (two-list families: 2 double- + 6 single-stream), 256
image tokens (images: a 16 x 16 token grid; videos: 4 latent frames of 8 x 8) and 32 text tokens, with the route
blocks 2..5 at selection ratio 0.5 (the paper's 2..depth-4 would be 2..4). Dense and routed steps alternate on one
model (``router.enabled`` toggles routing); the median wall and process-CPU times are reported with the step's FLOP
ratio (``torch.utils.flop_counter``, forward + backward, CPU attention included). Small widths make the per-token
overheads (norms, modulation, RoPE, the gather/scatter) a larger share than in real models, so the time ratio sits
above the FLOP ratio; it says where routing pays at this size, not at 12B parameters.

``--frames 1 5 9`` runs the video families whose inputs are a latent clip (``FRAME_FAMILIES``) once per latent frame
count at the same 8 x 8 tokens a frame (64, 320, 576 tokens), to show how the ratio moves as the clip grows.

    python bench/router_families.py                        # every family, 3 repeats, 2 threads
    python bench/router_families.py --families flux wan --repeats 5 --json bench/results/router_families_cpu.json
    python bench/router_families.py --families wan --frames 1 5 9 --json bench/results/router_frames_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import diffusers
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import apply_tread
from diffusers_tread.profiling import CPU_SDPA_FLOPS

B, T, HEADS, HEAD_DIM = 2, 32, 4, 16
W = HEADS * HEAD_DIM
ROUTE = {"start_layer_idx": 2, "end_layer_idx": 5, "selection_ratio": 0.5}


def _ids(frames, rows, cols):
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([f, r, c], dim=-1).reshape(-1, 3).float()


def _r(*shape):
    return torch.randn(*shape)


def _t():
    return torch.randint(1, 1000, (B,))


def _video(frames=4, channels=4):
    return _r(B, channels, frames, 16, 16)  # patch 2: 8 x 8 tokens a frame


def families(frames: int = 4) -> dict:
    """name -> (class name, config, inputs()) at the benchmark's width, depth and token counts; ``frames``: the
    latent frame count of the ``FRAME_FAMILIES``' clips."""
    heads = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    flux_like = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=6, joint_attention_dim=32, **heads)
    image_ids = dict(img_ids=_ids(1, 16, 16), txt_ids=torch.zeros(T, 3))
    wan = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=4 * W,
               num_layers=8, rope_max_seq_len=64, **heads)  # fmt: skip
    hunyuan = dict(in_channels=4, out_channels=4, num_layers=2, num_single_layers=6, num_refiner_layers=1,
                   text_embed_dim=32, **heads)  # fmt: skip
    # A table, one family an entry: its config and inputs written compactly.
    # fmt: off
    return {
        "pixart": (
            "PixArtTransformer2DModel",
            dict(in_channels=4, out_channels=8, num_layers=8, cross_attention_dim=W, sample_size=32, patch_size=2,
                 caption_channels=32, use_additional_conditions=False, **heads),
            lambda: dict(hidden_states=_r(B, 4, 32, 32), encoder_hidden_states=_r(B, T, 32), timestep=_t()),
        ),
        "sd3": (
            "SD3Transformer2DModel",
            dict(sample_size=32, patch_size=2, in_channels=4, num_layers=8, joint_attention_dim=32,
                 caption_projection_dim=W, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32, **heads),
            lambda: dict(hidden_states=_r(B, 4, 32, 32), encoder_hidden_states=_r(B, T, 32),
                         pooled_projections=_r(B, 32), timestep=_t()),
        ),
        "flux": (
            "FluxTransformer2DModel",
            dict(**flux_like, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
            lambda: dict(hidden_states=_r(B, 256, 16), encoder_hidden_states=_r(B, T, 32),
                         pooled_projections=_r(B, 32), timestep=torch.rand(B), **image_ids),
        ),
        "chroma": (
            "ChromaTransformer2DModel",
            dict(**flux_like, axes_dims_rope=(4, 4, 8), approximator_num_channels=16, approximator_hidden_dim=32,
                 approximator_layers=1),
            lambda: dict(
                hidden_states=_r(B, 256, 16), encoder_hidden_states=_r(B, T, 32), timestep=torch.rand(B), **image_ids
            ),
        ),
        "flux2": (
            "Flux2Transformer2DModel",
            dict(**flux_like, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
            lambda: dict(hidden_states=_r(B, 256, 16), encoder_hidden_states=_r(B, T, 32), timestep=torch.rand(B),
                         img_ids=torch.cat([torch.zeros(256, 1), _ids(1, 16, 16)], 1), txt_ids=torch.zeros(T, 4)),
        ),
        "auraflow": (
            "AuraFlowTransformer2DModel",
            dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=6,
                 joint_attention_dim=32, caption_projection_dim=W, out_channels=4, pos_embed_max_size=256, **heads),
            lambda: dict(hidden_states=_r(B, 4, 32, 32), encoder_hidden_states=_r(B, T, 32), timestep=torch.rand(B)),
        ),
        "cogview4": (
            "CogView4Transformer2DModel",
            dict(patch_size=2, in_channels=4, out_channels=4, num_layers=8, text_embed_dim=32, time_embed_dim=32,
                 condition_dim=8, pos_embed_max_size=32, sample_size=32, rope_axes_dim=(8, 8), **heads),
            lambda: dict(hidden_states=_r(B, 4, 32, 32), encoder_hidden_states=_r(B, T, 32), timestep=_t(),
                         original_size=torch.tensor([[256.0, 256.0]] * B),
                         target_size=torch.tensor([[256.0, 256.0]] * B), crop_coords=torch.zeros(B, 2)),
        ),
        "qwenimage": (
            "QwenImageTransformer2DModel",
            dict(patch_size=2, in_channels=16, out_channels=4, num_layers=8, joint_attention_dim=32,
                 axes_dims_rope=(4, 4, 8), **heads),
            lambda: dict(hidden_states=_r(B, 256, 16), encoder_hidden_states=_r(B, T, 32),
                         encoder_hidden_states_mask=torch.ones(B, T), timestep=torch.rand(B),
                         img_shapes=[[(1, 16, 16)]] * B),
        ),
        "hidream": (
            "HiDreamImageTransformer2DModel",
            dict(patch_size=2, in_channels=4, out_channels=4, num_layers=6, num_single_layers=2,
                 caption_channels=[32, 32], text_emb_dim=32, num_routed_experts=2, num_activated_experts=1,
                 axes_dims_rope=(4, 4, 8), max_resolution=(32, 32), llama_layers=list(range(8)), **heads),
            lambda: dict(hidden_states=_r(B, 4, 32, 32), timesteps=_t(), encoder_hidden_states_t5=_r(B, T // 2, 32),
                         encoder_hidden_states_llama3=_r(8, B, T // 4, 32), pooled_embeds=_r(B, 32)),
        ),
        "hunyuanimage_2_1": (
            "HunyuanImageTransformer2DModel",
            dict(**hunyuan, patch_size=(1, 1), rope_axes_dim=(8, 8)),
            lambda: dict(hidden_states=_r(B, 4, 16, 16), timestep=torch.rand(B) * 1000,
                         encoder_hidden_states=_r(B, T, 32), encoder_attention_mask=torch.ones(B, T)),
        ),
        "wan": (
            "WanTransformer3DModel",
            wan,
            lambda: dict(hidden_states=_video(frames), encoder_hidden_states=_r(B, T, 32), timestep=_t()),
        ),
        "skyreels_v2": (
            "SkyReelsV2Transformer3DModel",
            wan,
            lambda: dict(hidden_states=_video(frames), encoder_hidden_states=_r(B, T, 32), timestep=_t()),
        ),
        "ltx": (
            "LTXVideoTransformer3DModel",
            dict(in_channels=16, out_channels=16, cross_attention_dim=W, num_layers=8, caption_channels=32, **heads),
            lambda: dict(hidden_states=_r(B, 256, 16), encoder_hidden_states=_r(B, T, 32), timestep=_t(),
                         encoder_attention_mask=torch.ones(B, T), num_frames=4, height=8, width=8),
        ),
        "ltx2": (  # video tokens routed; the audio stream (16 tokens) and both texts stay dense
            "LTX2VideoTransformer3DModel",
            dict(in_channels=16, out_channels=16, cross_attention_dim=W, num_layers=8, caption_channels=32,
                 audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=16,
                 audio_cross_attention_dim=32, **heads),
            lambda: dict(hidden_states=_r(B, 256, 16), audio_hidden_states=_r(B, 16, 8),
                         encoder_hidden_states=_r(B, T, 32), audio_encoder_hidden_states=_r(B, T, 32), timestep=_t(),
                         audio_timestep=_t(), sigma=torch.rand(B), encoder_attention_mask=torch.ones(B, T),
                         audio_encoder_attention_mask=torch.ones(B, T), num_frames=4, height=8, width=8,
                         audio_num_frames=16),
        ),
        "hunyuan_video": (
            "HunyuanVideoTransformer3DModel",
            dict(**hunyuan, patch_size=2, patch_size_t=1, guidance_embeds=False, pooled_projection_dim=32,
                 rope_axes_dim=(4, 4, 8)),
            lambda: dict(hidden_states=_video(frames), timestep=_t(), encoder_hidden_states=_r(B, T, 32),
                         encoder_attention_mask=torch.ones(B, T), pooled_projections=_r(B, 32)),
        ),
        "hunyuan_video_1_5": (
            "HunyuanVideo15Transformer3DModel",
            dict(in_channels=9, out_channels=4, num_layers=8, num_refiner_layers=1, patch_size=1, text_embed_dim=32,
                 text_embed_2_dim=32, image_embed_dim=32, rope_axes_dim=(4, 4, 8), **heads),
            lambda: dict(hidden_states=_r(B, 9, 4, 8, 8), timestep=torch.rand(B) * 1000,
                         encoder_hidden_states=_r(B, T, 32), encoder_attention_mask=torch.ones(B, T),
                         encoder_hidden_states_2=_r(B, 8, 32), encoder_attention_mask_2=torch.ones(B, 8),
                         image_embeds=_r(B, 8, 32)),
        ),
        "kandinsky5": (
            "Kandinsky5Transformer3DModel",
            dict(in_visual_dim=4, in_text_dim=32, in_text_dim2=32, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
                 model_dim=W, ff_dim=4 * W, num_text_blocks=1, num_visual_blocks=8, axes_dims=(4, 4, 8)),
            lambda: dict(hidden_states=_r(B, 4, 16, 16, 4), encoder_hidden_states=_r(B, T, 32),
                         timestep=torch.rand(B) * 1000, pooled_projections=_r(B, 32),
                         visual_rope_pos=[torch.arange(4), torch.arange(8), torch.arange(8)],
                         text_rope_pos=torch.arange(T)),
        ),
        "cogvideox": (
            "CogVideoXTransformer3DModel",
            dict(in_channels=4, out_channels=4, time_embed_dim=32, text_embed_dim=32, num_layers=8, sample_width=16,
                 sample_height=16, sample_frames=13, patch_size=2, max_text_seq_length=T,
                 use_rotary_positional_embeddings=True, **heads),
            lambda: dict(hidden_states=_r(B, 4, 4, 16, 16), encoder_hidden_states=_r(B, T, 32), timestep=_t(),
                         image_rotary_emb=(_r(256, HEAD_DIM), _r(256, HEAD_DIM))),
        ),
        "mochi": (
            "MochiTransformer3DModel",
            dict(patch_size=2, num_layers=8, pooled_projection_dim=32, in_channels=4, text_embed_dim=32,
                 time_embed_dim=32, max_sequence_length=T, **heads),
            lambda: dict(hidden_states=_video(frames), encoder_hidden_states=_r(B, T, 32), timestep=_t(),
                         encoder_attention_mask=torch.ones(B, T)),
        ),
        "cosmos": (
            "CosmosTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=12 * 2, num_layers=8,
                 text_embed_dim=32, adaln_lora_dim=8, max_size=(8, 32, 32), patch_size=(1, 2, 2),
                 encoder_hidden_states_channels=32, concat_padding_mask=False),
            lambda: dict(hidden_states=_video(frames), timestep=torch.rand(B), encoder_hidden_states=_r(B, T, 32)),
        ),
    }
    # fmt: on


# the families whose inputs are a latent clip of ``frames`` frames (``_video``), for ``--frames``
FRAME_FAMILIES = ("wan", "skyreels_v2", "hunyuan_video", "mochi")  # Cosmos: max_size allows 8 frames


def _allegro_inputs():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    *freqs, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=24, crops_coords=((0, 0), (8, 8)), grid_size=(8, 8), temporal_size=4
    )
    positions = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).T.reshape(3, 1, -1)
    return dict(hidden_states=_video(), encoder_hidden_states=_r(B, T, 32), timestep=_t(),
                image_rotary_emb=(tuple(freqs), tuple(positions)))  # fmt: skip


ALLEGRO = ("AllegroTransformer3DModel",
           dict(patch_size=2, patch_size_t=1, num_attention_heads=HEADS, attention_head_dim=24, in_channels=4,
                out_channels=4, num_layers=8, cross_attention_dim=HEADS * 24, sample_height=16, sample_width=16,
                sample_frames=4, caption_channels=32),
           _allegro_inputs)  # fmt: skip


def lora_step(model, inputs, optimizer) -> None:
    model(**inputs).sample.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(model, inputs) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        model(**inputs).sample.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_family(name: str, spec, repeats: int) -> dict:
    class_name, config, make_inputs = spec
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**config).train()
    model.requires_grad_(False)
    targets = ["to_query", "to_key", "to_value"] if name == "kandinsky5" else ["to_q", "to_k", "to_v"]
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model.add_adapter(lora) if hasattr(model, "add_adapter") else inject_adapter_in_model(lora, model)
    router = apply_tread(model, [ROUTE], generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = make_inputs()
    flops = {}
    for mode in ("dense", "routed"):
        router.enabled = mode == "routed"
        flops[mode] = step_flops(model, inputs)
        lora_step(model, inputs, optimizer)  # warm-up
    times = {"dense": [], "routed": []}
    cpu = {"dense": [], "routed": []}
    for _ in range(repeats):
        for mode in ("dense", "routed"):
            router.enabled = mode == "routed"
            wall, proc = time.perf_counter(), time.process_time()
            lora_step(model, inputs, optimizer)
            times[mode].append(time.perf_counter() - wall)
            cpu[mode].append(time.process_time() - proc)
    num_image = router.route_masks[0].shape[1] if router.route_masks else None
    return {
        "family": name,
        "class": class_name,
        "blocks": router.num_blocks,
        "image_tokens": num_image,
        "flop_ratio": flops["routed"] / flops["dense"],
        "wall_ratio": statistics.median(times["routed"]) / statistics.median(times["dense"]),
        "cpu_ratio": statistics.median(cpu["routed"]) / statistics.median(cpu["dense"]),
        "dense_wall_s": statistics.median(times["dense"]),
        "routed_wall_s": statistics.median(times["routed"]),
    }


def _row_key(row: dict) -> tuple[str, int | None]:
    return row["family"], row.get("frames")


def main() -> None:
    specs = {**families(), "allegro": ALLEGRO}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=None, choices=list(specs))
    parser.add_argument("--frames", nargs="+", type=int, default=None, help="latent frame counts (video families)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.frames is None:
        names, frame_counts = args.families or list(specs), [None]
    else:
        names, frame_counts = args.families or ["wan"], args.frames
        other = [name for name in names if name not in FRAME_FAMILIES]
        if other or min(frame_counts) < 1:
            parser.error(f"--frames takes counts >= 1 and the families {', '.join(FRAME_FAMILIES)}; got {other}.")
    torch.set_num_threads(args.threads)
    rows = []
    print("| family | frames | blocks | image tokens | FLOP ratio | wall ratio | CPU ratio | dense step (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for frames in frame_counts:
            spec = specs[name] if frames is None else families(frames)[name]
            row = run_family(name, spec, args.repeats)
            if frames is not None:
                row["frames"] = frames
            rows.append(row)
            print(
                f"| {name} | {frames or '-'} | {row['blocks']} | {row['image_tokens']} | {row['flop_ratio']:.3f} "
                f"| {row['wall_ratio']:.3f} | {row['cpu_ratio']:.3f} | {row['dense_wall_s']:.3f} |",
                flush=True,
            )
    if args.json is not None:
        if args.json.exists():  # a run of some families (frame counts) updates their rows and keeps the others
            measured = {_row_key(row) for row in rows}
            rows = [row for row in json.loads(args.json.read_text())["rows"] if _row_key(row) not in measured] + rows
            rows.sort(key=lambda row: (list(specs).index(row["family"]), row.get("frames") or 0))
        meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "machine": platform.machine(),
                "threads": args.threads, "repeats": args.repeats, "batch": B, "text_tokens": T, "width": W,
                "route": ROUTE, "frames": args.frames}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
