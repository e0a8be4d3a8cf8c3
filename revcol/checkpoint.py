"""Checkpoints: safe loading with one clear error for each way a file can be wrong, and atomic writes."""
import itertools
import os
import pickle
from typing import Any, Callable

import torch

# What safe loading says when it refuses a global (a class or function the file would call), as opposed to a
# damaged file ("Unsupported operand", "String is too long", ...): torch/_weights_only_unpickler.py.
REFUSALS = ("GLOBAL", "add_safe_globals", "unrecognized function")
_write_count = itertools.count()  # with the process id, a temporary name no other write uses


def load_plain_checkpoint(path: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, raising ``ValueError`` with one line naming the
    problem: no such path, a folder, a file that pickles more than plain data, or a damaged file.

    Safe loading unpickles only plain data (tensors, containers, numbers, strings and the globals registered with
    ``torch.serialization.add_safe_globals``), so a checkpoint that would run code is refused, never run.
    """
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails in many ways: RuntimeError, EOFError, UnpicklingError, KeyError
        refusal = isinstance(e, pickle.UnpicklingError) and next(
            (line.strip() for line in str(e).splitlines() if any(word in line for word in REFUSALS)), None)
        if refusal:
            raise ValueError(f"checkpoint {path} holds more than plain data and is refused ({refusal[:160]})") from None
        raise ValueError(f"checkpoint {path} cannot be read: truncated, or not a torch checkpoint "
                         f"({type(e).__name__})") from None


def write_atomically(write: Callable[[str], Any], path: str) -> None:
    """``write(tmp_path)``, then rename over ``path``: a crash or a kill never leaves a half-written file at
    ``path``, which keeps what it held before. A write that fails removes its temporary file.

    The temporary name is unique to the process and the call, so that writes of the same ``path`` by two processes
    (or two calls) never take each other's temporary file."""
    tmp = f"{path}.{os.getpid()}-{next(_write_count)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
