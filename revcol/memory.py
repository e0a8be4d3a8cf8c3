"""Counting what autograd keeps for backward: the activation memory that reversible columns keep flat."""
from contextlib import contextmanager
from typing import Iterator

import torch


class SavedBytes:
    """Bytes of the distinct storages autograd saved while the counter was open."""

    def __init__(self):
        self.bytes = 0
        self._seen = set()

    def add(self, tensor: torch.Tensor) -> None:
        if tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()


@contextmanager
def count_saved_bytes() -> Iterator[SavedBytes]:
    """``with count_saved_bytes() as saved: loss = model(x).sum()`` then ``saved.bytes``.

    Parameters are counted too when an op saves them; a tensor saved by several ops counts once.
    """
    saved = SavedBytes()

    def pack(tensor):
        saved.add(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
