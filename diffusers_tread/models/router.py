"""One TREAD router for Diffusers' stock image and video transformers (arXiv 2501.04765), driven by a registry.

``apply_tread(transformer, routes)`` attaches routes to a *stock* model through forward hooks on the model and on the
blocks of its block lists; no module, parameter or state-dict key changes, so LoRA/peft, ``save_pretrained`` and
``load_state_dict`` see the ordinary model. In eval mode (or with ``router.enabled = False``) every hook returns at
once and the output is the stock model's bit for bit. What differs between families (where the blocks are, which
output is the image stream, the order of joint text+image tensors, which block inputs carry a token axis) is a few
declarative lines in ``families.py``; the route itself is written once, here, with the tensor primitives of
``diffusers_tread.routing``.

How a route ``i..j`` runs (the paper's Fig. 2, ICCV version Sec. 3.2):

* a pre-hook on block ``i`` stores the full image-token sequence, draws each sample's kept positions
  (``routing.sample_kept_indices``) and gathers them (``routing.gather_tokens``);
* a pre-hook on every block ``i..j`` swaps in the rows of every per-token block input that belong to the kept tokens
  of *that sample* (RoPE tables, shared or per-sample, in text-first or image-first joint order; masks; per-token
  timestep modulation), as the family's ``TokenInput`` lines declare them;
* a forward hook on block ``j`` scatters the processed kept tokens back into the stored sequence
  (``routing.scatter_tokens``): a bypassed token re-enters with the state it had entering block ``i``
  (``route_reinsertion="pre_route"``, ICCV) or that plus the image tokens entering the first block
  (``"pre_route_plus_input"``, v1's x_D_last + x_T).

Only image/video tokens are routed; text reaches the blocks as a separate stream (cross-attention or joint attention)
and is never touched. In block lists whose ``hidden_states`` is a joint ``[text; image]`` sequence (Chroma's and
Flux.2's single-stream blocks) the router splits the text part off at a route start and puts it back at a route end.

Layer indices count the blocks in the order they run, over the family's block lists (Flux.1-dev: 19 double-stream
blocks, then 38 single-stream ones; index 19 is ``single_transformer_blocks[0]``).

Gradient checkpointing: the models call ``self._gradient_checkpointing_func(block, *args)``. During a routed forward
the router wraps that function so that the gather and the scatter run *outside* the checkpoint and the block's hooks
are suspended inside it; the recomputation in backward replays exactly the tokens of the forward pass.

``torch.compile``: the hooks bind arguments by precomputed parameter names (no ``inspect`` at call time) and pass a
shared RoPE table's per-sample rows as a plain ``_PerSampleRows`` object, which Dynamo inlines; draw the subsets from
the global RNG (``generator=None``) in a compiled forward, since a ``torch.Generator`` argument breaks the graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch

from .. import routing
from .families import Family, family_for

# --- the router -------------------------------------------------------------------------------------------------------


def _parameter_names(function) -> tuple[list[str], bool]:
    """A forward's parameter names without ``self``, and whether it takes ``**kwargs``."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _bind(names: list[str], args: tuple, kwargs: dict) -> dict:
    """The arguments of a call by name (what ``Signature.bind`` gives for these calls; traceable by Dynamo)."""
    bound = dict(zip(names, args, strict=False))  # extra positional arguments belong to a block's *args
    bound.update(kwargs)
    return bound


class _HooksSuspended:
    """Calls a block with the router's block hooks switched off (used inside the checkpointed call, whose
    recomputation in backward must not redraw or re-scatter)."""

    def __init__(self, router: TreadRouter, block: torch.nn.Module, kwargs: dict | None = None):
        self.router, self.block, self.kwargs = router, block, kwargs or {}

    def __call__(self, *args):
        self.router._suspended += 1
        try:
            return self.block(*args, **self.kwargs)
        finally:
            self.router._suspended -= 1


