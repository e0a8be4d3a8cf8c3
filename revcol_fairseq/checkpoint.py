"""Safe loading of fairseq checkpoints under torch >= 2.6.

torch.load defaults to ``weights_only=True``: it unpickles only tensors, containers, numbers and strings
plus the globals registered with ``torch.serialization.add_safe_globals``, and refuses everything else
(so a checkpoint cannot run code when opened). fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls
torch.load without arguments, so it gets that default, and a checkpoint that fairseq-train writes for an
argparse-configured model such as ours holds one global outside it: the ``argparse.Namespace`` of the
training flags (under ``cfg["model"]`` and ``args``). Found by saving real fairseq-train checkpoints and
listing their pickled globals; see tests/test_fairseq_model.py.

Allowing it is safe: the restricted unpickler rebuilds a Namespace by setting attributes from values that
are themselves restricted, and Namespace runs no code of its own. Safe loading otherwise stays on.
"""
import argparse

import torch

CHECKPOINT_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoint_globals() -> None:
    """Let ``torch.load(weights_only=True)`` (fairseq's load path) rebuild the globals our checkpoints hold."""
    torch.serialization.add_safe_globals(CHECKPOINT_GLOBALS)
