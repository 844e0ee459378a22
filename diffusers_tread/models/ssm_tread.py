"""TreadSSM2DModel: a class-conditional state-space (Mamba) diffusion backbone with TREAD routing (arXiv 2501.04765).

DiT's layout with the attention replaced by a bidirectional selective scan::

    patchify + fixed 2D sin-cos positions (raster order)
    -> num_layers x [adaLN-Zero -> bidirectional S6 mixer -> gated residual (-> adaLN-Zero -> MLP -> gated residual)]
    -> adaLN final layer -> linear -> unpatchify

Sources:
- Selective scan (S6): Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
  (arXiv 2312.00752), Alg. 2 and Sec. 3; the mixer follows their block (in_proj -> causal depthwise conv -> SiLU ->
  S6, gated by SiLU(z) -> out_proj) and their initialisation (S4D-real A, log-uniform step sizes).
- Bidirectional scan over image patches: Vision Mamba (Zhu et al. 2024, arXiv 2401.09417): a forward and a backward
  scan with their own conv/S6 parameters, shared in/out projections, outputs averaged (Vim's "v2" block). State-space
  diffusion backbones built on such scans: DiS (Fei et al. 2024, "Scalable Diffusion Models with State Space
  Backbone", arXiv 2402.05608), Zigma (Hu et al. 2024, arXiv 2403.13802).
- Conditioning: DiT's adaLN-Zero (Peebles & Xie 2023, arXiv 2212.09748): per-block shift/scale/gate from the
  timestep + class embedding, zero-initialised, so every block starts as the identity.

TREAD routing is the same as in `TreadTransformer2DModel` and uses the same router (`diffusers_tread.routing`). The
scan depends on token order, and the router returns each sample's kept tokens in ascending (raster) order, so a route
scans the kept tokens in their original order, with the bypassed ones left out.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .. import routing
from .modeling_tread import TreadRoutingMixin, TreadTransformer2DModelOutput

# Our sizes (not from a paper): DiT's depth and width (Peebles & Xie 2023, Table 1) with the attention replaced by
# the bidirectional mixer and the MLP kept, so parameters and FLOPs are close to the DiT of the same name.
SSM_SIZES = {
    "Tiny": {"num_layers": 8, "hidden_size": 64},  # for tests and CPU demos, like DiT-Tiny/2
    "S": {"num_layers": 12, "hidden_size": 384},
    "B": {"num_layers": 12, "hidden_size": 768},
}
SSM_PRESETS = {f"SSM-{size}/2": {**dims, "patch_size": 2} for size, dims in SSM_SIZES.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Selective scan
# ----------------------------------------------------------------------------------------------------------------------


def selective_scan_reference(u, delta, A, B, C, D):
    """Mamba's selective scan (Gu & Dao 2023, Alg. 2) as a plain loop over time, with autograd through every step.

    ``u``, ``delta``: ``(batch, dim, length)`` inputs and positive step sizes; ``A``: ``(dim, state)``, negative;
    ``B``, ``C``: ``(batch, state, length)``; ``D``: ``(dim,)``. With the zero-order-hold ``exp(delta A)`` for ``A``
    and Mamba's simplified ``delta B`` for ``B``::

        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t + D u_t,    h_{-1} = 0

    The test oracle for `selective_scan`; slow and memory-hungry, not for training.
    """
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1) + D[:, None] * u


def _time_major(tensor: torch.Tensor) -> torch.Tensor:
    """``(batch, channels, length)`` -> contiguous ``(length, batch, channels)``: each time step one block."""
    return tensor.permute(2, 0, 1).contiguous()


def _scan_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the scan computes in: float32, or wider if an input is (as Mamba's kernel, whatever autocast says)."""
    return functools.reduce(torch.promote_types, [tensor.dtype for tensor in tensors], torch.float32)


