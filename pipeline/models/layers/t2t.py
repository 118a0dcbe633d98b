"""Tokens-to-token (T2T) tokenizer of T2T-ViT, with the soft-split grids DVT's official code uses.

The image is cut into overlapping patches (a "soft split", ``nn.Unfold``), each patch becomes a token, a
small single-head transformer layer mixes the tokens, they are folded back into an image-shaped map and
soft-split again; after three splits a linear layer projects the last tokens to the embedding width.

DVT's T2T-ViT-12/14 exits use the **performer** flavour (``tokens_type='performer'`` in the official
``T2t_vit_12`` / ``T2t_vit_14`` factories): linear attention with fixed random positive features. The
plain ``transformer`` flavour (softmax attention) is here too, as T2T-ViT's ``T2t_vit_t_*`` use it.

Only the first split changes with the token grid; the next two are always kernel 3, stride 2, padding 1.
First splits of the official code at 224x224 (``T2T_FIRST_SPLITS_224``)::

    7x7   (performer_less_less_token): kernel 14, stride 8, padding 3   224 -> 28 -> 14 -> 7
    10x10 (performer_less_token):      kernel 11, stride 6, padding 5   224 -> 38 -> 19 -> 10
    14x14 (performer):                 kernel 7,  stride 4, padding 2   224 -> 56 -> 28 -> 14
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp, to_2tuple
from torch import nn

# grid side at 224x224 -> (kernel, stride, padding) of the first soft split [paper: official code]
T2T_FIRST_SPLITS_224: dict[int, tuple[int, int, int]] = {7: (14, 8, 3), 10: (11, 6, 5), 14: (7, 4, 2)}
_LATER_SPLIT = (3, 2, 1)


def t2t_first_split(grid: int, img_size: int = 224) -> tuple[int, int, int]:
    """The official first soft split (kernel, stride, padding) that yields a ``grid x grid`` token map."""
    if img_size != 224 or grid not in T2T_FIRST_SPLITS_224:
        raise ValueError(
            f"T2T soft splits are defined for 224x224 images and grids {sorted(T2T_FIRST_SPLITS_224)} "
            f"(the official DVT ones); got grid {grid} at {img_size}. Pass first_split=(kernel, stride, padding).")
    return T2T_FIRST_SPLITS_224[grid]


def _unfold_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class TokenPerformer(nn.Module):
    """T2T's performer layer: single-head linear attention with fixed random positive features.

    ``softmax(q kᵀ)`` is replaced by ``phi(q) phi(k)ᵀ`` with ``phi(x) = exp(w x - |x|²/2) / sqrt(m)`` for
    ``m = kernel_ratio * out_dim`` orthogonal random directions ``w`` (frozen, saved with the model).
    The input width differs from the output width, so the residual of the attention sub-layer is ``v``.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1, eps: float = 1e-8):
        super().__init__()
        self.out_dim = out_dim
        self.num_features = int(out_dim * kernel_ratio)
        self.eps = eps  # keeps the normaliser away from zero
        self.norm1 = nn.LayerNorm(dim)
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, out_dim, out_dim, drop=(0., drop))
        # A frozen Parameter (not a buffer), as in the official code, so that parameter counts agree with it.
        w = nn.init.orthogonal_(torch.empty(self.num_features, out_dim)) * math.sqrt(self.num_features)
        self.w = nn.Parameter(w, requires_grad=False)

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, T, out_dim) -> (B, T, m)."""
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.t() - half_sq_norm) / math.sqrt(self.num_features)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.out_dim, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)  # (B, T, m)
        normaliser = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(-1)  # (B, T, 1)
        kv = torch.einsum("btd,btm->bdm", v, kp)  # (B, out_dim, m): linear in T
        y = torch.einsum("btm,bdm->btd", qp, kv) / (normaliser + self.eps)
        return v + self.proj_drop(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenTransformer(nn.Module):
    """T2T's softmax-attention layer (one head, input width ``dim``, output width ``out_dim``, residual ``v``)."""

    def __init__(self, dim: int, out_dim: int, num_heads: int = 1, mlp_ratio: float = 1.0, qkv_bias: bool = False,
                 drop: float = 0.):
        super().__init__()
        if num_heads != 1:
            raise ValueError("TokenTransformer keeps v as its residual, which needs a single head (num_heads=1)")
        self.out_dim = out_dim
        self.scale = (dim // num_heads) ** -0.5  # T2T scales by the *input* width, as the official code
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), out_dim, drop=drop)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.out_dim, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return v + self.proj_drop(self.proj(attn @ v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TTokenizer(nn.Module):
    """Image (B, C, H, W) -> tokens (B, grid_h * grid_w, embed_dim) by three soft splits.

    ``first_split`` is (kernel, stride, padding) of the first split; by default the official one for
    ``grid`` at 224x224 (see the module docstring). ``flavour`` is ``'performer'`` (DVT's T2T-ViT) or
    ``'transformer'``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, embed_dim: int = 384,
                 token_dim: int = 64, grid: int | None = 14, first_split: tuple[int, int, int] | None = None,
                 flavour: str = "performer", kernel_ratio: float = 0.5, drop: float = 0.1):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        if first_split is None:
            if grid is None or self.img_size[0] != self.img_size[1]:
                raise ValueError("T2TTokenizer needs first_split=(kernel, stride, padding) or a grid at 224x224")
            first_split = t2t_first_split(grid, self.img_size[0])
        k0, s0, p0 = first_split
        k1, s1, p1 = _LATER_SPLIT
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)

        # spatial sizes after each split, tracked explicitly (the official code assumes square maps)
        size0 = tuple(_unfold_out(s, k0, s0, p0) for s in self.img_size)
        size1 = tuple(_unfold_out(s, k1, s1, p1) for s in size0)
        self.grid_size = tuple(_unfold_out(s, k1, s1, p1) for s in size1)
        if min(self.grid_size) < 1:
            raise ValueError(f"first_split {first_split} leaves no tokens at image size {self.img_size}")
        self.map_sizes = (size0, size1)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        if flavour == "performer":
            self.attention1 = TokenPerformer(in_chans * k0 * k0, token_dim, kernel_ratio=kernel_ratio, drop=drop)
            self.attention2 = TokenPerformer(token_dim * k1 * k1, token_dim, kernel_ratio=kernel_ratio, drop=drop)
        elif flavour == "transformer":
            self.attention1 = TokenTransformer(in_chans * k0 * k0, token_dim)
            self.attention2 = TokenTransformer(token_dim * k1 * k1, token_dim)
        else:
            raise ValueError(f"unknown T2T flavour {flavour!r}; expected 'performer' or 'transformer'")
        self.flavour = flavour
        self.project = nn.Linear(token_dim * k1 * k1, embed_dim)

    @staticmethod
    def _to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"T2TTokenizer built for {self.img_size} images, got {tuple(x.shape[-2:])}")
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = self.attention2(self.soft_split1(self._to_map(x, self.map_sizes[0])).transpose(1, 2))
        x = self.soft_split2(self._to_map(x, self.map_sizes[1])).transpose(1, 2)
        return self.project(x)


def sinusoid_position_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """T2T-ViT's fixed position table (1, num_positions, dim): sin on even channels, cos on odd ones."""
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angle = position / torch.pow(10000.0, exponent)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32).unsqueeze(0)
