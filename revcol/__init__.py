"""RevCol core: reversible columns in pure PyTorch."""
from .columns import GAMMA_MIN, Column, ReversibleColumns, clamp_gamma
from .isotropic import (CosineAttention, DropPath, IsotropicLevel, LevelFusion, PostNormBlock,
                        isotropic_columns)

__all__ = ["GAMMA_MIN", "Column", "ReversibleColumns", "clamp_gamma", "CosineAttention", "DropPath",
           "IsotropicLevel", "LevelFusion", "PostNormBlock", "isotropic_columns"]
