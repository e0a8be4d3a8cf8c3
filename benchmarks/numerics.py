"""How far reversible gradients drift from plain autograd as columns are added.

Each inverse step divides the forward's rounding error by gamma, and the rebuilt states of one level feed
the next level's recompute, so the error grows with the number of columns; how fast depends on gamma.
The figure is ||g_rev - g_plain|| / ||g_plain|| over all gradients, float32 unless stated, for
  1. bare isotropic columns (dim 32, blocks (1, 1, 1, 1), 4 heads) on (4, 16, 32) inputs, and
  2. the RevCol-ViT models at initialization on two 64x64 images (16 tokens), loss logsumexp(logits).

    python benchmarks/numerics.py
"""
from datetime import date

import timm
import torch

import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)
from revcol import isotropic_columns


def gradients(model, x, reversible):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    states = model(x)
    sum((s * torch.linspace(-1, 1, s.numel(), dtype=s.dtype).view_as(s)).sum() for s in states).backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])


def model_gradients(model, x, reversible):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    model(x).logsumexp(-1).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main():
    print(f"# CPU, {date.today()}, torch {torch.__version__}")
    columns = (2, 4, 8, 16)
    print("| dtype | gamma | " + " | ".join(f"{n} columns" for n in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for dtype in (torch.float32, torch.float64):
        for gamma in (0.5, 1.0):
            errors = []
            for n in columns:
                torch.manual_seed(0)
                model = isotropic_columns(32, [1, 1, 1, 1], n, 4, gamma_init=gamma).to(dtype)
                x = torch.randn(4, 16, 32, dtype=dtype)
                rev, plain = gradients(model, x, True), gradients(model, x, False)
                errors.append(((rev - plain).norm() / plain.norm()).item())
            print(f"| {str(dtype).split('.')[1]} | {gamma} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    print("\n| model | columns | gamma 0.5 | gamma 1.0 |\n|---|---|---|---|")
    for name in ("revcol_vit_s", "revcol_vit_b_2x16", "revcol_vit_b_4x8", "revcol_vit_b_8x4"):
        errors = []
        for gamma in (0.5, 1.0):
            torch.manual_seed(0)
            model = timm.create_model(name, img_size=64, num_classes=10, gamma_init=gamma, drop_path_rate=0.0)
            x = torch.randn(2, 3, 64, 64)
            rev, plain = model_gradients(model, x, True), model_gradients(model, x, False)
            errors.append(((rev - plain).norm() / plain.norm()).item())
        print(f"| {name} | {len(model.revcol.columns)} | {errors[0]:.1e} | {errors[1]:.1e} |")


if __name__ == "__main__":
    main()
