"""The registry of Diffusers transformer families the TREAD router knows (see ``router.py``).

A family is a ``Family`` line: its Diffusers class names, its block lists in the order they run (``BlockList``:
which output is the image stream, whether ``hidden_states`` is a joint text+image sequence there), and the block
arguments that carry a token axis (``TokenInput``: which axis, text-first or image-first joint order, a table shared
by the batch or one per sample). Family code appears only where a line cannot say it (a forward argument that makes
routing wrong, the tokens of one latent frame). Adding a family is a line here plus its tiny config in
``tests/test_router_families.py``. A class the installed Diffusers lacks is skipped; a class that cannot be routed as
TREAD has a ``refuse`` reason that ``apply_tread`` raises.

Read against Diffusers 0.42.1 (``diffusers/models/transformers/``); ``/work``'s ``diffusers-families.md`` is the
survey these lines started from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import diffusers
import torch

from .. import compat

LAYOUTS = ("image", "text_image", "image_text")


# --- per-token inputs -------------------------------------------------------------------------------------------------


class _PerSampleRows:
    """Per-sample rows ``(batch, seq, dim)`` of a RoPE table that the model shares across the batch ``(seq, dim)``.

    Diffusers' ``apply_rotary_emb`` broadcasts a shared table with ``cos[None, :, None, :]`` (``sequence_dim=1``,
    layout ``(batch, seq, heads, dim)``) or ``cos[None, None, :, :]`` (``sequence_dim=2``) and then calls
    ``.to(device)``. This object answers exactly those two indexings with the per-sample views ``(batch, seq, 1, dim)``
    / ``(batch, 1, seq, dim)``; any other use raises, so a processor that reads the table differently fails loudly
    instead of mixing samples. A plain object, not a tensor subclass, so that ``torch.compile(fullgraph=True)`` traces
    it.
    """

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __getitem__(self, key):
        if key == (None, slice(None), None, slice(None)):
            return self.rows[:, :, None, :]
        if key == (None, None, slice(None), slice(None)):
            return self.rows[:, None, :, :]
        raise TypeError(
            f"A TREAD-routed block indexed a per-sample rotary table (batch, seq, dim) with {key!r}; only Diffusers' "
            "apply_rotary_emb broadcasting is supported. Use the model's default attention processor."
        )

    def unsqueeze(self, dim: int) -> torch.Tensor:
        """Qwen-Image's complex ``apply_rotary_emb_qwen`` broadcasts ``freqs.unsqueeze(1)`` against
        ``(batch, seq, heads, dim)``: the per-sample rows as ``(batch, seq, 1, dim)``."""
        if dim != 1:
            raise TypeError(
                f"A TREAD-routed block called unsqueeze({dim}) on a per-sample rotary table; only 1 is known."
            )
        return self.rows[:, :, None, :]

    def __repr__(self) -> str:
        return f"_PerSampleRows{tuple(self.rows.shape)}"


def token_rows(kept: torch.LongTensor, layout: str, num_image: int, num_text: int) -> torch.LongTensor:
    """``(batch, rows)``: the positions along a per-token input's token axis of the text rows (all of them, in their
    place) and of each sample's kept image rows, for the ``layout`` of that axis."""
    if layout == "image":
        return kept
    text = torch.arange(num_text, device=kept.device).expand(kept.shape[0], -1)
    if layout == "text_image":
        return torch.cat([text, kept + num_text], dim=1)
    return torch.cat([kept, text + num_image], dim=1)  # "image_text"


def gather_axis(value: torch.Tensor, rows: torch.LongTensor, axis: int) -> torch.Tensor:
    """``value`` (batch or 1, ..., tokens at ``axis``, ...) -> each sample's ``rows`` along ``axis``."""
    batch = rows.shape[0]
    value = value.expand(batch, *value.shape[1:])
    shape = [batch] + [1] * (value.ndim - 1)
    shape[axis] = rows.shape[1]
    index = rows.to(value.device).view(shape).expand(*value.shape[:axis], rows.shape[1], *value.shape[axis + 1 :])
    return value.gather(axis, index)


