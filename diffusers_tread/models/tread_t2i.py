"""TREAD routing for Diffusers' text-to-image transformers: PixArt, SD3 / SD3.5 and Flux.1 (arXiv 2501.04765).

``apply_tread(transformer)`` attaches routes to a *stock* model through forward hooks; no module, parameter or
state-dict key changes, so LoRA/peft, ``save_pretrained`` and ``load_state_dict`` see the ordinary model, and in eval
mode (or with ``router.enabled = False``) every hook returns at once and the output is the stock model's bit for bit.

How a route ``i..j`` runs (the paper's Fig. 2, ICCV version Sec. 3.2; the tensor work is ``diffusers_tread.routing``):

* a pre-hook on block ``i`` stores the full image-token sequence, draws each sample's kept positions
  (``routing.sample_kept_indices``) and gathers them (``routing.gather_tokens``);
* a pre-hook on every block ``i..j`` swaps in the per-token block inputs gathered for those positions: Flux's rotary
  tables (Flux.1 applies RoPE inside every attention, so the kept tokens need their own rows; see
  ``_PerSampleRotary``) and PixArt's optional image self-attention mask;
* a forward hook on block ``j`` scatters the processed kept tokens back into the stored sequence
  (``routing.scatter_tokens``), so a bypassed token re-enters with the state it had entering block ``i``
  (``route_reinsertion="pre_route"``, ICCV) or that plus the image tokens entering the first block, the patch-embedded
  input (``"pre_route_plus_input"``, v1's x_D_last + x_T), as `routing.run_blocks` does for the DiT.

Only image tokens are routed. Text tokens are never touched: PixArt reads them through cross-attention, SD3's MMDiT
blocks (Esser et al. 2024, Sec. 3) and Flux's double-stream blocks take them as a separate ``encoder_hidden_states``
stream and attend jointly over ``[text; kept image tokens]``, and Flux's single-stream blocks (in Diffusers 0.42 they
also take the two streams separately and concatenate inside) do the same. Per-sample conditioning (adaLN timestep /
pooled-text embeddings) has no token axis and broadcasts over any number of tokens.

Layer indices count the blocks in the order they run. PixArt and SD3: ``transformer_blocks``. Flux: the
``num_layers`` double-stream blocks first, then the ``num_single_layers`` single-stream blocks (Flux.1-dev: 19 + 38 =
57 indices, so index 19 is ``single_transformer_blocks[0]``); both kinds share one call convention, so a route may
span the two lists.

Gradient checkpointing: the models call ``self._gradient_checkpointing_func(block, *args)``. During a routed
forward the router wraps that function so that the gather and the scatter run *outside* the checkpoint and the
block's hooks are suspended inside it; the recomputation in backward then replays exactly the tokens of the forward
pass (a hook inside the checkpoint would redraw the subset on recomputation).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

from .. import routing

# --- per-model adapters: where the blocks are and what besides the tokens carries a token axis ---------------------


class _PixArtAdapter:
    """PixArt-alpha/Sigma: ``BasicTransformerBlock(hidden_states, attention_mask, encoder_hidden_states,
    encoder_attention_mask, timestep, ...) -> hidden_states``. Text enters only through cross-attention (its mask,
    ``encoder_attention_mask``, is over text tokens and stays as is); the adaLN-single ``timestep`` is per sample."""

    block_lists = ("transformer_blocks",)

    @staticmethod
    def hidden_output(output):
        return output

    @staticmethod
    def replace_hidden_output(output, hidden_states):
        return hidden_states

    @staticmethod
    def check_forward(arguments: dict, routes: list[dict]) -> None:
        pass

    @staticmethod
    def gather_block_inputs(arguments: dict, kept_indices: torch.LongTensor, num_tokens: int) -> dict:
        mask = arguments.get("attention_mask")
        if mask is None:
            return {}
        # PixArt's forward turns a (batch, image_tokens) self-attention mask into a key bias (batch, 1, image_tokens).
        if mask.ndim != 3 or mask.shape[1] != 1 or mask.shape[-1] != num_tokens:
            raise ValueError(
                f"TREAD routing supports PixArt's image attention_mask as a (batch, image_tokens) mask or a "
                f"(batch, 1, image_tokens) bias; got shape {tuple(mask.shape)} for {num_tokens} image tokens."
            )
        mask = mask.expand(kept_indices.shape[0], -1, -1)
        return {"attention_mask": mask.gather(2, kept_indices.unsqueeze(1))}


class _JointAdapter:
    """SD3 ``JointTransformerBlock`` and Flux's blocks: ``(hidden_states, encoder_hidden_states, temb, ...) ->
    (encoder_hidden_states, hidden_states)`` (SD3's last block returns ``None`` for the text stream)."""

    block_lists = ("transformer_blocks",)
    controlnet_arguments: tuple[str, ...] = ()

    @staticmethod
    def hidden_output(output):
        return output[1]

    @staticmethod
    def replace_hidden_output(output, hidden_states):
        return (output[0], hidden_states)

    @classmethod
    def check_forward(cls, arguments: dict, routes: list[dict]) -> None:
        for name in cls.controlnet_arguments:
            if arguments.get(name) is not None:
                raise ValueError(
                    f"TREAD routing does not support `{name}`: ControlNet residuals are added to every image token "
                    "between blocks, also inside a route. Route without ControlNet, or disable routing "
                    "(router.enabled = False / eval mode)."
                )
        if "attention_mask" in (arguments.get("joint_attention_kwargs") or {}):
            raise ValueError(
                "TREAD routing does not support an `attention_mask` in `joint_attention_kwargs` (it spans the image "
                "tokens, which a route removes); pass no mask or disable routing."
            )

    @staticmethod
    def gather_block_inputs(arguments: dict, kept_indices: torch.LongTensor, num_tokens: int) -> dict:
        return {}


class _SD3Adapter(_JointAdapter):
    """SD3 / SD3.5: positions are a 2D sin-cos table added once at the input (``PatchEmbed``), so the blocks take
    nothing per token besides the tokens; SD3.5's extra image self-attention (``attn2``) sees the kept tokens."""

    controlnet_arguments = ("block_controlnet_hidden_states",)

    @classmethod
    def check_forward(cls, arguments: dict, routes: list[dict]) -> None:
        super().check_forward(arguments, routes)
        skipped = set(arguments.get("skip_layers") or ())
        for route in routes:
            ends = {route["start_layer_idx"], route["end_layer_idx"]}
            if skipped & ends:
                raise ValueError(
                    f"skip_layers {sorted(skipped & ends)} would skip the first or last block of the route {route}; "
                    "a route starts and ends at blocks that run."
                )


class _FluxAdapter(_JointAdapter):
    """Flux.1: double-stream blocks, then single-stream blocks, one call convention; RoPE over [text; image]."""

    block_lists = ("transformer_blocks", "single_transformer_blocks")
    controlnet_arguments = ("controlnet_block_samples", "controlnet_single_block_samples")

    @staticmethod
    def gather_block_inputs(arguments: dict, kept_indices: torch.LongTensor, num_tokens: int) -> dict:
        rotary = arguments.get("image_rotary_emb")
        if rotary is None:
            return {}
        # Flux computes one (cos, sin) table over the ids [txt_ids; img_ids] and shares it across the batch. A
        # route keeps different positions per sample (paper Sec. 3), so each sample needs its own rows: all text
        # rows, then the rows of its kept image tokens, in the order the tokens were gathered.
        text_len = arguments["encoder_hidden_states"].shape[1]
        cos, sin = rotary
        if cos.ndim != 2 or cos.shape[0] != text_len + num_tokens:
            raise ValueError(
                f"TREAD routing expects Flux's image_rotary_emb as a (text + image tokens, dim) table, i.e. "
                f"{text_len} + {num_tokens} rows; got shape {tuple(cos.shape)}."
            )
        text_rows = torch.arange(text_len, device=cos.device).expand(kept_indices.shape[0], -1)
        rows = torch.cat([text_rows, kept_indices.to(cos.device) + text_len], dim=1)  # (batch, text + kept)
        return {"image_rotary_emb": (_PerSampleRotary(cos[rows]), _PerSampleRotary(sin[rows]))}


class _PerSampleRotary(torch.Tensor):
    """A per-sample rotary table ``(batch, seq, dim)`` that Diffusers' ``apply_rotary_emb`` can use.

    ``apply_rotary_emb`` broadcasts a shared ``(seq, dim)`` table with ``cos[None, :, None, :]`` (``sequence_dim=1``,
    Flux's layout ``(batch, seq, heads, dim)``) or ``cos[None, None, :, :]`` (``sequence_dim=2``). This tensor answers
    exactly those two indexings with the per-sample views ``(batch, seq, 1, dim)`` / ``(batch, 1, seq, dim)``; any
    other indexing raises, so a processor that reads the table differently fails loudly instead of mixing samples.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # every other op returns a plain tensor

    def __new__(cls, table: torch.Tensor):
        return table.as_subclass(cls)  # same storage, same autograd history

    def __getitem__(self, key):
        table = self.as_subclass(torch.Tensor)
        if isinstance(key, tuple) and all(item is None or item == slice(None) for item in key):
            if key == (None, slice(None), None, slice(None)):
                return table[:, :, None, :]
            if key == (None, None, slice(None), slice(None)):
                return table[:, None, :, :]
        raise TypeError(
            f"A TREAD-routed Flux block indexed its per-sample rotary table (batch, seq, dim) with {key!r}; only "
            "diffusers' apply_rotary_emb broadcasting is supported. Use the default Flux attention processor."
        )


# Most specific class first; subclasses of these models are accepted.
_ADAPTERS = (
    (PixArtTransformer2DModel, _PixArtAdapter),
    (SD3Transformer2DModel, _SD3Adapter),
    (FluxTransformer2DModel, _FluxAdapter),
)


def _adapter_for(transformer):
    for model_class, adapter in _ADAPTERS:
        if isinstance(transformer, model_class):
            return adapter
    supported = ", ".join(model_class.__name__ for model_class, _ in _ADAPTERS)
    raise TypeError(
        f"TREAD routing supports {supported} (and their subclasses); got {type(transformer).__name__}. "
        "For DiT use diffusers_tread.TreadTransformer2DModel."
    )


def _forward_signature(module: torch.nn.Module) -> inspect.Signature:
    """The signature of ``type(module).forward`` without ``self`` (independent of any instance-level wrapper)."""
    signature = inspect.signature(type(module).forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


@dataclass
class _OpenRoute:
    kept_indices: torch.LongTensor  # (batch, kept), ascending
    reinsert_into: torch.Tensor  # the full image-token sequence entering the route's first block
    block_inputs: dict = field(default_factory=dict)  # gathered per-token block inputs (RoPE rows, image mask)


class _HooksSuspended:
    """Calls a block with the router's block hooks switched off (used inside the checkpointed call, whose
    recomputation in backward must not redraw or re-scatter)."""

    def __init__(self, router: TreadRouter, block: torch.nn.Module):
        self.router, self.block = router, block

    def __call__(self, *args, **kwargs):
        self.router._suspended += 1
        try:
            return self.block(*args, **kwargs)
        finally:
            self.router._suspended -= 1


class TreadRouter:
    """Attaches TREAD routes to a stock Diffusers text-to-image transformer (PixArt, SD3, Flux) without changing its
    modules or state_dict (so LoRA/peft, save_pretrained, load_state_dict are unaffected).

    Args:
        transformer: a ``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        routes: ordered, non-overlapping ``{"start_layer_idx", "end_layer_idx", "selection_ratio"}`` dicts over the
            model's blocks (end inclusive, negative indices count from the end; Flux counts its double-stream
            blocks first, then its single-stream blocks), or ``"paper"`` for 2 .. num_blocks-4 at 0.5.
        generator: draws the routed subsets (for reproducible routing).
        route_reinsertion: ``"pre_route"`` (default, ICCV) or ``"pre_route_plus_input"`` (v1): what a bypassed token
            carries past its route (see the module docstring).

    Attributes:
        enabled: routes run when ``transformer.training and enabled`` (default True), or when ``force`` is set.
        force: route in eval mode too (e.g. Sparse Guidance at sampling time).
        selection_ratio: per-call override of the routes' ratios: one value for all routes or one per route.
        route_masks: the last forward's ``(batch, num_image_tokens)`` bool masks, True where a token bypassed the
            route (one per route); ``None`` if that forward did not route.
    """

    def __init__(
        self,
        transformer,
        routes: list[dict] | str,
        generator: torch.Generator | None = None,
        route_reinsertion: str = "pre_route",
    ):
        self.route_reinsertion = routing.check_route_reinsertion(route_reinsertion)
        self._adapter = _adapter_for(transformer)
        if attached_router(transformer) is not None:
            raise ValueError("This transformer already has a TreadRouter; call its remove() first.")
        self.transformer = transformer
        self.blocks: list[torch.nn.Module] = [
            block for name in self._adapter.block_lists for block in getattr(transformer, name)
        ]
        self.routes = routes
        self.generator = generator
        self.enabled = True
        self.force = False
        self.selection_ratio: float | list[float] | None = None
        self.route_masks: tuple[torch.BoolTensor, ...] | None = None

        # Keyed by index / by module (not id()), so that copy.deepcopy(transformer) yields a working routed copy.
        self._signatures = [_forward_signature(block) for block in self.blocks]
        self._block_index = {block: index for index, block in enumerate(self.blocks)}
        self._forward_signature = _forward_signature(transformer)
        self._suspended = 0
        self._reset()
        self._handles = [
            transformer.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
            # always_call: the per-forward state is cleared even when the forward raises.
            transformer.register_forward_hook(self._on_forward_end, always_call=True),
        ]
        for index, block in enumerate(self.blocks):
            self._handles.append(
                block.register_forward_pre_hook(partial(self._block_pre_hook, index), with_kwargs=True)
            )
            self._handles.append(block.register_forward_hook(partial(self._block_hook, index), with_kwargs=True))

    # --- configuration ----------------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def routes(self) -> list[dict]:
        return self._routes

    @routes.setter
    def routes(self, routes: list[dict] | str) -> None:
        self._routes = routing.resolve_routes(routes, self.num_blocks)

    def remove(self) -> None:
        """Detach: remove every hook; the transformer is exactly the stock model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset()

    def _routes_for_call(self) -> list[dict]:
        if self.selection_ratio is None:
            return self._routes
        return routing.validate_routes(routing.routes_for_call(self._routes, self.selection_ratio), self.num_blocks)

    # --- per-forward state --------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._active_routes: list[dict] | None = None  # the routes of the running forward; None: not routing
        self._route_of_block: dict[int, int] = {}  # block index -> position of its route in _active_routes
        self._open: dict[int, _OpenRoute] = {}
        self._masks: list[torch.BoolTensor] = []
        self._input_tokens: torch.Tensor | None = None  # x_T: the image tokens entering the first block
        self._checkpoint_original: Callable | None = None

    def _on_forward_start(self, transformer, args, kwargs):
        self.route_masks = None
        self._reset()
        if not ((transformer.training and self.enabled) or self.force):
            return None
        routes = self._routes_for_call()
        if not routes:
            return None
        arguments = self._forward_signature.bind_partial(*args, **kwargs).arguments
        self._adapter.check_forward(arguments, routes)
        self._active_routes = routes
        self._route_of_block = {
            index: position
            for position, route in enumerate(routes)
            for index in range(route["start_layer_idx"], route["end_layer_idx"] + 1)
        }
        if transformer.gradient_checkpointing:
            self._checkpoint_original = transformer._gradient_checkpointing_func
            transformer._gradient_checkpointing_func = partial(self._checkpointed_block, self._checkpoint_original)
        return None

    def _on_forward_end(self, transformer, args, output):
        try:
            if self._checkpoint_original is not None:
                transformer._gradient_checkpointing_func = self._checkpoint_original
            if self._active_routes is not None and output is not None:  # output is None when the forward raised
                if self._open:
                    unclosed = [self._active_routes[position] for position in self._open]
                    raise RuntimeError(f"TREAD routes {unclosed} started but never ended (was a block skipped?).")
                self.route_masks = tuple(self._masks)
        finally:
            self._reset()  # drop the stored sequences

    # --- the route itself (shared by all models) ------------------------------------------------------------------

    def _route_inputs(self, index: int, block, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Route start: store the image tokens, draw and gather the kept ones. Every routed block: swap in the
        gathered per-token inputs (RoPE rows, image mask). Arguments keep the way they were passed."""
        position = self._route_of_block[index]
        route = self._active_routes[position]
        signature = self._signatures[index]
        arguments = signature.bind(*args, **kwargs).arguments
        updates = {}
        if index == route["start_layer_idx"]:
            hidden_states = arguments["hidden_states"]
            batch_size, num_tokens = hidden_states.shape[:2]
            kept_indices = routing.sample_kept_indices(
                batch_size, num_tokens, route["selection_ratio"], generator=self.generator, device=hidden_states.device
            )
            block_inputs = self._adapter.gather_block_inputs(arguments, kept_indices, num_tokens)
            self._open[position] = _OpenRoute(kept_indices, hidden_states, block_inputs)
            updates["hidden_states"] = routing.gather_tokens(hidden_states, kept_indices)
        updates.update(self._open[position].block_inputs)
        args, kwargs = list(args), dict(kwargs)
        names = list(signature.parameters)
        for name, value in updates.items():
            if name in kwargs:
                kwargs[name] = value
            else:
                args[names.index(name)] = value
        return tuple(args), kwargs

    def _route_output(self, index: int, output):
        """Route end: scatter the kept tokens back into the stored sequence (None: not a route end)."""
        position = self._route_of_block[index]
        if index != self._active_routes[position]["end_layer_idx"]:
            return None
        state = self._open.pop(position)
        reinsert_into = state.reinsert_into
        if self.route_reinsertion == "pre_route_plus_input":
            reinsert_into = reinsert_into + self._input_tokens  # v1 (Jan 2025): x_D_last + x_T
        hidden_states = routing.scatter_tokens(self._adapter.hidden_output(output), state.kept_indices, reinsert_into)
        self._masks.append(routing.bypass_mask(state.kept_indices, state.reinsert_into.shape[1]))
        return self._adapter.replace_hidden_output(output, hidden_states)

    def _remember_input_tokens(self, index: int, args: tuple, kwargs: dict) -> None:
        if index == 0 and self._active_routes is not None and self.route_reinsertion == "pre_route_plus_input":
            self._input_tokens = self._signatures[0].bind(*args, **kwargs).arguments["hidden_states"]

    def _block_pre_hook(self, index, block, args, kwargs):
        if self._suspended:
            return None
        self._remember_input_tokens(index, args, kwargs)
        if index not in self._route_of_block:
            return None
        return self._route_inputs(index, block, args, kwargs)

    def _block_hook(self, index, block, args, kwargs, output):
        if self._suspended or index not in self._route_of_block:
            return None
        return self._route_output(index, output)

    def _checkpointed_block(self, checkpoint: Callable, block, *args):
        """Stands in for ``transformer._gradient_checkpointing_func`` during a routed forward."""
        index = self._block_index.get(block)
        if index is not None:
            self._remember_input_tokens(index, args, {})
        if index not in self._route_of_block:
            return checkpoint(block, *args)
        args, kwargs = self._route_inputs(index, block, args, {})
        assert not kwargs, "the checkpointed block call is positional"
        output = checkpoint(_HooksSuspended(self, block), *args)
        routed = self._route_output(index, output)
        return output if routed is None else routed


def attached_router(transformer) -> TreadRouter | None:
    """The ``TreadRouter`` attached to ``transformer``, if any (found through its hooks, so copies are covered)."""
    for hook in transformer._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), TreadRouter):
            return hook.__self__
    return None


def apply_tread(
    transformer,
    routes: list[dict] | str = "paper",
    generator: torch.Generator | None = None,
    route_reinsertion: str = "pre_route",
) -> TreadRouter:
    """Attach TREAD routes to a stock PixArt / SD3 / Flux transformer; ``routes="paper"`` is the paper's default
    single route, blocks 2 .. num_blocks-4 at selection ratio 0.5 (ICCV Sec. 4.1). Returns the ``TreadRouter``;
    ``router.remove()`` detaches it."""
    return TreadRouter(transformer, routes, generator=generator, route_reinsertion=route_reinsertion)
