"""The TREAD router on every family of its registry (diffusers_tread/models/families.py), on tiny random configs.

A family here is a ``Case``: its tiny model, its inputs, and a hand-written gather of its per-token block inputs for
one sample (independent of the router's ``TokenInput`` lines). Every config has an image-token count that differs from
every other size in it (batch 3, text 5, widths 16/32, heads 2, head dim 8, 6 modulation chunks), so a wrong axis
cannot pass by coincidence. Adding a family: a registry line plus a ``Case`` here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import diffusers
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from diffusers_tread import apply_tread
from diffusers_tread.models import families
from diffusers_tread.models.router import attached_router

BATCH, TEXT = 3, 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grid_ids(frames: int, rows: int, cols: int) -> torch.Tensor:
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([f, r, c], dim=-1).reshape(-1, 3).float()


# --- the families' tiny configs and hand-written per-sample gathers ---------------------------------------------------


@dataclass
class Case:
    name: str
    model_class: str
    config: dict
    inputs: Callable[[torch.Generator, int], dict]
    num_image: int
    route: dict
    gather: dict[str, Callable] = field(default_factory=dict)  # name -> (value of one sample, kept, N, T) -> rows
    text_args: tuple[str, ...] = ("encoder_hidden_states",)
    keep_first_frame: bool = False
    # inputs the stock model's checkpointed forward drops (Chroma's single blocks get no attention_mask there)
    not_checkpointed: tuple[str, ...] = ()
    # text tokens the blocks see (AuraFlow adds 8 register tokens, HiDream concatenates T5 and two Llama layers)
    joint_text: int = TEXT
    # the next block's text stream from this block's text output and the model's input to the next block
    next_text: Callable | None = None
    # a second token stream the blocks return besides the image one and that is never routed (LTX-2's audio): the
    # reference carries the sample's own stream from block to block
    second_stream: str | None = None

    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v")
    # zero-initialised gates (Kandinsky 5's modulation) make every block the identity: give them random values
    randomize_zero_init: bool = False
    # the reference comparison's rtol/atol: fp32 rounding, a few blocks deep (see the Kandinsky 5 entry)
    reference_tolerance: float = 1e-5

    def make(self, seed: int = 0):
        torch.manual_seed(seed)
        model = getattr(diffusers, self.model_class)(**self.config)
        if self.randomize_zero_init:
            with torch.no_grad():
                for parameter in model.parameters():
                    if not parameter.any():
                        parameter.normal_(0.0, 0.1)
        return model

    def make_inputs(self, seed: int = 0, batch_size: int = BATCH) -> dict:
        return self.inputs(torch.Generator().manual_seed(seed), batch_size)


def _joint_rows(kept, num_text):  # text-first shared table: all text rows, then the kept image rows
    return torch.cat([torch.arange(num_text), kept + num_text])


def _pixart_inputs(g, b):
    return dict(
        hidden_states=torch.randn(b, 4, 6, 10, generator=g),  # patch 2: 3 x 5 = 15 tokens
        encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
        attention_mask=torch.rand(b, 15, 15, generator=g) > 0.2,  # a full (query, key) image mask, N x N
    )


def _pixart_mask(value, kept, n, t):
    value = value[:, kept] if value.shape[1] == n else value
    return value[:, :, kept]


def _sd3_inputs(g, b):
    return dict(
        hidden_states=torch.randn(b, 4, 6, 10, generator=g),
        encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
        pooled_projections=torch.randn(b, 10, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
    )


def _flux_inputs(g, b):
    return dict(
        hidden_states=torch.randn(b, 15, 4, generator=g),  # 3 x 5 grid
        encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
        pooled_projections=torch.randn(b, 10, generator=g),
        timestep=torch.rand(b, generator=g),
        img_ids=_grid_ids(1, 3, 5),
        txt_ids=torch.zeros(TEXT, 3),
    )


def _wan_inputs(frames, per_token_timestep=False, image=False, in_channels=4):
    def make(g, b):
        inputs = dict(
            hidden_states=torch.randn(b, in_channels, frames, 6, 8, generator=g),  # patch (1, 2, 2): 3 x 4 per frame
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.randint(0, 1000, (b,), generator=g),
        )
        if per_token_timestep:  # Wan 2.2 TI2V: the first (conditioning) frame at t = 0, the rest at t
            timestep = inputs["timestep"][:, None].repeat(1, frames * 12)
            timestep[:, :12] = 0
            inputs["timestep"] = timestep
        if image:  # Wan 2.1 I2V: CLIP image tokens; the image latent is concatenated on the channels
            inputs["encoder_hidden_states_image"] = torch.randn(b, 4, 12, generator=g)
        return inputs

    return make


_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=12,
    freq_dim=8,
    ffn_dim=32,
    num_layers=6,
    rope_max_seq_len=32,
)
_WAN_GATHER = {
    "rotary_emb": lambda v, kept, n, t: tuple(table[:, kept] for table in v),
    "temb": lambda v, kept, n, t: v[:, kept] if v.ndim == 4 else v,
}


def _ltx_inputs(per_token_timestep=False, frames=3):
    def make(g, b):
        n = frames * 7
        inputs = dict(
            hidden_states=torch.randn(b, n, 4, generator=g),  # frames x 7 tokens, packed
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.randint(0, 1000, (b,), generator=g),
            encoder_attention_mask=torch.ones(b, TEXT),
            num_frames=frames,
            height=1,
            width=7,
            video_coords=_grid_ids(frames, 1, 7).T[None].expand(b, -1, -1).contiguous(),  # (B, 3, N) frame/row/col
        )
        if per_token_timestep:
            inputs["timestep"] = torch.randint(0, 1000, (b, n), generator=g)
        return inputs

    return make


_LTX = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    num_layers=6,
    caption_channels=12,
)
_LTX_GATHER = {
    "image_rotary_emb": lambda v, kept, n, t: tuple(table[:, kept] for table in v),
    "temb": lambda v, kept, n, t: v[:, kept] if v.shape[1] == n else v,
}

ROUTE = {"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.5}

CASES = [
    Case(
        "pixart",
        "PixArtTransformer2DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=6,
            cross_attention_dim=16,
            sample_size=6,
            patch_size=2,
            caption_channels=12,
            use_additional_conditions=False,
        ),
        _pixart_inputs,
        15,
        ROUTE,
        gather={"attention_mask": _pixart_mask},
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
    ),
    Case(
        "sd3",
        "SD3Transformer2DModel",
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=6,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            caption_projection_dim=16,
            pooled_projection_dim=10,
            out_channels=4,
            pos_embed_max_size=10,
            dual_attention_layers=(0, 1, 2),
            qk_norm="rms_norm",
        ),
        _sd3_inputs,
        15,
        ROUTE,
    ),
    Case(
        "flux",
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            pooled_projection_dim=10,
            axes_dims_rope=(2, 2, 4),
        ),
        _flux_inputs,
        15,
        ROUTE,  # double block 1 .. single block 2
        gather={"image_rotary_emb": lambda v, kept, n, t: tuple(table[_joint_rows(kept, t)] for table in v)},
    ),
    Case("wan_t2v", "WanTransformer3DModel", _WAN, _wan_inputs(frames=2), 24, ROUTE, gather=_WAN_GATHER),
    Case("wan_one_frame", "WanTransformer3DModel", _WAN, _wan_inputs(frames=1), 12, ROUTE, gather=_WAN_GATHER),
    Case(
        "wan_i2v",
        "WanTransformer3DModel",
        {**_WAN, "in_channels": 8, "image_dim": 12, "added_kv_proj_dim": 16},
        _wan_inputs(frames=2, image=True, in_channels=8),
        24,
        ROUTE,
        gather=_WAN_GATHER,
    ),
    Case(
        "wan_ti2v",
        "WanTransformer3DModel",
        _WAN,
        _wan_inputs(frames=3, per_token_timestep=True),
        36,
        ROUTE,
        gather=_WAN_GATHER,
        keep_first_frame=True,
    ),
    Case("ltx", "LTXVideoTransformer3DModel", _LTX, _ltx_inputs(), 21, ROUTE, gather=_LTX_GATHER),
    Case("ltx_one_frame", "LTXVideoTransformer3DModel", _LTX, _ltx_inputs(frames=1), 7, ROUTE, gather=_LTX_GATHER),
    Case(
        "ltx_per_token_timestep",
        "LTXVideoTransformer3DModel",
        _LTX,
        _ltx_inputs(per_token_timestep=True),
        21,
        ROUTE,
        gather=_LTX_GATHER,
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
    ),
]


def _ltx2_inputs(per_token_timestep=False, frames=3, self_attention_mask=False):
    """LTX-2: frames x 1 x 7 video tokens (21: no other size), 6 audio tokens, 5 text tokens per stream."""

    def make(g, b):
        n = frames * 7
        inputs = dict(
            hidden_states=torch.randn(b, n, 4, generator=g),
            audio_hidden_states=torch.randn(b, 6, 4, generator=g),
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            audio_encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.randint(0, 1000, (b, n) if per_token_timestep else (b,), generator=g),
            audio_timestep=torch.randint(0, 1000, (b,), generator=g),
            sigma=torch.rand(b, generator=g),
            encoder_attention_mask=torch.ones(b, TEXT),
            audio_encoder_attention_mask=torch.ones(b, TEXT),
            num_frames=frames,
            height=1,
            width=7,
            audio_num_frames=6,
        )
        if self_attention_mask:  # IC-LoRA's multiplicative video self-attention mask (B, N, N)
            inputs["video_self_attention_mask"] = torch.rand(b, n, n, generator=g)
        return inputs

    return make


_LTX2 = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    audio_in_channels=4,
    audio_out_channels=4,
    audio_num_attention_heads=2,
    audio_attention_head_dim=4,
    audio_cross_attention_dim=8,
    num_layers=6,
    caption_channels=12,
)
# LTX-2.3: split RoPE (B, heads, N, D'), gated attention, prompt modulation from sigma
_LTX2_3 = dict(
    _LTX2, rope_type="split", gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True
)


def _ltx2_rope(v, kept, n, t):
    return tuple(table[:, kept] if table.ndim == 3 else table[:, :, kept] for table in v)


def _ltx2_per_token(v, kept, n, t):
    return v[:, kept] if v.shape[1] == n else v


_LTX2_GATHER = {
    "video_rotary_emb": _ltx2_rope,
    "ca_video_rotary_emb": _ltx2_rope,
    "temb": _ltx2_per_token,
    "temb_ca_scale_shift": _ltx2_per_token,
    "temb_ca_gate": _ltx2_per_token,
    "self_attention_mask": lambda v, kept, n, t: v[:, kept][:, :, kept],
}
_LTX2_NEVER_ROUTED = (
    "encoder_hidden_states",
    "audio_encoder_hidden_states",
    "encoder_attention_mask",
    "audio_encoder_attention_mask",
    "audio_hidden_states",
    "temb_audio",
    "temb_ca_audio_scale_shift",
    "temb_ca_audio_gate",
    "audio_rotary_emb",
    "ca_audio_rotary_emb",
)
# the loss reads the video output: layers whose output reaches it (the last block's audio branch does not)
_LTX2_LORA = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "audio_to_video_attn.to_k")
CASES += [
    Case(
        "ltx2",
        "LTX2VideoTransformer3DModel",
        _LTX2,
        _ltx2_inputs(),
        21,
        ROUTE,
        gather=_LTX2_GATHER,
        text_args=_LTX2_NEVER_ROUTED,
        second_stream="audio_hidden_states",
        lora_targets=_LTX2_LORA,
    ),
    Case(
        "ltx2_per_token_timestep",
        "LTX2VideoTransformer3DModel",
        _LTX2,
        _ltx2_inputs(per_token_timestep=True),
        21,
        ROUTE,
        gather=_LTX2_GATHER,
        text_args=_LTX2_NEVER_ROUTED,
        second_stream="audio_hidden_states",
        lora_targets=_LTX2_LORA,
    ),
    Case(
        "ltx2_one_frame",
        "LTX2VideoTransformer3DModel",
        _LTX2,
        _ltx2_inputs(frames=1),
        7,
        ROUTE,
        gather=_LTX2_GATHER,
        text_args=_LTX2_NEVER_ROUTED,
        second_stream="audio_hidden_states",
        lora_targets=_LTX2_LORA,
    ),
    Case(
        "ltx2_3_split_rope_video_mask",
        "LTX2VideoTransformer3DModel",
        _LTX2_3,
        _ltx2_inputs(per_token_timestep=True, self_attention_mask=True),
        21,
        ROUTE,
        gather=_LTX2_GATHER,
        text_args=_LTX2_NEVER_ROUTED,
        second_stream="audio_hidden_states",
        lora_targets=_LTX2_LORA,
    ),
]


def _flux_like_inputs(g, b, mask=False):
    inputs = _flux_inputs(g, b)
    del inputs["pooled_projections"]
    if mask:  # Chroma: a (B, T + N) mask, text first; the last text token of sample 0 is padding
        inputs["attention_mask"] = torch.ones(b, TEXT + 15)
        inputs["attention_mask"][0, TEXT - 1] = 0
    return inputs


def _video_inputs(channels_first=True, frames=2, text_dim=12, **extra):
    def make(g, b):
        shape = (b, 4, frames, 6, 10) if channels_first else (b, frames, 4, 6, 10)
        inputs = dict(
            hidden_states=torch.randn(*shape, generator=g),  # patch 2: 3 x 5 tokens per frame
            encoder_hidden_states=torch.randn(b, TEXT, text_dim, generator=g),
            timestep=torch.randint(1, 1000, (b,), generator=g),
        )
        for name, make_value in extra.items():
            inputs[name] = make_value(g, b)
        return inputs

    return make


def _text_mask(g, b):
    mask = torch.ones(b, TEXT)
    mask[0, -2:] = 0
    return mask


_SHARED_ROWS = lambda v, kept, n, t: tuple(table[kept] for table in v)  # noqa: E731
_SKYREELS = {**_WAN, "num_frame_per_block": 2}
_HUNYUAN_VIDEO = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_single_layers=4,
    num_refiner_layers=1,
    patch_size=2,
    patch_size_t=1,
    guidance_embeds=False,
    text_embed_dim=12,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 2, 4),
)
_HUNYUAN_GATHER = {
    "freqs_cis": _SHARED_ROWS,
    "image_rotary_emb": _SHARED_ROWS,
    "attention_mask": lambda v, kept, n, t: v[..., torch.cat([kept, n + torch.arange(t)])],
}
_HUNYUAN_INPUTS = _video_inputs(
    encoder_attention_mask=_text_mask, pooled_projections=lambda g, b: torch.randn(b, 8, generator=g)
)

CASES += [
    Case(
        "chroma",
        "ChromaTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            axes_dims_rope=(2, 2, 4),
            approximator_num_channels=8,
            approximator_hidden_dim=16,
            approximator_layers=1,
        ),
        lambda g, b: _flux_like_inputs(g, b, mask=True),
        15,
        ROUTE,  # double block 1 .. single block 2 (a joint [text; image] stream)
        not_checkpointed=("attention_mask",),
        gather={
            "image_rotary_emb": lambda v, kept, n, t: tuple(table[_joint_rows(kept, t)] for table in v),
            "attention_mask": lambda v, kept, n, t: v[:, _joint_rows(kept, t)],
        },
    ),
    Case(
        "cogview4",
        "CogView4Transformer2DModel",
        dict(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            attention_head_dim=8,
            num_attention_heads=2,
            text_embed_dim=12,
            time_embed_dim=8,
            condition_dim=4,
            pos_embed_max_size=16,
            sample_size=8,
            rope_axes_dim=(4, 4),
        ),
        lambda g, b: dict(
            hidden_states=torch.randn(b, 4, 6, 10, generator=g),
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.randint(0, 1000, (b,), generator=g),
            original_size=torch.tensor([[48.0, 80.0]] * b),
            target_size=torch.tensor([[48.0, 80.0]] * b),
            crop_coords=torch.zeros(b, 2),
        ),
        15,
        ROUTE,
        gather={"image_rotary_emb": _SHARED_ROWS},
        text_args=("encoder_hidden_states", "attention_mask"),
    ),
    Case(
        "skyreels_v2_diffusion_forcing",
        "SkyReelsV2Transformer3DModel",
        _SKYREELS,
        lambda g, b: dict(
            hidden_states=torch.randn(b, 4, 4, 6, 8, generator=g),  # 4 frames x 3 x 4 = 48 tokens, 2 frames a block
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.randint(0, 1000, (b, 4), generator=g),  # one timestep per frame
            enable_diffusion_forcing=True,
        ),
        48,
        ROUTE,
        gather={
            "rotary_emb": lambda v, kept, n, t: tuple(table[:, kept] for table in v),
            "temb": lambda v, kept, n, t: v[:, :, kept] if v.ndim == 4 else v,
            "attention_mask": lambda v, kept, n, t: v[:, :, kept][:, :, :, kept],
        },
    ),
    Case(
        "hunyuan_video",
        "HunyuanVideoTransformer3DModel",
        _HUNYUAN_VIDEO,
        _HUNYUAN_INPUTS,
        30,
        ROUTE,
        gather=_HUNYUAN_GATHER,
        text_args=("encoder_hidden_states",),
    ),
    Case(
        "hunyuan_video_i2v_token_replace",
        "HunyuanVideoTransformer3DModel",
        {**_HUNYUAN_VIDEO, "image_condition_type": "token_replace"},
        _HUNYUAN_INPUTS,
        30,
        ROUTE,
        gather=_HUNYUAN_GATHER,
        keep_first_frame=True,
    ),
    Case(
        "cogvideox_1_5",
        "CogVideoXTransformer3DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=12,
            num_layers=6,
            sample_width=10,
            sample_height=6,
            sample_frames=5,
            patch_size=2,
            max_text_seq_length=TEXT,
            use_rotary_positional_embeddings=True,
        ),
        _video_inputs(
            channels_first=False,
            image_rotary_emb=lambda g, b: (torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)),
        ),
        30,
        ROUTE,
        gather={"image_rotary_emb": _SHARED_ROWS},
    ),
    Case(
        "mochi",
        "MochiTransformer3DModel",
        dict(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=6,
            pooled_projection_dim=8,
            in_channels=4,
            text_embed_dim=16,  # its caption pooler has 8 heads
            time_embed_dim=4,
            max_sequence_length=TEXT,
        ),
        _video_inputs(text_dim=16, encoder_attention_mask=_text_mask),
        30,
        ROUTE,
        gather={
            "image_rotary_emb": lambda v, kept, n, t: v[kept] if torch.is_tensor(v) else _SHARED_ROWS(v, kept, n, t)
        },
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
    ),
]


def _qwen_inputs(edit=False, layered=False):
    def make(g, b):
        shapes = [(1, 3, 5), (1, 3, 2)] if edit else [(1, 3, 5)]  # Edit: the reference image's tokens follow
        if layered:  # Layered: two output layers, then the condition image
            shapes = [(1, 3, 5), (1, 3, 5), (1, 3, 2)]
        n = sum(f * h * w for f, h, w in shapes)
        return dict(
            hidden_states=torch.randn(b, n, 16, generator=g),
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            encoder_hidden_states_mask=torch.ones(b, TEXT),
            timestep=torch.rand(b, generator=g),
            img_shapes=[shapes] * b,
        )

    return make


_QWEN = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=6,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    axes_dims_rope=(2, 2, 4),
)
_QWEN_GATHER = {
    "image_rotary_emb": lambda v, kept, n, t: (v[0][kept], v[1]),
    "modulate_index": lambda v, kept, n, t: v[:, kept],
}

_FLUX2 = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    timestep_guidance_channels=8,
    mlp_ratio=2.0,
    axes_dims_rope=(2, 2, 2, 2),
    guidance_embeds=False,
)
_FLUX2_GATHER = {"image_rotary_emb": lambda v, kept, n, t: tuple(table[_joint_rows(kept, t)] for table in v)}


def _flux2_ids(grid, time):  # Flux.2's (t, h, w, l) ids; Flux2Pipeline gives the reference images t = 10, 20, ...
    ids = _grid_ids(1, *grid)
    return torch.cat([torch.full((len(ids), 1), float(time)), ids[:, 1:], torch.zeros(len(ids), 1)], dim=1)


def _flux2_inputs(references=()):  # the target's 3 x 5 tokens, then each reference image's (rows, cols) grid
    def make(g, b):
        grids = [(3, 5), *references]
        ids = torch.cat([_flux2_ids(grid, 10 * i) for i, grid in enumerate(grids)])
        return dict(
            hidden_states=torch.randn(b, len(ids), 4, generator=g),
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.rand(b, generator=g),
            img_ids=ids,
            txt_ids=torch.zeros(TEXT, 4),
        )

    return make


CASES += [
    Case("flux2", "Flux2Transformer2DModel", _FLUX2, _flux2_inputs(), 15, ROUTE, gather=_FLUX2_GATHER),
    # two reference images (2 x 3 and 1 x 4 tokens) after the target's 15: they stay in every route
    Case(
        "flux2_edit",
        "Flux2Transformer2DModel",
        _FLUX2,
        _flux2_inputs([(2, 3), (1, 4)]),
        25,
        ROUTE,
        gather=_FLUX2_GATHER,
    ),
    Case(
        "auraflow",
        "AuraFlowTransformer2DModel",
        dict(
            sample_size=6,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=2,
            num_single_dit_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            caption_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=64,
        ),
        lambda g, b: dict(
            hidden_states=torch.randn(b, 4, 6, 10, generator=g),
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.rand(b, generator=g),
        ),
        15,
        ROUTE,  # joint block 1 .. single block 2
        joint_text=TEXT + 8,  # AuraFlow prepends 8 register tokens to the text
    ),
    Case(
        "qwenimage",
        "QwenImageTransformer2DModel",
        _QWEN,
        _qwen_inputs(),
        15,
        ROUTE,
        gather=_QWEN_GATHER,
        text_args=("encoder_hidden_states", "encoder_hidden_states_mask"),
    ),
    Case(
        "qwenimage_edit_zero_cond_t",
        "QwenImageTransformer2DModel",
        {**_QWEN, "zero_cond_t": True},
        _qwen_inputs(edit=True),
        21,
        ROUTE,
        gather=_QWEN_GATHER,
        text_args=("encoder_hidden_states", "encoder_hidden_states_mask"),
    ),
    Case(
        "qwenimage_layered",
        "QwenImageTransformer2DModel",
        {**_QWEN, "use_layer3d_rope": True},
        _qwen_inputs(layered=True),
        36,
        ROUTE,
        gather=_QWEN_GATHER,
        text_args=("encoder_hidden_states", "encoder_hidden_states_mask"),
    ),
]


def _allegro_inputs(g, b):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    *freqs, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=12, crops_coords=((0, 0), (4, 5)), grid_size=(4, 5), temporal_size=2
    )
    positions = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).T.reshape(3, 1, -1)
    freqs, positions = tuple(freqs), tuple(positions)  # (t, h, w) tables; 3 x (1, N) positions, as the pipeline
    return dict(
        hidden_states=torch.randn(b, 4, 2, 8, 10, generator=g),  # 2 frames x 4 x 5 (no table of BATCH rows)
        encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
        encoder_attention_mask=_text_mask(g, b),
        image_rotary_emb=(freqs, positions),
    )


def _cosmos_inputs(per_frame_timestep=False):
    def make(g, b):
        inputs = dict(
            hidden_states=torch.randn(b, 4, 2, 6, 10, generator=g),
            timestep=torch.rand(b, generator=g),
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
        )
        if per_frame_timestep:
            inputs["timestep"] = torch.rand(b, 1, 2, 1, 1, generator=g)
        return inputs

    return make


_COSMOS = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=12,
    num_layers=6,
    text_embed_dim=12,
    adaln_lora_dim=4,
    max_size=(4, 16, 16),
    patch_size=(1, 2, 2),
    encoder_hidden_states_channels=12,
    concat_padding_mask=False,  # the padding-mask resize needs torchvision
)
_COSMOS_GATHER = {
    "image_rotary_emb": _SHARED_ROWS,
    "extra_pos_emb": lambda v, kept, n, t: v[:, kept],
    "temb": lambda v, kept, n, t: v[:, kept] if v.ndim == 3 else v,
    "embedded_timestep": lambda v, kept, n, t: v[:, kept] if v.ndim == 3 else v,
}

CASES += [
    Case(
        "allegro",
        "AllegroTransformer3DModel",
        dict(
            patch_size=2,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=12,  # its RoPE splits a head into (t, h, w) thirds
            in_channels=4,
            out_channels=4,
            num_layers=6,
            cross_attention_dim=24,
            sample_height=8,
            sample_width=10,
            sample_frames=2,
            caption_channels=12,
        ),
        _allegro_inputs,
        40,
        ROUTE,
        gather={
            "image_rotary_emb": lambda v, kept, n, t: (v[0], tuple(p[:, kept] for p in v[1])),
            "attention_mask": lambda v, kept, n, t: v[:, :, kept],
        },
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
    ),
    Case(
        "cosmos",
        "CosmosTransformer3DModel",
        _COSMOS,
        _cosmos_inputs(),
        30,
        ROUTE,
        gather=_COSMOS_GATHER,
        text_args=("encoder_hidden_states", "attention_mask"),
    ),
    Case(
        "cosmos_per_frame_timestep",
        "CosmosTransformer3DModel",
        _COSMOS,
        _cosmos_inputs(per_frame_timestep=True),
        30,
        ROUTE,
        gather=_COSMOS_GATHER,
        text_args=("encoder_hidden_states", "attention_mask"),
    ),
    Case(
        "hunyuanimage_2_1",
        "HunyuanImageTransformer2DModel",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_single_layers=4,
            num_refiner_layers=1,
            patch_size=(1, 1),
            text_embed_dim=12,
            rope_axes_dim=(4, 4),
        ),
        lambda g, b: dict(
            hidden_states=torch.randn(b, 4, 3, 5, generator=g),
            timestep=torch.rand(b, generator=g) * 1000,
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            encoder_attention_mask=_text_mask(g, b),
        ),
        15,
        ROUTE,
        gather={
            "image_rotary_emb": _SHARED_ROWS,
            "attention_mask": lambda v, kept, n, t: v[..., torch.cat([kept, n + torch.arange(t)])],
        },
    ),
]

CASES += [
    Case(
        "hidream",
        "HiDreamImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=[12, 12],
            text_emb_dim=10,
            num_routed_experts=2,
            num_activated_experts=1,
            axes_dims_rope=(2, 2, 4),
            max_resolution=(16, 16),
            llama_layers=list(range(8)),
        ),
        lambda g, b: dict(
            hidden_states=torch.randn(b, 4, 6, 10, generator=g),  # training pads it to 8 x 8 = 64 (masked) tokens
            timesteps=torch.randint(0, 1000, (b,), generator=g),
            encoder_hidden_states_t5=torch.randn(b, TEXT, 12, generator=g),
            encoder_hidden_states_llama3=torch.randn(8, b, TEXT, 12, generator=g),
            pooled_embeds=torch.randn(b, 10, generator=g),
        ),
        64,
        ROUTE,  # double-stream blocks 1..4
        gather={
            "image_rotary_emb": lambda v, kept, n, t: v[:, torch.cat([kept, n + torch.arange(t)])],
            "hidden_states_masks": lambda v, kept, n, t: v[:, kept],
        },
        joint_text=3 * TEXT,
        # the model keeps the [t5; llama(-1)] part of a block's text output and appends the next llama layer
        next_text=lambda text, given: torch.cat([text[:, : 2 * TEXT], given[:, 2 * TEXT :]], dim=1),
    ),
]

CASES += [
    Case(
        "hunyuan_video_1_5_i2v",
        "HunyuanVideo15Transformer3DModel",
        dict(
            in_channels=9,  # latent 4 + conditioning latent 4 + mask 1, concatenated on the channels
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=6,
            num_refiner_layers=1,
            patch_size=1,
            text_embed_dim=12,
            text_embed_2_dim=12,
            image_embed_dim=12,
            rope_axes_dim=(2, 2, 4),
        ),
        lambda g, b: dict(
            hidden_states=torch.randn(b, 9, 2, 3, 5, generator=g),  # 2 frames x 3 x 5 = 30 tokens
            timestep=torch.rand(b, generator=g) * 1000,
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            encoder_attention_mask=_text_mask(g, b),
            encoder_hidden_states_2=torch.randn(b, 4, 12, generator=g),
            encoder_attention_mask_2=torch.ones(b, 4),
            image_embeds=torch.randn(b, 4, 12, generator=g),
        ),
        30,
        ROUTE,
        gather={"freqs_cis": _SHARED_ROWS},
        text_args=("encoder_hidden_states", "attention_mask"),
        joint_text=TEXT + 4 + 4,  # the blocks see [image embeds; byT5; MLLM] text tokens
    ),
]

CASES += [
    Case(
        "chroma_route_in_single_blocks",
        "ChromaTransformer2DModel",
        next(case for case in CASES if case.name == "chroma").config,
        lambda g, b: _flux_like_inputs(g, b, mask=True),
        15,
        {"start_layer_idx": 3, "end_layer_idx": 5, "selection_ratio": 0.5},  # starts and ends in the joint list
        gather=next(case for case in CASES if case.name == "chroma").gather,
        not_checkpointed=("attention_mask",),
    ),
]

CASES += [
    Case(
        "kandinsky5",
        "Kandinsky5Transformer3DModel",
        dict(
            in_visual_dim=4,
            in_text_dim=12,
            in_text_dim2=10,
            time_dim=16,
            out_visual_dim=4,
            patch_size=(1, 2, 2),
            model_dim=16,
            ff_dim=32,
            num_text_blocks=1,
            num_visual_blocks=6,
            axes_dims=(2, 2, 4),
        ),
        lambda g, b: dict(
            hidden_states=torch.randn(b, 2, 6, 10, 4, generator=g),  # (B, frames, H, W, C): 2 x 3 x 5 tokens
            encoder_hidden_states=torch.randn(b, TEXT, 12, generator=g),
            timestep=torch.rand(b, generator=g) * 1000,
            pooled_projections=torch.randn(b, 10, generator=g),
            visual_rope_pos=[torch.arange(2), torch.arange(3), torch.arange(5)],
            text_rope_pos=torch.arange(TEXT),
        ),
        30,
        ROUTE,
        gather={"rope": lambda v, kept, n, t: v[:, kept]},
        text_args=("text_embed",),
        lora_targets=("to_query", "to_key", "to_value"),
        randomize_zero_init=True,
        # its random gates make the route ill-conditioned: perturbing the pre-route state by fp32 rounding (1.2e-7
        # relative) moves the reference's output by up to 3e-4 (measured), so the sample-alone reference and the batched
        # route differ by that much wherever the CPU's kernels round differently; a wrong gather differs by O(1)
        reference_tolerance=1e-3,
    ),
]
ALL_CASES = CASES


def _family_supported_here(case: Case) -> bool:
    """The installed Diffusers has the case's class, and its registry line describes this release's forward."""
    if not hasattr(diffusers, case.model_class):
        return False
    family = next((f for f in families.FAMILIES if case.model_class in f.classes), None)
    return family is None or family.supported_here()


CASES = [case for case in CASES if _family_supported_here(case)]  # skipped: a class or forward this release lacks
IDS = [case.name for case in CASES]


def pair(case: Case):
    model, stock = case.make(), case.make()
    stock.load_state_dict(model.state_dict())
    return model, stock


def route_of(case: Case, model, **kwargs):
    return apply_tread(model, [case.route], keep_first_frame=case.keep_first_frame, **kwargs)


def bound(block, args, kwargs) -> dict:
    return dict(inspect.signature(block.forward).bind(*args, **kwargs).arguments)


def image_of(router, index, output, num_text=TEXT):
    position = router._block_list[index].output
    hidden = output if position is None else output[position]
    return hidden[:, num_text:] if router._block_list[index].joint else hidden  # the joint layouts here: text first


def text_of(router, index, output, num_text=TEXT):
    if router._block_list[index].joint:
        return output[:, :num_text]
    position = router._block_list[index].output
    return None if position is None else output[1 - position]


class Recorder:
    """Hooks that see each block's inputs before the router (``prepend``) and its output after it."""

    def __init__(self, router):
        self.inputs, self.outputs, self.after_router = {}, {}, {}
        for index, block in enumerate(router.blocks):
            block.register_forward_pre_hook(self._pre(index), with_kwargs=True, prepend=True)
            block.register_forward_pre_hook(self._after(index), with_kwargs=True)
            block.register_forward_hook(self._post(index))

    def _pre(self, index):
        def hook(block, args, kwargs):
            self.inputs.setdefault(index, bound(block, args, kwargs))

        return hook

    def _after(self, index):
        def hook(block, args, kwargs):
            self.after_router.setdefault(index, bound(block, args, kwargs))

        return hook

    def _post(self, index):
        def hook(block, args, output):
            self.outputs.setdefault(index, output)

        return hook


