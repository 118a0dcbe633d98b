"""Model families. Importing this package registers every model with timm's registry."""
from . import castling_vit, vit  # noqa: F401  (plain ViT and Castling-ViT families)
from . import dvt  # noqa: F401  (DVT cascades and T2T-ViT)
from . import hierarchical  # noqa: F401  (ViT-LSLA and the Swin-style backbone)
