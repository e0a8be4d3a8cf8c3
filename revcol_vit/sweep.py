"""Appendix B.3: top-1 against the number of columns, at ViT-B width with 32 blocks in all (1x32 ... 8x4).

Trains every variant with one recipe (the flags of ``revcol_vit.train``), then writes ``sweep.csv`` and ``sweep.png``
(top-1 per variant with a table of parameters, FLOPs and training memory) to ``--output``.

    Toy scale, CPU:  python -m revcol_vit.sweep --data digits/ --output runs/sweep --embed-dim 32 --num-heads 2 \
                         --img-size 32 --patch-size 8 --epochs 5 --batch-size 32 --lr-base-batch 32 --workers 0
    ImageNet, GPUs:  torchrun --nproc_per_node 8 -m revcol_vit.sweep --data /imagenet --output runs/sweep --amp bf16

A variant whose output folder already holds a checkpoint continues from it, so a stopped sweep picks up where it was
(with this run's schedule flags, as ``--resume`` does). A rerun updates its variants' rows of ``sweep.csv`` and keeps
the others.
"""
import argparse
import copy
import csv
import dataclasses
import os
from typing import Any, Dict, List, Optional

import torch
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

from revcol import check_gamma_init
from revcol.checkpoint import write_atomically
from revcol.memory import PeakBytes

from .config import TRAIN_OPTIONS, Option, Parser
from .data import open_splits
from .errors import UsageError
from .model import VARIANTS
from .runtime import (
    CHECKPOINT_NAME,
    count_parameters,
    create_model,
    make_output_folder,
    run_cli,
    setup_distributed,
    write_csv,
)
from .train import build_parser, model_kwargs, parse_args, train

SWEEP_VARIANTS = ("1x32", "2x16", "4x8", "8x4")


def sweep_options() -> Dict[Optional[str], Dict[str, Option]]:
    """The trainer's options, with the variants to train, the model left to the sweep and its own output folder."""
    options = {title: dict(group) for title, group in TRAIN_OPTIONS.items()}
    for group in options.values():
        if "model" in group:
            group["model"] = Option(optional=True, help="unset: the sweep sets the model per variant")
    options[None]["output"] = dataclasses.replace(options[None]["output"], default="runs/column_sweep")
    options[None]["variants"] = Option(count="+", choices=SWEEP_VARIANTS, default=list(SWEEP_VARIANTS),
                                       help="columns x blocks per column")
    return options


def sweep_parser() -> Parser:
    return build_parser(sweep_options(), __doc__.splitlines()[0])


def gflops(model: torch.nn.Module, img_size: int) -> float:
    """Multiply-adds of one image's forward pass, in G (the "FLOPs" of Table 9, counted like fvcore).

    Counted on the meta device: there attention dispatches to a kernel the counter knows, the CPU one it misses.
    """
    model = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img_size, img_size, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


def peak_mb_per_sample(model: torch.nn.Module, img_size: int) -> float:
    """Peak activation memory of a training step (forward and backward) per image, on any device: half the peak
    at batch 4 minus that at batch 2, which cancels what does not grow with the batch. (Not batch 1: for a small
    model, weight-gradient temporaries elsewhere in the step can set its peak, which would understate the growth.)"""
    model.train()
    device = next(model.parameters()).device
    images = [torch.zeros(batch, 3, img_size, img_size, device=device) for batch in (2, 4)]
    model(images[0]).sum().backward()  # allocates the gradients, which the measured steps start with
    peaks = []
    for x in images:
        with PeakBytes(ignore=[*model.parameters(), *(p.grad for p in model.parameters())]) as peak:
            model(x).sum().backward()
        peaks.append(peak.peak)
    model.zero_grad(set_to_none=True)
    return (peaks[1] - peaks[0]) / 2 / 2**20