def one_sample(value, b):
    if isinstance(value, (tuple, list)):
        return type(value)(one_sample(item, b) for item in value)
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == BATCH:
        return value[b : b + 1]
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 2 * BATCH:
        return value[b::BATCH]  # Qwen's zero_cond_t stacks [temb(t); temb(0)] on the batch axis
    return value


def reference(case, router, recorder, b, kept):
    """Sample ``b`` alone through the route's stock blocks, its kept rows of every per-token input gathered by hand,
    the result scattered back into its pre-route state."""
    route = router.routes[0]
    start, end = route["start_layer_idx"], route["end_layer_idx"]
    hidden_name = router._block_list[start].hidden
    pre_route = recorder.inputs[start][hidden_name][b : b + 1]
    text = None
    if router._block_list[start].joint:
        text, pre_route = pre_route[:, : case.joint_text], pre_route[:, case.joint_text :]
    hidden, second = pre_route[:, kept], None
    with torch.no_grad():
        for index in range(start, end + 1):
            kwargs = {name: one_sample(value, b) for name, value in recorder.inputs[index].items()}
            for name, gather in case.gather.items():
                if kwargs.get(name) is not None:
                    kwargs[name] = gather(kwargs[name], kept, case.num_image, case.joint_text)
            kwargs[hidden_name] = hidden
            if second is not None:
                kwargs[case.second_stream] = second
            if text is not None and router._block_list[index].joint:
                kwargs[hidden_name] = torch.cat([text, hidden], dim=1)
            elif text is not None and "encoder_hidden_states" in kwargs:
                given = kwargs["encoder_hidden_states"]
                kwargs["encoder_hidden_states"] = text if case.next_text is None else case.next_text(text, given)
            output = router.blocks[index](**kwargs)
            hidden = image_of(router, index, output, case.joint_text)
            if case.second_stream is not None:
                second = output[1 - router._block_list[index].output]
            else:
                text = text_of(router, index, output, case.joint_text)
    expected = pre_route.clone()
    expected[:, kept] = hidden
    return expected, pre_route


