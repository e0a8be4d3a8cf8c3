"""Writes scikit-learn's bundled 8x8 digits as an ImageNet-layout folder of 32x32 RGB PNGs, for toy runs on CPU.

    python examples/vit/make_digits.py data/digits     # train/digit0..9/*.png (1433), val/digit0..9/*.png (364)
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(root: Path, per_class: int = 10_000) -> Path:
    """Up to ``per_class`` images of each digit, every 5th of them to val/."""
    digits = load_digits()
    counts = np.zeros(10, dtype=int)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if counts[label] == per_class:
            continue
        split = "val" if counts[label] % 5 == 0 else "train"
        counts[label] += 1
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)  # digits are 0..16
        Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--per-class", type=int, default=10_000)
    args = parser.parse_args()
    write_digits(args.root, args.per_class)
