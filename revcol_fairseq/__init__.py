"""RevCol-Transformer as a fairseq ``--user-dir`` plugin: importing it registers the model and its architectures,
allows the few safe globals its checkpoints hold, and makes fairseq-train's checkpoint copies atomic (see
checkpoint.py)."""
from .checkpoint import allow_fairseq_checkpoint_globals, copy_checkpoints_atomically
from .encoder import RevColEncoder
from .model import RevColTransformerModel

allow_fairseq_checkpoint_globals()
copy_checkpoints_atomically()

__all__ = ["RevColEncoder", "RevColTransformerModel", "allow_fairseq_checkpoint_globals", "copy_checkpoints_atomically"]
