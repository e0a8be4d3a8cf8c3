"""RevCol-ViT models registered with timm: ``import revcol_vit`` makes ``timm.create_model('revcol_vit_b')`` work."""
from .model import VARIANTS, RevColViT

__all__ = ["RevColViT", "VARIANTS"]
