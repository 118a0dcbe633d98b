"""Hierarchical (Swin-style) vision transformer with a pluggable window attention: ViT-LSLA and its twins.

ViT-LSLA (arXiv 2210.17115) is Swin with a convolutional stem and LSLA in place of W-MSA. The attention
is picked by name (``attn="msa" | "lsla" | "castling"``, knobs in ``attn_kwargs``), so the same
backbone, stem and blocks serve every kind and the attention is the only difference between twins.

    stem      3x3 conv s2 (C/2) - BatchNorm - GELU - 3x3 conv s2 (C) - LayerNorm   -> H/4 x W/4 x C
    stage i   patch merging (i > 0, timm's PatchMerging) + depth_i pre-norm blocks at C * 2^i channels
    block     x + DropPath(Attn(LN(x)))  then  x + DropPath(MLP(LN(x))); windows shifted by half a
              window in every second block, shifted-window masking given to the attention as region ids
    head      LayerNorm, global average pool, linear

Small inputs: as in Swin, a stage whose feature map is no larger than the window along a side uses the
whole side as its window there and does not shift along it (at 32x32 input with window 4 the stages
see 8, 4, 2, 1 tokens a side: windows 4, 4, 2, 1, shifted only in the first stage). A side that the
window does not divide is zero-padded at the end; padded tokens get their own region id, so real
tokens never attend to them [ours: Swin attends to the padding in unshifted windows].
"""

from __future__ import annotations

import math

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse
from torch import nn

from .layers.lsla import WindowLSLA
from .layers.window_msa import WindowMSA

__all__ = ["HierarchicalViT", "ConvStem", "window_attention_class", "window_region_ids", "create_hierarchical"]


def window_attention_class(name: str) -> type[nn.Module]:
    """The window attention kind called ``name`` (window contract of ``pipeline.models.layers``)."""
    if name == "msa":
        return WindowMSA
    if name == "lsla":
        return WindowLSLA
    if name == "castling":
        from .layers.castling import WindowCastlingAttention  # imported only by models that use it

        return WindowCastlingAttention
    raise ValueError(f"unknown window attention {name!r}: expected 'msa', 'lsla' or 'castling'")


