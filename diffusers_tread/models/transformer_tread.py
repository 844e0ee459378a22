"""TreadTransformer2DModel: Diffusers' DiT with TREAD token routing during training (arXiv 2501.04765).

The forward pass is DiT's (``DiTTransformer2DModel.forward``) with one addition, the paper's Fig. 2: at a route's
start layer a random subset of each sample's tokens leaves the sequence, the blocks of the route run on the rest, and
after the route's end layer the bypassed tokens re-enter at their original positions. No parameter is added, so a
TREAD checkpoint is a DiT checkpoint, and in eval mode (all tokens, all blocks) the output is stock DiT's bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from torch import nn

from .. import routing
from .modeling_tread import TreadRoutingMixin, TreadTransformer2DModelOutput

# DiT model sizes (Peebles & Xie 2023, Table 1): depth, hidden size, heads. Hidden = heads * attention_head_dim.
DIT_SIZES = {
    "S": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64},
    "B": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},
    "L": {"num_layers": 24, "num_attention_heads": 16, "attention_head_dim": 64},
    "XL": {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72},
    # Not from the paper: a width-64, 8-block model for tests and CPU demos.
    "Tiny": {"num_layers": 8, "num_attention_heads": 4, "attention_head_dim": 16},
}
PRESETS = {
    f"DiT-{size}/{patch}": {**dims, "patch_size": patch}
    for size, dims in DIT_SIZES.items()
    for patch in ((2,) if size == "Tiny" else (2, 4, 8))
}


class TreadDiTBlock(BasicTransformerBlock):
    """Diffusers' DiT block (``BasicTransformerBlock`` with adaLN-Zero, no cross-attention), same modules and weights,
    with a forward that runs only DiT's path (Peebles & Xie 2023, Sec. 3.2 and Fig. 3) and takes the SiLU'd
    conditioning embedding from the model when the model computes it once (``shared_conditioning=True``).

    The arithmetic is stock's, op for op, so outputs are bit-identical to ``BasicTransformerBlock``'s; what goes is the
    per-call Python of the generic block (norm-type branches, GLIGEN, the processor's signature inspection) and the
    no-op ``/ rescale_output_factor`` and zero-probability dropouts, each an eager op in every block.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        activated_conditioning: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or added_cond_kwargs is not None:
            raise ValueError("DiT blocks have no cross-attention or added conditions.")
        # adaLN-Zero: six (batch, 1, dim) modulation vectors from SiLU(timestep + label embedding).
        if activated_conditioning is None:
            conditioning = self.norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
            activated_conditioning = F.silu(conditioning)
        modulation = self.norm1.linear(activated_conditioning).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)

        norm_hidden_states = self.norm1.norm(hidden_states) * (1 + scale_msa) + shift_msa
        attn_output = self._self_attention(norm_hidden_states, attention_mask, cross_attention_kwargs)
        hidden_states = gate_msa * attn_output + hidden_states

        norm_hidden_states = self.norm3(hidden_states) * (1 + scale_mlp) + shift_mlp
        if self._chunk_size is not None:
            ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
        else:
            ff_output = self._feed_forward(norm_hidden_states)
        return gate_mlp * ff_output + hidden_states

    # The linear layers take the tokens as one (batch * tokens, dim) matrix: what `F.linear` does internally for a
    # 3-d input (view, addmm, view; the same addmm, so the same numbers), without two view ops per layer.
    def _self_attention(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cross_attention_kwargs: dict | None
    ) -> torch.Tensor:
        attn = self.attn1
        if type(attn.processor) is not AttnProcessor2_0 or attention_mask is not None or cross_attention_kwargs:
            # Any other processor (e.g. AttnProcessor in Diffusers' determinism tests), masks: Diffusers' path.
            return attn(hidden_states, attention_mask=attention_mask, **(cross_attention_kwargs or {}))
        # AttnProcessor2_0's computation for DiT's attention (no norms, no residual, output factor 1).
        batch_size, num_tokens, dim = hidden_states.shape
        tokens = hidden_states.reshape(batch_size * num_tokens, dim)
        projections = (attn.to_q, attn.to_k, attn.to_v)
        if self.training and torch.is_grad_enabled() and all(map(_is_plain_linear, projections)):
            # Training: one (3 * dim)-wide matmul for q, k and v, as DiT's fused `qkv` layer computes them (fewer ops
            # and launches forward and backward). Not bit-identical to three matmuls, so eval keeps those.
            weight = torch.cat([layer.weight for layer in projections])
            bias = torch.cat([layer.bias for layer in projections])
            qkv = F.linear(tokens, weight, bias).view(batch_size, num_tokens, 3, attn.heads, -1)
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
            head_dim = key.shape[-1] // attn.heads
            query = query.view(batch_size, num_tokens, attn.heads, head_dim).transpose(1, 2)
            key = key.view(batch_size, num_tokens, attn.heads, head_dim).transpose(1, 2)
            value = value.view(batch_size, num_tokens, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size * num_tokens, dim)
        hidden_states = _dropout(attn.to_out[1], attn.to_out[0](hidden_states))
        return hidden_states.view(batch_size, num_tokens, -1)

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, num_tokens, dim = hidden_states.shape
        tokens = hidden_states.reshape(batch_size * num_tokens, dim)
        for module in self.ff.net:
            tokens = _dropout(module, tokens) if isinstance(module, nn.Dropout) else module(tokens)
        return tokens.view(batch_size, num_tokens, -1)


