"""RevCol core: reversible columns in pure PyTorch."""
from .checkpoint import load_plain_checkpoint, write_atomically
from .columns import GAMMA_INIT, GAMMA_MIN, Column, ReversibleColumns, clamp_gamma
from .isotropic import CosineAttention, DropPath, IsotropicLevel, LevelFusion, PostNormBlock, isotropic_columns
from .memory import PeakBytes, count_saved_bytes

__all__ = ["GAMMA_INIT", "GAMMA_MIN", "Column", "ReversibleColumns", "clamp_gamma", "CosineAttention", "DropPath",
           "IsotropicLevel", "LevelFusion", "PostNormBlock", "isotropic_columns", "PeakBytes", "count_saved_bytes",
           "load_plain_checkpoint", "write_atomically"]