@dataclass(frozen=True)
class TokenInput:
    """A block argument with a token axis; the router passes each sample's kept rows of it to the routed blocks.

    Args:
        axes: the token axes (two for an N x N mask), counting the batch axis.
        layout: what runs along them: ``"image"`` (N rows), ``"text_image"`` (T text rows, then N image rows) or
            ``"image_text"``.
        shared: the tensor has no batch axis, one table for the batch with the rows first (a RoPE table ``(S, D)``);
            the kept rows make it per sample ``(batch, rows, D)``.
        rope_view: a shared table read by Diffusers' ``apply_rotary_emb``: pass the rows as ``_PerSampleRows``.
        when_ndim: a token axis only when the tensor has this many dims (Wan's ``temb``: ``(B, N, 6, D)`` per token in
            Wan 2.2 TI2V, ``(B, 6, D)`` otherwise); other shapes pass unchanged.
        broadcast: size 1 along an axis means one value for every token (LTX's ``temb`` ``(B, 1, 6D)``): unchanged.
        elements: for a tuple argument, the elements that carry the token axis (Qwen-Image's RoPE is
            ``(image_freqs, text_freqs)``); None: every element.
        ndim_axes: ``((ndim, axes), ...)``: the token axes of a tensor with that many dims, in place of ``axes``,
            where the model code fixes the layout by rank (LTX-2's RoPE: ``(B, N, D)`` interleaved, ``(B, heads, N,
            D')`` split).

    A tuple or list (``(cos, sin)``) is gathered element by element. A size along an axis that is neither the
    layout's length nor (with ``broadcast``) 1 raises: the router never guesses an axis.
    """

    axes: tuple[int, ...] = (1,)
    layout: str = "image"
    shared: bool = False
    rope_view: bool = False
    when_ndim: int | None = None
    broadcast: bool = False
    elements: tuple[int, ...] | None = None
    ndim_axes: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def gather(self, name: str, value, kept: torch.LongTensor, num_image: int, num_text: int):
        if isinstance(value, (tuple, list)):
            inner = self if self.elements is None else replace(self, elements=None)
            return type(value)(
                inner.gather(name, item, kept, num_image, num_text)
                if self.elements is None or position in self.elements
                else item
                for position, item in enumerate(value)
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"TREAD routing: block argument `{name}` should be a tensor, got {type(value).__name__}.")
        if self.when_ndim is not None and value.ndim != self.when_ndim:
            return value
        expected = num_image if self.layout == "image" else num_image + num_text
        rows = token_rows(kept, self.layout, num_image, num_text)
        for axis in dict(self.ndim_axes).get(value.ndim, self.axes):
            size = value.shape[axis] if axis < value.ndim else None
            if size == 1 and self.broadcast:
                continue
            if size != expected:
                what = {"image": f"{num_image} image", "text_image": f"{num_text} text + {num_image} image"}.get(
                    self.layout, f"{num_image} image + {num_text} text"
                )
                raise ValueError(
                    f"TREAD routing expects block argument `{name}` to have {what} tokens along axis {axis}; got "
                    f"shape {tuple(value.shape)}. Routing would gather the wrong axis, so it stops here: pass the "
                    "input in the model's documented shape, or disable routing (router.enabled = False)."
                )
            if self.shared:
                value = value.to(rows.device)[rows] if axis == 0 else None
                if value is None:
                    raise ValueError(f"TokenInput for `{name}`: a shared table has its rows on axis 0.")
                return _PerSampleRows(value) if self.rope_view else value
            value = gather_axis(value, rows, axis)
        return value


@dataclass(frozen=True)
class BlockList:
    """A ``ModuleList`` of blocks that runs in the model's forward.

    Args:
        name: the attribute (``"transformer_blocks"``).
        output: where the image stream is in a block's output tuple; None when the block returns it alone.
        joint: ``hidden_states`` here is a joint sequence, ``"text_image"`` or ``"image_text"`` (the model
            concatenated the streams before this list); None: image tokens only.
        token_inputs: per-token arguments of this list, if they differ from the family's.
        hidden: the name of the blocks' token-stream argument.
    """

    name: str
    output: int | None = None
    joint: str | None = None
    token_inputs: Mapping[str, TokenInput] | None = None
    hidden: str = "hidden_states"


def _forward_text_length(transformer, arguments: dict) -> int:
    text = arguments.get("encoder_hidden_states")
    if not isinstance(text, torch.Tensor) or text.ndim != 3:
        raise ValueError("TREAD routing needs the text length: pass encoder_hidden_states as (batch, tokens, dim).")
    return text.shape[1]