def _is_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` and ``layer.bias`` compute what calling ``layer`` does: an ``nn.Linear`` without hooks.
    Diffusers' layerwise casting and group offloading and Accelerate's offloading replace ``forward`` on the instance
    (e.g. casting fp8-stored weights to the compute dtype there); PyTorch's hooks live in the hook dicts."""
    hooked = "forward" in vars(layer) or layer._forward_pre_hooks or layer._forward_hooks
    return type(layer) is nn.Linear and not hooked


def _dropout(dropout: nn.Dropout, hidden_states: torch.Tensor) -> torch.Tensor:
    """``dropout(hidden_states)``, skipped when it cannot change anything (p = 0 or eval mode)."""
    return dropout(hidden_states) if dropout.training and dropout.p > 0 else hidden_states


class TreadTransformer2DModel(DiTTransformer2DModel, AttentionMixin, PeftAdapterMixin, TreadRoutingMixin):
    """``DiTTransformer2DModel`` with TREAD routes.

    Extra config:
        routes (`list[dict]`, defaults to `[]`): ordered, non-overlapping ``{"start_layer_idx", "end_layer_idx",
            "selection_ratio"}`` dicts (end inclusive, negative indices count from the end); see `diffusers_tread.routing`.
        route_reinsertion (`str`, defaults to `"pre_route"`): the state a bypassed token carries past its route:
            ``"pre_route"``, the state entering the route's first block (ICCV version); ``"pre_route_plus_input"``,
            that state plus the patch-embedded input tokens (v1's ``x_D_last + x_T``).
        shared_conditioning (`bool`, defaults to `False`): compute the timestep + label embedding once per forward
            (``conditioning_embedder``) and share it across the blocks, as DiT and TREAD do (DiT-XL/2: 675M parameters).
            `False` keeps Diffusers' layout, one embedder per block (``transformer_blocks.N.norm1.emb``, +75M for
            XL/2), so stock checkpoints load unchanged. `from_dit`/`to_dit` convert between the two.

    Routing runs when the model is in train mode and has routes (unless `disable_routing()` was called), or when
    ``force_routing=True``. The per-block
    class-label dropout of Diffusers' embedders is switched off: Diffusers draws it separately in every block, so a
    sample would almost never be fully unconditional; the training script drops labels once per sample instead.
    """

    _no_split_modules = ["TreadDiTBlock"]
    _repeated_blocks = ["TreadDiTBlock"]
    # from_preset: a DiT size from PRESETS, e.g. "DiT-XL/2", with DiT's ImageNet 256 defaults (4x32x32 latents, learned
    # sigma: 8 output channels, 1000 classes) and one conditioning embedding shared by all blocks (DiT's layout, e.g.
    # 675M parameters for DiT-XL/2); pass shared_conditioning=False for Diffusers' per-block layout.
    presets = PRESETS
    preset_defaults = {
        "in_channels": 4,
        "out_channels": 8,
        "sample_size": 32,
        "num_embeds_ada_norm": 1000,
        "shared_conditioning": True,
    }

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        routes: list[dict] | None = None,
        route_reinsertion: str = "pre_route",
        shared_conditioning: bool = False,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        self._register_routes(routes, route_reinsertion, num_layers)
        # Same modules and weights, DiT's forward without the generic block's overhead (see TreadDiTBlock).
        for block in self.transformer_blocks:
            block.__class__ = TreadDiTBlock
        if shared_conditioning:  # one embedder for all blocks and the final layer, as in DiT (Peebles & Xie, Sec. 3.2)
            self.conditioning_embedder = CombinedTimestepLabelEmbeddings(num_embeds_ada_norm, self.inner_dim)
            for block in self.transformer_blocks:
                block.norm1.emb = None
        # CFG label dropout happens once per sample in the training script (see the class docstring).
        for embedder in self.conditioning_embedders():
            embedder.class_embedder.dropout_prob = 0.0

    def conditioning_embedders(self) -> list[CombinedTimestepLabelEmbeddings]:
        """The timestep + label embedders: one when shared, else one per block (Diffusers' layout)."""
        return _conditioning_embedders(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> TreadTransformer2DModel:
        """`ModelMixin.from_pretrained`; ``shared_conditioning=True`` or ``False`` also converts the loaded weights to
        that layout (see `from_dit`), e.g. a stock Diffusers DiT checkpoint to the shared form."""
        shared_conditioning = kwargs.pop("shared_conditioning", None)
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if shared_conditioning is None or bool(shared_conditioning) == model.config.shared_conditioning:
            return model
        return cls.from_dit(model, shared_conditioning=bool(shared_conditioning))

    @classmethod
    def from_dit(cls, model: DiTTransformer2DModel, **config_overrides) -> TreadTransformer2DModel:
        """Wrap a loaded ``DiTTransformer2DModel``'s (or TREAD model's) weights, shared, not copied, in a TREAD model.

        ``config_overrides`` (e.g. ``routes=[...]``) change the config; the result keeps ``model``'s train/eval mode.
        ``shared_conditioning=True`` turns Diffusers' per-block embedders into one; this needs them to be identical
        (true of every checkpoint converted from facebookresearch/DiT and never fine-tuned per block), else the outputs
        would change, and a ``ValueError`` says so. ``shared_conditioning=False`` copies a shared embedder into every
        block: the stock layout, computing the same outputs.
        """
        config = {key: value for key, value in model.config.items() if not key.startswith("_")}
        config.update(config_overrides)
        state_dict = _conditioning_layout(
            model.state_dict(), config["num_layers"], bool(config.get("shared_conditioning", False))
        )
        with torch.device("meta"):
            tread = cls.from_config(config)
        # assign=True adopts model's tensors (no copy); the fixed sin-cos table is a non-persistent buffer.
        tread.load_state_dict(state_dict, assign=True)
        tread.pos_embed.pos_embed = model.pos_embed.pos_embed
        _copy_timestep_frequencies(model, tread)
        tread.register_to_config(_name_or_path=model.config.get("_name_or_path", ""))
        return tread.train(model.training)

    def to_dit(self) -> DiTTransformer2DModel:
        """This model's weights in Diffusers' stock ``DiTTransformer2DModel`` (a copy): the layout and class that
        ``DiTPipeline`` and every Diffusers DiT tool load, computing the same eval outputs."""
        config = {
            key: value
            for key, value in self.config.items()
            if not key.startswith("_") and key not in ("routes", "route_reinsertion", "shared_conditioning")
        }
        state_dict = _conditioning_layout(self.state_dict(), self.config.num_layers, shared=False)
        with torch.device("meta"):
            dit = DiTTransformer2DModel.from_config(config)
        dit.load_state_dict({key: value.clone() for key, value in state_dict.items()}, assign=True)
        dit.pos_embed.pos_embed = self.pos_embed.pos_embed.clone()
        _copy_timestep_frequencies(self, dit)
        return dit.train(self.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        force_routing: bool = False,
        selection_ratio: float | list[float] | None = None,
        route_generator: torch.Generator | None = None,
        capture_layer_idx: int | None = None,
        delay_routing_after: int | None = None,
        route_kept_indices: tuple[torch.LongTensor, ...] | None = None,
    ) -> TreadTransformer2DModelOutput | tuple:
        """DiT's forward with TREAD routing.

        Args (beyond ``DiTTransformer2DModel.forward``'s):
            force_routing: route even in eval mode (e.g. for Sparse Guidance).
            selection_ratio: overrides the routes' selection ratios for this call: one value for every route, or a
                list with one per route (e.g. a training-time ratio schedule).
            route_generator: draws the routed subsets, for reproducible routing.
            capture_layer_idx: also return this block's output (``captured_hidden_states``) and, inside a route, the
                positions of its kept tokens (``captured_token_indices``); e.g. for REPA (`diffusers_tread.repa`).
            delay_routing_after: a route covering this block lets its tokens leave only after it (delayed routing,
                `routing.run_blocks`'s ``drop_after_layer``).
            route_kept_indices: each active route's ``(batch, num_kept)`` kept positions, drawn ahead
                (`routing.draw_kept_indices` over `active_routes`), e.g. outside a compiled training step; then
                nothing is drawn here and ``route_generator`` is unused.

        Returns:
            ``TreadTransformer2DModelOutput(sample, route_masks)`` or ``(sample, route_masks)``; with routing off,
            ``route_masks`` is None and the tuple is ``(sample,)``, exactly as ``DiTTransformer2DModel`` returns.
        """
        routes = self._routes_for_call(force_routing, selection_ratio)

        # 1. Input: patchify and add the fixed sin-cos positions (once, so routed tokens keep their position).
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        hidden_states = self.pos_embed(hidden_states)
        input_tokens = hidden_states  # x_T in the v1 paper's notation
        # SiLU(timestep + label embedding), the input of every adaLN modulation; computed here once when shared, else
        # by each block from its own embedder (Diffusers' layout).
        activated_conditioning = None
        if self.config.shared_conditioning:
            conditioning = self.conditioning_embedder(timestep, class_labels, hidden_dtype=hidden_states.dtype)
            activated_conditioning = F.silu(conditioning)

        # 2. Blocks; inside a route only the kept tokens run (routing.run_blocks).
        def run_block(block: TreadDiTBlock, hidden_states: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                # The subset was gathered before, outside the checkpoint, so recomputation sees the same tokens.
                return self._gradient_checkpointing_func(
                    block,
                    hidden_states,
                    None,
                    None,
                    None,
                    timestep,
                    cross_attention_kwargs,
                    class_labels,
                    None,
                    activated_conditioning,
                )
            return block(
                hidden_states,
                timestep=timestep,
                cross_attention_kwargs=cross_attention_kwargs,
                class_labels=class_labels,
                activated_conditioning=activated_conditioning,
            )

        captured = {}

        def capture(layer_idx: int, layer_output: torch.Tensor, kept_indices: torch.LongTensor | None) -> None:
            if layer_idx == capture_layer_idx:
                captured.update(captured_hidden_states=layer_output, captured_token_indices=kept_indices)

        hidden_states, route_masks = routing.run_blocks(
            self.transformer_blocks,
            hidden_states,
            run_block,
            routes,
            self.config.route_reinsertion,
            input_tokens,
            route_generator,
            drop_after_layer=delay_routing_after,
            on_block_output=None if capture_layer_idx is None else capture,
            kept_indices=route_kept_indices,
        )

        # 3. Output: DiT's final adaLN layer (in Diffusers' layout conditioned through block 0's embedder) and
        # unpatchify.
        if activated_conditioning is None:
            conditioning = self.transformer_blocks[0].norm1.emb(
                timestep, class_labels, hidden_dtype=hidden_states.dtype
            )
            activated_conditioning = F.silu(conditioning)
        shift, scale = self.proj_out_1(activated_conditioning).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)

        hidden_states = hidden_states.reshape(
            shape=(-1, height, width, self.patch_size, self.patch_size, self.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(
            shape=(-1, self.out_channels, height * self.patch_size, width * self.patch_size)
        )

        if not return_dict:
            return (output,) if route_masks is None else (output, route_masks)
        return TreadTransformer2DModelOutput(sample=output, route_masks=route_masks, **captured)


_SHARED_EMBEDDER = "conditioning_embedder."


def _block_embedder(layer_idx: int) -> str:
    return f"transformer_blocks.{layer_idx}.norm1.emb."


def _conditioning_embedders(model: DiTTransformer2DModel) -> list[CombinedTimestepLabelEmbeddings]:
    if getattr(model, "conditioning_embedder", None) is not None:
        return [model.conditioning_embedder]
    return [block.norm1.emb for block in model.transformer_blocks]


def _conditioning_layout(state_dict: dict[str, torch.Tensor], num_layers: int, shared: bool) -> dict:
    """``state_dict`` with its timestep + label embedding in the shared (``conditioning_embedder.*``) or the per-block
    (``transformer_blocks.N.norm1.emb.*``) layout. Tensors are reused; the per-block copies beyond block 0 are cloned
    so that they train independently, as in Diffusers."""
    is_shared = any(key.startswith(_SHARED_EMBEDDER) for key in state_dict)
    if is_shared == shared:
        return dict(state_dict)
    source_prefix = _SHARED_EMBEDDER if is_shared else _block_embedder(0)
    embedder = {key[len(source_prefix) :]: value for key, value in state_dict.items() if key.startswith(source_prefix)}
    converted = {
        key: value
        for key, value in state_dict.items()
        if not key.startswith(_SHARED_EMBEDDER) and ".norm1.emb." not in key
    }
    if shared:
        for layer_idx in range(1, num_layers):
            for name, value in embedder.items():
                if not torch.equal(state_dict[_block_embedder(layer_idx) + name], value):
                    raise ValueError(
                        f"Block {layer_idx}'s timestep/label embedder differs from block 0's (`{name}`), so one shared "
                        "embedder would change the model's outputs. Load it with shared_conditioning=False (Diffusers' "
                        "per-block layout)."
                    )
        converted.update({_SHARED_EMBEDDER + name: value for name, value in embedder.items()})
    else:
        for layer_idx in range(num_layers):
            for name, value in embedder.items():
                converted[_block_embedder(layer_idx) + name] = value if layer_idx == 0 else value.clone()
    return converted


def _copy_timestep_frequencies(source: DiTTransformer2DModel, target: DiTTransformer2DModel) -> None:
    """Carry an in-memory timestep-frequency setting (``convert_checkpoint.use_original_timestep_frequencies``)."""
    shift = _conditioning_embedders(source)[0].time_proj.downscale_freq_shift
    for embedder in _conditioning_embedders(target):
        embedder.time_proj.downscale_freq_shift = shift
