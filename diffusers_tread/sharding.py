"""Full (unsharded) weights from a sharded training run: what the checkpoint and final-save paths need under FSDP.

With FSDP (PyTorch's ``fully_shard``, FSDP2, or accelerate's ``--use_fsdp``) every process holds a shard of each
parameter (a ``DTensor``); ``model.state_dict()`` is then a dict of shards, and Diffusers' ``save_pretrained`` would
write one process's slice. These functions gather the full weights (a collective: **every process must call them**,
in the same order) and write or load them as ordinary Diffusers folders, the ``FULL_STATE_DICT`` layout:

- `fully_shard_model` / `FSDP_WRAP_CLASSES`: how to shard a TREAD DiT (each block and each conditioning embedder
  its own unit); accelerate's ``--fsdp_transformer_layer_cls_to_wrap`` takes the same class names.
- `is_sharded`: whether a model's parameters are sharded (FSDP2 ``DTensor`` or an FSDP1 wrapper).
- `gather_full_state_dict`: the model's full state dict on the main process, on the CPU (empty elsewhere).
- `gather_full_ema_state_dict`: the same for an ``EMAModel`` whose shadow parameters are shards of the model's.
- `shard_ema_like`: make an ``EMAModel`` built before sharding hold shards laid out like the model's parameters.
- `load_full_state_dict`: load a full state dict (e.g. from ``from_pretrained``) into a sharded or plain model.
- `save_full_pretrained`: write a Diffusers model folder from a full state dict, without a second model in memory.

Without sharding they reduce to ``state_dict()`` / ``load_state_dict`` / ``save_pretrained``, so callers need no
branch. Tested on CPU over gloo with 2 processes (``tests/test_fsdp.py``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# The modules to shard as their own FSDP units. The blocks, as for any transformer; and the conditioning embedders:
# in Diffusers' layout (``shared_conditioning=False``) the final layer calls block 0's embedder outside block 0's
# forward, where a unit of the whole block would have resharded it ("got mixed torch.Tensor and DTensor").
FSDP_WRAP_CLASSES = ("TreadDiTBlock", "CombinedTimestepLabelEmbeddings")


def fully_shard_model(model: nn.Module, wrap_classes: tuple[str, ...] = FSDP_WRAP_CLASSES, **fsdp_kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``): every module whose class is named in
    ``wrap_classes``, innermost first, then the root (what accelerate's ``TRANSFORMER_BASED_WRAP`` does with
    ``--fsdp_transformer_layer_cls_to_wrap TreadDiTBlock,CombinedTimestepLabelEmbeddings``). ``fsdp_kwargs`` go to
    every ``fully_shard`` call (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...). Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    for module in reversed(list(model.modules())):
        if module is not model and type(module).__name__ in wrap_classes:
            fully_shard(module, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def _is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded across processes: FSDP2 (``fully_shard``: parameters are
    ``DTensor``s) or FSDP1 (a ``FullyShardedDataParallel`` module inside)."""
    if any(_is_dtensor(parameter) for parameter in model.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of ``model`` (every parameter and persistent buffer whole, as ``FULL_STATE_DICT``).

    Sharded: a collective (call it on every process); the main process gets the tensors on the CPU, the others an
    empty dict (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict=True,
    cpu_offload=True``, so no process holds more than one full copy, in host memory). Not sharded: ``state_dict()``."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_full_ema_state_dict(ema, model: nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights of ``model`` as a full state dict keyed like ``model.state_dict()`` (the buffers are the
    model's), on the main process and on the CPU (empty elsewhere).

    ``ema`` is a Diffusers ``EMAModel`` over ``model.parameters()``; its shadow parameters are shards (`shard_ema_like`)
    or whole tensors. A collective when any of them is sharded: call it on every process."""
    parameters = list(model.named_parameters())
    if len(parameters) != len(ema.shadow_params):
        raise ValueError(
            f"The EMA holds {len(ema.shadow_params)} tensors for a model with {len(parameters)} parameters; build it "
            "from this model's parameters."
        )
    main = _is_main_process()
    full = {}
    for (name, _), shadow in zip(parameters, ema.shadow_params, strict=True):
        shadow = shadow.detach()
        shadow = shadow.full_tensor() if _is_dtensor(shadow) else shadow  # all-gather: every process takes part
        if main:
            full[_clean_name(name)] = shadow.cpu()
    buffers = gather_full_state_dict(model)  # the persistent buffers, gathered the same way as the parameters
    if main:
        full.update({key: value for key, value in buffers.items() if key not in full})
    return full


def _clean_name(name: str) -> str:
    """A parameter name as it appears in a full state dict: FSDP1's and ``torch.compile``'s wrappers' prefixes off."""
    for prefix in ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def shard_ema_like(ema, model: nn.Module) -> None:
    """Lay out ``ema``'s shadow parameters like ``model``'s (now sharded) parameters, in place.

    An ``EMAModel`` built before ``fully_shard`` (or accelerate's ``prepare``) keeps whole tensors, and its ``step``
    cannot mix them with the model's ``DTensor`` shards. Each shadow becomes a shard of itself with its parameter's
    mesh and placements (every process holds the same whole shadow, so each keeps its own slice: no communication).
    Nothing to do when the model is not sharded with DTensors."""
    from torch.distributed.tensor import distribute_tensor

    parameters = list(model.parameters())
    if len(parameters) != len(ema.shadow_params):
        raise ValueError(
            f"The EMA holds {len(ema.shadow_params)} tensors for a model with {len(parameters)} parameters."
        )
    ema.shadow_params = [
        distribute_tensor(shadow.detach().to(parameter.device), parameter.device_mesh, parameter.placements)
        if _is_dtensor(parameter) and not _is_dtensor(shadow)
        else shadow
        for shadow, parameter in zip(ema.shadow_params, parameters, strict=True)
    ]


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into ``model`` in place (the optimizer keeps its parameters): each process keeps its own
    shard when ``model`` is sharded (``set_model_state_dict`` with ``full_state_dict=True``; every process passes the
    full dict, e.g. from ``from_pretrained``), else ``load_state_dict``. Missing or unexpected keys raise."""
    if not is_sharded(model):
        model.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


def save_full_pretrained(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    extra_config: dict | None = None,
) -> None:
    """Write ``state_dict`` (full, e.g. from `gather_full_state_dict`) as a Diffusers folder of ``model``'s class and
    config (plus ``extra_config``, e.g. an EMA's decay and step as ``EMAModel.save_pretrained`` writes them), loadable
    with ``from_pretrained``. Call on the main process. The weights are not copied: the model that saves them is
    built on the meta device and takes the tensors as they are."""
    with torch.device("meta"):
        saver = _model_class(model).from_config(_unwrapped(model).config)
    saver.load_state_dict(state_dict, strict=True, assign=True)
    if extra_config:
        saver.register_to_config(**extra_config)
    saver.save_pretrained(folder)


def full_model(model: nn.Module, state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """An ordinary (unsharded) copy of ``model`` holding ``state_dict`` on ``device``, in ``model``'s train/eval mode:
    for work one process does alone after a sharded run (the final pipeline's save and sample grid)."""
    copy = _model_class(model).from_config(_unwrapped(model).config)  # not on meta: it keeps its own fixed buffers
    copy.load_state_dict(state_dict, strict=True)
    return copy.to(device).train(model.training)


def _model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 swaps it for a subclass named ``FSDP<name>``, which must not reach a config."""
    cls = type(_unwrapped(model))
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if issubclass(cls, FSDPModule):
        cls = next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))
    return cls


def _unwrapped(model: nn.Module) -> nn.Module:
    """The Diffusers model inside FSDP1's wrapper (FSDP2 keeps the model itself, with a subclass of its class)."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)
