"""Helpers shared by the test files."""
import importlib.util
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far ``a`` is from the reference ``b`` (a zero ``b`` makes any difference huge)."""
    return ((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)).item()


def write_reversal_corpus(workdir: Path) -> None:
    """A toy translation task for fairseq tests, the target being the source sentence reversed:
    train.{src,tgt} (300 pairs) and valid.{src,tgt} (24 pairs) over a 30-word vocabulary, in ``workdir``."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    for split, count in (("train", 300), ("valid", 24)):
        sentences = [rng.choices(words, k=rng.randint(3, 9)) for _ in range(count)]
        (workdir / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in sentences))
        (workdir / f"{split}.tgt").write_text("".join(" ".join(reversed(s)) + "\n" for s in sentences))


def load_example(relative_path: str):
    """An example script of the repository as a module, imported by its path (sys.path stays as it is)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_digits(*args, **kwargs) -> Path:
    """The toy image data set users build with ``examples/vit/make_digits.py`` (scikit-learn's digits)."""
    return load_example("examples/vit/make_digits.py").write_digits(*args, **kwargs)
