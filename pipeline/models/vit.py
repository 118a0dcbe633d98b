"""Plain (DeiT-style) Vision Transformer with pluggable global attention.

One class token, learned position embedding, pre-norm blocks, final norm, linear head: the DeiT
layout, with parameter names and counts identical to timm's ``VisionTransformer`` for the same sizes
(a timm DeiT state dict loads as is). The attention of every block is picked by name
(``msa``, ``castling``, ``lsla``) and follows the global contract of ``pipeline.models.layers``.

Two extensions for DVT (``pipeline.models.dvt``), unused by the plain models:
- ``tokenizer``: any module mapping images to ``(B, grid_h * grid_w, D)`` tokens replaces the patch embed.
- ``context_dim``: feature reuse concatenates a ``(B, N, context_dim)`` context to the MLP input of every
  block (``norm2`` and ``fc1`` take ``D + context_dim``, ``fc2`` returns ``D``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import register_model
from torch import Tensor, nn


__all__ = ["Attention", "Block", "VisionTransformer", "global_attention_class", "create_vit"]


class Attention(nn.Module):
    """Softmax multi-head self-attention (``msa``), global contract.

    The normal path runs ``F.scaled_dot_product_attention`` (fused kernels, no N x N tensor kept for
    backward); the logits are materialised only when asked for or when a bias must be added.
    """

    has_logits = True

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
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: Tensor, attn_bias: Tensor | None = None, return_logits: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = None
        if attn_bias is None and not return_logits:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if attn_bias is not None:
                if attn_bias.shape[-2:] != (N, N):
                    raise ValueError(f"attn_bias covers {tuple(attn_bias.shape[-2:])} tokens, x has {N}")
                logits = logits + attn_bias
            x = self.attn_drop(logits.softmax(dim=-1)) @ v
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
        return x, logits


# Attention kinds by name: "module:class". Imported on first use, so this file works before the
# other kinds' modules exist and a model pays only for the kind it uses.
GLOBAL_ATTENTION = {
    "msa": f"{__name__}:Attention",
    "castling": "pipeline.models.layers.castling:CastlingAttention",
    "lsla": "pipeline.models.layers.lsla:GlobalLSLA",
}


def global_attention_class(name: str) -> type[nn.Module]:
    """The global attention class registered under ``name``."""
    if name not in GLOBAL_ATTENTION:
        raise ValueError(f"unknown attention {name!r}; choose one of {sorted(GLOBAL_ATTENTION)}")
    module, cls = GLOBAL_ATTENTION[name].split(":")
    return getattr(importlib.import_module(module), cls)


class Block(nn.Module):
    """Pre-norm transformer block; the MLP input optionally carries a reused context (DVT)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid_size: tuple[int, int],
        num_prefix_tokens: int = 1,
        attn: str = "msa",
        attn_kwargs: dict | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        context_dim: int = 0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.norm1 = norm_layer(dim)
        self.attn = global_attention_class(attn)(
            dim,
            num_heads,
            grid_size=to_2tuple(grid_size),
            num_prefix_tokens=num_prefix_tokens,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **(attn_kwargs or {}),
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim + context_dim)
        self.mlp = Mlp(
            in_features=dim + context_dim,
            hidden_features=int(dim * mlp_ratio),
            out_features=dim,
            act_layer=act_layer,
            drop=proj_drop,
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        attn_bias: Tensor | None = None,
        context: Tensor | None = None,
        return_logits: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        y, logits = self.attn(self.norm1(x), attn_bias=attn_bias, return_logits=return_logits)
        x = x + self.drop_path1(y)
        if self.context_dim:
            if context is None or context.shape[:-1] != x.shape[:-1] or context.shape[-1] != self.context_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"block expects a context of shape {(*x.shape[:-1], self.context_dim)}, got {got}")
            h = torch.cat([x, context], dim=-1)
        elif context is not None:
            raise ValueError("context given to a block built with context_dim=0")
        else:
            h = x
        x = x + self.drop_path2(self.mlp(self.norm2(h)))
        return x, logits


