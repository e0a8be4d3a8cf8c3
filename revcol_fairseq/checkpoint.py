"""fairseq checkpoints: safe loading under torch >= 2.6, and no half-written copies.

Safe loading. torch.load defaults to ``weights_only=True``: it unpickles only tensors, containers, numbers and
strings plus the globals registered with ``torch.serialization.add_safe_globals``, and refuses everything else
(so a checkpoint cannot run code when opened). fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls
torch.load without arguments, so it gets that default, and a checkpoint that fairseq-train writes for an
argparse-configured model such as ours holds one global outside it: the ``argparse.Namespace`` of the
training flags (under ``cfg["model"]`` and ``args``). Found by saving real fairseq-train checkpoints and
listing their pickled globals; see tests/test_fairseq_model.py. Allowing it is safe: the restricted unpickler
rebuilds a Namespace by setting attributes from values that are themselves restricted, and Namespace runs no
code of its own. Safe loading otherwise stays on.

Atomic copies. fairseq-train writes the first checkpoint of a save atomically (a temporary file, then a
rename), but makes the others (checkpoint_last.pt, checkpoint_best.pt) with ``PathManager.copy``, which writes
in place: a job killed during that copy leaves a truncated checkpoint_last.pt, and the resume fails on it.
"""
import argparse
import shutil

import torch
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager

from revcol.checkpoint import write_atomically

CHECKPOINT_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoint_globals() -> None:
    """Let ``torch.load(weights_only=True)`` (fairseq's load path) rebuild the globals our checkpoints hold, at every
    load: a ``torch.serialization.safe_globals`` block elsewhere in the process (timm's checkpoint loader has one)
    removes its globals from the allowlist when it ends, ours included."""
    torch.serialization.add_safe_globals(CHECKPOINT_GLOBALS)
    load = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(load, "allows_fairseq_checkpoint_globals", False):
        return

    def load_checkpoint_to_cpu(*args, **kwargs):
        torch.serialization.add_safe_globals(CHECKPOINT_GLOBALS)
        return load(*args, **kwargs)

    load_checkpoint_to_cpu.allows_fairseq_checkpoint_globals = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


class AtomicCopyPathManager(PathManager):
    """fairseq's PathManager, except that a local copy goes to a temporary file renamed into place."""

    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not PathManager.supports_rename(dst_path):  # remote storage through iopath: fairseq's own copy
            return PathManager.copy(src_path, dst_path, overwrite)
        write_atomically(lambda tmp: shutil.copyfile(src_path, tmp), dst_path)
        return True


def copy_checkpoints_atomically() -> None:
    """Make fairseq's checkpoint saving copy checkpoint_last.pt and checkpoint_best.pt atomically."""
    checkpoint_utils.PathManager = AtomicCopyPathManager