@dataclass(frozen=True)
class Family:
    """One family of Diffusers transformers, as the router needs it (see the module docstring).

    Args:
        name: for messages and the README table.
        classes: Diffusers class names (missing ones are skipped); subclasses match too.
        block_lists: in the order the forward runs them.
        token_inputs: block arguments with a token axis.
        text_args: text-side block arguments (LTX-2: also its audio stream's); never routed.
        refuse: the class cannot be routed as TREAD: why (``apply_tread`` raises it).
        refuse_arguments: model forward arguments that make routing wrong when given: name -> why.
        frame_tokens: ``(transformer, forward arguments) -> tokens of one latent frame`` (video; for
            ``keep_first_frame``).
        reference_tokens: ``(transformer, forward arguments) -> reference-image tokens at the end of the image
            sequence`` (an edit model's conditioning images; 0 when none): they stay in every route unless
            ``route_reference_tokens=True``.
        check: more forward checks, ``(router, forward arguments, routes)``; raise ``ValueError`` to refuse.
        route_check: ``(router, routes)`` checks of the routes themselves.
        text_length: ``(transformer, forward arguments) -> text tokens``, for joint layouts in blocks without a text
            argument.
        video: a video family (README table).
        min_diffusers: the oldest Diffusers release whose forward this line describes, where older releases feed
            the blocks differently (other RoPE shapes, config arguments, block signatures); on an older release
            ``apply_tread`` refuses the class, naming the release it needs, rather than route it wrongly. ``None``:
            every supported release (0.35 onward).
    """

    name: str
    classes: tuple[str, ...]
    block_lists: tuple[BlockList, ...] = ()
    token_inputs: Mapping[str, TokenInput] = field(default_factory=dict)
    text_args: tuple[str, ...] = ("encoder_hidden_states",)
    refuse: str | None = None
    refuse_arguments: Mapping[str, str] = field(default_factory=dict)
    frame_tokens: Callable | None = None
    reference_tokens: Callable | None = None
    check: Callable | None = None
    route_check: Callable | None = None
    text_length: Callable = _forward_text_length
    video: bool = False
    min_diffusers: tuple[int, ...] | None = None

    @property
    def uses_text_length(self) -> bool:
        """Whether a joint layout (a joint block list or a text+image per-token input) needs the text length."""
        inputs = [self.token_inputs] + [block_list.token_inputs or {} for block_list in self.block_lists]
        return any(block_list.joint for block_list in self.block_lists) or any(
            spec.layout != "image" for specs in inputs for spec in specs.values()
        )

    def supported_here(self) -> bool:
        """Whether the installed Diffusers release is one this line describes (`min_diffusers`)."""
        return self.min_diffusers is None or compat.DIFFUSERS_RELEASE >= self.min_diffusers

    def installed_classes(self) -> list[type]:
        return [getattr(diffusers, name) for name in self.classes if hasattr(diffusers, name)]

    def check_routes(self, router, routes: list[dict]) -> None:
        if self.route_check is not None:
            self.route_check(router, routes)

    def check_forward(self, router, arguments: dict, routes: list[dict]) -> None:
        for name, reason in self.refuse_arguments.items():
            if arguments.get(name) is not None:
                raise ValueError(
                    f"TREAD routing does not support `{name}` on {self.name}: {reason} Route without it, or disable "
                    "routing (router.enabled = False / eval mode)."
                )
        if self.check is not None:
            self.check(router, arguments, routes)

    def check_tokens(self, router, arguments: dict, num_image: int, num_text: int) -> None:
        """Never guess an axis: a 3D+ block tensor that nobody declared but has the image-token count (or text +
        image) along axis 1 may be a per-token input the router does not know; refuse."""
        declared = set(self.token_inputs) | set(self.text_args)
        for block_list in self.block_lists:
            declared |= set(block_list.token_inputs or {}) | {block_list.hidden}
        for name, value in arguments.items():
            values = value if isinstance(value, (tuple, list)) else (value,)
            for item in values:
                if name in declared or not isinstance(item, torch.Tensor) or item.ndim < 3:
                    continue
                if item.shape[1] in (num_image, num_image + num_text):
                    raise ValueError(
                        f"TREAD routing on {self.name}: block argument `{name}` of shape {tuple(item.shape)} has "
                        f"{item.shape[1]} rows along axis 1, which matches the {num_image} image tokens (text: "
                        f"{num_text}); it is ambiguous whether it is per token, so routing refuses. Use a resolution "
                        "whose token count differs from this size, or disable routing."
                    )


# --- family code: what a line cannot say ------------------------------------------------------------------------------


def _joint_mask_check(router, arguments: dict, routes: list[dict]) -> None:
    for key in ("joint_attention_kwargs", "attention_kwargs"):
        if "attention_mask" in (arguments.get(key) or {}):
            raise ValueError(
                f"TREAD routing does not support an `attention_mask` in `{key}` (it spans the image tokens, which a "
                "route removes, and reaches the attention processor unchanged); pass no mask or disable routing."
            )


def _sd3_check(router, arguments: dict, routes: list[dict]) -> None:
    _joint_mask_check(router, arguments, routes)
    skipped = set(arguments.get("skip_layers") or ())
    for route in routes:
        inside = skipped & set(range(route["start_layer_idx"], route["end_layer_idx"] + 1))
        if inside:
            raise ValueError(
                f"skip_layers {sorted(inside)} lie inside the route {route}: skip-layer guidance removes blocks of a "
                "route (its first or last block carries the gather and the scatter); route other blocks or skip none."
            )


