"""Castling-ViT's linear-angular attention (arXiv 2211.10526), in both attention contracts.

Per head, with ``q̂ = q/||q||`` and ``k̂ = k/||k||`` over the head's channels::

    Y = 0.5 v + (1/pi) q̂ (k̂ᵀ v)          right to left: k̂ᵀ v is d x d, so the cost is linear in n
    Y = Y + g_h Sparse v                 training form only, Sparse = P ⊙ 1[P > eps], P = softmax(q kᵀ/sqrt(d))
    Y = Y / ||Y||
    Y = Y + DWConv(v)                    depthwise, one kernel per head (as the official release); optional
    out = concat_heads(Y) W_proj + b

The masked softmax branch approximates the higher-order terms of the angular kernel while training and is
dropped for inference (``switch_to_inference``: no softmax is left, the cost per token no longer depends on
n). The paper regularises its masks "to gradually become zeros"; the release has only the fixed threshold.
Here the branch of head ``h`` is ``g_h · (Sparse v)`` with a gate ``g_h = max(a_h, 0) · s`` [ours]:

- ``a_h`` (``branch_gate``, starts at 1) is learned under a sparsity penalty ``λ Σ_layers mean_h g_h m_h``
  (``mask_regularization``), ``m_h`` the share of each row's attention mass that ``P > eps`` keeps (not
  differentiated). The gate's gradient ``λ m_h`` works at every n, and is largest when the mask is full.
  Once ``a_h`` drops to 0 the head's branch is exactly zero and stays so (``max`` passes no gradient there).
- ``s`` (``branch_scale``, a buffer kept in the state dict) is a schedule the training loop sets: it falls
  from 1 to 0 by a chosen share of training; from then on the branch adds exactly nothing and the rest of
  training trains the deployed model's function. So every mask ends empty, at any n.

Why not a penalty on ``P`` itself (``mean(Sparse)``): a softmax row's largest weight is at least ``1/n``, so
below ``n = 1/eps = 50`` tokens (Swin's 49-token windows, DVT's coarse exits) no penalty can empty ``P > eps``,
and with the mask full ``mean(Sparse) = 1/n`` is a constant with no gradient; above 50, the cheapest way to
push ``P`` under ``eps`` is to flatten ``q kᵀ``, which the angular term, blind to the scale of q and k, allows.
The gate shuts the branch itself. The switch changes no parameter, so a state dict loads into either form;
the inference form does not read the gate.

``CastlingAttention`` follows the global contract (plain ViT), ``WindowCastlingAttention`` the window
contract (hierarchical backbone); both are described in ``pipeline.models.layers``.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor, nn

from .window_msa import check_heads, check_windows, cross_region_mask

__all__ = [
    "CastlingAttention",
    "WindowCastlingAttention",
    "switch_to_inference",
    "inference_form",
    "open_branches",
    "describe_open_branches",
    "set_branch_scale",
    "branch_scale_at",
    "castling_modules",
    "mask_regularization",
    "mask_densities",
    "mask_reg_weight",
    "window_regions",
]

DWCONV_MODES = ("tokens", "grid", "none")


class _LinearAngularAttention(nn.Module):
    """Projections, the attention core and the depthwise convolution shared by both contracts.

    ``dwconv="tokens"`` convolves each head's ``v`` along the token sequence (kernel ``k``, the
    release's ``Conv2d(heads, heads, (k, 1), groups=heads)`` on ``(B, heads, N, d)``); ``"grid"``
    convolves it on the 2-D token grid (kernel ``k x k``) [ours]. Either way a head has one kernel,
    shared by its ``d`` channels (``dwconv_weight``: ``(heads, k)`` or ``(heads, k, k)``). ``"none"`` has no
    conv (and no ``dwconv_weight``): the paper's ablation of it.
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
        if dwconv == "none":
            self.register_parameter("dwconv_weight", None)
        else:
            taps = (dwconv_kernel,) if dwconv == "tokens" else (dwconv_kernel, dwconv_kernel)
            self.dwconv_weight = nn.Parameter(torch.empty(num_heads, *taps))
            bound = 1 / math.sqrt(math.prod(taps))  # nn.Conv's default init for this fan-in
            nn.init.uniform_(self.dwconv_weight, -bound, bound)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # the branch's gate (see the module docstring): learned per head, times the loop's schedule
        self.branch_gate = nn.Parameter(torch.ones(num_heads))
        # Built without the branch (the inference form, or training without it: the paper's ablation) the gate
        # is never used, so it is not trained: DDP requires every trained parameter to get a gradient.
        self.branch_gate.requires_grad_(sparse_branch)
        self.register_buffer("branch_scale", torch.ones(()))

        # Statistics of the last training forward with the branch (read by mask_regularization / mask_densities).
        self.last_penalty: Tensor | None = None  # mean_h g_h m_h, differentiable in the gate
        self.last_mask_density: Tensor | None = None  # share of the gated mask's entries that are on, detached

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, C) -> q, k, v, each (B, heads, N, d)."""
        B, N, _ = x.shape
        return self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def angular(self, q: Tensor, k: Tensor, v: Tensor, regions: Tensor | None = None) -> Tensor:
        """``0.5 v + (1/pi) q̂ (k̂ᵀ v)``, right to left: ``k̂ᵀ v`` is d x d, so the cost is linear in n.

        q, k, v: (..., n, d). ``regions``: None, or a (..., 1, n, R) one-hot of each token's region; a
        token then attends only to its region: ``q̂_i S_r(i)`` with per-region sums ``S_r = Σ_{j in r} k̂_jᵀ v_j``,
        computed by placing ``q̂`` and ``k̂`` in their region's slot of an (n, R*d) matrix (R times the cost).
        """
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if regions is not None:
            slots = regions.to(q.dtype).unsqueeze(-1)  # (..., 1, n, R, 1)
            q, k = (q.unsqueeze(-2) * slots).flatten(-2), (k.unsqueeze(-2) * slots).flatten(-2)
        return 0.5 * v + (q @ (k.transpose(-2, -1) @ v)) / math.pi

    def gate(self) -> Tensor:
        """``g_h = max(a_h, 0) · s`` per head, ``(heads,)``: 0 shuts the head's branch exactly."""
        return F.relu(self.branch_gate) * self.branch_scale

    def sparse_attention(self, q: Tensor, k: Tensor, v: Tensor, same: Tensor | None = None) -> Tensor:
        """``g_h (Sparse · v)`` with ``Sparse = P ⊙ 1[P > eps]``; records the penalty and the density while training.

        q, k, v: (..., heads, n, d). ``same``: None, or a bool mask broadcasting against the (..., n, n)
        logits, False where a token may not attend (another region).
        """
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if same is not None:
            logits = logits.masked_fill(~same, float("-inf"))
        probs = logits.float().softmax(dim=-1)  # float32 whatever the autocast dtype: eps is compared to it
        mask = probs > self.mask_eps
        sparse = probs * mask
        gate = self.gate()
        if self.training:
            per_head = [i for i in range(sparse.ndim - 1) if i != sparse.ndim - 3]  # every axis but heads and keys
            kept = sparse.detach().sum(dim=-1).mean(dim=per_head)  # m_h: the row mass the threshold keeps
            self.last_penalty = (gate * kept).mean()
            self.last_mask_density = (mask.float().mean(dim=[*per_head, -1]) * (gate > 0)).mean().detach()
        return (self.attn_drop(sparse).to(v.dtype) @ v) * gate.view(-1, 1, 1)

    def conv(self, v: Tensor, grid: tuple[int, int], num_prefix: int = 0) -> Tensor | None:
        """Depthwise conv of ``v`` (B, h, N, d), one kernel per head: (B, h, N, d); None for ``"none"``.

        ``"tokens"``: along N, zero-padded at both ends. ``"grid"``: on the token grid, channel-major; the
        first ``num_prefix`` tokens have no place on the grid and get the kernel's centre tap alone.
        """
        if self.dwconv_weight is None:
            return None
        B, h, N, d = v.shape
        c = self.dwconv_kernel // 2
        if self.dwconv_mode == "tokens":
            return F.conv2d(v, self.dwconv_weight.view(h, 1, -1, 1), padding=(c, 0), groups=h)
        weight = self.dwconv_weight.repeat_interleave(d, dim=0).unsqueeze(1)  # (C, 1, k, k): head kernel per channel
        planes = v[:, :, num_prefix:].transpose(-2, -1).reshape(B, h * d, *grid)
        conv = F.conv2d(planes, weight, padding=c, groups=h * d).view(B, h, d, -1).transpose(-2, -1)
        if num_prefix:
            centre = self.dwconv_weight[:, c, c].view(1, h, 1, 1)
            conv = torch.cat([v[:, :, :num_prefix] * centre, conv], dim=2)
        return conv

    def finish(self, y: Tensor, conv: Tensor | None) -> Tensor:
        """``y / ||y|| + conv`` per head (no conv: ``y / ||y||``), heads merged, projected: (B, N, C)."""
        B, h, N, d = y.shape
        out = F.normalize(y, dim=-1)
        if conv is not None:
            out = out + conv
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, self.dim)))

    def attend_tokens(self, x: Tensor, grid: tuple[int, int], num_prefix: int = 0) -> Tensor:
        """The whole attention on (B, N, C) tokens, without region restriction: (B, N, C)."""
        q, k, v = self.split_heads(x)
        y = self.angular(q, k, v)
        if self.sparse_branch:
            y = y + self.sparse_attention(q, k, v)
        return self.finish(y, self.conv(v, grid, num_prefix))

    def branch_open(self) -> bool:
        """The branch added something in the last training forward (its gated mask was not empty), so the
        switch changes the output. False when no training forward was recorded."""
        return self.sparse_branch and self.last_mask_density is not None and bool(self.last_mask_density > 0)

    def switch_to_inference(self) -> None:
        self.sparse_branch = False
        self.last_penalty = self.last_mask_density = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, dwconv={self.dwconv_mode}, "
            f"dwconv_kernel={self.dwconv_kernel}, mask_eps={self.mask_eps}, sparse_branch={self.sparse_branch}"
        )


