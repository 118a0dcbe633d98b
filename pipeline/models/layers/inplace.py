"""Eager inference may overwrite intermediates in place: nothing keeps them for a backward pass."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GELU", "eager_without_autograd"]


def eager_without_autograd() -> bool:
    """Intermediates may be overwritten in place: nothing is kept for backward and no graph is being
    traced (export and compile want functional ops, no ``out=``)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


class GELU(nn.GELU):
    """``nn.GELU`` that overwrites its input in eager inference (``eager_without_autograd``).

    For inputs nobody reads afterwards, such as an MLP's first linear output: the result then lands in a
    buffer still in cache instead of a fresh one, and one activation-sized buffer fewer is live
    (``bench_lsla --only 224``, CPU, one thread, batch 4: vit_lsla_tiny inference +1%, two runs each way;
    the hidden layer of its first stage is 14 MB). Under autograd (GELU's backward needs its input),
    export or compile it is ``nn.GELU``.
    """

    def forward(self, input: Tensor) -> Tensor:
        if eager_without_autograd():
            return torch.ops.aten.gelu_(input, approximate=self.approximate)
        return super().forward(input)
