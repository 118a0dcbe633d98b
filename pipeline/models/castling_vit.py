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
    """CPU-sized Castling ViT: 32x32 images, 4x4 patches (64 tokens), D=128, 6 blocks, 4 heads (twin: ``vit_msa_nano``)."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, attn="castling")
    return create_vit("castling_vit_nano", pretrained, defaults=defaults, **kwargs)