def routed_forward(case, model, router):
    recorder = Recorder(router)
    model(**case.make_inputs())
    return recorder, router.route_masks[0]


# --- eval mode and ratio 0 are the stock model -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_and_ratio_zero_equal_the_stock_model_bit_for_bit(case):
    model, stock = pair(case)
    router = route_of(case, model)
    inputs = case.make_inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).sample, stock.eval()(**inputs).sample)
        assert router.route_masks is None
        model.train(), stock.train()
        routed = model(**inputs).sample
        assert router.route_masks[0].any() and not torch.allclose(routed, stock(**inputs).sample)
        router.selection_ratio = 0.0
        assert torch.equal(model(**inputs).sample, stock(**inputs).sample)
        assert not router.route_masks[0].any()


# --- a routed sample equals the same sample alone through a hand-written reference -------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_routed_sample_equals_the_sample_alone_through_a_reference(case):
    model = case.make().train()
    router = route_of(case, model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        recorder, mask = routed_forward(case, model, router)
    end = router.routes[0]["end_layer_idx"]
    routed = image_of(router, end, recorder.outputs[end], case.joint_text)
    assert routed.shape[1] == case.num_image
    assert not (mask == mask[0]).all(), "subsets are drawn per sample"
    for b in range(BATCH):
        kept = (~mask[b]).nonzero().squeeze(1)
        expected, pre_route = reference(case, router, recorder, b, kept)
        assert torch.equal(routed[b][mask[b]], pre_route[0][mask[b]])  # bypassed: the pre-route state, exactly
        assert not torch.allclose(routed[b][~mask[b]], pre_route[0][~mask[b]])  # the route's blocks did something
        tolerance = case.reference_tolerance
        torch.testing.assert_close(routed[b : b + 1], expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bypassed_tokens_re_enter_with_pre_route_state_plus_input_in_v1_mode(case):
    model = case.make().train()
    router = route_of(
        case, model, generator=torch.Generator().manual_seed(2), route_reinsertion="pre_route_plus_input"
    )
    with torch.no_grad():
        recorder, mask = routed_forward(case, model, router)
    start, end = router.routes[0]["start_layer_idx"], router.routes[0]["end_layer_idx"]
    routed = image_of(router, end, recorder.outputs[end], case.joint_text)
    hidden_name = router._block_list[start].hidden
    pre_route = recorder.inputs[start][hidden_name]
    if router._block_list[start].joint:  # a route starting in a joint [text; image] list: its image part
        pre_route = pre_route[:, case.joint_text :]
    expected = pre_route + recorder.inputs[0][router._block_list[0].hidden]
    assert torch.equal(routed[mask], expected[mask])
    assert mask.any(1).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_text_is_never_routed_and_routed_blocks_see_the_kept_tokens(case):
    model = case.make().train()
    router = route_of(case, model)
    with torch.no_grad():
        recorder, mask = routed_forward(case, model, router)
    kept = case.num_image - int(mask[0].sum())
    assert kept < case.num_image
    route = router.routes[0]
    for index in range(router.num_blocks):
        before, after = recorder.inputs[index], recorder.after_router[index]
        for name in case.text_args:
            if before.get(name) is not None:
                assert after[name] is before[name], f"block {index}: {name} was changed"
        if route["start_layer_idx"] <= index <= route["end_layer_idx"]:
            joint = router._block_list[index].joint
            hidden = router._block_list[index].hidden
            assert after[hidden].shape[1] == kept + (case.joint_text if joint else 0), index
        else:
            hidden = router._block_list[index].hidden
            assert after[hidden] is before[hidden], index  # outside a route: untouched


# --- positions computed from ids: the kept tokens' rotary rows are those of the kept ids -------------------------------


def _flux_rows(model, inputs, kept):  # Flux.1 and Chroma: one table over [txt_ids; img_ids]
    return model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"][kept]]))


def _flux2_rows(model, inputs, kept):  # Flux.2: the text and image tables computed apart, then joined text first
    text, image = model.pos_embed(inputs["txt_ids"]), model.pos_embed(inputs["img_ids"][kept])
    return tuple(torch.cat([t, i]) for t, i in zip(text, image, strict=True))


_ROTARY_FROM_IDS = {
    "flux": _flux_rows,
    "chroma": _flux_rows,
    "chroma_route_in_single_blocks": _flux_rows,
    "flux2": _flux2_rows,
    "flux2_edit": _flux2_rows,
}


@pytest.mark.parametrize("name", [name for name in _ROTARY_FROM_IDS if name in IDS])
def test_flux_kept_rotary_rows_equal_rows_recomputed_from_the_kept_ids(name):
    """Flux.1, Chroma, Flux.2: every routed block's per-sample rotary rows are the model's RoPE of the kept ids."""
    case = next(c for c in CASES if c.name == name)
    model = case.make().train()
    router = route_of(case, model, generator=torch.Generator().manual_seed(3))
    inputs = case.make_inputs()
    recorder = Recorder(router)
    with torch.no_grad():
        model(**inputs)
    (mask,) = router.route_masks
    for index in range(router.routes[0]["start_layer_idx"], router.routes[0]["end_layer_idx"] + 1):
        cos, sin = recorder.after_router[index]["image_rotary_emb"]
        for b in range(BATCH):
            kept = (~mask[b]).nonzero().squeeze(1)
            expected_cos, expected_sin = _ROTARY_FROM_IDS[name](model, inputs, kept)
            assert torch.equal(cos.rows[b], expected_cos) and torch.equal(sin.rows[b], expected_sin), (index, b)


def test_hidream_kept_rotary_rows_equal_rows_recomputed_from_the_kept_ids():
    """HiDream builds its image ids inside the forward (a 3 x 5 patch grid padded to max_resolution's 8 x 8 = 64
    rows of id 0) and a per-sample table over [img_ids; txt_ids]: the routed blocks' rows are the model's RoPE of
    the kept image ids, written out here by hand, followed by the 15 text ids (all 0)."""
    case = next(c for c in CASES if c.name == "hidream")
    model = case.make().train()
    router = route_of(case, model, generator=torch.Generator().manual_seed(3))
    recorder = Recorder(router)
    with torch.no_grad():
        model(**case.make_inputs())
    (mask,) = router.route_masks
    img_ids = torch.zeros(64, 3)
    img_ids[:15] = _grid_ids(1, 3, 5)
    txt_ids = torch.zeros(case.joint_text, 3)
    for index in range(router.routes[0]["start_layer_idx"], router.routes[0]["end_layer_idx"] + 1):
        rows = recorder.after_router[index]["image_rotary_emb"]
        for b in range(BATCH):
            kept = (~mask[b]).nonzero().squeeze(1)
            expected = model.pe_embedder(torch.cat([img_ids[kept], txt_ids])[None])
            assert torch.equal(rows[b : b + 1], expected), (index, b)


@pytest.mark.parametrize("name", ["ltx", "ltx_per_token_timestep"])
def test_ltx_kept_rotary_rows_equal_rows_recomputed_from_the_kept_coordinates(name):
    case = next(c for c in CASES if c.name == name)
    model = case.make().train()
    router = route_of(case, model, generator=torch.Generator().manual_seed(3))
    inputs = case.make_inputs()
    recorder = Recorder(router)
    with torch.no_grad():
        model(**inputs)
    (mask,) = router.route_masks
    cos, sin = recorder.after_router[router.routes[0]["start_layer_idx"]]["image_rotary_emb"]
    for b in range(BATCH):
        kept = (~mask[b]).nonzero().squeeze(1)
        coords = inputs["video_coords"][b : b + 1, :, kept]
        expected_cos, expected_sin = model.rope(inputs["hidden_states"][:1, kept], video_coords=coords)
        torch.testing.assert_close(cos[b : b + 1], expected_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[b : b + 1], expected_sin, rtol=0, atol=1e-6)


# --- image-to-video conditioning frame, one-frame video ---------------------------------------------------------------


def test_wan_ti2v_first_frame_stays_in_every_route():
    case = next(c for c in CASES if c.name == "wan_ti2v")
    model = case.make().train()
    router = route_of(case, model, generator=torch.Generator().manual_seed(4))
    router.selection_ratio = 0.75
    model(**case.make_inputs())
    (mask,) = router.route_masks
    assert not mask[:, :12].any()  # the 3 x 4 tokens of the conditioning frame never bypass
    assert (mask[:, 12:].sum(1) == int(24 * 0.75)).all()  # the ratio applies to the other frames' tokens
    with pytest.raises(ValueError, match="no conditioning frame"):
        apply_tread(next(c for c in CASES if c.name == "flux").make(), keep_first_frame=True)


# --- an edit model's reference-image tokens stay in every route unless route_reference_tokens=True ---------------------


@pytest.mark.parametrize(
    "name, num_target", [("flux2_edit", 15), ("qwenimage_edit_zero_cond_t", 15), ("qwenimage_layered", 30)]
)
def test_reference_image_tokens_stay_in_every_route(name, num_target):
    case = _case(name)
    model = case.make().train()
    router = route_of(case, model, generator=torch.Generator().manual_seed(4))
    router.selection_ratio = 0.75
    with torch.no_grad():
        model(**case.make_inputs())
    (mask,) = router.route_masks
    assert not mask[:, num_target:].any()  # the reference images' tokens never bypass
    assert (mask[:, :num_target].sum(1) == int(num_target * 0.75)).all()  # the ratio applies to the target's
    router.remove()
    router = route_of(case, model, generator=torch.Generator().manual_seed(4), route_reference_tokens=True)
    router.selection_ratio = 0.75
    with torch.no_grad():
        model(**case.make_inputs())
    (mask,) = router.route_masks
    assert mask[:, num_target:].any() and (mask.sum(1) == int(case.num_image * 0.75)).all()  # routed like the rest


def test_reference_tokens_that_cannot_be_told_apart_are_refused():
    flux2 = _case("flux2_edit")
    inputs = flux2.make_inputs()
    inputs["img_ids"] = inputs["img_ids"].flip(0)  # the reference images' ids before the target's
    model = flux2.make().train()
    route_of(flux2, model)
    with pytest.raises(ValueError, match="do not have that order"):
        model(**inputs)
    qwen = _case("qwenimage_edit_zero_cond_t")
    inputs = qwen.make_inputs()
    inputs["img_shapes"] = [[(1, 3, 5), (1, 3, 2)], [(1, 3, 4), (1, 3, 3)], [(1, 3, 5), (1, 3, 2)]]
    model = qwen.make().train()
    route_of(qwen, model)
    with pytest.raises(ValueError, match="different reference-image token counts"):
        model(**inputs)


# --- gradient checkpointing, LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_checkpointing_gives_the_same_gradients(case):
    plain, checkpointed = pair(case)
    plain.train(), checkpointed.train()
    checkpointed.enable_gradient_checkpointing()
    routers = [route_of(case, m, generator=torch.Generator().manual_seed(5)) for m in (plain, checkpointed)]
    inputs = {k: v for k, v in case.make_inputs().items() if k not in case.not_checkpointed}
    outputs = [m(**inputs).sample for m in (plain, checkpointed)]
    for output in outputs:
        output.square().mean().backward()
    assert torch.equal(routers[0].route_masks[0], routers[1].route_masks[0])
    torch.testing.assert_close(outputs[1], outputs[0])
    grads = dict(plain.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        if parameter.grad is not None or grads[name].grad is not None:
            torch.testing.assert_close(parameter.grad, grads[name].grad, msg=name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_parameters_get_gradients_under_routing(case):
    model = case.make().train()
    model.requires_grad_(False)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=list(case.lora_targets), init_lora_weights=False)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)
    router = route_of(case, model)
    model(**case.make_inputs()).sample.square().mean().backward()
    assert router.route_masks is not None
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.any() for p in lora.values())


# --- torch.compile(fullgraph=True): a shared-RoPE family (Flux) and a batched-RoPE family (Wan) ------------------------


@pytest.mark.parametrize("name", ["flux", "wan_ti2v"])
def test_routed_forward_compiles_with_fullgraph(name):
    """Dynamo traces the whole routed forward, hooks included, without a graph break (``fullgraph=True``). The
    ``eager`` backend runs the captured graph op by op: the check is the capture, and it keeps the test at seconds on
    a loaded CPU (inductor's code generation would take minutes)."""
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == name)
    model = case.make().train()
    router = route_of(case, model)  # generator=None: the global RNG (a torch.Generator argument breaks the graph)
    inputs = case.make_inputs()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.manual_seed(7)
        out = compiled(**inputs).sample
        masks = router.route_masks
        torch.manual_seed(7)
        expected = model(**inputs).sample
    assert masks is not None and torch.equal(masks[0], router.route_masks[0])
    torch.testing.assert_close(out, expected)
    torch._dynamo.reset()