def measure(args, num_classes: int, history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Size, cost and training memory of the variant ``args.model`` as trained."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(args.model, **model_kwargs(args, num_classes)).to(device)
    row = dict(params_m=count_parameters(model) / 1e6, gflops=gflops(model, args.img_size))
    if "peak_memory_mb" in history[-1]:
        row.update(memory_mb=max(r["peak_memory_mb"] for r in history), memory_kind="cuda peak per GPU")
    else:
        row.update(memory_mb=peak_mb_per_sample(model, args.img_size), memory_kind="training peak per image")
    return row


def plot(rows: List[Dict[str, Any]], title: str, path: str) -> None:
    fig = Figure(figsize=(7, 6.5))  # not pyplot: no global figure or display backend to manage
    ax, table_ax = fig.subplots(2, 1, gridspec_kw=dict(height_ratios=(3, 1.4)))
    columns = [r["columns"] for r in rows]
    top1 = [r["top1"] for r in rows]
    ax.plot(columns, top1, "o-")
    for r in rows:
        ax.annotate(f"{r['top1']:.1f}", (r["columns"], r["top1"]), textcoords="offset points", xytext=(0, 7),
                    ha="center")
    ax.set_xscale("log", base=2)
    ax.set_xticks(columns, [r["variant"] for r in rows])
    ax.set_xlabel("columns x blocks per column")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.margins(y=0.15)  # room for the labels above the points
    ax.grid(alpha=0.3)
    table_ax.axis("off")
    table = table_ax.table(
        cellText=[[r["variant"], f"{r['params_m']:.2f}", f"{r['gflops']:.3g}", f"{r['memory_mb']:.3g}",
                   f"{r['top1']:.2f}"] for r in rows],
        colLabels=["variant", "params (M)", "GFLOPs", "memory (MB) *", "top-1 (%)"], loc="upper center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table_ax.text(0.5, 0.0, f"* training memory: {rows[0]['memory_kind']}", ha="center", va="bottom",
                  transform=table_ax.transAxes, fontsize=9)
    fig.tight_layout()
    write_atomically(lambda tmp: fig.savefig(tmp, format="png", dpi=120), path)


def read_rows(path: str) -> List[Dict[str, Any]]:
    """The rows of an earlier run's sweep.csv (none if there is none), numbers as numbers."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep(args) -> List[Dict[str, Any]]:
    if args.model is not None:
        raise UsageError("the sweep sets the model per variant; drop --model")
    if args.num_columns is not None or args.depths is not None:
        raise UsageError("the variants fix the columns and depths; drop --num-columns/--depths")
    if args.initial_checkpoint is not None:
        raise UsageError("the sweep trains every variant from scratch; drop --initial-checkpoint")
    if args.gamma_init is not None:  # before any variant trains: the most columns bound it most
        try:
            check_gamma_init(args.gamma_init, max(VARIANTS[f"revcol_vit_b_{v}"]["num_columns"] for v in args.variants))
        except ValueError as e:
            raise UsageError(str(e)) from None
    d = setup_distributed(args.device)
    if d.is_main:
        make_output_folder(args.output)
    num_classes = len(open_splits(args.dataset, args.data, {"train": None, "val": None})[1])
    sweep_csv = os.path.join(args.output, "sweep.csv")
    rows_by_variant = {row["variant"]: row for row in read_rows(sweep_csv)}  # of earlier runs, which a rerun keeps
    for variant in args.variants:
        run = argparse.Namespace(**vars(args))
        run.model = f"revcol_vit_b_{variant}"
        run.output = os.path.join(args.output, variant)
        checkpoint = os.path.join(run.output, CHECKPOINT_NAME)
        run.resume = checkpoint if os.path.isfile(checkpoint) else None
        history = train(run)
        if not d.is_main:
            continue
        config = VARIANTS[run.model]
        last = history[-1]
        row = dict(variant=variant, model=run.model, columns=config["num_columns"],
                   blocks_per_column=sum(config["depths"]), epochs=last["epoch"], top1=last["val_top1"],
                   top5=last["val_top5"], best_top1=max(r["val_top1"] for r in history))
        if "ema_top1" in last:
            row["ema_top1"] = last["ema_top1"]
        row.update(measure(run, num_classes, history))
        rows_by_variant[variant] = row
        rows = [rows_by_variant[v] for v in SWEEP_VARIANTS if v in rows_by_variant]
        write_csv(rows, sweep_csv)
    rows = [rows_by_variant[v] for v in SWEEP_VARIANTS if v in rows_by_variant]
    if d.is_main:
        title = f"RevCol-ViT, 32 blocks in all: {os.path.basename(os.path.normpath(args.data))}, {args.epochs} epochs"
        plot(rows, title, os.path.join(args.output, "sweep.png"))
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda argv: sweep(parse_args(argv, sweep_parser())), argv)


if __name__ == "__main__":
    main()
