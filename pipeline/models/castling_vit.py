"""Castling-ViT models (arXiv 2211.10526): linear-angular attention in the project's backbones.

``castling_deit_*`` are DeiT layouts (``pipeline.models.vit``) with every attention Castling's;
``castling_vit_nano`` is the CPU-sized model that trains at 32x32 (its softmax twin is ``vit_msa_nano``);
``castling_swin_t`` puts Castling in the hierarchical (Swin-T) backbone, which no published code offers.
Models are built in training form; ``model.switch_to_inference()`` removes the softmax branch.
"""

from __future__ import annotations

from timm.models import register_model

from .vit import VisionTransformer, create_vit


@register_model
def castling_deit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Tiny layout (D=192, 12 blocks, 3 heads, patch 16, 224x224) with Castling attention."""
    defaults = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, attn="castling")
    return create_vit("castling_deit_tiny", pretrained, defaults=defaults, **kwargs)


@register_model
def castling_deit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Small layout (D=384, 12 blocks, 6 heads, patch 16, 224x224) with Castling attention."""
    defaults = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, attn="castling")
    return create_vit("castling_deit_small", pretrained, defaults=defaults, **kwargs)


@register_model
def castling_deit_base(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Base layout (D=768, 12 blocks, 12 heads, patch 16, 224x224) with Castling attention."""
    defaults = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, attn="castling")
    return create_vit("castling_deit_base", pretrained, defaults=defaults, **kwargs)


@register_model
def castling_vit_nano(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized Castling ViT: 32x32 images, 4x4 patches (64 tokens), D=128, 6 blocks, 4 heads.

    Its softmax twin, same size, is ``vit_msa_nano``.
    """
    defaults = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, attn="castling")
    return create_vit("castling_vit_nano", pretrained, defaults=defaults, **kwargs)


# Castling in the hierarchical (Swin-style) backbone: windows, shifted every second block, restricted by
# region as the window contract asks. The layouts are Swin-T's and the CPU-sized nano one of that family.
_SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0)
_SWIN_NANO = dict(
    img_size=32, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, mlp_ratio=2.0,
    drop_path_rate=0.0,
)


def _create_castling_hierarchical(variant: str, pretrained: bool, defaults: dict, cfg: dict, **kwargs):
    from .hierarchical import create_hierarchical, hierarchical_cfg

    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    args = {**defaults, "attn": "castling", **kwargs}
    return create_hierarchical(variant, pretrained, pretrained_cfg=hierarchical_cfg(**cfg), **args)


@register_model
def castling_swin_t(pretrained: bool = False, **kwargs):
    """Swin-T's layout (2-2-6-2, heads 3-6-12-24, C=96, window 7) with Castling window attention.

    Like-for-like with ``hier_msa_swin_t``; no published code offers Castling in windows.
    """
    return _create_castling_hierarchical("castling_swin_t", pretrained, _SWIN_T, {}, **kwargs)


@register_model
def castling_swin_nano(pretrained: bool = False, **kwargs):
    """CPU-sized hierarchical Castling model at 32x32 (twin of ``hier_msa_nano``)."""
    cfg = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0)
    return _create_castling_hierarchical("castling_swin_nano", pretrained, _SWIN_NANO, cfg, **kwargs)