class CastlingAttention(_LinearAngularAttention):
    """Linear-angular attention over a whole token sequence (global contract).

    Knobs: ``mask_eps`` (0.02, the release), ``sparse_branch`` (False builds the inference form directly),
    ``dwconv`` (``"tokens"``, the release, ``"grid"`` [ours], or ``"none"``), ``dwconv_kernel`` (9, the release).
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


def window_regions(region_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(num_windows, N) region ids -> (one-hot (num_windows, N, R) bool, indices of the windows with > 1 region).

    Region ids are renumbered within each window (0, 1, ...), so ``R`` is the most regions any one
    window has, not the number of ids in the map.
    """
    ids = region_ids - region_ids.min()
    present = F.one_hot(ids, int(ids.max()) + 1).amax(dim=1)  # (nW, G): which ids each window holds
    local = (present.cumsum(dim=-1) - 1).gather(1, ids)  # rank of the token's id among its window's ids
    counts = present.sum(dim=-1)
    return F.one_hot(local, int(counts.max())).bool(), (counts > 1).nonzero().flatten()


class WindowCastlingAttention(_LinearAngularAttention):
    """Linear-angular attention within windows (window contract, hierarchical backbone).

    Under shifted windows (``region_ids`` given) a token meets only the tokens of its region, in the
    linear attention (per-region ``k̂ᵀ v`` sums), in the softmax branch (the matching mask) and in the
    depthwise conv (the conv of each region's tokens alone, so nothing leaks across the cyclic shift's
    seams). Only the windows that span a seam pay for it (``R`` times the plain cost, ``R`` the most
    regions in one window: 4 under Swin's shift); the others take the plain path. No relative position
    bias: linear attention has no logits to add it to; the conv carries the position information.
    Default conv: ``"grid"``, 3 x 3 [ours], 9 taps like the release's kernel but along both window axes.

    A block binds its region ids once (``bind_region_ids``): the one-hot regions and the seamed windows
    are then buffers, and the forward has no data-dependent shapes (``torch.compile`` traces it whole).
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
        for name in ("region_ids", "region_onehot", "seamed_windows"):
            self.register_buffer(name, None, persistent=False)

    def bind_region_ids(self, region_ids: Tensor) -> None:
        """Keep ``region_ids`` and what ``window_regions`` makes of them as buffers (outside inference mode)."""
        with torch.inference_mode(False):
            self.region_ids = region_ids
            self.region_onehot, self.seamed_windows = window_regions(region_ids)

    def regions(self, region_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``window_regions(region_ids)``: the bound buffers when given the bound tensor."""
        if region_ids is self.region_ids:
            return self.region_onehot, self.seamed_windows
        return window_regions(region_ids)

    def forward(self, x: Tensor, region_ids: Tensor | None = None) -> Tensor:
        num_windows = check_windows(x, self.window_area, region_ids)
        onehot, seamed = (None, None) if region_ids is None else self.regions(region_ids)
        if seamed is None or seamed.numel() == 0:  # unshifted, or no window spans a seam
            return self.attend_tokens(x, self.window_size)

        q, k, v = self.split_heads(x)  # (B*nW, h, N, d)
        BW, h, N, d = q.shape
        q, k, v = (t.reshape(-1, num_windows, h, N, d) for t in (q, k, v))
        regions = onehot[seamed].unsqueeze(1)  # (nS, 1, N, R)
        seam_y = self.angular(q[:, seamed], k[:, seamed], v[:, seamed], regions)
        y = self.angular(q, k, v).index_copy(1, seamed, seam_y)
        if self.sparse_branch:
            y = y + self.sparse_attention(q, k, v, ~cross_region_mask(region_ids))

        if self.dwconv_weight is None:
            return self.finish(y.view(BW, h, N, d), None)
        conv = self.conv(v.reshape(BW, h, N, d), self.window_size).view(-1, num_windows, h, N, d)
        # Seamed windows: the conv of each region alone (other regions' tokens zeroed), kept on that region.
        v_seamed, seam_conv = v[:, seamed], 0
        for r in range(onehot.shape[-1]):
            keep = regions[..., r, None].to(v.dtype)  # (nS, 1, N, 1): the tokens of the window's r-th region
            alone = self.conv((v_seamed * keep).reshape(-1, h, N, d), self.window_size)
            seam_conv = seam_conv + alone.view_as(v_seamed) * keep
        conv = conv.index_copy(1, seamed, seam_conv)
        return self.finish(y.view(BW, h, N, d), conv.view(BW, h, N, d))


