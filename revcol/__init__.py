"""RevCol core: reversible columns in pure PyTorch."""
from .columns import GAMMA_MIN, Column, ReversibleColumns, clamp_gamma
from .memory import count_saved_bytes
from .isotropic import (CosineAttention, DropPath, IsotropicLevel, LevelFusion, PostNormBlock,
                        isotropic_columns)

__all__ = ["GAMMA_MIN", "Column", "ReversibleColumns", "clamp_gamma", "CosineAttention", "DropPath",
           "IsotropicLevel", "LevelFusion", "PostNormBlock", "isotropic_columns", "count_saved_bytes"]