def test_flux2_compiles_with_the_reference_token_count_given():
    """Flux.2 finds reference-image tokens by reading img_ids, which Dynamo cannot trace: a compiled forward asks
    for ``router.reference_tokens`` (0 for text-to-image) and then compiles with fullgraph=True, references kept."""
    torch._dynamo.reset()
    for name, count in (("flux2", 0), ("flux2_edit", 10)):
        case = _case(name)
        model = case.make().train()
        router = route_of(case, model)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad(), pytest.raises(Exception, match="router.reference_tokens"):
            compiled(**case.make_inputs())
        torch._dynamo.reset()
        router.reference_tokens = count
        with torch.no_grad():
            torch.manual_seed(7)
            out = compiled(**case.make_inputs()).sample
            masks = router.route_masks
            router.reference_tokens = None  # eager: found from img_ids, the same count
            torch.manual_seed(7)
            expected = model(**case.make_inputs()).sample
        assert torch.equal(masks[0], router.route_masks[0]) and not masks[0][:, case.num_image - count :].any()
        torch.testing.assert_close(out, expected)
        torch._dynamo.reset()


def test_flux_blocks_compiled_one_by_one_route():
    """``block.compile(fullgraph=True)`` on every block (the regional compilation Diffusers recommends): the router's
    hooks and the per-sample RoPE rows trace without a graph break, and the output equals the eager routed one."""
    torch._dynamo.reset()
    case = _case("flux")
    model = case.make().train()
    router = route_of(case, model)
    blocks = router.blocks
    for block in blocks:
        block.compile(fullgraph=True, backend="eager")
    inputs = case.make_inputs()
    with torch.no_grad():
        torch.manual_seed(7)
        out = model(**inputs).sample
        masks = router.route_masks
        for block in blocks:
            block._compiled_call_impl = None  # back to eager
        torch.manual_seed(7)
        expected = model(**inputs).sample
    assert torch.equal(masks[0], router.route_masks[0]) and masks[0].any()
    torch.testing.assert_close(out, expected)
    torch._dynamo.reset()