def _batch_major(length: int, batch: int, dim: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty ``(batch, dim, length)`` tensor laid out time-major, as the scan's results are (for the fakes)."""
    return like.new_empty(length, batch, dim, dtype=dtype).permute(1, 2, 0)


def _gradient_like(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty gradient for ``tensor``: its layout when dense (else contiguous), as ``empty_like`` on fake tensors
    gives it too. (Time-major gradients, the scan's natural layout, met a meta-vs-CPU stride disagreement in
    ``softplus_backward`` downstream under ``torch.compile``'s eager-kernel backends.)"""
    return torch.empty_like(tensor, dtype=dtype)


# The scan cuts the sequence into time chunks whose ``(chunk, batch, dim, state)`` tensors fit in a CPU cache: about
# SCAN_CHUNK_ELEMENTS numbers each, but at least SCAN_MIN_CHUNK_STEPS steps.
SCAN_CHUNK_ELEMENTS = 2**18
SCAN_MIN_CHUNK_STEPS = 8


def scan_chunk_steps(batch: int, dim: int, state: int) -> int:
    """Time steps per chunk of `selective_scan` for these sizes (a Python int: static under ``torch.compile``)."""
    return max(SCAN_MIN_CHUNK_STEPS, SCAN_CHUNK_ELEMENTS // (batch * dim * state))


def _chunk_states(u, delta, A, B, h_before):
    """One time chunk of the recurrence (time-major inputs): ``exp(delta_t A)`` and the states ``h_t``, both
    ``(chunk, batch, dim, state)``, starting from the state ``h_before`` (``(batch, dim, state)``)."""
    decay = torch.exp(delta.unsqueeze(-1) * A)
    h = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # delta_t B_t u_t
    h[0].addcmul_(decay[0], h_before)
    for t in range(1, h.shape[0]):
        h[t].addcmul_(decay[t], h[t - 1])  # h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
    return decay, h


# The scan and its backward are custom operators (torch.library): opaque to torch.compile, so a compiled training step
# keeps them whole (no graph break, and no unrolled time loop to compile) and runs exactly the eager code in them. Their
# namespace is this module's name, so the package and a remote-code copy of this file loaded beside it (its Hub
# bundle) each register their own.
_OPS = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(
    f"{_OPS}::selective_scan",
    mutates_args=(),
    schema="(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, int chunk) -> (Tensor, Tensor)",
)
def _selective_scan_forward(u, delta, A, B, C, chunk):
    """``y_t = C_t . h_t`` of `selective_scan_reference` (without ``D``), chunked over time, and the state before each
    chunk (``(chunks, batch, dim, state)``, what the backward starts from).

    Within a chunk, everything but the recurrence is one batched op; the recurrence itself is one fused multiply-add
    per step, in place. This is exact (only products of decays <= 1 occur, so nothing overflows whatever the step
    sizes, unlike log-space cumulative sums) and on CPU it was faster than the parallel-scan formulations we tried
    (Hillis-Steele doubling, chunked log-space cumsums), which stream ``length x state`` tensors through memory several
    times. Memory: the autograd formula keeps the inputs and these boundary states (with 16 states and chunks of at
    least 8 steps, no more than the inputs), not the ``length x state`` states.
    """
    with torch.autocast(u.device.type, enabled=False):  # float32 (or 64) throughout, under mixed precision too
        dtype = _scan_dtype(u, delta, A, B, C)
        A_ = A.to(dtype)
        u_, delta_, B_, C_ = (_time_major(tensor.to(dtype)) for tensor in (u, delta, B, C))
        length, batch, dim = u_.shape
        h_last = u_.new_zeros(batch, dim, A.shape[1])
        boundaries, ys = [], []
        for start in range(0, length, chunk):
            window = slice(start, start + chunk)
            boundaries.append(h_last)
            _, h = _chunk_states(u_[window], delta_[window], A_, B_[window], h_last)
            ys.append(torch.bmm(h.flatten(0, 1), C_[window].flatten(0, 1).unsqueeze(-1)).view(-1, batch, dim))
            h_last = h[-1].clone()
        return torch.cat(ys).permute(1, 2, 0).to(u.dtype), torch.stack(boundaries)


@_selective_scan_forward.register_fake
def _(u, delta, A, B, C, chunk):
    (batch, dim, length), dtype = u.shape, _scan_dtype(u, delta, A, B, C)
    boundaries = u.new_empty(-(-length // chunk), batch, dim, A.shape[1], dtype=dtype)
    return _batch_major(length, batch, dim, u, u.dtype), boundaries


@torch.library.custom_op(
    f"{_OPS}::selective_scan_backward",
    mutates_args=(),
    schema="(Tensor grad_y, Tensor u, Tensor delta, Tensor A, "
    "Tensor B, Tensor C, Tensor boundaries, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _selective_scan_backward(grad_y, u, delta, A, B, C, boundaries, chunk):
    """The gradients of `_selective_scan_forward`'s ``y`` with respect to ``u, delta, A, B, C``.

    Recomputes a chunk's states from its boundary (as Mamba's CUDA kernel recomputes) and runs the adjoint recurrence
    backwards in time, ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` (the gradient with respect to ``h_t``), from
    which every input gradient is a product or a sum.
    """
    inputs = (u, delta, A, B, C)
    with torch.autocast(grad_y.device.type, enabled=False):
        dtype = boundaries.dtype
        A = A.to(dtype)
        u, delta, B, C, grad_y = (_time_major(tensor.to(dtype)) for tensor in (u, delta, B, C, grad_y))
        length, batch, dim = u.shape
        # each gradient in its input's layout (`_gradient_like`), written through a time-major view
        grads = [_gradient_like(tensor, dtype) for tensor in inputs[:2]] + [torch.zeros_like(A)]
        grads += [_gradient_like(tensor, dtype) for tensor in inputs[3:]]
        grad_u, grad_delta, grad_A, grad_B, grad_C = (
            grad.permute(2, 0, 1) if grad.dim() == 3 else grad for grad in grads
        )
        g_next = decay_next = None  # g and exp(delta A) at the first step of the chunk after this one
        for index in reversed(range(len(boundaries))):
            window = slice(index * chunk, (index + 1) * chunk)
            h_before = boundaries[index]
            decay, h = _chunk_states(u[window], delta[window], A, B[window], h_before)
            g = grad_y[window].unsqueeze(-1) * C[window].unsqueeze(2)  # the direct part C_t dy_t
            if g_next is not None:
                g[-1].addcmul_(decay_next, g_next)
            for t in range(g.shape[0] - 2, -1, -1):
                g[t].addcmul_(decay[t + 1], g[t + 1])
            g_next, decay_next = g[0], decay[0]

            steps = g.shape[0]
            flat_g, flat_h = g.flatten(0, 1), h.flatten(0, 1)  # (steps * batch, dim, state)
            grad_C[window] = torch.bmm(grad_y[window].flatten(0, 1).unsqueeze(1), flat_h).view(steps, batch, -1)
            # through exp(delta_t A) h_{t-1}: gradient with respect to delta_t A
            h_previous = torch.cat([h_before.unsqueeze(0), h[:-1]])
            grad_log_decay = g * decay * h_previous
            grad_A += torch.einsum("tbdn,tbd->dn", grad_log_decay, delta[window])
            # through delta_t B_t u_t: sum_n g_t B_t is the gradient with respect to delta_t u_t
            g_dot_B = torch.bmm(flat_g, B[window].flatten(0, 1).unsqueeze(-1)).view(steps, batch, dim)
            grad_delta[window] = (grad_log_decay * A).sum(-1) + g_dot_B * u[window]
            grad_u[window] = g_dot_B * delta[window]
            delta_u = (delta[window] * u[window]).flatten(0, 1).unsqueeze(1)
            grad_B[window] = torch.bmm(delta_u, flat_g).view(steps, batch, -1)
        return tuple(grad.to(tensor.dtype) for grad, tensor in zip(grads, inputs, strict=True))


@_selective_scan_backward.register_fake
def _(grad_y, u, delta, A, B, C, boundaries, chunk):
    return tuple(_gradient_like(tensor, tensor.dtype) for tensor in (u, delta, A, B, C))


def _selective_scan_setup_context(ctx, inputs, output):
    *tensors, ctx.chunk = inputs
    ctx.save_for_backward(*tensors, output[1])
    # The boundary states are an output only to be saved: no gradient flows into them, and none is materialised as
    # zeros (which would cost their size again in the backward).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _selective_scan_autograd(ctx, grad_y, grad_boundaries):
    if grad_y is None:  # y unused
        return (None,) * 6
    return (*_selective_scan_backward(grad_y, *ctx.saved_tensors, ctx.chunk), None)


_selective_scan_forward.register_autograd(_selective_scan_autograd, setup_context=_selective_scan_setup_context)


@functools.cache
def fused_selective_scan():
    """Mamba's fused CUDA kernel, ``mamba_ssm``'s ``selective_scan_fn``, when that package is installed; else None.
    Optional: nothing here needs it (imported by name so that the package stays out of the import lines)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return None
    return importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_fn


def selective_scan(u, delta, A, B, C, D):
    """The selective scan of `selective_scan_reference` (same arguments and result), fast and memory-lean.

    CUDA tensors use Mamba's fused kernel when ``mamba_ssm`` is installed; everything else (CPU included) runs the
    pure-PyTorch `_selective_scan_forward` (a custom operator with its own backward, so ``torch.compile(fullgraph=True)``
    takes it whole). The scan runs in float32 whatever the input dtype (as Mamba's kernel); the result has ``u``'s
    dtype.
    """
    if u.is_cuda and fused_selective_scan() is not None:
        return fused_selective_scan()(u, delta, A, B, C, D.float())
    y, _ = _selective_scan_forward(u, delta, A, B, C, scan_chunk_steps(u.shape[0], *A.shape))
    return (y + D[:, None] * u).to(u.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class S6Scan(nn.Module):
    """One scan direction of the Mamba mixer: causal depthwise conv -> SiLU -> S6 with input-dependent step size,
    ``B`` and ``C`` (Gu & Dao 2023, Alg. 2). Parameter names follow Mamba / transformers' ``MambaMixer``."""

    def __init__(self, inner_size: int, state_size: int, conv_kernel: int, time_step_rank: int):
        super().__init__()
        self.time_step_rank, self.state_size = time_step_rank, state_size
        self.conv1d = nn.Conv1d(inner_size, inner_size, conv_kernel, groups=inner_size, padding=conv_kernel - 1)
        self.x_proj = nn.Linear(inner_size, time_step_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(time_step_rank, inner_size)
        # Mamba's initialisation: S4D-real A = -(1..N); step sizes log-uniform in [1e-3, 1e-1] through the softplus.
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, state_size + 1, dtype=torch.float32)).repeat(inner_size, 1)
        )
        self.D = nn.Parameter(torch.ones(inner_size))
        nn.init.uniform_(self.dt_proj.weight, -(time_step_rank**-0.5), time_step_rank**-0.5)
        dt = torch.exp(torch.rand(inner_size) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, inner_size, length)`` -> same shape, scanning from the first token to the last."""
        length = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :length])  # causal: token t sees tokens t-k+1..t
        delta, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.time_step_rank, self.state_size, self.state_size], dim=-1
        )
        delta = F.softplus(self.dt_proj(delta)).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D)


class BidirectionalMambaMixer(nn.Module):
    """Mamba's mixer scanning the token sequence both ways (Vision Mamba's block, Zhu et al. 2024).

    ``in_proj`` gives ``x`` and the gate ``z``; ``x`` is scanned forwards by ``forward_scan`` and, reversed, by
    ``backward_scan`` (separate conv/S6 parameters: the two directions see different causal contexts); the two outputs
    are averaged, gated by ``SiLU(z)`` and projected back by ``out_proj``. Every output token depends on every input
    token, as with attention.
    """

    def __init__(self, hidden_size: int, state_size: int, expand: int, conv_kernel: int, time_step_rank: int):
        super().__init__()
        inner_size = expand * hidden_size
        self.in_proj = nn.Linear(hidden_size, 2 * inner_size, bias=False)
        self.forward_scan = S6Scan(inner_size, state_size, conv_kernel, time_step_rank)
        self.backward_scan = S6Scan(inner_size, state_size, conv_kernel, time_step_rank)
        self.out_proj = nn.Linear(inner_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (batch, inner, length) each
        y = (self.forward_scan(x) + self.backward_scan(x.flip(-1)).flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2) * F.silu(z.transpose(1, 2)))


class SSMBlock(nn.Module):
    """A DiT block with the attention replaced by `BidirectionalMambaMixer`; adaLN-Zero conditioning (DiT Sec. 3.2).

    ``hidden_states``: ``(batch, tokens, hidden_size)``, any number of tokens (a route passes only its kept tokens);
    ``conditioning``: ``(batch, hidden_size)``, the timestep + class embedding. With ``mlp_ratio`` 0 the block is the
    mixer alone (a plain Mamba block with adaLN).
    """

    def __init__(self, hidden_size, state_size, expand, conv_kernel, time_step_rank, mlp_ratio, norm_eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mixer = BidirectionalMambaMixer(hidden_size, state_size, expand, conv_kernel, time_step_rank)
        self.has_mlp = mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
            self.ff = FeedForward(
                hidden_size, inner_dim=int(hidden_size * mlp_ratio), activation_fn="gelu-approximate"
            )
        # shift, scale, gate for the mixer (and the MLP); zero-init: every block starts as the identity
        self.adaLN_modulation = nn.Linear(hidden_size, (6 if self.has_mlp else 3) * hidden_size)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(F.silu(conditioning)).unsqueeze(1).chunk(6 if self.has_mlp else 3, dim=-1)
        shift, scale, gate = modulation[:3]
        hidden_states = hidden_states + gate * self.mixer(self.norm1(hidden_states) * (1 + scale) + shift)
        if self.has_mlp:
            shift, scale, gate = modulation[3:]
            hidden_states = hidden_states + gate * self.ff(self.norm2(hidden_states) * (1 + scale) + shift)
        return hidden_states


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class TreadSSM2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, TreadRoutingMixin):
    """A class-conditional bidirectional-Mamba diffusion backbone with TREAD routes; a drop-in for
    `TreadTransformer2DModel` in `TreadDiTPipeline`, `train_tread.py` and the losses (same forward and output).

    Config:
        sample_size, patch_size, in_channels, out_channels (None: ``in_channels``): the input grid, as DiT.
        num_layers, hidden_size: depth and width.
        state_size, expand, conv_kernel, time_step_rank (None: ``ceil(hidden_size / 16)``): the mixer, named as in
            transformers' ``MambaConfig``; the mixer's inner width is ``expand * hidden_size``.
        mlp_ratio (`float`, defaults to 4.0): MLP width per block, as DiT's; 0 drops the MLP sub-block.
        num_embeds_ada_norm (`int`): number of classes; the label table has one more row, the null class
            ``num_embeds_ada_norm`` used for classifier-free guidance.
        norm_eps: the LayerNorms' epsilon.
        routes, route_reinsertion: TREAD routes, exactly as `TreadTransformer2DModel` (validated by
            `routing.validate_routes`; stored resolved).

    Tokens are scanned in raster order (row by row, as ``PatchEmbed`` flattens them) and in reverse.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SSMBlock"]
    _repeated_blocks = ["SSMBlock"]
    # from_preset: one of SSM_PRESETS (our sizes, see there) with DiT's ImageNet 256 defaults (4x32x32 latents, 8
    # output channels, 1000 classes).
    presets = SSM_PRESETS
    preset_defaults = {"in_channels": 4, "out_channels": 8, "sample_size": 32, "num_embeds_ada_norm": 1000}

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 12,
        hidden_size: int = 384,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        time_step_rank: int | None = None,
        mlp_ratio: float = 4.0,
        num_embeds_ada_norm: int = 1000,
        norm_eps: float = 1e-6,
        routes: list[dict] | None = None,
        route_reinsertion: str = "pre_route",
    ):
        super().__init__()
        self._register_routes(routes, route_reinsertion, num_layers)
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.gradient_checkpointing = False

        # 1. Input: patches with fixed 2D sin-cos positions; timestep + class embedding (Diffusers' DiT modules).
        self.pos_embed = PatchEmbed(sample_size, sample_size, patch_size, in_channels, hidden_size)
        self.emb = CombinedTimestepLabelEmbeddings(num_embeds_ada_norm, hidden_size, class_dropout_prob=0.1)
        # The 0.1 above only makes room for the null-class row; CFG label dropout happens once per sample in the
        # training script, so the embedder's own dropout is off (as in TreadTransformer2DModel).
        self.emb.class_embedder.dropout_prob = 0.0

        # 2. Blocks.
        self.blocks = nn.ModuleList(
            [
                SSMBlock(
                    hidden_size,
                    state_size,
                    expand,
                    conv_kernel,
                    time_step_rank or math.ceil(hidden_size / 16),
                    mlp_ratio,
                    norm_eps,
                )
                for _ in range(num_layers)
            ]
        )

        # 3. Output: DiT's final layer (adaLN shift/scale, linear to patches), zero-initialised as in DiT.
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out_2 = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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
        route_kept_indices: tuple[torch.LongTensor, ...] | None = None,
    ) -> TreadTransformer2DModelOutput | tuple:
        """`TreadTransformer2DModel.forward`'s signature and outputs (``cross_attention_kwargs`` is accepted and
        unused: there is no attention).

        Args:
            force_routing: route even in eval mode (e.g. for Sparse Guidance).
            selection_ratio: overrides the routes' selection ratios for this call: one value, or one per route.
            route_generator: draws the routed subsets, for reproducible routing.
            route_kept_indices: each active route's kept positions drawn ahead (`routing.draw_kept_indices`).

        Returns:
            ``TreadTransformer2DModelOutput(sample, route_masks)`` or ``(sample, route_masks)``; with routing off,
            ``route_masks`` is None and the tuple is ``(sample,)``.
        """
        routes = self._routes_for_call(force_routing, selection_ratio)

        # 1. Input: patchify and add positions (once, so routed tokens keep theirs); the conditioning vector.
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        hidden_states = self.pos_embed(hidden_states)
        input_tokens = hidden_states  # x_T in the v1 paper's notation
        conditioning = self.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)

        # 2. Blocks (routing.run_blocks); inside a route only the kept tokens run, in their original (raster) order:
        # the router returns them sorted, so the scan sees the same token order as without routing, with the bypassed
        # tokens left out.
        def run_block(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                return self._gradient_checkpointing_func(block, hidden_states, conditioning)
            return block(hidden_states, conditioning)

        hidden_states, route_masks = routing.run_blocks(
            self.blocks,
            hidden_states,
            run_block,
            routes,
            self.config.route_reinsertion,
            input_tokens,
            route_generator,
            kept_indices=route_kept_indices,
        )

        # 3. Output: adaLN final layer, linear to patches, unpatchify (as DiT).
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)
        hidden_states = hidden_states.reshape(-1, height, width, self.patch_size, self.patch_size, self.out_channels)
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(-1, self.out_channels, height * self.patch_size, width * self.patch_size)

        if not return_dict:
            return (output,) if route_masks is None else (output, route_masks)
        return TreadTransformer2DModelOutput(sample=output, route_masks=route_masks)