class VisionTransformer(nn.Module):
    """DeiT-style ViT: (tokenizer | patch embed) + class token + position embedding, blocks, norm, head."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn: str = "msa",
        attn_kwargs: dict | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        tokenizer: nn.Module | None = None,
        grid_size: int | tuple[int, int] | None = None,
        context_dim: int = 0,
        global_pool: str = "token",
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))  # timm's ViT eps
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.attn_kind = attn

        if tokenizer is None:
            self.patch_embed = PatchEmbed(
                img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
            )
            grid = tuple(self.patch_embed.grid_size)
        else:
            if grid_size is None:
                raise ValueError("a custom tokenizer needs grid_size (the token grid it produces)")
            self.patch_embed = tokenizer
            grid = to_2tuple(grid_size)
        self.grid_size: tuple[int, int] = grid
        num_tokens = self.num_prefix_tokens + grid[0] * grid[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # the plain backbone is one stage: parameters the attention kind shares stage-wide (LSLA's
        # bias_sharing="stage" table) are made once here and handed to every block
        share = getattr(global_attention_class(attn), "stage_shared_params", None)
        shared = share(num_heads, grid, self.num_prefix_tokens, **(attn_kwargs or {})) if share else {}
        self.shared_attn_params = nn.ParameterDict(shared)
        attn_kwargs = {**(attn_kwargs or {}), **self.shared_attn_params}

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear in depth
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                grid_size=grid,
                num_prefix_tokens=self.num_prefix_tokens,
                attn=attn,
                attn_kwargs=attn_kwargs,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=dpr[i],
                context_dim=context_dim,
                norm_layer=norm_layer,
                act_layer=act_layer,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embedding, class token, and attention tables (LSLA's scale and bias tables, tied
        outer-bias gains), every alias of a shared one: as the hierarchical backbone."""
        tables = {name for name, _ in self.named_parameters(remove_duplicate=False)
                  if name.endswith("_table") or name.endswith("outer_bias_gain")}  # fmt: skip
        return {"pos_embed", "cls_token"} | tables

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, for timm's layer-wise learning-rate decay (``optim.layer_decay``)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^shared_attn_params",  # tables shared by all blocks
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])  # fmt: skip

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def embed_tokens(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to tokens (B, N, D): tokenizer, class token, position embedding."""
        x = self.patch_embed(x)
        if x.shape[1] != self.pos_embed.shape[1] - self.num_prefix_tokens:
            raise ValueError(
                f"tokenizer produced {x.shape[1]} tokens, the model expects a {self.grid_size} grid "
                f"({self.pos_embed.shape[1] - self.num_prefix_tokens} tokens)"
            )
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.embed_tokens(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def switch_to_inference(self) -> VisionTransformer:
        """Drop every training-only attention branch (Castling's masked softmax); weights unchanged."""
        from .layers.castling import switch_to_inference

        return switch_to_inference(self)


def _data_cfg(img_size: int | tuple[int, int], in_chans: int, num_classes: int) -> dict:
    """Preprocessing config timm's data helpers read (``timm.data.resolve_data_config``)."""
    h, w = to_2tuple(img_size)
    return {
        "num_classes": num_classes,
        "input_size": (in_chans, h, w),
        "interpolation": "bicubic",
        "crop_pct": 0.875 if h >= 160 else 1.0,
        "mean": (0.485, 0.456, 0.406) if in_chans == 3 else (0.5,) * in_chans,
        "std": (0.229, 0.224, 0.225) if in_chans == 3 else (0.5,) * in_chans,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def create_vit(name: str, pretrained: bool = False, *, defaults: dict, **kwargs) -> VisionTransformer:
    """Build a registered variant: ``defaults`` overridden by the caller's kwargs (timm factory style)."""
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are published for this project's models")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    args = {**defaults, **kwargs}
    model = VisionTransformer(**args)
    model.pretrained_cfg = model.default_cfg = _data_cfg(
        args.get("img_size", 224), args.get("in_chans", 3), model.num_classes
    )
    return model


@register_model
def vit_msa_nano(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax twin of ``castling_vit_nano``: 32x32 images, 4x4 patches, D=128, 6 blocks, 4 heads."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, attn="msa")
    return create_vit("vit_msa_nano", pretrained, defaults=defaults, **kwargs)


@register_model
def vit_msa_deit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Tiny (timm ``deit_tiny_patch16_224``) built by this backbone: the softmax twin of ``castling_deit_tiny``."""
    defaults = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, attn="msa")
    return create_vit("vit_msa_deit_tiny", pretrained, defaults=defaults, **kwargs)


@register_model
def vit_msa_deit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Small (timm ``deit_small_patch16_224``) built by this backbone."""
    defaults = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, attn="msa")
    return create_vit("vit_msa_deit_small", pretrained, defaults=defaults, **kwargs)


@register_model
def vit_msa_deit_base(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Base (timm ``deit_base_patch16_224``) built by this backbone."""
    defaults = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, attn="msa")
    return create_vit("vit_msa_deit_base", pretrained, defaults=defaults, **kwargs)
