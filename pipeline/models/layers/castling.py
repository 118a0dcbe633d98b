"""Castling-ViT's linear-angular attention (arXiv 2211.10526), in both attention contracts.

Per head, with ``q̂ = q/||q||`` and ``k̂ = k/||k||`` over the head's channels::

    Y = 0.5 v + (1/pi) q̂ (k̂ᵀ v)          right to left: k̂ᵀ v is d x d, so the cost is linear in n
    Y = Y + Sparse v                     training form only, Sparse = P ⊙ 1[P > eps], P = softmax(q kᵀ/sqrt(d))
    Y = Y / ||Y||
    Y = Y + DWConv(v)                    depthwise, one kernel per head (as the official release)
    out = concat_heads(Y) W_proj + b

The masked softmax branch approximates the higher-order terms of the angular kernel while training; a
regulariser (``mask_regularization``) drives its mask empty, and ``switch_to_inference`` then removes
it: no softmax is left and the cost per token no longer depends on n. The switch changes no parameter,
so a state dict loads into either form.

``CastlingAttention`` follows the global contract (plain ViT), ``WindowCastlingAttention`` the window
contract (hierarchical backbone); both are described in ``pipeline.models.layers``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor, nn

from .inplace import eager_without_autograd
from .window_msa import check_heads, check_windows

__all__ = [
    "CastlingAttention",
    "WindowCastlingAttention",
    "switch_to_inference",
    "castling_modules",
    "mask_regularization",
    "mask_densities",
    "mask_reg_weight",
]

DWCONV_MODES = ("tokens", "grid")


def _inv_norm(t: Tensor) -> Tensor:
    """``1 / max(||t||, 1e-12)`` over the last axis, keepdim (F.normalize's convention)."""
    return torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()


class _LinearAngularAttention(nn.Module):
    """Projections, the attention core and the depthwise convolution shared by both contracts.

    ``dwconv="tokens"`` convolves each head's ``v`` along the token sequence (kernel ``k``, the
    release); ``"grid"`` convolves it on the 2-D token grid (kernel ``k x k``) [ours]. Either way a head
    has one kernel, shared by its ``d`` channels (``dwconv_weight``: ``(heads, k)`` or ``(heads, k, k)``).

    Memory layout, for speed on CPU (the attention core is a few passes over memory, so passes and
    temporaries are what it costs): q, k, v are copied once into head-major order, where the matmuls
    and the conv along the tokens run without further copies; without autograd the core reuses the
    q, k, v buffer for its intermediates.
    """

    has_logits = False  # the softmax branch is auxiliary and vanishes, so no logits are part of the interface

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
        mask_eps: float,
        sparse_branch: bool,
        dwconv: str,
        dwconv_kernel: int,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = check_heads(dim, num_heads)
        self.scale = self.head_dim**-0.5
        self.grid_size = to_2tuple(grid_size)
        if dwconv not in DWCONV_MODES:
            raise ValueError(f"dwconv must be one of {DWCONV_MODES}, got {dwconv!r}")
        if dwconv_kernel < 1 or dwconv_kernel % 2 == 0:
            raise ValueError(f"dwconv_kernel must be a positive odd number (centred kernel), got {dwconv_kernel}")
        if mask_eps < 0:
            raise ValueError(f"mask_eps must be >= 0, got {mask_eps}")
        self.mask_eps = mask_eps
        self.sparse_branch = sparse_branch  # True: training form; switch_to_inference sets False
        self.dwconv_mode = dwconv
        self.dwconv_kernel = dwconv_kernel

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        taps = (dwconv_kernel,) if dwconv == "tokens" else (dwconv_kernel, dwconv_kernel)
        self.dwconv_weight = nn.Parameter(torch.empty(num_heads, *taps))
        bound = 1 / math.sqrt(math.prod(taps))  # nn.Conv's default init for this fan-in
        nn.init.uniform_(self.dwconv_weight, -bound, bound)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        # Statistics of the last training forward with the branch (read by mask_regularization / mask_densities).
        self.last_mask_mean: Tensor | None = None  # mean(Sparse), differentiable
        self.last_mask_density: Tensor | None = None  # share of P > eps, detached

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, C) -> q, k, v, each (B, heads, N, d), contiguous (one copy for all three)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.contiguous().unbind(0)

    def angular(self, q: Tensor, k: Tensor, v: Tensor, regions: Tensor | None = None) -> Tensor:
        """``2 (0.5 v + (1/pi) q̂ (k̂ᵀ v))``, not yet normalised (the factor 2 saves a pass; the
        normalisation that follows removes it).

        q, k, v: (..., h, n, d). ``regions``: None, or a (..., 1, n, R) one-hot of each token's region; a
        token then attends only to its region: ``q̂_i S_r(i)`` with per-region sums ``S_r = Σ_{j in r} k̂_jᵀ v_j``,
        stacked as an (R*d, d) matrix and gathered back through the one-hot (linear in n, R times the cost).
        """
        kn = k * (_inv_norm(k) * (2 / math.pi))  # k̂, with 2/pi folded into the per-token scale
        if regions is None:
            y = q @ (kn.transpose(-2, -1) @ v)  # right to left: (d x n)(n x d) first
        else:
            *lead, n, d = q.shape
            kr = (kn.unsqueeze(-2) * regions.unsqueeze(-1)).reshape(*lead, n, -1)  # k̂ in its region's slot
            qr = (q.unsqueeze(-2) * regions.unsqueeze(-1)).reshape(*lead, n, -1)
            y = qr @ (kr.transpose(-2, -1) @ v)
        # q̂ (k̂ᵀ v) = (q (k̂ᵀ v)) / ||q||: scale the product's rows rather than normalising q first
        return torch.addcmul(v, y, _inv_norm(q), out=y if eager_without_autograd() else None)

    def sparse_attention(self, q: Tensor, k: Tensor, v: Tensor, regions: Tensor | None) -> Tensor:
        """``Sparse · v`` with ``Sparse = P ⊙ 1[P > eps]``; records the mask statistics while training."""
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if regions is not None:
            same = (regions @ regions.transpose(-2, -1)) > 0  # (..., 1, n, n), every token meets itself
            logits = logits.masked_fill(~same, float("-inf"))
        probs = logits.softmax(dim=-1)
        mask = probs > self.mask_eps
        sparse = probs * mask
        if self.training:
            self.last_mask_mean = sparse.mean()
            self.last_mask_density = mask.float().mean().detach()
        return self.attn_drop(sparse) @ v

    def conv(self, v: Tensor, grid: tuple[int, int], num_prefix: int = 0, out: Tensor | None = None) -> Tensor:
        """Depthwise conv of ``v`` (B, h, N, d), one kernel per head: (B, h, N, d).

        ``"tokens"``: ``k`` shifted multiply-adds along N in v's own layout (written into ``out`` when
        given): no layout copy, and steady, where oneDNN's depthwise conv1d took 0.5 to 6 ms for the same
        tensor here. Being element-wise ops, the MAC counter does not see these ``k`` MACs per element
        (0.4% of castling_deit_tiny). ``"grid"``: a 2-D conv on the token grid, channel-major; the first
        ``num_prefix`` tokens have no place on the grid and get the kernel's centre tap alone.
        """
        B, h, N, d = v.shape
        c = self.dwconv_kernel // 2
        if self.dwconv_mode == "tokens":
            taps = self.dwconv_weight.view(1, h, -1, 1, 1)  # taps[:, :, t]: (1, h, 1, 1)
            out = torch.mul(v, taps[:, :, c], out=out)
            for shift in range(1, min(c, N - 1) + 1):
                out[:, :, : N - shift].addcmul_(v[:, :, shift:], taps[:, :, c + shift])  # token i sees i + shift
                out[:, :, shift:].addcmul_(v[:, :, : N - shift], taps[:, :, c - shift])  # and i - shift
            return out
        weight = self.dwconv_weight.repeat_interleave(d, dim=0).unsqueeze(1)  # (C, 1, k, k): head kernel per channel
        planes = v[:, :, num_prefix:].transpose(-2, -1).reshape(B, h * d, *grid)
        conv = F.conv2d(planes, weight, padding=c, groups=h * d).view(B, h, d, -1).transpose(-2, -1)
        if num_prefix:
            centre = self.dwconv_weight[:, c, c].view(1, h, 1, 1)
            conv = torch.cat([v[:, :, :num_prefix] * centre, conv], dim=2)
        return conv

    def finish(self, y: Tensor, conv: Tensor) -> Tensor:
        """``y / ||y|| + conv`` per head, heads merged into token-major order, projected: (B, N, C)."""
        B, h, N, d = y.shape
        out = torch.addcmul(conv, y, _inv_norm(y))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, self.dim)))

    def attend_tokens(self, x: Tensor, grid: tuple[int, int], num_prefix: int = 0) -> Tensor:
        """The whole attention on (B, N, C) tokens, without region restriction: (B, N, C)."""
        q, k, v = self.split_heads(x)
        if eager_without_autograd():
            return self.attend_tokens_in_place(q, k, v, grid, num_prefix)
        y = self.angular(q, k, v)
        if self.sparse_branch:
            y = y.add_(self.sparse_attention(q, k, v, None), alpha=2.0)
        return self.finish(y, self.conv(v, grid, num_prefix))

    def attend_tokens_in_place(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], num_prefix: int) -> Tensor:
        """``angular`` + branch + ``finish`` when nothing is kept for backward: the same math, computed
        inside the buffer that holds q, k, v. On CPU every fresh (B, N, C) temporary costs page faults
        and cache misses comparable to the attention's arithmetic.
        """
        B, h, N, d = q.shape
        branch = self.sparse_attention(q, k, v, None) if self.sparse_branch else None  # needs the raw q, k
        q_scale = _inv_norm(q)
        kv = k.mul_(_inv_norm(k) * (2 / math.pi)).transpose(-2, -1) @ v  # k's buffer: k̂ (2/pi folded in)
        y = torch.matmul(q, kv, out=k)  # k's buffer: q k̂ᵀv
        torch.addcmul(v, y, q_scale, out=y)  # 2 (0.5 v + (1/pi) q̂ k̂ᵀ v), as in angular
        if branch is not None:
            y.add_(branch, alpha=2.0)
        conv = self.conv(v, grid, num_prefix, out=q if self.dwconv_mode == "tokens" else None)  # q's buffer
        out = v.view(B, N, h, d)  # v's buffer (v is no longer read): the token-major result
        torch.addcmul(conv, y, _inv_norm(y), out=out.transpose(1, 2))
        return self.proj_drop(self.proj(out.view(B, N, self.dim)))

    def switch_to_inference(self) -> None:
        self.sparse_branch = False
        self.last_mask_mean = self.last_mask_density = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, dwconv={self.dwconv_mode}, "
            f"dwconv_kernel={self.dwconv_kernel}, mask_eps={self.mask_eps}, sparse_branch={self.sparse_branch}"
        )


