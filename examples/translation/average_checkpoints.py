"""Averages the model weights of the last N fairseq checkpoints (Vaswani et al., 2017, Sec. 6.1).

fairseq's own averaging script is not installed with its pip package, hence this one. It picks the newest
``checkpoint_<epoch>_<updates>.pt`` files (written with ``--save-interval-updates``) from a directory, loads them
with ``torch.load(weights_only=True)`` (safe loading, through ``revcol.checkpoint.load_plain_checkpoint``: importing
revcol_fairseq allows the one extra global fairseq checkpoints hold), averages every floating-point weight in
float64 and writes a checkpoint that fairseq-generate loads like any other: the newest input with its weights
replaced. The output is written to a temporary file first and renamed, so it is never half-written.

    python examples/translation/average_checkpoints.py checkpoints/wmt16_en_de --last 5 --output checkpoints/averaged.pt
"""
import argparse
import os
import re
import sys

import torch

import revcol_fairseq
from revcol.checkpoint import load_plain_checkpoint, write_atomically

UPDATE_CHECKPOINT = re.compile(r"checkpoint_\d+_(\d+)\.pt")


def last_checkpoints(directory: str, count: int):
    """Paths of the ``count`` checkpoints with the highest update counts."""
    if not os.path.isdir(directory):
        sys.exit(f"error: checkpoint directory {directory} does not exist")
    numbered = []
    for name in os.listdir(directory):
        match = UPDATE_CHECKPOINT.fullmatch(name)
        if match:
            numbered.append((int(match.group(1)), os.path.join(directory, name)))
    if len(numbered) < count:
        sys.exit(f"error: {directory} holds {len(numbered)} checkpoint_<epoch>_<updates>.pt files, fewer than the "
                 f"{count} to average (train with --save-interval-updates)")
    return [path for _, path in sorted(numbered)[-count:]]


def average_checkpoints(paths):
    """Returns the newest checkpoint (the last path) with each weight replaced by its mean over ``paths``."""
    sums, newest = None, None
    revcol_fairseq.allow_fairseq_checkpoint_globals()  # again: a safe_globals block elsewhere may have removed them
    for path in paths:
        try:
            checkpoint = load_plain_checkpoint(path)
        except ValueError as e:
            sys.exit(f"error: {e}")
        weights = checkpoint["model"]
        if sums is None:
            sums = {name: w.double() if w.is_floating_point() else w for name, w in weights.items()}
        elif weights.keys() != sums.keys():
            sys.exit(f"error: {path} has different weight names than {paths[0]}: not the same model")
        else:
            for name, w in weights.items():
                if w.is_floating_point():
                    sums[name] += w.double()
        newest = checkpoint
    newest["model"] = {name: (s / len(paths)).to(newest["model"][name].dtype) if s.is_floating_point() else s
                       for name, s in sums.items()}
    return newest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("--last", type=int, default=5, help="how many of the newest checkpoints to average")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.last < 1:
        sys.exit(f"error: --last must be at least 1, got {args.last}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        sys.exit(f"error: the folder of --output {args.output} does not exist")

    paths = last_checkpoints(args.checkpoint_dir, args.last)
    print("averaging " + " ".join(os.path.basename(p) for p in paths))
    averaged = average_checkpoints(paths)
    write_atomically(lambda tmp: torch.save(averaged, tmp), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
