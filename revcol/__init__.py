"""RevCol core: reversible columns in pure PyTorch.

The model API is exported here. Checkpoint I/O lives in :mod:`revcol.checkpoint` (``write_atomically``,
``load_plain_checkpoint``) and the CPU memory meters in :mod:`revcol.memory` (``PeakBytes``, ``count_saved_bytes``).
"""
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

__all__ = ["GAMMA_INIT", "GAMMA_MIN", "Column", "ReconstructionError", "ReversibleColumns", "clamp_gamma",
           "CosineAttention", "DropPath", "IsotropicLevel", "LevelFusion", "PostNormBlock", "isotropic_columns",
           "check_gamma_init"]