# --- refusals, skipped classes ----------------------------------------------------------------------------------------

REFUSED = [family for family in families.FAMILIES if family.refuse is not None and family.installed_classes()]


@pytest.mark.parametrize("family", REFUSED, ids=[f.name for f in REFUSED])
def test_refused_classes_name_their_reason(family):
    for model_class in family.installed_classes():
        model = model_class.__new__(model_class)  # the refusal comes before anything touches the model
        with pytest.raises(TypeError, match="cannot route") as error:
            apply_tread(model)
        assert family.refuse in str(error.value)


def test_a_class_missing_from_diffusers_is_skipped():
    family = families.Family(name="future", classes=("NoSuchTransformer3DModel",))
    assert family.installed_classes() == []
    with pytest.raises(TypeError, match="TREAD routing supports PixArtTransformer2DModel"):
        apply_tread(torch.nn.Linear(2, 2))


def _case(name):
    case = next((c for c in CASES if c.name == name), None)
    if case is None:
        pytest.skip(f"the installed Diffusers {diffusers.__version__} has no routable {name} (class or forward)")
    return case


def test_a_family_newer_than_the_installed_release_is_refused_naming_the_release(monkeypatch):
    """A registry line that describes a newer release's forward (`Family.min_diffusers`) refuses the class on an
    older one, naming the release to install, instead of routing the wrong axes."""
    case = next(c for c in ALL_CASES if c.name == "qwenimage")
    family = next(f for f in families.FAMILIES if case.model_class in f.classes)
    assert family.min_diffusers == (0, 42)
    model_class = getattr(diffusers, case.model_class)
    model = model_class.__new__(model_class)  # the refusal comes before anything touches the model
    monkeypatch.setattr(families.compat, "DIFFUSERS_RELEASE", (0, 35, 2))
    with pytest.raises(TypeError, match=r"QwenImageTransformer2DModel .* needs Diffusers >= 0\.42: older releases"):
        apply_tread(model)
    monkeypatch.setattr(families.compat, "DIFFUSERS_RELEASE", (0, 42, 0))
    assert families.family_for(model) is family