def window_region_ids(
    resolution: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int]
) -> torch.Tensor | None:
    """``(num_windows, N)`` long region ids of a feature map cut into windows, or ``None`` if no mask is needed.

    The map is cyclically shifted by ``-shift_size`` and zero-padded at the end to whole windows (as the
    block does). Built on the CPU (kinds derive host-side facts from them); the block moves them. A token may attend to those of its window with the same id: the rows (columns) that the
    roll wrapped around from the top (left) form their own region, as in Swin's mask; padding is region 4.
    """
    H, W = resolution
    wh, ww = window_size
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    if not any(shift_size) and (Hp, Wp) == (H, W):
        return None
    rows, cols = torch.arange(Hp, device="cpu"), torch.arange(Wp, device="cpu")  # host data, even on a meta model
    wrapped_row = (rows >= H - shift_size[0]).long()  # after the roll, rows H-s..H-1 came from the top
    wrapped_col = (cols >= W - shift_size[1]).long()
    ids = 2 * wrapped_row[:, None] + wrapped_col[None, :]
    ids[H:, :] = 4
    ids[:, W:] = 4
    return ids.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convolutions, ``(B, in_chans, H, W)`` -> ``(B, H/4, W/4, dim)`` channels-last.

    The paper gives only "two 3x3 convolutions"; BatchNorm + GELU between them, ``dim/2`` channels in
    the middle and a LayerNorm at the end (Swin's patch-embedding norm) are ours.
    """

    def __init__(self, in_chans: int, dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or dim // 2
        self.conv1 = nn.Conv2d(in_chans, hidden_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden_dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden_dim, dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.bn(self.conv1(x))))
        return self.norm(x.permute(0, 2, 3, 1))  # a free view when the input is channels_last


class HierarchicalBlock(nn.Module):
    """Pre-norm transformer block over (shifted) windows of a ``(B, H, W, C)`` map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        resolution: tuple[int, int],
        window_size: tuple[int, int],
        shift_size: tuple[int, int],
        attn_layer: type[nn.Module],
        attn_kwargs: dict,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.resolution, self.window_size, self.shift_size = resolution, window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_layer(
            dim, num_heads, window_size=window_size, qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, **attn_kwargs,
        )  # fmt: skip
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        region_ids = window_region_ids(resolution, window_size, shift_size)
        # a kind that can bind them keeps the ids and the masks made from them (buffers, built once);
        # the block then passes the attention's own buffer, others get the block's
        bind = getattr(self.attn, "bind_region_ids", None)
        if region_ids is not None and bind is not None:
            bind(region_ids)
            region_ids = None
        self.register_buffer("own_region_ids", region_ids, persistent=False)
        self.to(torch.get_default_device())  # the region buffers, built on the CPU, go where the parameters are

    @property
    def region_ids(self) -> torch.Tensor | None:
        """``(num_windows, N)`` region ids given to the attention, or ``None`` when nothing is masked."""
        return self.own_region_ids if self.own_region_ids is not None else getattr(self.attn, "region_ids", None)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Roll, pad, partition, attend, reverse, crop, roll back: Swin's shifted windows."""
        B, H, W, C = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        pad_h, pad_w = -H % wh, -W % ww
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        if pad_h or pad_w:
            x = nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        windows = window_partition(x, self.window_size).view(-1, wh * ww, C)
        windows = self.attn(windows, self.region_ids)
        x = window_reverse(windows.view(-1, wh, ww, C), self.window_size, H + pad_h, W + pad_w)
        x = x[:, :H, :W]
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, window_size={self.window_size}, shift_size={self.shift_size}"


class HierarchicalStage(nn.Module):
    """Optional 2x2 patch merging, then blocks with windows shifted in every second one.

    Parameters the attention kind wants shared by the whole stage (LSLA's ``bias_sharing="stage"``
    table) are made by its ``stage_shared_params`` hook, owned here and handed to every block.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        *,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: tuple[int, int],
        downsample: bool,
        attn_layer: type[nn.Module],
        attn_kwargs: dict,
        drop_path: list[float],
        **block_kwargs,
    ):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.resolution = tuple((r + 1) // 2 for r in resolution) if downsample else resolution
        # Swin's clamp: a window no smaller than the map covers it, and there is nothing to shift
        self.window_size = tuple(min(r, w) for r, w in zip(self.resolution, window_size))
        shift = tuple(0 if r <= w else w // 2 for r, w in zip(self.resolution, self.window_size))
        share = getattr(attn_layer, "stage_shared_params", None)
        self.shared_attn_params = nn.ParameterDict(share(num_heads, self.window_size, **attn_kwargs) if share else {})
        block_attn_kwargs = {**attn_kwargs, **self.shared_attn_params}
        self.blocks = nn.Sequential(*[
            HierarchicalBlock(
                dim, num_heads, resolution=self.resolution, window_size=self.window_size,
                shift_size=shift if i % 2 else (0, 0), attn_layer=attn_layer, attn_kwargs=block_attn_kwargs,
                drop_path=drop_path[i], **block_kwargs,
            )
            for i in range(depth)
        ])  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class HierarchicalViT(nn.Module):
    """Swin-style hierarchical transformer with a convolutional stem and a pluggable window attention.

    Args:
        img_size: input size the model is built for (windows, shifts and masks depend on it).
        in_chans: input channels.
        num_classes: classes of the linear head (0: no head, ``forward`` returns pooled features).
        global_pool: ``"avg"`` (or any timm ``ClassifierHead`` pooling).
        embed_dim: channels ``C`` of the first stage; stage ``i`` has ``C * 2^i``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window side (or ``(h, w)``) before clamping to small maps.
        mlp_ratio: hidden width of the MLP over its input width.
        qkv_bias: bias of the attention's input projections.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention's output projection and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, rising linearly over all blocks from 0 to this rate.
        attn: window attention kind: ``"msa"``, ``"lsla"`` or ``"castling"``.
        attn_kwargs: the kind's own knobs (e.g. LSLA's ``ds_init``, ``bias_sharing``), given to every block.
        stem_hidden_dim: channels between the stem's convolutions (default ``C / 2``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        attn: str = "msa",
        attn_kwargs: dict | None = None,
        stem_hidden_dim: int | None = None,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        self.img_size = to_2tuple(img_size)
        if min(self.img_size) < 1 or in_chans < 1:
            raise ValueError(f"img_size {self.img_size} and in_chans {in_chans} must be positive")
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, global_pool
        self.attn, self.attn_kwargs = attn, dict(attn_kwargs or {})
        attn_layer = window_attention_class(attn)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"

        self.stem = ConvStem(in_chans, embed_dim, stem_hidden_dim)
        resolution = tuple(math.ceil(s / 4) for s in self.img_size)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stage = HierarchicalStage(
                dims[max(i - 1, 0)], dims[i], resolution=resolution, depth=depth, num_heads=heads,
                window_size=to_2tuple(window_size), downsample=i > 0, attn_layer=attn_layer,
                attn_kwargs=self.attn_kwargs, drop_path=rates[sum(depths[:i]):sum(depths[: i + 1])],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            )  # fmt: skip
            resolution = stage.resolution
            stages.append(stage)
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)  # fmt: skip
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Swin's init for linear layers; attention tables initialise themselves, convs keep torch's default
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def stage_resolutions(self) -> list[tuple[int, int]]:
        """Token grid ``(H, W)`` of every stage."""
        return [stage.resolution for stage in self.layers]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative-position tables (bias, scale) and the tied outer-bias gains, every alias of a shared one."""
        return {
            name
            for name, _ in self.named_parameters(remove_duplicate=False)
            if name.endswith("_table") or name.endswith("outer_bias_gain")
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, for timm's layer-wise learning-rate decay (``optim.layer_decay``); a stage's
        merging and its shared tables go with its first block, as timm's Swin."""
        return dict(stem=r"^stem", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.(?:downsample|shared_attn_params)", (0,)),
            (r"^layers\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ])  # fmt: skip

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def switch_to_inference(self) -> HierarchicalViT:
        """Drop training-only attention branches (Castling's sparse softmax); a no-op for msa and lsla."""
        from .layers.castling import switch_to_inference

        switch_to_inference(self)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, H/32, W/32, num_features)`` after the final norm."""
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"{type(self).__name__} was built for inputs (B, {self.in_chans}, {self.img_size[0]}, "
                f"{self.img_size[1]}), got {tuple(x.shape)}; create it with img_size/in_chans to match"
            )
        return self.norm(self.layers(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def hierarchical_cfg(**kwargs) -> dict:
    """timm pretrained config for a model of this family: no weights to download, ever."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


def _nano_cfg() -> dict:
    return hierarchical_cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0)


