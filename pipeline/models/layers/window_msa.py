"""Swin's window multi-head self-attention with a relative position bias: the ``msa`` window kind.

Implements the window contract of ``pipeline.models.layers``: ``forward(x, region_ids=None)`` on
``(B * num_windows, N, C)`` windows. Also home of the helpers the window kinds share: the relative
position index of a window, the masks made from ``region_ids`` (built once per block by
``BoundRegions``) and the input checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from timm.models.swin_transformer import get_relative_position_index
from torch import nn

__all__ = ["WindowMSA", "BoundRegions", "relative_position_index", "cross_region_mask", "region_masks", "check_heads", "check_windows"]


def relative_position_index(window_size: tuple[int, int], device=None) -> torch.Tensor:
    """``(N, N)`` long: Swin's relative position index ``rpi(i, j)`` of a window, ``(2Wh-1)(2Ww-1)`` values."""
    return get_relative_position_index(window_size[0], window_size[1], device=device)


def cross_region_mask(region_ids: torch.Tensor) -> torch.Tensor:
    """``(num_windows, N)`` region ids -> ``(num_windows, 1, N, N)`` bool, True where query and key lie in different regions.

    A pure function of its input, so tracing (``torch.export`` / ``torch.compile``) sees no side effect;
    backbones build it once per block through ``BoundRegions.bind_region_ids``.
    """
    return (region_ids.unsqueeze(-1) != region_ids.unsqueeze(-2)).unsqueeze(1)


def region_masks(region_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_windows, N)`` region ids -> ``(num_windows, 1, N, N)`` additive (0 / -inf) and keep (1 / 0) masks.

    The first is added to the logits (a softmax then gives masked pairs exactly 0); the second multiplies
    terms added after the softmax (LSLA's outer bias), which must vanish there too.
    """
    cross = cross_region_mask(region_ids)
    return torch.zeros(cross.shape, dtype=dtype, device=cross.device).masked_fill_(cross, float("-inf")), (~cross).to(dtype)


class BoundRegions:
    """Mixin for window attention kinds (``nn.Module`` subclasses): region masks made once, from a block's ids.

    A backbone block calls ``bind_region_ids`` once and then passes the module's own ``region_ids``
    buffer at every call. The masks are non-persistent buffers: they follow ``.to()``, and a traced
    forward only reads them. They are made at binding, so ids changed in place need a new bind; any
    other ``region_ids`` tensor gets its masks built at the call.
    """

    def _init_bound_regions(self) -> None:
        for name in ("region_ids", "region_bias", "region_keep"):
            self.register_buffer(name, None, persistent=False)

    def bind_region_ids(self, region_ids: torch.Tensor) -> None:
        """Keep ``region_ids`` and the masks made from them as buffers (outside inference mode, so they serve training)."""
        with torch.inference_mode(False):
            self.region_ids = region_ids
            self.region_bias, self.region_keep = region_masks(region_ids)

    def region_masks(self, region_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The additive and keep masks of ``region_ids``: the bound buffers when given the bound tensor."""
        if region_ids is self.region_ids:
            return self.region_bias, self.region_keep
        return region_masks(region_ids, dtype)


def check_heads(dim: int, num_heads: int) -> int:
    """Channels per head; a clear error when ``dim`` does not split evenly."""
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
    return dim // num_heads


def check_windows(x: torch.Tensor, window_area: int, region_ids: torch.Tensor | None) -> int:
    """Validate a window batch against the contract; returns the number of windows per image (1 if unmasked)."""
    if x.ndim != 3 or x.shape[1] != window_area:
        raise ValueError(f"expected windows of shape (B * num_windows, {window_area}, C), got {tuple(x.shape)}")
    if region_ids is None:
        return 1
    num_windows = region_ids.shape[0]
    if region_ids.shape != (num_windows, window_area) or x.shape[0] % num_windows:
        raise ValueError(
            f"region_ids of shape {tuple(region_ids.shape)} do not fit windows {tuple(x.shape)}: "
            f"expected (num_windows, {window_area}) with num_windows dividing {x.shape[0]}"
        )
    return num_windows


class WindowMSA(BoundRegions, nn.Module):
    """Window multi-head self-attention with Swin's relative position bias (the baseline).

    ``softmax(q kᵀ / sqrt(d) + B) v`` per window and head, ``B[k, i, j] = T[k, rpi(i, j)]`` with ``T``
    trunc-normal(0.02) as in Swin. Under shifted windows the bias is ``-inf`` wherever two tokens carry
    different region ids, so those weights are exactly zero. Runs ``F.scaled_dot_product_attention``
    with the bias (and mask) as ``attn_mask``: the fused kernels on a GPU.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: tuple[int, int] | int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = check_heads(dim, num_heads)
        self.window_size = to_2tuple(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        num_relative = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # (heads, entries) rather than Swin's (entries, heads): one gather gives (heads, N, N) directly
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, num_relative))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_bound_regions()

    def relative_position_bias(self) -> torch.Tensor:
        """``(heads, N, N)``: the bias table gathered at every query/key pair of the window."""
        return self.relative_position_bias_table[:, self.relative_position_index]

    def forward(self, x: torch.Tensor, region_ids: torch.Tensor | None = None) -> torch.Tensor:
        num_windows = check_windows(x, self.window_area, region_ids)
        B_, N, C = x.shape
        q, k, v = self.qkv(x).view(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias()  # (heads, N, N), broadcast over windows
        if region_ids is not None:
            bias = bias + self.region_masks(region_ids, bias.dtype)[0]  # (nW, heads, N, N), -inf across regions
            # the fused kernels take 4-D inputs: one mask per window of the batch, as timm's Swin
            bias = bias.expand(B_ // num_windows, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"