def castling_modules(model: nn.Module) -> list[tuple[str, _LinearAngularAttention]]:
    """Every Castling attention of ``model`` (any backbone, DVT cascades included), with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LinearAngularAttention)]


def open_branches(model: nn.Module) -> dict[str, float]:
    """Castling layers whose branch is still open (``branch_open``), with their last recorded mask density."""
    return {name: float(m.last_mask_density) for name, m in castling_modules(model) if m.branch_open()}


def describe_open_branches(model: nn.Module) -> str:
    """``"2 layer(s): blocks.0.attn (density 0.061), ..."`` for the open branches, ``""`` when none is open."""
    still_open = open_branches(model)
    if not still_open:
        return ""
    listed = ", ".join(f"{name} (density {density:.3f})" for name, density in still_open.items())
    return f"{len(still_open)} layer(s): {listed}"


def switch_to_inference(model: nn.Module, warn: bool = True) -> nn.Module:
    """Turn every Castling attention of ``model`` into its inference form; returns ``model``.

    The masked softmax branch is removed (no softmax runs, cost per token constant in n); parameters
    and buffers are untouched, so the state dict is the same before and after. Train/eval mode is left
    as it is. With ``warn``, a branch that was still open (its output changes) is named in a warning.
    """
    listed = describe_open_branches(model) if warn else ""
    if listed:
        warnings.warn(f"Castling: switching to the inference form with masks not empty in {listed}; the deployed "
                      "model differs from the trained one", stacklevel=2)  # fmt: skip
    for _, module in castling_modules(model):
        module.switch_to_inference()
    return model


@contextlib.contextmanager
def inference_form(model: nn.Module):
    """Within the block, every Castling attention of ``model`` runs its inference form (branch dropped)."""
    modules = [m for _, m in castling_modules(model)]
    before = [m.sparse_branch for m in modules]
    for m in modules:
        m.sparse_branch = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.sparse_branch = flag


def set_branch_scale(model: nn.Module, scale: float) -> None:
    """Set the schedule factor ``s`` of every Castling gate (in place: a compiled model does not recompile)."""
    for _, module in castling_modules(model):
        module.branch_scale.fill_(scale)


def branch_scale_at(progress: float, off_at: float | None) -> float:
    """The gate schedule ``s`` at ``progress`` (share of training done): 1 falling linearly to 0 at ``off_at``
    and 0 after it [ours]; always 1 when ``off_at`` is None (the learned gate alone closes the branch)."""
    if off_at is None:
        return 1.0
    if not 0.0 < off_at <= 1.0:
        raise ValueError(f"branch_off_at must be in (0, 1], got {off_at}")
    return max(0.0, 1.0 - max(progress, 0.0) / off_at)


def mask_regularization(model: nn.Module) -> Tensor:
    """Sum over Castling layers of the gate penalty ``mean_h g_h m_h`` from the last training forward.

    The training loop adds ``mask_reg_weight(...) * mask_regularization(model)`` to its loss. Zero (a
    tensor) when no layer recorded a term, e.g. after the switch.
    """
    terms = [m.last_penalty for _, m in castling_modules(model) if m.last_penalty is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return torch.stack(terms).sum()


def mask_densities(model: nn.Module) -> dict[str, float]:
    """Per Castling layer, the share of the gated mask's entries that are on in its last training forward."""
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
