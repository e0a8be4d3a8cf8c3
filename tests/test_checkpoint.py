"""revcol.checkpoint: plain data loads, every way a file can be wrong is one ValueError naming it; atomic writes."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from revcol.checkpoint import load_plain_checkpoint, write_atomically


@dataclass
class Settings:
    """A harmless class, but not on safe loading's allowlist (revcol_fairseq allowlists argparse.Namespace)."""
    lr: float


class RunsCommand:
    """Unpickling this would call ``os.system``: stands for any code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_plain_data_loads(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "history": [{"loss": 0.5}]}
    torch.save(state, tmp_path / "ok.pth")
    loaded = load_plain_checkpoint(str(tmp_path / "ok.pth"))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["history"] == state["history"]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("a folder", "is not a file"),
    ("truncated", r"cannot be read: truncated, or not a torch checkpoint \(RuntimeError\)"),
    ("empty", r"cannot be read: truncated, or not a torch checkpoint \(EOFError\)"),
    ("random bytes", r"cannot be read: truncated, or not a torch checkpoint \(UnpicklingError\)"),
    ("a class outside the allowlist", r"holds more than plain data and is refused \(.*GLOBAL .*Settings"),
    ("a call to os.system", r"holds more than plain data and is refused \(.*GLOBAL posix.system"),
])
def test_a_bad_file_is_one_error_naming_it(tmp_path, case, message):
    path = tmp_path / "x.pth"
    marker = tmp_path / "code-ran"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    if case == "a folder":
        path.mkdir()
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:2000])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif case == "a class outside the allowlist":
        torch.save({"args": Settings(lr=1.0)}, path)
    elif case == "a call to os.system":
        torch.save({"model": RunsCommand(marker)}, path)
    with pytest.raises(ValueError, match=f"^checkpoint {path} {message}") as error:
        load_plain_checkpoint(str(path))
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_a_write_killed_midway_keeps_the_previous_file_whole(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 1}, path)

    def write_half_then_die(tmp):
        torch.save({"epoch": 2, "weights": torch.zeros(1000)}, tmp)
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        raise KeyboardInterrupt  # a kill or Ctrl-C in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        write_atomically(write_half_then_die, str(path))
    assert load_plain_checkpoint(str(path)) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    write_atomically(lambda tmp: torch.save({"epoch": 2}, tmp), str(path))
    assert load_plain_checkpoint(str(path)) == {"epoch": 2}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