class TreadRouter:
    """Attaches TREAD routes to a stock Diffusers image or video transformer without changing its modules or
    state_dict (LoRA/peft, save_pretrained, load_state_dict are unaffected). ``families.py`` lists the classes.

    Args:
        transformer: a transformer of a routable family (``diffusers_tread.models.families.FAMILIES``).
        routes: ordered, non-overlapping ``{"start_layer_idx", "end_layer_idx", "selection_ratio"}`` dicts over the
            model's blocks (end inclusive, negative indices count from the end; several block lists count in the
            order they run), or ``"paper"`` for 2 .. num_blocks-4 at 0.5.
        generator: draws the routed subsets (for reproducible routing; leave None under ``torch.compile``).
        route_reinsertion: ``"pre_route"`` (default, ICCV) or ``"pre_route_plus_input"`` (v1): what a bypassed token
            carries past its route.
        keep_first_frame: image-to-video training where the first latent frame is a clean conditioning frame inside
            the video sequence (Wan 2.2 TI2V, HunyuanVideo I2V): its tokens go through every route. A family whose
            I2V conditioning is not part of the token sequence (Wan 2.1 I2V concatenates it on the channels) does
            not need it.
        route_reference_tokens: an edit model's reference-image tokens, which its pipeline appends to the target's
            image tokens (Flux.2 with reference images, Qwen-Image-Edit, Qwen-Image-Layered's condition image), stay
            in every route by default, as the conditioning frame does under ``keep_first_frame``: they are clean
            conditioning, not tokens the loss denoises, and a block that skipped them would edit without seeing the
            image it edits. The selection ratio applies to the target's tokens. True routes them like the others.

    Attributes:
        enabled: routes run when ``transformer.training and enabled`` (default True), or when ``force`` is set.
        force: route in eval mode too (e.g. Sparse Guidance at sampling time).
        selection_ratio: per-call override of the routes' ratios: one value for all routes or one per route.
        reference_tokens: how many reference-image tokens end the image sequence (see ``route_reference_tokens``);
            None (default): found from the forward's inputs. Flux.2 finds them by reading ``img_ids``' values, which
            ``torch.compile(fullgraph=True)`` cannot trace: set it there (0 for text-to-image).
        route_masks: the last forward's ``(batch, num_image_tokens)`` bool masks, True where a token bypassed the
            route (one per route); ``None`` if that forward did not route.
    """

    def __init__(
        self,
        transformer,
        routes: list[dict] | str,
        generator: torch.Generator | None = None,
        route_reinsertion: str = "pre_route",
        keep_first_frame: bool = False,
        route_reference_tokens: bool = False,
    ):
        routing.check_route_reinsertion(route_reinsertion)
        self.family: Family = family_for(transformer)
        if keep_first_frame and self.family.frame_tokens is None:
            raise ValueError(
                f"keep_first_frame: {self.family.name} has no conditioning frame inside its token sequence; "
                "leave keep_first_frame=False."
            )
        if attached_router(transformer) is not None:
            raise ValueError("This transformer already has a TreadRouter; call its remove() first.")
        self.route_reinsertion = route_reinsertion
        self.keep_first_frame = keep_first_frame
        self.route_reference_tokens = route_reference_tokens
        self.transformer = transformer
        self.blocks: list[torch.nn.Module] = []
        self._block_list: list = []  # per block: its BlockList line
        for block_list in self.family.block_lists:
            for block in getattr(transformer, block_list.name):
                self.blocks.append(block)
                self._block_list.append(block_list)
        self.routes = routes
        self.generator = generator
        self.enabled = True
        self.force = False
        self.selection_ratio: float | list[float] | None = None
        self.reference_tokens: int | None = None
        self.route_masks: tuple[torch.BoolTensor, ...] | None = None

        # Keyed by index / by module (not id()), so that copy.deepcopy(transformer) yields a working routed copy.
        self._names = [_parameter_names(type(block).forward)[0] for block in self.blocks]
        self._block_index = {block: index for index, block in enumerate(self.blocks)}
        self._forward_names = _parameter_names(type(transformer).forward)[0]
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
        routes = routing.resolve_routes(routes, self.num_blocks)
        self.family.check_routes(self, routes)
        self._routes = routes

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
        self._open: dict[int, dict] = {}  # position -> the open route's state
        self._masks: list[torch.BoolTensor] = []
        self._input_tokens: torch.Tensor | None = None  # x_T: the image tokens entering the first block
        self._checkpoint_original: Callable | None = None
        self._forward_arguments: dict = {}
        self._reference_count: int | None = None  # reference-image tokens kept in every route, read once a forward

    def _on_forward_start(self, transformer, args, kwargs):
        self.route_masks = None
        self._reset()
        if not ((transformer.training and self.enabled) or self.force):
            return None
        routes = self._routes_for_call()
        if not routes:
            return None
        arguments = _bind(self._forward_names, args, kwargs)
        if getattr(transformer, "_parallel_config", None) is not None:
            raise ValueError(
                "TREAD routing does not support context/tensor parallelism: each rank holds a slice of the token "
                "sequence, and a route draws its subset over the whole sequence. Disable parallelism or routing."
            )
        self.family.check_forward(self, arguments, routes)
        self._forward_arguments = arguments
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

    # --- the route itself (shared by all families) --------------------------------------------------------------------

    def _text_length(self, arguments: dict) -> int:
        """Text tokens of the joint layouts: the block's text stream if it has one, else the model's text input."""
        if not self.family.uses_text_length:
            return 0  # no joint layout: nothing is indexed by the text length (Cosmos may pass text as a tuple)
        for name in self.family.text_args:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.ndim == 3:
                return value.shape[1]
        return self.family.text_length(self.transformer, self._forward_arguments)

    def _split_joint(self, index: int, hidden_states: torch.Tensor, num_text: int):
        """(text, image) parts of a block list's ``hidden_states``; text is None when the list has no joint stream."""
        joint = self._block_list[index].joint
        if joint is None:
            return None, hidden_states
        if joint == "text_image":
            return hidden_states[:, :num_text], hidden_states[:, num_text:]
        num_image = hidden_states.shape[1] - num_text
        return hidden_states[:, num_image:], hidden_states[:, :num_image]

    def _join(self, index: int, text: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
        joint = self._block_list[index].joint
        if joint is None:
            return image
        return torch.cat([text, image] if joint == "text_image" else [image, text], dim=1)

    def _keep_count(self) -> int:
        if not self.keep_first_frame:
            return 0
        return self.family.frame_tokens(self.transformer, self._forward_arguments)

    def _reference_tokens(self) -> int:
        """The trailing reference-image tokens that go through every route (0 with ``route_reference_tokens``)."""
        if self.route_reference_tokens or self.family.reference_tokens is None:
            return 0
        if self.reference_tokens is not None:
            return self.reference_tokens
        if self._reference_count is None:
            self._reference_count = self.family.reference_tokens(self.transformer, self._forward_arguments)
        return self._reference_count

    def _draw(self, batch_size: int, num_tokens: int, ratio: float, device) -> torch.LongTensor:
        keep, references = self._keep_count(), self._reference_tokens()
        if keep + references > num_tokens:
            raise ValueError(
                f"TREAD routing on {self.family.name}: {keep} first-frame and {references} reference-image tokens "
                f"should stay in every route, but there are only {num_tokens} image tokens."
            )
        routable = num_tokens - keep - references
        kept = routing.sample_kept_indices(batch_size, routable, ratio, generator=self.generator, device=device)
        if keep == 0 and references == 0:
            return kept
        first = torch.arange(keep, device=device).expand(batch_size, -1)
        last = torch.arange(keep + routable, num_tokens, device=device).expand(batch_size, -1)
        return torch.cat([first, kept + keep, last], dim=1)

    def _gathered_inputs(self, index: int, arguments: dict, state: dict) -> dict:
        """The kept rows of every per-token block input of block ``index``. Gathered per block (an index op on
        tensors the size of the tokens), since a family may pass a different tensor to each block."""
        specs = self._block_list[index].token_inputs or self.family.token_inputs
        return {
            name: spec.gather(name, arguments[name], state["kept"], state["num_image"], state["num_text"])
            for name, spec in specs.items()
            if arguments.get(name) is not None
        }

    def _route_inputs(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Route start: store the image tokens, draw and gather the kept ones. Every routed block: swap in the
        gathered per-token inputs. Arguments keep the way they were passed."""
        position = self._route_of_block[index]
        route = self._active_routes[position]
        names = self._names[index]
        arguments = _bind(names, args, kwargs)
        updates = {}
        if index == route["start_layer_idx"]:
            num_text = self._text_length(arguments)
            hidden_name = self._block_list[index].hidden
            text, image = self._split_joint(index, arguments[hidden_name], num_text)
            batch_size, num_image = image.shape[:2]
            self.family.check_tokens(self, arguments, num_image, num_text)
            kept = self._draw(batch_size, num_image, route["selection_ratio"], image.device)
            self._open[position] = dict(kept=kept, reinsert_into=image, num_image=num_image, num_text=num_text)
            updates[hidden_name] = self._join(index, text, routing.gather_tokens(image, kept))
        updates.update(self._gathered_inputs(index, arguments, self._open[position]))
        args, kwargs = list(args), dict(kwargs)
        for name, value in updates.items():
            if name in kwargs or names.index(name) >= len(args):
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
        reinsert_into = state["reinsert_into"]
        if self.route_reinsertion == "pre_route_plus_input":
            reinsert_into = reinsert_into + self._input_tokens  # v1 (Jan 2025): x_D_last + x_T
        block_list = self._block_list[index]
        hidden = output if block_list.output is None else output[block_list.output]
        text, routed = self._split_joint(index, hidden, state["num_text"])
        hidden = self._join(index, text, routing.scatter_tokens(routed, state["kept"], reinsert_into))
        self._masks.append(routing.bypass_mask(state["kept"], state["num_image"]))
        if block_list.output is None:
            return hidden
        output = list(output)
        output[block_list.output] = hidden
        return tuple(output)

    def _remember_input_tokens(self, index: int, args: tuple, kwargs: dict) -> None:
        if index == 0 and self._active_routes is not None and self.route_reinsertion == "pre_route_plus_input":
            arguments = _bind(self._names[0], args, kwargs)
            tokens = arguments[self._block_list[0].hidden]
            _, self._input_tokens = self._split_joint(0, tokens, self._text_length(arguments))

    def _block_pre_hook(self, index, block, args, kwargs):
        if self._suspended or self._active_routes is None:
            return None
        self._remember_input_tokens(index, args, kwargs)
        if index not in self._route_of_block:
            return None
        return self._route_inputs(index, args, kwargs)

    def _block_hook(self, index, block, args, kwargs, output):
        if self._suspended or self._active_routes is None or index not in self._route_of_block:
            return None
        return self._route_output(index, output)

    def _checkpointed_block(self, checkpoint: Callable, block, *args, **kwargs):
        """Stands in for ``transformer._gradient_checkpointing_func`` during a routed forward. Keyword arguments
        (HunyuanImage calls its blocks with some) pass through, bound to the block, since Diffusers' own
        checkpointing function takes positional ones only."""
        index = self._block_index.get(block)
        if index is not None:
            self._remember_input_tokens(index, args, kwargs)
        if index not in self._route_of_block:
            return checkpoint(partial(block, **kwargs) if kwargs else block, *args)
        args, kwargs = self._route_inputs(index, args, kwargs)
        output = checkpoint(_HooksSuspended(self, block, kwargs), *args)
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
    keep_first_frame: bool = False,
    route_reference_tokens: bool = False,
) -> TreadRouter:
    """Attach TREAD routes to a stock Diffusers image or video transformer (see ``families.py`` for the classes);
    ``routes="paper"`` is the paper's default single route, blocks 2 .. num_blocks-4 at selection ratio 0.5 (ICCV
    Sec. 4.1). Returns the ``TreadRouter``; ``router.remove()`` detaches it."""
    return TreadRouter(
        transformer,
        routes,
        generator=generator,
        route_reinsertion=route_reinsertion,
        keep_first_frame=keep_first_frame,
        route_reference_tokens=route_reference_tokens,
    )
