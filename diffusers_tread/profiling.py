"""What a training step costs, counted rather than timed, for the benchmarks and tests: its FLOPs
(`count_flops`, ``torch.utils.flop_counter``) and the ATen ops it dispatches (`count_aten_ops`, a
``TorchDispatchMode``).

FLOPs say what routing saves in arithmetic; ATen ops say what it costs in dispatch (each op is a trip through the
dispatcher and, on a GPU, a kernel launch), which sets an eager step's time at small sizes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# flop_counter registers the CUDA attention kernels only; CPU's fused SDPA gets the same formulas here.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: (
        sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, out_shape=None, **kw: (
        sdpa_backward_flop_count(g, q, k, v)
    ),
}


def count_flops(fn: Callable[[], Any], cpu_attention: bool = True) -> int:
    """The FLOPs of running ``fn()`` (forward, and backward if it runs one), as ``FlopCounterMode`` counts them:
    matmuls, convolutions and attention (with ``cpu_attention``, CPU's fused SDPA kernels too, `CPU_SDPA_FLOPS`)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS if cpu_attention else None) as counter:
        fn()
    return counter.get_total_flops()


class _AtenOpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1  # e.g. "aten.addmm", whatever the overload
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], Any]) -> collections.Counter[str]:
    """Run ``fn()`` and count every ATen op it dispatches (forward, and backward if it runs one), by overload packet.

    Counted below autograd, after composite ops are decomposed (a ``linear`` shows up as ``t`` + ``addmm``), views
    included: each is one trip through the dispatcher, so the count tracks the per-op overhead (CPU time, kernel
    launches) that bounds an eager step at small batch sizes, which FLOPs do not show.
    """
    with _AtenOpCounter() as counter:
        fn()
    return counter.counts