def _wan_frame_tokens(transformer, arguments: dict) -> int:
    _, _, _, height, width = arguments["hidden_states"].shape
    _, p_h, p_w = transformer.config.patch_size
    return (height // p_h) * (width // p_w)


def _ltx_frame_tokens(transformer, arguments: dict) -> int:
    if arguments.get("height") is None or arguments.get("width") is None:
        raise ValueError("keep_first_frame on LTX-Video needs the forward's `height` and `width` (latent grid).")
    return int(arguments["height"]) * int(arguments["width"])


def _ltx2_frame_tokens(transformer, arguments: dict) -> int:
    """LTX-2's video tokens run frame by frame (``prepare_video_coords``: frames, then rows, then columns)."""
    if arguments.get("height") is None or arguments.get("width") is None:
        raise ValueError("keep_first_frame on LTX-2 needs the forward's `height` and `width` (latent grid).")
    patch = transformer.config.patch_size
    return (int(arguments["height"]) // patch) * (int(arguments["width"]) // patch)


def _hunyuan_video_check(router, arguments: dict, routes: list[dict]) -> None:
    if router.transformer.config.image_condition_type == "token_replace" and not router.keep_first_frame:
        raise ValueError(
            "HunyuanVideo I2V (image_condition_type='token_replace') modulates the first latent frame's tokens "
            "differently and finds them as the first `first_frame_num_tokens` tokens; route with "
            "apply_tread(..., keep_first_frame=True) so that they stay, in place, in every route."
        )


def _hunyuan_frame_tokens(transformer, arguments: dict) -> int:
    _, _, _, height, width = arguments["hidden_states"].shape
    patch = transformer.config.patch_size
    return (height // patch) * (width // patch)


def _flux2_check(router, arguments: dict, routes: list[dict]) -> None:
    _joint_mask_check(router, arguments, routes)
    if arguments.get("kv_cache_mode") is not None or arguments.get("kv_cache") is not None:
        raise ValueError(
            "TREAD routing does not support Flux.2's KV cache (kv_cache / kv_cache_mode): it stores and reuses the "
            "keys and values of every token of the reference images, which a route would cut; route without it."
        )


def _flux2_reference_tokens(transformer, arguments: dict) -> int:
    """Flux.2's pipelines append the reference images' latents to the target's and mark them in ``img_ids``' first
    (time) coordinate: 0 for the target (``Flux2Pipeline._prepare_latent_ids``), 10, 20, ... for the references
    (``_prepare_image_ids``)."""
    ids = arguments.get("img_ids")
    if not isinstance(ids, torch.Tensor):
        return 0
    if torch.compiler.is_compiling():
        raise ValueError(
            "TREAD routing on Flux.2 under torch.compile: the router finds the reference-image tokens, which stay in "
            "every route, by reading img_ids, which a compiled graph cannot do. Set router.reference_tokens to their "
            "count (0 for text-to-image), or pass route_reference_tokens=True to route every image token alike."
        )
    reference = (ids[0] if ids.ndim == 3 else ids)[:, 0] != 0
    count = int(reference.sum())  # a host read of the ids (a graph break under torch.compile)
    if count and (reference[0] or not reference[-count:].all()):
        raise ValueError(
            "TREAD routing on Flux.2 keeps reference-image tokens in every route and finds them by img_ids' time "
            "coordinate, as Flux2Pipeline writes it: the target's tokens (time 0) first, then the reference images' "
            "(time 10, 20, ...). These img_ids do not have that order; reorder them, or pass "
            "route_reference_tokens=True to route every image token alike."
        )
    return count


def _qwen_reference_tokens(transformer, arguments: dict) -> int:
    """Qwen-Image-Edit's pipelines append the reference images' tokens to the target's; ``img_shapes`` lists the
    target's (frames, rows, cols) first, then each reference's. Qwen-Image-Layered (``use_layer3d_rope``) lists its
    output layers first and the condition image last (``QwenEmbedLayer3DRope``)."""
    shapes = arguments.get("img_shapes")
    if not shapes:
        return 0
    layered = getattr(transformer.config, "use_layer3d_rope", False)
    counts = set()
    for sample in shapes:
        sample = list(sample) if isinstance(sample[0], (list, tuple)) else [sample]  # shapes, or one (f, h, w)
        references = sample[-1:] if layered else sample[1:]
        counts.add(sum(frames * rows * cols for frames, rows, cols in references))
    if len(counts) != 1:
        raise ValueError(
            f"TREAD routing on Qwen-Image: the samples of a batch have different reference-image token counts "
            f"{sorted(counts)} (img_shapes); batch samples with the same target and reference sizes."
        )
    return counts.pop()


def _auraflow_text_length(transformer, arguments: dict) -> int:
    return _forward_text_length(transformer, arguments) + transformer.register_tokens.shape[1]


def _hidream_route_check(router, routes: list[dict]) -> None:
    num_double = len(router.transformer.double_stream_blocks)
    for route in routes:
        if route["end_layer_idx"] >= num_double:
            raise ValueError(
                f"HiDream: the route {route} reaches the single-stream blocks (indices {num_double} and up); HiDream's "
                "forward records the image-token count after the double-stream blocks in Python and slices the joint "
                "sequence by it, so a route must end inside the double-stream blocks (end_layer_idx < "
                f"{num_double})."
            )


_CONTROLNET = "ControlNet residuals are added to every image token between blocks, also inside a route."
_SHARED_ROPE_JOINT = {"image_rotary_emb": TokenInput(axes=(0,), layout="text_image", shared=True, rope_view=True)}


# --- the registry -----------------------------------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = (
    Family(
        # BasicTransformerBlock(hidden_states, attention_mask, encoder_hidden_states, ...) -> hidden_states; text via
        # cross-attention; the model turns a (B, N) image mask into a key bias (B, 1, N); a 3D mask is passed as is.
        name="PixArt-alpha / Sigma",
        classes=("PixArtTransformer2DModel",),
        block_lists=(BlockList("transformer_blocks"),),
        token_inputs={"attention_mask": TokenInput(axes=(1, 2), broadcast=True)},
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
    ),
    Family(
        # JointTransformerBlock(hidden_states, encoder_hidden_states, temb, ...) -> (text, image); positions added
        # once at the patch embedding; SD3.5's image self-attention (attn2) sees the kept tokens.
        name="Stable Diffusion 3 / 3.5",
        classes=("SD3Transformer2DModel",),
        block_lists=(BlockList("transformer_blocks", output=1),),
        refuse_arguments={"block_controlnet_hidden_states": _CONTROLNET},
        check=_sd3_check,
    ),
    Family(
        # Double- then single-stream blocks, both (hidden_states, encoder_hidden_states, temb, image_rotary_emb)
        # -> (text, image); one RoPE table over [txt_ids; img_ids] shared by the batch.
        name="Flux.1",
        classes=("FluxTransformer2DModel",),
        block_lists=(
            BlockList("transformer_blocks", output=1),
            BlockList("single_transformer_blocks", output=1),
        ),
        token_inputs=_SHARED_ROPE_JOINT,
        refuse_arguments={"controlnet_block_samples": _CONTROLNET, "controlnet_single_block_samples": _CONTROLNET},
        check=_joint_mask_check,
    ),
    Family(
        # As Flux.1, but the model concatenates [text; image] before the single-stream blocks, whose
        # hidden_states is then joint; a (B, T + N) attention mask in the same order reaches every block.
        name="Chroma",
        classes=("ChromaTransformer2DModel",),
        block_lists=(
            BlockList("transformer_blocks", output=1),
            BlockList("single_transformer_blocks", joint="text_image"),
        ),
        token_inputs={**_SHARED_ROPE_JOINT, "attention_mask": TokenInput(axes=(1,), layout="text_image")},
        refuse_arguments={"controlnet_block_samples": _CONTROLNET, "controlnet_single_block_samples": _CONTROLNET},
        check=_joint_mask_check,
    ),
    Family(
        # CogView4TransformerBlock(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask, ...)
        # -> (image, text); RoPE over the image tokens only (N, D), applied with sequence_dim=2; attention_mask is the
        # text mask (B, T): the processor builds the joint mask from the two streams' lengths.
        name="CogView4",
        classes=("CogView4Transformer2DModel",),
        block_lists=(BlockList("transformer_blocks", output=0),),
        token_inputs={"image_rotary_emb": TokenInput(axes=(0,), shared=True, rope_view=True)},
        text_args=("encoder_hidden_states", "attention_mask"),
        check=_joint_mask_check,
    ),
    Family(
        # As Chroma without a mask: double-stream blocks -> (text, image), then single-stream blocks over the joint
        # [text; image] stream; one RoPE table over [txt_ids; img_ids] shared by the batch.
        name="Flux.2",
        classes=("Flux2Transformer2DModel",),
        block_lists=(
            BlockList("transformer_blocks", output=1),
            BlockList("single_transformer_blocks", joint="text_image"),
        ),
        token_inputs=_SHARED_ROPE_JOINT,
        reference_tokens=_flux2_reference_tokens,
        check=_flux2_check,
    ),
    Family(
        # AuraFlowJointTransformerBlock(hidden_states, encoder_hidden_states, temb) -> (text, image), then
        # AuraFlowSingleTransformerBlock over [registers + text; image]; positions added once (learned).
        name="AuraFlow",
        classes=("AuraFlowTransformer2DModel",),
        block_lists=(
            BlockList("joint_transformer_blocks", output=1),
            BlockList("single_transformer_blocks", joint="text_image"),
        ),
        text_length=_auraflow_text_length,
        check=_joint_mask_check,
    ),
    Family(
        # QwenImageTransformerBlock(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
        # image_rotary_emb, ..., modulate_index) -> (text, image); RoPE (image_freqs (N, D/2), text_freqs (T, D/2)),
        # complex, shared; Edit's zero_cond_t modulates reference-image tokens by a per-token modulate_index (B, N).
        name="Qwen-Image / Qwen-Image-Edit",
        min_diffusers=(0, 42),  # 0.35.2 feeds its blocks otherwise; 0.36-0.41 untested
        classes=("QwenImageTransformer2DModel",),
        block_lists=(BlockList("transformer_blocks", output=1),),
        token_inputs={
            "image_rotary_emb": TokenInput(axes=(0,), shared=True, rope_view=True, elements=(0,)),
            "modulate_index": TokenInput(axes=(1,)),
        },
        text_args=("encoder_hidden_states", "encoder_hidden_states_mask"),
        refuse_arguments={"controlnet_block_samples": _CONTROLNET},
        reference_tokens=_qwen_reference_tokens,
        check=_joint_mask_check,
    ),
    Family(
        # As HunyuanVideo, for images: double- then single-stream blocks -> (image, text); RoPE (N, D) shared; the
        # joint mask (B, 1, 1, N + T) in [image; text] order; its checkpointed calls pass keyword arguments.
        name="HunyuanImage 2.1",
        classes=("HunyuanImageTransformer2DModel",),
        block_lists=(
            BlockList("transformer_blocks", output=0),
            BlockList("single_transformer_blocks", output=0),
        ),
        token_inputs={
            "image_rotary_emb": TokenInput(axes=(0,), shared=True, rope_view=True),
            "attention_mask": TokenInput(axes=(3,), layout="image_text"),
        },
    ),
    Family(
        # HiDreamImageTransformerBlock(hidden_states, hidden_states_masks, encoder_hidden_states, temb,
        # image_rotary_emb) -> (image, text); RoPE per sample (B, N + T, 1, D/2, 2, 2) over [img_ids; txt_ids]; the
        # image mask (B, N) (training pads the image to max_resolution and masks the padding); MoE feed-forward
        # gates per token. Routes must end inside the double-stream blocks (see _hidream_route_check).
        name="HiDream-I1",
        classes=("HiDreamImageTransformer2DModel",),
        block_lists=(
            BlockList("double_stream_blocks", output=0),
            BlockList("single_stream_blocks"),
        ),
        token_inputs={
            "image_rotary_emb": TokenInput(axes=(1,), layout="image_text"),
            "hidden_states_masks": TokenInput(axes=(1,)),
        },
        route_check=_hidream_route_check,
    ),
    Family(
        # WanTransformerBlock(hidden_states, encoder_hidden_states, temb, rotary_emb) -> hidden_states; text (and the
        # CLIP image of 2.1 I2V, whose latent is concatenated on the channels) via cross-attention. RoPE (1, N, 1, D);
        # temb (B, 6, D), or per token (B, N, 6, D) in Wan 2.2 TI2V.
        name="Wan 2.1 / 2.2 (T2V, I2V, TI2V)",
        classes=("WanTransformer3DModel",),
        block_lists=(BlockList("blocks"),),
        token_inputs={"rotary_emb": TokenInput(axes=(1,)), "temb": TokenInput(axes=(1,), when_ndim=4)},
        frame_tokens=_wan_frame_tokens,
        video=True,
    ),
    Family(
        # LTXVideoTransformerBlock(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
        # encoder_attention_mask) -> hidden_states; RoPE per sample (B, N, D); temb (B, 1 or N, 6D).
        name="LTX-Video",
        classes=("LTXVideoTransformer3DModel",),
        block_lists=(BlockList("transformer_blocks"),),
        token_inputs={"image_rotary_emb": TokenInput(axes=(1,)), "temb": TokenInput(axes=(1,), broadcast=True)},
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
        frame_tokens=_ltx_frame_tokens,
        video=True,
    ),
    Family(
        # LTX2VideoTransformerBlock(hidden_states, audio_hidden_states, encoder_hidden_states,
        # audio_encoder_hidden_states, temb, temb_audio, temb_ca_*, temb_prompt*, video_rotary_emb, audio_rotary_emb,
        # ca_video_rotary_emb, ca_audio_rotary_emb, masks, ...) -> (video, audio). Only the video tokens are routed:
        # the audio stream runs dense, as text does (it is a second token stream, not part of the video sequence).
        # Video per-token inputs: the timestep modulations temb, temb_ca_scale_shift, temb_ca_gate (B, 1 or N, k D);
        # the video self-attention RoPE and the temporal RoPE of the audio<->video cross-attention, per sample,
        # (B, N, D) interleaved or (B, heads, N, D') split; the IC-LoRA video self-attention mask (B, N, N). In the
        # video-to-audio cross-attention the audio queries see the kept video tokens inside a route, as text does in
        # the joint-attention families.
        name="LTX-2",
        min_diffusers=(0, 42),  # read against 0.42.1 (its block arguments grew with LTX-2.3); older ones untested
        classes=("LTX2VideoTransformer3DModel",),
        block_lists=(BlockList("transformer_blocks", output=0),),
        token_inputs={
            "temb": TokenInput(axes=(1,), broadcast=True),
            "temb_ca_scale_shift": TokenInput(axes=(1,), broadcast=True),
            "temb_ca_gate": TokenInput(axes=(1,), broadcast=True),
            "video_rotary_emb": TokenInput(ndim_axes=((3, (1,)), (4, (2,)))),
            "ca_video_rotary_emb": TokenInput(ndim_axes=((3, (1,)), (4, (2,)))),
            "self_attention_mask": TokenInput(axes=(1, 2)),
        },
        text_args=(  # never routed: the text of both streams and the audio stream with its own inputs
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
        ),
        frame_tokens=_ltx2_frame_tokens,
        video=True,
    ),
    Family(
        # As Wan; temb (B, 6, D), or (B, 6, N, D) under diffusion forcing; a block-causal mask (1, 1, N, N) when
        # num_frame_per_block > 1.
        name="SkyReels-V2",
        min_diffusers=(0, 42),  # 0.35.2 feeds its blocks otherwise; 0.36-0.41 untested
        classes=("SkyReelsV2Transformer3DModel",),
        block_lists=(BlockList("blocks"),),
        token_inputs={
            "rotary_emb": TokenInput(axes=(1,)),
            "temb": TokenInput(axes=(2,), when_ndim=4),
            "attention_mask": TokenInput(axes=(2, 3)),
        },
        frame_tokens=_wan_frame_tokens,
        video=True,
    ),
    Family(
        # Double- then single-stream blocks (hidden_states, encoder_hidden_states, temb, attention_mask, RoPE, ...)
        # -> (image, text); RoPE over the image tokens (N, D), shared, applied with sequence_dim=1; the joint mask
        # (B, 1, 1, N + T) is in [image; text] order. I2V "token_replace" modulates the first frame's tokens apart.
        name="HunyuanVideo",
        classes=("HunyuanVideoTransformer3DModel",),
        block_lists=(
            BlockList("transformer_blocks", output=0),
            BlockList("single_transformer_blocks", output=0),
        ),
        token_inputs={
            "freqs_cis": TokenInput(axes=(0,), shared=True, rope_view=True),
            "image_rotary_emb": TokenInput(axes=(0,), shared=True, rope_view=True),
            "attention_mask": TokenInput(axes=(3,), layout="image_text"),
        },
        check=_hunyuan_video_check,
        frame_tokens=_hunyuan_frame_tokens,
        video=True,
    ),
    Family(
        # HunyuanVideo15TransformerBlock(hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis)
        # -> (image, text); RoPE (N, D) shared, applied with sequence_dim=1; attention_mask is the text mask (B, T),
        # which the processor pads on the image side by the streams' lengths. I2V conditions through the channels and
        # the text stream (image_embeds), not through tokens of the video sequence.
        name="HunyuanVideo 1.5",
        classes=("HunyuanVideo15Transformer3DModel",),
        block_lists=(BlockList("transformer_blocks", output=0),),
        token_inputs={"freqs_cis": TokenInput(axes=(0,), shared=True, rope_view=True)},
        text_args=("encoder_hidden_states", "attention_mask"),
        video=True,
    ),
    Family(
        # CogVideoXBlock(hidden_states, encoder_hidden_states, temb, image_rotary_emb, ...) -> (image, text); the
        # text and video tokens are split after the joint patch embedding; RoPE (1.5) over the video tokens (N, D),
        # shared, applied with sequence_dim=2 (1.0 adds positions once).
        name="CogVideoX",
        classes=("CogVideoXTransformer3DModel",),
        block_lists=(BlockList("transformer_blocks", output=0),),
        token_inputs={"image_rotary_emb": TokenInput(axes=(0,), shared=True, rope_view=True)},
        video=True,
    ),
    Family(
        # MochiTransformerBlock(hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb)
        # -> (image, text); RoPE (N, heads, D / 2) shared, broadcast against (B, N, heads, D / 2): per-sample rows
        # (B, K, heads, D / 2) broadcast the same way.
        name="Mochi",
        classes=("MochiTransformer3DModel",),
        block_lists=(BlockList("transformer_blocks", output=0),),
        token_inputs={"image_rotary_emb": TokenInput(axes=(0,), shared=True)},
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
        video=True,
    ),
    Family(
        # AllegroTransformerBlock(hidden_states, encoder_hidden_states, temb, attention_mask, encoder_attention_mask,
        # image_rotary_emb) -> hidden_states; RoPE is ((t, h, w) cos/sin tables over coordinates, (t, h, w) positions
        # (1, N) per token): the positions follow the kept tokens; the video mask is a key bias (B, 1, N).
        name="Allegro",
        classes=("AllegroTransformer3DModel",),
        block_lists=(BlockList("transformer_blocks"),),
        token_inputs={
            "image_rotary_emb": TokenInput(axes=(1,), elements=(1,)),
            "attention_mask": TokenInput(axes=(1, 2), broadcast=True),
        },
        text_args=("encoder_hidden_states", "encoder_attention_mask"),
        video=True,
    ),
    Family(
        # CosmosTransformerBlock(hidden_states, encoder_hidden_states, embedded_timestep, temb, image_rotary_emb,
        # extra_pos_emb, attention_mask, controlnet_residual, ...) -> hidden_states; RoPE (N, D) shared
        # (sequence_dim=2); a learnable extra positional embedding (B, N, D) added in every block; the timestep
        # embeddings (B, D), or per frame expanded to (B, N, D); attention_mask is the text mask.
        name="Cosmos",
        min_diffusers=(0, 42),  # 0.35.2 feeds its blocks otherwise; 0.36-0.41 untested
        classes=("CosmosTransformer3DModel",),
        block_lists=(BlockList("transformer_blocks"),),
        token_inputs={
            "image_rotary_emb": TokenInput(axes=(0,), shared=True, rope_view=True),
            "extra_pos_emb": TokenInput(axes=(1,)),
            "temb": TokenInput(axes=(1,), when_ndim=3),
            "embedded_timestep": TokenInput(axes=(1,), when_ndim=3),
        },
        text_args=("encoder_hidden_states", "attention_mask"),
        refuse_arguments={"block_controlnet_hidden_states": _CONTROLNET},
        frame_tokens=_wan_frame_tokens,
        video=True,
    ),
    Family(
        # Kandinsky5TransformerDecoderBlock(visual_embed, text_embed, time_embed, rope, sparse_params) -> visual_embed;
        # text via cross-attention (the text blocks run before, unrouted); RoPE per sample (B, N, 1, D/2, 2, 2).
        # NABLA sparse attention (sparse_params) builds its block mask over the full token grid: refused.
        name="Kandinsky 5",
        classes=("Kandinsky5Transformer3DModel",),
        block_lists=(BlockList("visual_transformer_blocks", hidden="visual_embed"),),
        token_inputs={"rope": TokenInput(axes=(1,))},
        text_args=("text_embed",),
        refuse_arguments={
            "sparse_params": "NABLA sparse attention masks blocks of the full token grid, which a route removes."
        },
        video=True,
    ),
    # --- refused ---
    Family(
        name="Sana",
        classes=("SanaTransformer2DModel",),
        refuse="its Mix-FFN applies a depthwise convolution over the full (height, width) token grid in every block; "
        "a routed subset has no grid.",
    ),
    Family(
        name="SanaVideo",
        classes=("SanaVideoTransformer3DModel",),
        refuse="its Mix-FFN applies a convolution over the full (frames, height, width) token grid in every block; "
        "a routed subset has no grid.",
        video=True,
    ),
    Family(
        name="Lumina2",
        classes=("Lumina2Transformer2DModel",),
        refuse="its main layers run per-sample packed [text_i; image; padding] sequences of different lengths; the "
        "image tokens have no fixed position to route by shape.",
    ),
    Family(
        name="Z-Image",
        classes=("ZImageTransformer2DModel",),
        refuse="its main layers run per-sample packed [image; text; padding] sequences; the image tokens have no "
        "fixed position to route by shape.",
    ),
    Family(
        name="Wan-VACE",
        classes=("WanVACETransformer3DModel",),
        refuse="VACE control hints are added to the video tokens between blocks, also inside a route.",
        video=True,
    ),
)


def family_for(transformer) -> Family:
    """The registry line of ``transformer``'s class (the most specific match); refused classes raise their reason."""
    matches = []
    for family in FAMILIES:
        for model_class in family.installed_classes():
            if isinstance(transformer, model_class):
                matches.append((len(type(transformer).__mro__) - type(transformer).__mro__.index(model_class), family))
    if not matches:
        routable = [name for family in FAMILIES if family.refuse is None for name in family.classes]
        raise TypeError(
            f"TREAD routing supports {', '.join(routable)} (and their subclasses, where the installed Diffusers has "
            f"them); got {type(transformer).__name__}. For DiT use diffusers_tread.TreadTransformer2DModel."
        )
    family = max(matches, key=lambda match: match[0])[1]  # the class nearest to the instance's
    if family.refuse is not None:
        raise TypeError(f"TREAD routing cannot route {type(transformer).__name__} ({family.name}): {family.refuse}")
    if not family.supported_here():
        needed = ".".join(map(str, family.min_diffusers))
        raise TypeError(
            f"TREAD routing of {type(transformer).__name__} ({family.name}) needs Diffusers >= {needed}: older "
            f"releases feed its blocks differently, and the installed {diffusers.__version__} is one of them. "
            f"Upgrade Diffusers (pip install 'diffusers>={needed}')."
        )
    return family
