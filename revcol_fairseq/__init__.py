"""RevCol-Transformer as a fairseq ``--user-dir`` plugin: importing it registers the model and its architectures
and allows the few safe globals its checkpoints hold (see checkpoint.py)."""
from .checkpoint import allow_fairseq_checkpoint_globals
from .encoder import RevColEncoder
from .model import RevColTransformerModel

allow_fairseq_checkpoint_globals()

__all__ = ["RevColEncoder", "RevColTransformerModel", "allow_fairseq_checkpoint_globals"]
