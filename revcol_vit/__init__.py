"""RevCol models registered with timm: ``import revcol_vit`` makes ``timm.create_model('revcol_vit_b')`` and
``timm.create_model('revcol_tiny')`` work."""
from . import hierarchical
from .model import VARIANTS, RevColViT

__all__ = ["RevColViT", "VARIANTS", "hierarchical"]
