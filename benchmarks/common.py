"""What the benchmark scripts share: the header of every output, tables and CSV files, the compared ViT models
and an ATen op counter. ``python benchmarks/<script>.py`` puts this folder on sys.path, so the scripts import it
as ``common``."""
import csv
import subprocess
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIT_MODELS = {  # label -> (timm name, kwargs)
    "revcol_vit_s": ("revcol_vit_s", {}),
    "revcol_vit_s plain": ("revcol_vit_s", {"reversible": False}),
    "vit_small_patch16_224": ("vit_small_patch16_224", {}),
    "revcol_vit_b": ("revcol_vit_b", {}),
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
}
# Ops that launch no kernel but cost host time.
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "unbind", "alias", "slice",
            "select", "unsqueeze", "squeeze", "as_strided", "split", "reshape"}


def commit() -> str:
    """The checked-out commit, with ``+changes`` when the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return head + ("+changes" if dirty else "")


def header(device: str, *details: str) -> str:
    """Device, date, commit and torch version, then ``details``: the first line of every output."""
    return ", ".join([device, str(date.today()), f"commit {commit()}", f"torch {torch.__version__}", *details])


def print_table(rows: List[Dict[str, Any]]) -> None:
    """Markdown table of ``rows``, floats to one decimal."""
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
