"""What every benchmark of ``benchmark.py`` shares: the device, autocast, timing, peak memory, the header line,
tables, CSV and PNG files, the compared ViT models and an ATen op counter. ``python benchmarks/benchmark.py``
puts this folder on sys.path, so the benchmark modules import it as ``common``."""
import csv
import statistics
import subprocess
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from revcol.testing import step_peak_bytes

VIT_MODELS = {  # label -> (timm name, kwargs); a label with " compiled" appended runs with its levels compiled
    "revcol_vit_s": ("revcol_vit_s", {}),
    "revcol_vit_s plain": ("revcol_vit_s", {"reversible": False}),
    "vit_small_patch16_224": ("vit_small_patch16_224", {}),
    "revcol_vit_b": ("revcol_vit_b", {}),
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
}
# Ops that launch no kernel but cost host time.
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "unbind", "alias", "slice",
            "select", "unsqueeze", "squeeze", "as_strided", "split", "reshape"}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def create_vit(label: str, **extra) -> torch.nn.Module:
    """The model of a ``VIT_MODELS`` label (registered with timm by ``revcol_vit``), built from seed 0."""
    import timm

    import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)
    name, kwargs = VIT_MODELS[label.removesuffix(" compiled")]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs, **extra)
    if label.endswith(" compiled"):
        model.revcol.compile_levels()
    return model


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def autocast(device: torch.device, amp: str):
    """Autocast to the dtype named ``amp`` (``AMP_DTYPES``); off for ``none``."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=AMP_DTYPES[amp] is not None)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call of ``fn``, waiting for the GPU's queue to drain on CUDA."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int = 0) -> float:
    """Median of ``steps`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(seconds(fn, device) for _ in range(steps))


def peak_bytes(step: Callable[[], None], device: torch.device,
               keep: Callable[[], Iterable[torch.Tensor]] = lambda: ()) -> int:
    """Peak memory of a training step above what it starts with, measured on its second run: the first allocates
    what every later step starts with (gradients, optimizer state). CUDA: ``max_memory_allocated`` above the
    start. CPU: the tensors the step creates (``revcol.testing.step_peak_bytes``), leaving out ``keep()`` and
    their gradients: the tensors alive before the step, asked for after the first run, once they all exist."""
    if device.type != "cuda":
        def after_first_run():  # a generator: step_peak_bytes reads it after its first run of the step
            yield from keep()
        return step_peak_bytes(step, after_first_run())
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


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


def plot_lines(rows: List[Dict[str, Any]], path: Path, title: str, x: str, line: str,
               panels: Sequence[Tuple[str, str, float]], xbase: int = 10) -> None:
    """One line per value of ``rows``' column ``line``, ``x`` on a log axis, in one panel per
    (column, axis label, divisor) of ``panels``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for name in dict.fromkeys(r[line] for r in rows):
            pts = [(r[x], r[key] / scale) for r in rows if r[line] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=xbase)
        ax.set(xlabel=x, ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
