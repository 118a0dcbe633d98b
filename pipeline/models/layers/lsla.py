"""Light Self-Limited Attention (ViT-LSLA, arXiv 2210.17115): the ``lsla`` attention kind.

No public implementation exists; this one follows ``docs/models.md#lsla-attention``. Per window (or sequence)
and head ``k``, with ``X_k`` the head's channel slice of the normalised input::

    S   = (Q_k X_kᵀ) ⊙ DS_k                 DS_k[i, j] = T_ds[k, rpi(i, j)]   dynamic scale
    A   = softmax(S + B_i,k)                B_i,k[i, j] = T_bi[k, rpi(i, j)]  inner bias
    A'  = A + B_o,k                         B_o,k[i, j] = T_bo[k, rpi(i, j)]  outer bias
    out = concat_k(A' X_k) W_O + b_O

Two forms, one per plug-in contract of ``pipeline.models.layers``:

- ``WindowLSLA``: Swin windows, tables of ``(2Wh-1)(2Ww-1)`` entries; ``region_ids`` mask both the
  logits (``-inf``) and ``B_o`` (zero), so masked weights of ``A'`` are exactly zero.
- ``GlobalLSLA``: the whole token grid of a plain (DeiT-style) backbone, tables sized by the grid.

Knobs (keyword arguments, so a config or a search space can set them):

- ``kv``: ``"qxx"`` (the paper's LSA: keys and values are ``X``), ``"qxv"`` (values projected),
  ``"qkv"`` (ordinary projections: the ablation baseline).
- ``scale``: ``"dynamic"`` (learned ``T_ds``) or ``"fixed"`` (``1/sqrt(d)``, no table).
- ``ds_init`` and ``ds_init_unit``: every ``T_ds`` entry starts at ``ds_init / sqrt(d)``
  (``"inv_sqrt_d"``, the default, so the block starts as a fixed scale) or at ``ds_init`` (``"absolute"``).
- ``ds_param``: ``"linear"`` (the table is ``DS``) or ``"log"`` (the table is ``log DS``: stays positive).
- ``outer_bias``: use ``B_o`` at all.
- ``bias_sharing`` for ``B_o``: ``"none"`` (own table per block and head), ``"tied"``
  (``T_bo = a * T_bi``, a learned scalar ``a`` per head, init 0), ``"heads"`` (one table for all heads),
  ``"stage"`` (one ``(heads, entries)`` table per stage, owned by the stage and handed to its blocks as
  ``shared_outer_bias_table``; see ``WindowLSLA.stage_shared_params``). Ignored when ``outer_bias=False``.

Initialisation: ``T_bi`` trunc-normal std 0.02 (as Swin), ``T_bo`` and ``a`` zero, ``T_ds`` at ``ds_init``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from timm.layers import to_2tuple, trunc_normal_
from torch import nn

from .window_msa import BoundRegions, check_heads, check_windows, relative_position_index

__all__ = ["WindowLSLA", "GlobalLSLA", "global_relative_position_index"]

KV_MODES = ("qxx", "qxv", "qkv")
SCALE_MODES = ("dynamic", "fixed")
DS_INIT_UNITS = ("inv_sqrt_d", "absolute")
DS_PARAMS = ("linear", "log")
BIAS_SHARING = ("none", "tied", "heads", "stage")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"LSLA: {name}={value!r} is not one of {choices}")
    return value


def _num_relative(window_size: tuple[int, int]) -> int:
    return (2 * window_size[0] - 1) * (2 * window_size[1] - 1)


def global_relative_position_index(grid_size: tuple[int, int], num_prefix_tokens: int) -> tuple[torch.Tensor, int]:
    """``(P + G, P + G)`` relative position index over a token grid with ``P`` prefix tokens, and its size.

    Patch pairs use Swin's index over the whole grid. Prefix (class) tokens have no position, so they get
    three entries of their own after the grid's (as BEiT does) [ours]: prefix->patch, patch->prefix and
    prefix->prefix; every prefix token shares them.
    """
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    grid_index = relative_position_index(grid_size)
    num_grid = _num_relative(grid_size)
    if num_prefix_tokens == 0:
        return grid_index, num_grid
    P, G = num_prefix_tokens, grid_index.shape[0]
    index = torch.empty(P + G, P + G, dtype=torch.long)
    index[P:, P:] = grid_index
    index[:P, P:] = num_grid  # query is a prefix token, key a patch
    index[P:, :P] = num_grid + 1  # query is a patch, key a prefix token
    index[:P, :P] = num_grid + 2
    return index, num_grid + 3


class _LightSelfLimitedAttention(nn.Module):
    """Projections, tables and the limited softmax shared by the window and the global form."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        index: torch.Tensor,
        num_relative: int,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kv: str = "qxx",
        scale: str = "dynamic",
        ds_init: float = 1.0,
        ds_init_unit: str = "inv_sqrt_d",
        ds_param: str = "linear",
        outer_bias: bool = True,
        bias_sharing: str = "none",
        shared_outer_bias_table: nn.Parameter | None = None,
    ):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = check_heads(dim, num_heads)
        self.kv = _choice("kv", kv, KV_MODES)
        self.scale = _choice("scale", scale, SCALE_MODES)
        self.ds_param = _choice("ds_param", ds_param, DS_PARAMS)
        _choice("ds_init_unit", ds_init_unit, DS_INIT_UNITS)
        sharing = _choice("bias_sharing", bias_sharing, BIAS_SHARING)
        self.bias_sharing = sharing if outer_bias else "none"  # nothing to share without an outer bias
        self.outer_bias = bool(outer_bias)
        if not isinstance(ds_init, Real) or isinstance(ds_init, bool) or not math.isfinite(ds_init):
            raise ValueError(f"LSLA: ds_init must be a finite number, got {ds_init!r}")
        self.ds_init = float(ds_init) * (self.head_dim**-0.5 if ds_init_unit == "inv_sqrt_d" else 1.0)
        if self.scale == "dynamic" and self.ds_param == "log" and self.ds_init <= 0:
            raise ValueError(f"LSLA: ds_param='log' needs a positive ds_init, got {ds_init!r}")
        self.register_buffer("relative_position_index", index, persistent=False)

        # LSA: the key and value maps fold into W_Q and W_O, so "qxx" keeps only these two
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias) if kv == "qkv" else None
        self.v = nn.Linear(dim, dim, bias=qkv_bias) if kv in ("qkv", "qxv") else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        # tables are (heads, entries): one gather at the (N, N) index gives (heads, N, N)
        self.inner_bias_table = nn.Parameter(torch.zeros(num_heads, num_relative))
        trunc_normal_(self.inner_bias_table, std=0.02)
        self.scale_table = None
        if self.scale == "dynamic":
            init = math.log(self.ds_init) if self.ds_param == "log" else self.ds_init
            self.scale_table = nn.Parameter(torch.full((num_heads, num_relative), init))
        self.outer_bias_table = self.outer_bias_gain = None
        if self.outer_bias:
            if self.bias_sharing == "none":
                self.outer_bias_table = nn.Parameter(torch.zeros(num_heads, num_relative))
            elif self.bias_sharing == "heads":
                self.outer_bias_table = nn.Parameter(torch.zeros(1, num_relative))
            elif self.bias_sharing == "tied":
                self.outer_bias_gain = nn.Parameter(torch.zeros(num_heads, 1))
            else:  # "stage": the stage owns the table; registering it here too ties it to every block
                if shared_outer_bias_table is None or shared_outer_bias_table.shape != (num_heads, num_relative):
                    raise ValueError(
                        "LSLA: bias_sharing='stage' needs the stage's shared_outer_bias_table of shape "
                        f"({num_heads}, {num_relative}), got "
                        f"{None if shared_outer_bias_table is None else tuple(shared_outer_bias_table.shape)}"
                    )
                self.outer_bias_table = shared_outer_bias_table

    def _tables(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``DS``, ``B_i``, ``B_o`` gathered once per forward: ``(heads or 1, N, N)`` each, ``None`` if unused."""
        index = self.relative_position_index

        def gather(table: torch.Tensor) -> torch.Tensor:
            return table[:, index]

        inner = gather(self.inner_bias_table)
        ds = None
        if self.scale_table is not None:
            ds = gather(self.scale_table.exp() if self.ds_param == "log" else self.scale_table)
        outer = None
        if self.outer_bias_gain is not None:
            outer = self.outer_bias_gain.unsqueeze(-1) * inner
        elif self.outer_bias_table is not None:
            outer = gather(self.outer_bias_table)
        return ds, inner, outer

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """``Q = x W_Q + b``, ``(B, N, C)``; a fixed scale goes on q (N d values) rather than on the N N scores."""
        q = self.q(x)
        return q * self.head_dim**-0.5 if self.scale == "fixed" else q

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N, C)`` -> queries, keys, values as ``(B, heads, N, d)``; head ``k`` of ``X`` is its channel slice."""
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self._queries(x))
        k = heads(self.k(x)) if self.k is not None else heads(x)
        v = heads(self.v(x)) if self.v is not None else heads(x)
        return q, k, v

    def _weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        ds: torch.Tensor | None,
        inner: torch.Tensor,
        outer: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', logits)``: ``logits = (Q Kᵀ) ⊙ DS + B_i [+ attn_bias]`` and ``A' = softmax(logits) + B_o``.

        ``q`` and ``k`` are ``(..., N, d)``; the tables broadcast against the ``(..., N, N)`` scores. A fixed
        scale is already on ``q``. The tables are float32 parameters, so under autocast the logits, the
        softmax and ``A'`` are float32 whatever precision the matmul ran in.
        """
        scores = q @ k.transpose(-2, -1)
        logits = (scores * ds if ds is not None else scores) + inner
        if attn_bias is not None:
            logits = logits + attn_bias
        # dropout acts on the softmax weights only, so B_o is never rescaled at random [ours]
        attn = self.attn_drop(logits.softmax(dim=-1))
        return (attn + outer if outer is not None else attn), logits

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """Heads ``(B, heads, N, d)`` merged and projected: ``(B, N, C)``."""
        B, _, N, _ = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, self.dim)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kv={self.kv}, scale={self.scale}, "
            f"ds_init={self.ds_init:.4g}, ds_param={self.ds_param}, outer_bias={self.outer_bias}, "
            f"bias_sharing={self.bias_sharing}"
        )


class WindowLSLA(BoundRegions, _LightSelfLimitedAttention):
    """LSLA inside Swin windows (window contract of ``pipeline.models.layers``).

    ``WindowLSLA(dim, num_heads, window_size=(7, 7), **knobs)``; the knobs are described in the module
    docstring. With ``bias_sharing="stage"`` the stage builds the table with ``stage_shared_params`` and
    passes its entries as keyword arguments to every block's attention.
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
        **knobs,
    ):
        window_size = to_2tuple(window_size)
        super().__init__(
            dim, num_heads, relative_position_index(window_size), _num_relative(window_size),
            qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **knobs,
        )  # fmt: skip
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        self._init_bound_regions()

    @staticmethod
    def stage_shared_params(num_heads: int, window_size: tuple[int, int], **knobs) -> dict[str, nn.Parameter]:
        """Parameters a stage owns and hands to each block's attention (keyword -> parameter); may be empty."""
        if knobs.get("bias_sharing", "none") != "stage" or not knobs.get("outer_bias", True):
            return {}
        table = nn.Parameter(torch.zeros(num_heads, _num_relative(to_2tuple(window_size))))  # T_bo starts at 0
        return {"shared_outer_bias_table": table}

    def attention_map(self, x: torch.Tensor, region_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``A' = A + B_o`` for every window and head, ``(B * num_windows, heads, N, N)``."""
        return self._attention(x, region_ids)[0]

    def _masked_tables(self, region_ids: torch.Tensor | None):
        """``DS``, ``B_i``, ``B_o`` with the region masks applied: ``(nW or 1, heads or 1, N, N)`` each, or None."""
        ds, inner, outer = self._tables()
        if region_ids is None:
            return ds, inner, outer
        bias, keep = self.region_masks(region_ids, inner.dtype)  # (nW, 1, N, N) each
        inner = inner + bias  # -inf across regions: weight exactly 0 after the softmax
        if outer is not None:
            outer = outer * keep  # zero there, or B_o would leak the masked tokens back in
        return ds, inner, outer

    def _attention(self, x: torch.Tensor, region_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A'`` and the values, both ``(B * num_windows, heads, N, .)``."""
        num_windows = check_windows(x, self.window_area, region_ids)
        B_, N, _ = x.shape
        q, k, v = self._project(x)
        # windows of one image side by side, so that per-window masks broadcast over the images
        q, k = (t.view(-1, num_windows, self.num_heads, N, self.head_dim) for t in (q, k))
        attn, _ = self._weights(q, k, *self._masked_tables(region_ids))
        return attn.view(B_, self.num_heads, N, N), v

    def forward(self, x: torch.Tensor, region_ids: torch.Tensor | None = None) -> torch.Tensor:
        attn, v = self._attention(x, region_ids)
        return self._output(attn @ v)


class GlobalLSLA(_LightSelfLimitedAttention):
    """LSLA over the whole token grid of a plain backbone (global contract of ``pipeline.models.layers``).

    ``GlobalLSLA(dim, num_heads, grid_size=(14, 14), num_prefix_tokens=1, **knobs)``. Tables have
    ``(2Gh-1)(2Gw-1)`` entries plus three for the prefix (class) tokens (see
    ``global_relative_position_index``). A plain backbone is one stage: with ``bias_sharing="stage"`` it
    makes the table once with ``stage_shared_params`` and hands it to every block.
    """

    has_logits = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid_size: tuple[int, int] | int,
        num_prefix_tokens: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        **knobs,
    ):
        grid_size = to_2tuple(grid_size)
        index, num_relative = global_relative_position_index(grid_size, num_prefix_tokens)
        super().__init__(
            dim, num_heads, index, num_relative,
            qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **knobs,
        )  # fmt: skip
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = index.shape[0]

    @staticmethod
    def stage_shared_params(
        num_heads: int, grid_size: tuple[int, int] | int, num_prefix_tokens: int = 1, **knobs
    ) -> dict[str, nn.Parameter]:
        """Parameters the backbone owns and hands to each block's attention (keyword -> parameter); may be empty."""
        if knobs.get("bias_sharing", "none") != "stage" or not knobs.get("outer_bias", True):
            return {}
        _, num_relative = global_relative_position_index(to_2tuple(grid_size), num_prefix_tokens)
        return {"shared_outer_bias_table": nn.Parameter(torch.zeros(num_heads, num_relative))}

    def forward(
        self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, return_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``logits`` are ``(Q Xᵀ) ⊙ DS + B_i + attn_bias``: everything inside the softmax."""
        if x.ndim != 3 or x.shape[1] != self.num_tokens:
            raise ValueError(
                f"GlobalLSLA built for {self.num_prefix_tokens} prefix tokens + grid {self.grid_size} "
                f"= {self.num_tokens} tokens, got x of shape {tuple(x.shape)}"
            )
        q, k, v = self._project(x)
        attn, logits = self._weights(q, k, *self._tables(), attn_bias=attn_bias)
        return self._output(attn @ v), (logits if return_logits else None)
