"""Does ``torch.compile`` of the level functions keep reversible gradients equal to plain autograd?

Each level module is compiled in place (``module.compile()``); reversible and plain gradients of the same
model are compared, without randomness and with dropout and drop path (Inductor's random numbers, with
``fallback_random``). Float32, gamma 1.0, isotropic columns of dim 32, 3 columns.

    python benchmarks/compile_levels.py      # a few minutes on CPU: every level compiles twice
"""
from datetime import date

import torch
import torch._dynamo.config
import torch._inductor.config

from revcol import isotropic_columns

torch._inductor.config.fallback_random = True
torch._dynamo.config.cache_size_limit = 64  # one compiled graph per level instance and grad mode


def relative_error(drop):
    torch.manual_seed(0)
    model = isotropic_columns(32, [1, 1, 1, 1], 3, 4, drop_path_rate=drop, dropout=drop / 3, gamma_init=1.0)
    for column in model.columns:
        for level in column.levels:
            level.compile()
    x = torch.randn(4, 8, 32)

    def grads(reversible):
        model.reversible = reversible
        model.zero_grad()
        xr = x.clone().requires_grad_()
        torch.manual_seed(5)
        states = model(xr)
        sum((s * torch.linspace(-1, 1, s.numel()).view_as(s)).sum() for s in states).backward()
        return torch.cat([xr.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])

    rev, plain = grads(True), grads(False)
    return ((rev - plain).norm() / plain.norm()).item()


def main():
    print(f"# CPU, {date.today()}, torch {torch.__version__}")
    print(f"no randomness: reversible vs plain relative gradient error {relative_error(0.0):.1e}")
    print(f"dropout 0.1, drop path 0.3: reversible vs plain relative gradient error {relative_error(0.3):.1e}")


if __name__ == "__main__":
    main()
