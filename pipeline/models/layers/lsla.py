"""Light Self-Limited Attention (ViT-LSLA, arXiv 2210.17115): the ``lsla`` attention kind.

No public implementation exists; this one follows ``METHODS.md`` section 1. Per window (or sequence)
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
from torch.autograd.function import once_differentiable

from .window_msa import BoundRegions, check_heads, check_windows, permute_along, relative_position_index

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


def _limited_softmax_forward(scores, ds, inner, outer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, A')``: ``A = softmax(S ⊙ DS + B_i)`` and ``A' = A + B_o`` (``A`` itself without ``B_o``)."""
    logits = torch.addcmul(inner, scores, ds) if ds is not None else scores + inner  # one fused pass
    probs = logits.softmax(dim=-1)
    return probs, probs + outer if outer is not None else probs


def _shares_memory(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _limited_softmax_backward(ctx, grad, scores, ds, probs, needs, grad_is_scratch=False):
    """Gradients for ``S``, ``DS``, ``B_i``, ``B_o`` (``None`` where ``needs`` is false); see ``_LimitedSoftmax``.

    ``grad_is_scratch``: ``grad`` is the caller's own tensor, dead after the softmax backward, so ``g ⊙ DS``
    can be written into it (a warm buffer instead of a fresh ``(B, heads, N, N)`` one).
    """
    need_scores, need_ds, need_inner, need_outer = needs
    g_outer = grad.sum_to_size(ctx.outer_shape) if need_outer else None
    g_logits = torch.ops.aten._softmax_backward_data(grad, probs, -1, probs.dtype)
    g_inner = g_logits.sum_to_size(ctx.inner_shape) if need_inner else None
    g_scores = None
    if need_scores:
        if ds is None:
            g_scores = g_logits
        elif grad_is_scratch and grad.is_contiguous() and not _shares_memory(g_outer, grad):
            g_scores = torch.mul(g_logits, ds, out=grad)
        else:
            g_scores = g_logits * ds
    g_ds = None
    if need_ds:
        # g_logits is read for the last time: its buffer can take g ⊙ S (one (B, heads, N, N) tensor
        # fewer), unless g_inner is g_logits itself (B_i as large as the scores: nothing to sum)
        product = g_logits * scores if g_inner is g_logits else g_logits.mul_(scores)
        g_ds = product.sum_to_size(ds.shape)
    return g_scores, g_ds, g_inner, g_outer


class _LimitedSoftmax(torch.autograd.Function):
    """``A' = softmax(S ⊙ DS + B_i) + B_o`` for training, with a hand-written backward.

    Autograd's ``addcmul`` backward multiplies the incoming gradient by the (unit) scalar before
    multiplying by ``DS``: one extra pass over ``(B, heads, N, N)`` (forward + backward of this step
    12.8 -> 11.8 ms at Swin-T's first stage, batch 4, one thread). Here: softmax backward, then
    ``g ⊙ DS`` for ``S``, batch sums of ``g ⊙ S``, ``g`` and the incoming gradient for ``DS``, ``B_i`` and
    ``B_o``. ``ds`` and ``outer`` may be ``None``; the tables broadcast against ``scores``.
    """

    @staticmethod
    def forward(ctx, scores, ds, inner, outer):
        probs, attn = _limited_softmax_forward(scores, ds, inner, outer)
        ctx.save_for_backward(scores if ds is not None else None, ds, probs)
        ctx.inner_shape, ctx.outer_shape = inner.shape, None if outer is None else outer.shape
        return attn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        scores, ds, probs = ctx.saved_tensors
        return _limited_softmax_backward(ctx, grad, scores, ds, probs, ctx.needs_input_grad)


class _LimitedAttention(torch.autograd.Function):
    """LSA's core for training: ``A' X`` with ``A' = softmax((Q Xᵀ) ⊙ DS + B_i) + B_o``, keys and values ``X``.

    ``q`` and ``x`` are ``(B * heads, N, d)``; the tables broadcast against the scores viewed as
    ``scores_shape``. Keys and values being one tensor, autograd would add their two gradients in an
    extra pass over ``(B * heads, N, d)``; here the second product accumulates into the first
    (``baddbmm``). The limited softmax's backward is ``_LimitedSoftmax``'s.
    """

    @staticmethod
    def forward(ctx, q, x, ds, inner, outer, scores_shape):
        scores = torch.bmm(q, x.transpose(1, 2)).view(scores_shape)
        probs, attn = _limited_softmax_forward(scores, ds, inner, outer)
        attn = attn.view(q.shape[0], q.shape[1], -1)
        ctx.save_for_backward(q, x, scores if ds is not None else None, ds, probs, attn)
        ctx.inner_shape, ctx.outer_shape = inner.shape, None if outer is None else outer.shape
        return torch.bmm(attn, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, x, scores, ds, probs, attn = ctx.saved_tensors
        need_q, need_x, need_ds, need_inner, need_outer, _ = ctx.needs_input_grad
        g_attn = torch.bmm(grad, x.transpose(1, 2)).view(probs.shape)
        g_x = torch.bmm(attn.transpose(1, 2), grad) if need_x else None
        g_scores, g_ds, g_inner, g_outer = _limited_softmax_backward(
            ctx, g_attn, scores, ds, probs, (need_q or need_x, need_ds, need_inner, need_outer), grad_is_scratch=True
        )
        g_q = None
        if g_scores is not None:
            g_scores = g_scores.view(attn.shape)
            g_q = torch.bmm(g_scores, x) if need_q else None
            if need_x:
                g_x.baddbmm_(g_scores.transpose(1, 2), q)
        return g_q, g_x, g_ds, g_inner, g_outer, None


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
        shape = index.shape

        def gather(table: torch.Tensor) -> torch.Tensor:
            # = table[:, index]; index_select is several times faster, and its backward is an index_add
            # rather than advanced indexing's sort-based accumulating index_put
            return table.index_select(1, index.view(-1)).view(-1, *shape)

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
        if self.k is not None and self.v is not None:
            return q, heads(self.k(x)), heads(self.v(x))
        x_heads = heads(x).contiguous()  # one copy serves both products, instead of one inside each
        k = heads(self.k(x)) if self.k is not None else x_heads
        v = heads(self.v(x)) if self.v is not None else x_heads
        return q, k, v

    def _limited_softmax(
        self,
        scores: torch.Tensor,
        ds: torch.Tensor | None,
        inner: torch.Tensor,
        outer: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        keep_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``A' = softmax(S ⊙ DS + B_i [+ attn_bias]) + B_o``; returns ``(A', logits)``. Tables broadcast.

        ``logits`` is ``None`` on the training path that does not keep them (no ``attn_bias``, no dropout):
        callers that want the logits pass ``keep_logits=True``.
        """
        inplace = not torch.is_grad_enabled()  # inference: reuse buffers, each (B, heads, N, N) costs
        dropout = self.training and self.attn_drop.p > 0
        if not inplace and not keep_logits and attn_bias is None and not dropout:
            return _LimitedSoftmax.apply(scores, ds, inner, outer), None
        if inplace:
            logits = torch.addcmul(inner, scores, ds, out=scores) if ds is not None else scores.add_(inner)
            if attn_bias is not None:
                logits.add_(attn_bias)
        else:
            logits = torch.addcmul(inner, scores, ds) if ds is not None else scores + inner  # one fused pass
            if attn_bias is not None:
                logits = logits + attn_bias
        # dropout acts on the softmax weights only, so B_o is never rescaled at random [ours]
        attn = self.attn_drop(logits.softmax(dim=-1))
        if outer is not None:
            attn = attn.add_(outer) if inplace else attn + outer
        return attn, logits

    def _output(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = v.shape
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.dim)
        return self.proj_drop(self.proj(x))

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

    def _masked_tables(self, region_ids: torch.Tensor | None, num_windows: int):
        """``DS``, ``B_i``, ``B_o`` with the region masks applied, and the scores' shape they broadcast against."""
        ds, inner, outer = self._tables()
        N = self.window_area
        if region_ids is None:
            return ds, inner, outer, (-1, self.num_heads, N, N)
        bias, keep = self.region_masks(region_ids, inner.dtype)  # (nW, 1, N, N) each
        inner = inner + bias  # -inf across regions: weight exactly 0 after the softmax
        if outer is not None:
            outer = outer * keep  # zero there, or B_o would leak the masked tokens back in
        return ds, inner, outer, (-1, num_windows, self.num_heads, N, N)

    def _attention(self, x: torch.Tensor, region_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        num_windows = check_windows(x, self.window_area, region_ids)
        B_, N, _ = x.shape
        q, k, v = self._project(x)
        ds, inner, outer, scores_shape = self._masked_tables(region_ids, num_windows)
        attn, _ = self._limited_softmax((q @ k.transpose(-2, -1)).view(scores_shape), ds, inner, outer)
        return attn.view(B_, self.num_heads, N, N), v

    def _fused_core(self) -> bool:
        """Training with keys and values X and no attention dropout: ``_LimitedAttention`` computes ``A' X``."""
        return self.kv == "qxx" and torch.is_grad_enabled() and not (self.training and self.attn_drop.p > 0)

    def forward(self, x: torch.Tensor, region_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self._fused_core():
            attn, v = self._attention(x, region_ids)
            return self._output(attn, v)
        # training, keys and values X: the fused core (see _LimitedAttention)
        num_windows = check_windows(x, self.window_area, region_ids)
        B_, N, _ = x.shape
        q, x_heads, _ = self._project(x)
        ds, inner, outer, scores_shape = self._masked_tables(region_ids, num_windows)
        out = _LimitedAttention.apply(
            q.reshape(-1, N, self.head_dim), x_heads.view(-1, N, self.head_dim), ds, inner, outer, scores_shape
        )
        out = out.view(B_, self.num_heads, N, self.head_dim).transpose(1, 2).reshape(B_, N, self.dim)
        return self.proj_drop(self.proj(out))

    def forward_map(
        self,
        x: torch.Tensor,
        window_order: torch.Tensor | None = None,
        window_order_inverse: torch.Tensor | None = None,
        region_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Windows of a ``(B, H, W, C)`` map, back on the map: ``window_reverse(self(window_partition(x)))``.

        With several heads the tensors are copied anyway to split and merge the heads: here those copies
        also partition and reverse the windows, two passes over the map fewer each way. Shifted windows:
        ``window_order`` and its inverse (``shifted_window_order`` of the backbone) and the windows'
        ``region_ids``; each copy is then one gather of ``d``-channel rows (``permute_along``). Unshifted ones
        keep the permuting copy: a row gather is slower on small maps in large batches (vit_lsla_nano
        at 32x32, batch 256: inference 1.17-1.18x hier_msa_nano with copies, 1.12-1.14x with gathers).
        ``H`` and ``W`` must be multiples of the window (no padding).
        """
        B, H, W, C = x.shape
        (wh, ww), N, h, d = self.window_size, self.window_area, self.num_heads, self.head_dim
        if H % wh or W % ww or C != self.dim:
            raise ValueError(
                f"forward_map needs a (B, H, W, {self.dim}) map tiled by {self.window_size} windows, "
                f"got {tuple(x.shape)}"
            )
        num_windows = (H // wh) * (W // ww)
        if window_order is None:

            def split(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B * windows * heads, N, d), one copy
                return t.view(B, H // wh, wh, W // ww, ww, h, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, N, d)

            def merge(t: torch.Tensor) -> torch.Tensor:  # the inverse, one copy
                t = t.view(B, H // wh, W // ww, h, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6)
                return t.reshape(B, H, W, C)

        else:  # shifted: one gather of d-channel rows each way
            rows, back = _head_rows(window_order, window_order_inverse, B, h, N)

            def split(t: torch.Tensor) -> torch.Tensor:
                return permute_along(t.reshape(-1, d), 0, rows, back).view(-1, N, d)

            def merge(t: torch.Tensor) -> torch.Tensor:
                return permute_along(t.reshape(-1, d), 0, back, rows).view(B, H, W, C)

        q = self._queries(x)
        x_heads = split(x) if self.k is None or self.v is None else None
        k = split(self.k(x)) if self.k is not None else x_heads
        v = split(self.v(x)) if self.v is not None else x_heads
        ds, inner, outer, scores_shape = self._masked_tables(region_ids, num_windows)
        if self._fused_core():
            out = _LimitedAttention.apply(split(q), x_heads, ds, inner, outer, scores_shape)
        else:
            attn, _ = self._limited_softmax(torch.bmm(split(q), k.transpose(1, 2)).view(scores_shape), ds, inner, outer)
            out = torch.bmm(attn.view(-1, N, N), v)
        return self.proj_drop(self.proj(merge(out)))


def _head_rows(order: torch.Tensor, order_inverse: torch.Tensor, images: int, heads: int, window_area: int):
    """Row indices into a ``(B * H * W * heads, d)`` view that split (shifted) windows and heads in one gather.

    ``rows``: for each ``(image, window, head, place)`` the row holding it, ``order[window * N + place]`` being
    the token. ``back``: for each ``(image, token, head)`` the row of the ``(B * windows * heads * N, d)``
    result that holds it, for the way back.
    """
    N, tokens = window_area, order.numel()
    image = torch.arange(images, device=order.device)
    head = torch.arange(heads, device=order.device)
    rows = (image.view(-1, 1, 1, 1) * tokens + order.view(1, -1, 1, N)) * heads + head.view(1, 1, -1, 1)
    window, place = order_inverse // N, order_inverse % N
    back = ((image.view(-1, 1, 1) * (tokens // N) + window.view(1, -1, 1)) * heads + head.view(1, 1, -1)) * N
    return rows.reshape(-1), (back + place.view(1, -1, 1)).reshape(-1)


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
        ds, inner, outer = self._tables()
        attn, logits = self._limited_softmax(q @ k.transpose(-2, -1), ds, inner, outer, attn_bias, return_logits)
        return self._output(attn, v), (logits if return_logits else None)