default_cfgs = generate_default_cfgs({
    "vit_lsla_tiny": hierarchical_cfg(),
    "vit_lsla_swin_t": hierarchical_cfg(),
    "hier_msa_swin_t": hierarchical_cfg(),
    "vit_lsla_nano": _nano_cfg(),
    "hier_msa_nano": _nano_cfg(),
    "vit_lsla_micro": hierarchical_cfg(num_classes=10, input_size=(3, 64, 64), crop_pct=1.0),
    "hier_msa_micro": hierarchical_cfg(num_classes=10, input_size=(3, 64, 64), crop_pct=1.0),
})  # fmt: skip


def create_hierarchical(variant: str, pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """Build a ``HierarchicalViT`` the timm way (``model.pretrained_cfg``, defaults from the config).

    A factory registered in another module (e.g. ``castling_swin_t``) can pass its own
    ``pretrained_cfg=hierarchical_cfg(...)``. No weights are published: ``pretrained=True`` is an error.
    """
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights exist in this project; use pretrained=False")
    return build_model_with_cfg(HierarchicalViT, variant, pretrained=False, **kwargs)


# The paper's budget (18.9M params, 3.5 GMACs at 224 with 102 classes); depths and MLP ratio are ours.
_LSLA_TINY = dict(embed_dim=96, depths=(3, 2, 6, 2), num_heads=(3, 6, 12, 24), mlp_ratio=3.0, attn="lsla")
_SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0)
# CPU-sized: works at 32x32 (stages 8/4/2/1 tokens a side) and 64x64 (16/8/4/2); window 4.
_NANO = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, mlp_ratio=2.0,
             drop_path_rate=0.0)  # fmt: skip
_MICRO = dict(embed_dim=48, depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16), window_size=4, mlp_ratio=3.0,
              drop_path_rate=0.05)  # fmt: skip


def _build(variant: str, pretrained: bool, defaults: dict, **kwargs) -> HierarchicalViT:
    return create_hierarchical(variant, pretrained, **{**defaults, **kwargs})


@register_model
def vit_lsla_tiny(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """ViT-LSLA at the paper's budget: depths 3-2-6-2, heads 3-6-12-24, C=96, MLP ratio 3, window 7."""
    return _build("vit_lsla_tiny", pretrained, _LSLA_TINY, **kwargs)


@register_model
def vit_lsla_swin_t(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """Swin-T's layout (2-2-6-2, MLP ratio 4) with LSLA: like-for-like with ``hier_msa_swin_t``."""
    return _build("vit_lsla_swin_t", pretrained, {**_SWIN_T, "attn": "lsla"}, **kwargs)


@register_model
def hier_msa_swin_t(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """Swin-T's layout with window MSA on the ViT-LSLA stem: the softmax baseline of ``vit_lsla_swin_t``."""
    return _build("hier_msa_swin_t", pretrained, {**_SWIN_T, "attn": "msa"}, **kwargs)


@register_model
def vit_lsla_nano(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """CPU-sized ViT-LSLA for 32x32 / 64x64 inputs (C=32, depths 2-2-2-2, window 4)."""
    return _build("vit_lsla_nano", pretrained, {**_NANO, "attn": "lsla"}, **kwargs)


@register_model
def hier_msa_nano(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """``vit_lsla_nano`` with window MSA."""
    return _build("hier_msa_nano", pretrained, {**_NANO, "attn": "msa"}, **kwargs)


@register_model
def vit_lsla_micro(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """Small ViT-LSLA for 64x64 inputs (C=48, depths 2-2-4-2, window 4); also works at 32x32."""
    return _build("vit_lsla_micro", pretrained, {**_MICRO, "attn": "lsla"}, **kwargs)


@register_model
def hier_msa_micro(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """``vit_lsla_micro`` with window MSA."""
    return _build("hier_msa_micro", pretrained, {**_MICRO, "attn": "msa"}, **kwargs)