@pytest.mark.parametrize(
    "name, extra, match",
    [
        ("flux", {"controlnet_block_samples": [torch.zeros(BATCH, 15, 16)]}, "ControlNet"),
        ("flux", {"joint_attention_kwargs": {"attention_mask": torch.ones(BATCH, 1, 1, 20)}}, "attention_mask"),
        ("sd3", {"block_controlnet_hidden_states": [torch.zeros(BATCH, 15, 16)]}, "ControlNet"),
        ("sd3", {"skip_layers": [2]}, "skip_layers"),  # inside the route 1..4
    ],
)
def test_forward_arguments_routing_cannot_honour_raise(name, extra, match):
    case = _case(name)
    model = case.make().train()
    router = route_of(case, model)
    with pytest.raises(ValueError, match=match):
        model(**case.make_inputs(), **extra)
    assert router._open == {} and router._active_routes is None  # the failed forward left no state behind


def test_context_parallelism_is_refused():
    case = _case("wan_t2v")
    model = case.make().train()
    route_of(case, model)
    model._parallel_config = object()  # what enable_parallelism records
    with pytest.raises(ValueError, match="parallelism"):
        model(**case.make_inputs())


def test_an_ambiguous_shape_is_refused():
    """A block tensor that no line declares, with the image-token count along axis 1, may be per token: refuse.
    Here Wan's line without its ``temb`` entry, on a video of exactly 6 tokens, where ``temb`` is (batch, 6, dim)."""
    import dataclasses

    case = _case("wan_t2v")
    model = case.make().train()
    router = route_of(case, model)
    inputs = case.make_inputs()
    inputs["hidden_states"] = inputs["hidden_states"][:, :, :1, :4, :6]  # 1 x 2 x 3 = 6 tokens
    model(
        **inputs
    )  # the real line declares temb: (batch, 6, dim) is per chunk by its ndim, (batch, N, 6, dim) per token
    router.family = dataclasses.replace(router.family, token_inputs={"rotary_emb": families.TokenInput()})
    with pytest.raises(ValueError, match="ambiguous"):
        model(**inputs)


