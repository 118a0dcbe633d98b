"""DVT's reuse paths from one exit of the cascade to the next (METHODS.md section 2).

**Feature reuse** (``FeatureReuse``, one per block of the receiving exit): the previous exit's last-block
tokens (before its final norm) -> ``LN(D) -> Linear(D, 128) -> GELU -> Linear(128, 48)`` -> drop the class
token, resize from the previous grid to the new one, zeros in the class slot. The result is the block's
``context``: concatenated to the input of its MLP sub-block only.

**Relationship reuse** (``RelationReuse``, one per receiving exit): the previous exit's attention logits of
all ``L`` blocks, stacked over heads (``H*L`` channels) -> one shared channel MLP (1x1 conv ``HL -> 3HL``,
GELU, 1x1 conv ``3HL -> HL``) -> both token axes resized to the new grid (the class row and column are
resized only along the other axis) -> split into ``L`` groups of ``H``, one ``attn_bias`` per block.

Resizing a token grid (``resize_grid``) follows the official code: nearest upsampling to a whole multiple of
the source grid, then adaptive average pooling to the target (7x7 -> 14x14 -> 10x10, 10x10 -> 20x20 -> 14x14).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp, to_2tuple
from torch import nn


def upsample_size(src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int]:
    """Size of the nearest-upsampled map before pooling: the smallest multiple of ``src`` covering ``dst``.

    At the official grids this is 2x (7 -> 14 for 10, 10 -> 20 for 14). For other grids the official code
    has no rule; "smallest covering multiple" is ours, and gives an exact nearest upsample when ``dst`` is
    a multiple of ``src``.
    """
    return tuple(s * max(1, math.ceil(d / s)) for s, d in zip(src, dst))


def resize_grid(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Resize the last axis of ``x`` (..., src_h * src_w) from grid ``src`` to grid ``dst``: (..., dst_h * dst_w)."""
    lead = x.shape[:-1]
    if x.shape[-1] != src[0] * src[1]:
        raise ValueError(f"last axis has {x.shape[-1]} entries, grid {src} needs {src[0] * src[1]}")
    if tuple(src) == tuple(dst):
        return x
    maps = x.reshape(-1, 1, *src)
    maps = F.interpolate(maps, size=upsample_size(src, dst), mode="nearest")
    maps = F.adaptive_avg_pool2d(maps, dst)
    return maps.reshape(*lead, dst[0] * dst[1])


class FeatureReuse(nn.Module):
    """Previous exit's tokens (B, 1 + src grid, dim) -> context (B, 1 + dst grid, out_dim) for one block."""

    def __init__(self, dim: int, src_grid: int | tuple[int, int], dst_grid: int | tuple[int, int],
                 hidden_dim: int = 128, out_dim: int = 48, drop: float = 0., norm_layer: type[nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.src_grid, self.dst_grid = to_2tuple(src_grid), to_2tuple(dst_grid)
        self.out_dim = out_dim
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_dim, out_dim, act_layer=act_layer, drop=drop)

    def forward(self, src_tokens: torch.Tensor) -> torch.Tensor:
        # The MLP runs on every token, class token included, then the class token is dropped: this is the
        # official order, and keeps our MAC count equal to the official design's.
        feats = self.mlp(self.norm(src_tokens))[:, 1:]  # (B, src_h*src_w, out_dim)
        feats = resize_grid(feats.transpose(1, 2), self.src_grid, self.dst_grid).transpose(1, 2)
        cls_slot = feats.new_zeros(feats.shape[0], 1, self.out_dim)
        return torch.cat([cls_slot, feats], dim=1)


class RelationReuse(nn.Module):
    """Previous exit's per-block logits [L x (B, H, n, n)] -> attention biases [L x (B, H, N, N)].

    ``expansion`` is the hidden width factor of the shared channel MLP (3 in the official code).
    """

    def __init__(self, num_heads: int, depth: int, src_grid: int | tuple[int, int], dst_grid: int | tuple[int, int],
                 expansion: int = 3, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.num_heads, self.depth = num_heads, depth
        self.src_grid, self.dst_grid = to_2tuple(src_grid), to_2tuple(dst_grid)
        channels = num_heads * depth
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, channels * expansion, kernel_size=1),
            act_layer(),
            nn.Conv2d(channels * expansion, channels, kernel_size=1),
        )

    def _resize_keys(self, r: torch.Tensor) -> torch.Tensor:
        """Resize the key axis (last) of (B, C, rows, 1 + src) to (B, C, rows, 1 + dst); class column kept."""
        return torch.cat([r[..., :1], resize_grid(r[..., 1:], self.src_grid, self.dst_grid)], dim=-1)

    def forward(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(logits) != self.depth:
            raise ValueError(f"relationship reuse expects logits of {self.depth} blocks, got {len(logits)}")
        n = 1 + self.src_grid[0] * self.src_grid[1]
        stacked = torch.cat(logits, dim=1)  # (B, L*H, n, n), block-major as the official torch.cat
        if stacked.shape[1:] != (self.num_heads * self.depth, n, n):
            raise ValueError(f"relationship reuse expects logits (B, {self.num_heads}, {n}, {n}) per block, "
                             f"got {tuple(logits[0].shape)}")
        r = self.mlp(stacked)  # on the small grid: cheaper than after resizing, and the official order
        r = self._resize_keys(r)  # keys:    (B, C, n, N)
        r = self._resize_keys(r.transpose(-1, -2)).transpose(-1, -2)  # queries: (B, C, N, N)
        return list(r.split(self.num_heads, dim=1))
