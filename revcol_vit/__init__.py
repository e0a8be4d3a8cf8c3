"""RevCol-ViT models registered with timm: ``import revcol_vit`` makes ``timm.create_model('revcol_vit_b')`` work."""
from .revcol_vit import VARIANTS, RevColViT

__all__ = ["RevColViT", "VARIANTS"]