class CastlingAttention(_LinearAngularAttention):
    """Linear-angular attention over a whole token sequence (global contract).

    Knobs: ``mask_eps`` (0.02, the release), ``sparse_branch`` (False builds the inference form directly),
    ``dwconv`` (``"tokens"``, the release, or ``"grid"`` [ours]), ``dwconv_kernel`` (9, the release).
    Prefix tokens (class token): in ``"tokens"`` mode they are part of the sequence the conv slides over,
    as in the release; in ``"grid"`` mode they have no place on the grid, so their conv is the kernel's
    centre tap alone (a token that is its own only neighbour) [ours].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid_size: tuple[int, int],
        num_prefix_tokens: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mask_eps: float = 0.02,
        sparse_branch: bool = True,
        dwconv: str = "tokens",
        dwconv_kernel: int = 9,
    ) -> None:
        super().__init__(
            dim, num_heads, grid_size, qkv_bias, attn_drop, proj_drop, mask_eps, sparse_branch, dwconv, dwconv_kernel
        )
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def forward(
        self, x: Tensor, attn_bias: Tensor | None = None, return_logits: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if attn_bias is not None or return_logits:
            raise ValueError("castling attention has no softmax logits: it takes no attn_bias and returns no logits")
        if x.ndim != 3 or x.shape[1] != self.num_tokens:
            raise ValueError(
                f"expected x of shape (B, {self.num_tokens}, {self.dim}) "
                f"({self.num_prefix_tokens} prefix + {self.grid_size} grid), got {tuple(x.shape)}"
            )
        return self.attend_tokens(x, self.grid_size, self.num_prefix_tokens), None


class WindowCastlingAttention(_LinearAngularAttention):
    """Linear-angular attention within windows (window contract, hierarchical backbone).

    Under shifted windows (``region_ids`` given) a token meets only the tokens of its region, in the
    linear attention (per-region ``k̂ᵀ v`` sums), in the softmax branch (the matching mask) and in the
    depthwise conv (the conv of each region's tokens alone, so nothing leaks across the cyclic shift's
    seams). Only the windows that span a seam pay for it (``R`` times the plain cost, ``R`` the most
    regions in one window: 4 under Swin's shift); the others take the plain path. No relative position
    bias: linear attention has no logits to add it to; the conv carries the position information.
    Default conv: ``"grid"``, 3 x 3 [ours], 9 taps like the release's kernel but along both window axes.
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
        mask_eps: float = 0.02,
        sparse_branch: bool = True,
        dwconv: str = "grid",
        dwconv_kernel: int = 3,
    ) -> None:
        super().__init__(
            dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, mask_eps, sparse_branch, dwconv, dwconv_kernel
        )
        self.window_size = self.grid_size
        self.window_area = self.grid_size[0] * self.grid_size[1]
        self._regions_cache: tuple[Tensor, int, tuple[Tensor, Tensor]] | None = None

    def regions(self, region_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(num_windows, N) region ids -> (one-hot (num_windows, N, R) bool, indices of the windows with > 1 region).

        Region ids are renumbered within each window (0, 1, ...), so ``R`` is the most regions any one
        window has, not the number of ids in the map. Cached per ``region_ids`` tensor (backbones pass
        the same buffer every step).
        """
        cache = self._regions_cache
        if cache is not None and cache[0] is region_ids and cache[1] == region_ids._version:
            return cache[2]
        # Built outside inference mode even when first asked for there (validation), or the cached
        # tensors would be inference tensors that the next training step cannot save for backward.
        with torch.inference_mode(False):
            ids = region_ids - region_ids.min()
            present = F.one_hot(ids, int(ids.max()) + 1).amax(dim=1)  # (nW, G): which ids each window holds
            local = (present.cumsum(dim=-1) - 1).gather(1, ids)  # rank of the token's id among its window's ids
            counts = present.sum(dim=-1)
            result = F.one_hot(local, int(counts.max())).bool(), (counts > 1).nonzero().flatten()
        self._regions_cache = (region_ids, region_ids._version, result)
        return result

    def forward(self, x: Tensor, region_ids: Tensor | None = None) -> Tensor:
        num_windows = check_windows(x, self.window_area, region_ids)
        onehot, seamed = (None, None) if region_ids is None else self.regions(region_ids)
        if seamed is None or seamed.numel() == 0:  # unshifted, or no window spans a seam
            return self.attend_tokens(x, self.window_size)

        q, k, v = self.split_heads(x)  # (B*nW, h, N, d)
        BW, h, N, d = q.shape
        onehot = onehot.to(q.dtype)  # (nW, N, R)
        q, k, v = (t.view(-1, num_windows, h, N, d) for t in (q, k, v))
        y = self.angular(q, k, v)
        regions = onehot[seamed].unsqueeze(1)  # (nS, 1, N, R)
        y[:, seamed] = self.angular(q[:, seamed], k[:, seamed], v[:, seamed], regions)
        if self.sparse_branch:
            y = y.add_(self.sparse_attention(q, k, v, onehot.unsqueeze(1)), alpha=2.0)

        conv = self.conv(v.view(BW, h, N, d), self.window_size).reshape(-1, num_windows, h, N, d)
        # Seamed windows: the conv of each region alone (other regions' tokens zeroed), kept on that region.
        R, nS = onehot.shape[-1], seamed.numel()
        masks = regions.squeeze(1).permute(2, 0, 1)[:, None, :, None, :, None]  # (R, 1, nS, 1, N, 1)
        by_region = self.conv((v[:, seamed] * masks).reshape(-1, h, N, d), self.window_size)
        conv[:, seamed] = (by_region.reshape(R, -1, nS, h, N, d) * masks).sum(dim=0)
        return self.finish(y.view(BW, h, N, d), conv.view(BW, h, N, d))


def castling_modules(model: nn.Module) -> list[tuple[str, _LinearAngularAttention]]:
    """Every Castling attention of ``model`` (any backbone, DVT cascades included), with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LinearAngularAttention)]