def test_wrong_token_axis_size_is_refused_not_guessed():
    case = _case("ltx_per_token_timestep")
    model = case.make().train()
    route_of(case, model)
    inputs = case.make_inputs()
    inputs["video_coords"] = inputs["video_coords"][:, :, :20]  # RoPE rows for 20 of the 21 tokens
    with pytest.raises((ValueError, RuntimeError)):
        model(**inputs)


def test_every_routable_family_has_a_case_or_is_not_installed():
    tested = {case.model_class for case in CASES}
    for family in families.FAMILIES:
        if family.refuse is None and family.supported_here():
            for model_class in family.installed_classes():
                assert model_class.__name__ in tested, f"{family.name}: add a Case"


def test_deepcopy_keeps_a_working_router():
    import copy

    case = _case("wan_t2v")
    model = case.make().train()
    router = route_of(case, model)
    copied = copy.deepcopy(model)
    assert attached_router(copied) is not router
    copied(**case.make_inputs())
    assert attached_router(copied).route_masks is not None and router.route_masks is None


def test_cosmos_routes_with_text_and_image_context_as_a_tuple():
    """Cosmos with an image context passes (text, image context) as a tuple; a family without joint layouts never
    needs the text length (the router used to read it from encoder_hidden_states and failed on the tuple)."""
    case = _case("cosmos")
    config = {**case.config, "img_context_dim_in": 12, "img_context_num_tokens": 4, "img_context_dim_out": 24}
    torch.manual_seed(0)
    model = diffusers.CosmosTransformer3DModel(**config).train()
    router = route_of(case, model)
    inputs = case.make_inputs()
    inputs["encoder_hidden_states"] = (inputs["encoder_hidden_states"], torch.randn(BATCH, 4, 12))
    model(**inputs)
    assert router.route_masks is not None


