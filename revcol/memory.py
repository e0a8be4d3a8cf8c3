"""Measuring activation memory on any device: what is kept for backward, and the peak of live tensors in a step."""
import weakref
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class SavedBytes:
    """Bytes of the distinct storages kept for backward while the counter was open."""

    def __init__(self):
        self.bytes = 0
        self._seen = set()

    def add(self, tensor: torch.Tensor) -> None:
        if tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        if storage._cdata not in self._seen:  # the storage itself: data_ptr is 0 for meta and fake tensors
            self._seen.add(storage._cdata)
            self.bytes += storage.nbytes()


_open_counters: List[SavedBytes] = []


def note_kept_for_backward(tensors: Iterable[torch.Tensor]) -> None:
    """Counts tensors kept for backward outside autograd's saved tensors (the last reversible column's outputs)."""
    for counter in _open_counters:
        for tensor in tensors:
            counter.add(tensor)


@contextmanager
def count_saved_bytes() -> Iterator[SavedBytes]:
    """``with count_saved_bytes() as saved: loss = model(x).sum()`` then ``saved.bytes``.

    Counts what autograd saves and what reversible columns keep themselves. Parameters are counted too when
    an op saves them; a tensor kept twice counts once.
    """
    saved = SavedBytes()

    def pack(tensor):
        saved.add(tensor)
        return tensor

    _open_counters.append(saved)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved
    finally:
        _open_counters.remove(saved)


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while the mode is on, counted until each is freed.

    Tensors alive before (``ignore``: parameters, gradients, optimizer state, inputs) are not counted, so
    on CPU this measures what ``torch.cuda.max_memory_allocated`` above the step's start measures on GPU,
    less the allocator's rounding. ``current`` is the bytes of those tensors alive now. Only ops that go
    through the dispatcher are seen: compiled graphs allocate their buffers outside it.
    """

    def __init__(self, ignore: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.peak = 0
        self.current = 0
        self._live: Dict[int, int] = {}
        self._refs: Dict[int, weakref.ref] = {}
        self._ignore = {t.untyped_storage().data_ptr() for t in ignore}

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._ignore or key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out