def switch_to_inference(model: nn.Module) -> nn.Module:
    """Turn every Castling attention of ``model`` into its inference form; returns ``model``.

    The masked softmax branch is removed (no softmax runs, cost per token constant in n); parameters
    and buffers are untouched, so the state dict is the same before and after. Train/eval mode is left
    as it is.
    """
    for _, module in castling_modules(model):
        module.switch_to_inference()
    return model


def mask_regularization(model: nn.Module) -> Tensor:
    """Sum over Castling layers of ``mean(Sparse)`` from the last training forward (differentiable).

    The training loop adds ``mask_reg_weight(...) * mask_regularization(model)`` to its loss; pushing
    the large attention weights under ``eps`` empties the masks [ours: METHODS.md section 3]. Zero (a
    tensor) when no layer recorded a term, e.g. after the switch.
    """
    terms = [m.last_mask_mean for _, m in castling_modules(model) if m.last_mask_mean is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return torch.stack(terms).sum()


def mask_densities(model: nn.Module) -> dict[str, float]:
    """Per Castling layer, the share of ``P > eps`` in its last training forward (for logging)."""
    recorded = [(name, m.last_mask_density) for name, m in castling_modules(model) if m.last_mask_density is not None]
    if not recorded:
        return {}
    values = torch.stack([d for _, d in recorded]).tolist()  # one device sync for all layers
    return {name: value for (name, _), value in zip(recorded, values)}


MASK_REG_SCHEDULES = ("constant", "linear")


def mask_reg_weight(
    strength: float, schedule: str = "constant", progress: float = 0.0, ramp_share: float = 0.5
) -> float:
    """Weight of the mask regulariser at ``progress`` (0..1, share of training done).

    ``constant``: ``strength`` throughout. ``linear`` [ours]: rises from 0 to ``strength`` over the first
    ``ramp_share`` of training, then stays, so attention can form before it is pushed under ``eps``.
    """
    if schedule not in MASK_REG_SCHEDULES:
        raise ValueError(f"mask regularisation schedule must be one of {MASK_REG_SCHEDULES}, got {schedule!r}")
    if strength < 0:
        raise ValueError(f"mask regularisation strength must be >= 0, got {strength}")
    if schedule == "constant":
        return float(strength)
    if not 0.0 < ramp_share <= 1.0:
        raise ValueError(f"ramp_share must be in (0, 1], got {ramp_share}")
    return float(strength) * min(max(progress, 0.0) / ramp_share, 1.0)