def test_ltx_keep_first_frame_keeps_the_conditioning_frame_in_every_route():
    case = _case("ltx_per_token_timestep")
    model = case.make().train()
    router = apply_tread(model, [case.route], keep_first_frame=True)
    router.selection_ratio = 0.75
    model(**case.make_inputs())
    assert not router.route_masks[0][:, :7].any()  # height x width = 1 x 7 tokens a latent frame
    assert (router.route_masks[0][:, 7:].sum(1) == int(14 * 0.75)).all()


def test_ltx2_keep_first_frame_keeps_the_conditioning_frame_in_every_route():
    case = _case("ltx2_per_token_timestep")
    model = case.make().train()
    router = apply_tread(model, [case.route], keep_first_frame=True)
    router.selection_ratio = 0.75
    model(**case.make_inputs())
    assert not router.route_masks[0][:, :7].any()  # height x width = 1 x 7 tokens a latent frame
    assert (router.route_masks[0][:, 7:].sum(1) == int(14 * 0.75)).all()


@pytest.mark.parametrize("name", ["ltx2", "ltx2_3_split_rope_video_mask"])
def test_ltx2_kept_rotary_rows_equal_rows_recomputed_from_the_kept_coordinates(name):
    """Both video tables (self-attention RoPE over (frame, row, col), cross-modal RoPE over the frame coordinate),
    interleaved (B, N, D) and split (B, heads, N, D'), equal the model's own tables computed from the kept coords."""
    case = _case(name)
    model = case.make().train()
    router = route_of(case, model, generator=torch.Generator().manual_seed(3))
    inputs = case.make_inputs()
    recorder = Recorder(router)
    with torch.no_grad():
        model(**inputs)
    (mask,) = router.route_masks
    seen = recorder.after_router[router.routes[0]["start_layer_idx"]]
    coords = model.rope.prepare_video_coords(BATCH, inputs["num_frames"], inputs["height"], inputs["width"], "cpu")
    axis = 1 if model.config.rope_type == "interleaved" else 2
    for b in range(BATCH):
        kept = (~mask[b]).nonzero().squeeze(1)
        sample = coords[b : b + 1, :, kept]
        for name, rope, sample_coords in (
            ("video_rotary_emb", model.rope, sample),
            ("ca_video_rotary_emb", model.cross_attn_rope, sample[:, 0:1]),
        ):
            for table, expected in zip(seen[name], rope(sample_coords), strict=True):
                assert table.shape[axis] == kept.numel()
                torch.testing.assert_close(table[b : b + 1], expected, rtol=0, atol=1e-6)


def test_ltx2_audio_stream_is_dense_and_ratio_zero_audio_is_the_stock_models():
    """The audio tokens are never routed: every block sees all of them, and at ratio 0 (and in eval mode) the audio
    output is the stock model's bit for bit. Inside a route the audio queries attend to the kept video tokens."""
    case = _case("ltx2_per_token_timestep")
    model, stock = pair(case)
    router = route_of(case, model)
    inputs = case.make_inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).audio_sample, stock.eval()(**inputs).audio_sample)
        model.train(), stock.train()
        recorder = Recorder(router)
        routed = model(**inputs).audio_sample
        for index in range(router.num_blocks):
            assert recorder.after_router[index]["audio_hidden_states"].shape[1] == 6, index
        assert routed.shape == (BATCH, 6, 4) and torch.isfinite(routed).all()
        assert not torch.allclose(routed, stock(**inputs).audio_sample)  # video-to-audio saw only the kept tokens
        router.selection_ratio = 0.0
        assert torch.equal(model(**inputs).audio_sample, stock(**inputs).audio_sample)


def test_hidream_routes_must_end_in_the_double_stream_blocks():
    model = _case("hidream").make()
    with pytest.raises(ValueError, match="must end inside the double-stream blocks"):
        apply_tread(model, [{"start_layer_idx": 4, "end_layer_idx": 6, "selection_ratio": 0.5}])


def test_hunyuan_video_token_replace_i2v_needs_keep_first_frame():
    case = _case("hunyuan_video_i2v_token_replace")
    model = case.make().train()
    apply_tread(model, [case.route])
    with pytest.raises(ValueError, match="keep_first_frame=True"):
        model(**case.make_inputs())
    model = case.make().train()
    router = route_of(case, model)
    router.selection_ratio = 0.75
    model(**case.make_inputs())
    assert not router.route_masks[0][:, :15].any()  # the first frame's 3 x 5 tokens stay in the route


def test_the_readme_table_lists_every_family_of_the_registry():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### Supported transformer families") :]
    for family in families.FAMILIES:
        assert f"| {family.name} |" in table, family.name
        for name in family.classes:
            assert f"`{name}`" in table, name
    for case in CASES:
        assert f"`{case.name}`" in table, case.name
