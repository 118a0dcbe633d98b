"""Parameter and multiply-accumulate counts for any model of the project (or of timm).

MACs follow the fvcore convention the papers use: one multiply-add of a matmul or convolution is one
MAC; element-wise ops, softmax and norms are not counted. We read torch's own FLOP counter, which
counts 2 FLOPs per multiply-add, and halve it. While counting, ``scaled_dot_product_attention`` runs its
math backend, whose two matmuls the counter sees on every device (it has no formula for the CPU's fused
kernel, which would silently drop q·kᵀ and P·v).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(
    model: nn.Module,
    inputs: torch.Tensor | tuple,
    forward: Callable[..., object] | None = None,
) -> int:
    """MACs of one forward pass on ``inputs`` (a tensor or a tuple of positional arguments).

    ``forward`` replaces ``model.__call__`` when the cost of another entry point is wanted (for example
    one exit of a DVT cascade). The model's train/eval mode is left as the caller set it, because
    some models (Castling-ViT) compute more in training than in inference.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    fn = forward if forward is not None else model
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def macs_by_module(model: nn.Module, inputs: torch.Tensor | tuple) -> dict[str, int]:
    """MACs per module (torch's hierarchical breakdown, top-level modules and the total)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=2) as counter:
        model(*args)
    return {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
