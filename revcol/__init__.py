"""RevCol core: reversible columns in pure PyTorch."""
from .checkpoint import load_plain_checkpoint, write_atomically
from .columns import (
    GAMMA_INIT,
    GAMMA_MIN,
    Column,
    ReconstructionError,
    ReversibleColumns,
    check_gamma_init,
    clamp_gamma,
)
from .isotropic import CosineAttention, DropPath, IsotropicLevel, LevelFusion, PostNormBlock, isotropic_columns
from .memory import PeakBytes, count_saved_bytes

__all__ = ["GAMMA_INIT", "GAMMA_MIN", "Column", "ReconstructionError", "ReversibleColumns", "clamp_gamma",
           "check_gamma_init",
           "CosineAttention", "DropPath", "IsotropicLevel", "LevelFusion", "PostNormBlock", "isotropic_columns",
           "PeakBytes", "count_saved_bytes", "load_plain_checkpoint", "write_atomically"]
