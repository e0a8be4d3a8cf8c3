"""``benchmark.py compile``: does ``torch.compile`` of the level functions keep reversible gradients equal
to plain autograd?

Reversible gradients of a model whose levels are compiled (``compile_levels()``) against plain eager
autograd of the same weights, float32, gamma 1.0, 3 columns of dim 32:
  - isotropic levels without randomness;
  - isotropic levels with dropout, attention dropout and drop path (their random ops run eagerly);
  - the same levels with their dropouts swapped for ``nn.Dropout``, which Inductor compiles into the graph:
    what happens to a level that does not keep its random ops eager.
Then what compiling buys on this machine's CPU: the training step time (forward, backward, AdamW) of
RevCol-ViT-S at batch 4, float32, eager and compiled, reversible and plain.
"""
import torch
from common import create_vit, median_seconds
from torch import nn

from revcol import isotropic_columns
from revcol.isotropic import Dropout


def build(drop):
    torch.manual_seed(0)
    return isotropic_columns(32, [1, 1, 1, 1], 3, 4, drop_path_rate=drop, dropout=drop / 3, attn_dropout=drop / 3,
                             gamma_init=1.0)


def gradients(model, x, reversible):
    model.reversible = reversible
    model.zero_grad()
    xr = x.clone().requires_grad_()
    torch.manual_seed(5)
    states = model(xr)
    sum((s * torch.linspace(-1, 1, s.numel()).view_as(s)).sum() for s in states).backward()
    return torch.cat([xr.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])


def relative_error(drop, random_ops_in_graph=False):
    eager, compiled = build(drop), build(drop)
    if random_ops_in_graph:
        for name, module in list(compiled.named_modules()):
            if isinstance(module, Dropout):
                parent, _, child = name.rpartition(".")
                setattr(compiled.get_submodule(parent), child, nn.Dropout(module.p))
    compiled.compile_levels()
    x = torch.randn(4, 8, 32)
    plain, rev = gradients(eager, x, False), gradients(compiled, x, True)
    return ((rev - plain).norm() / plain.norm()).item()


def step_ms(reversible, compiled, device, batch=4, steps=5):
    label = ("revcol_vit_s" if reversible else "revcol_vit_s plain") + " compiled" * compiled
    model = create_vit(label).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 224, 224, device=device), torch.randint(0, 1000, (batch,), device=device)

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The first step compiles every variant, the second one warms up.
    return 1000 * median_seconds(step, device, steps, warmup=2)


def run(args, device, title):
    print("compiled reversible vs eager plain, relative gradient error")
    print(f"no randomness: {relative_error(0.0):.1e}")
    print(f"dropout 0.1, attention dropout 0.1, drop path 0.3, random ops eager: {relative_error(0.3):.1e}")
    print(f"the same with nn.Dropout compiled into the graph: {relative_error(0.3, random_ops_in_graph=True):.1e}")
    print(f"\nRevCol-ViT-S training step, batch {args.batch}, float32, median of {args.steps}")
    print("| mode | eager ms | compiled ms | eager / compiled |\n|---|---|---|---|")
    for reversible in (True, False):
        eager, compiled = (step_ms(reversible, c, device, args.batch, args.steps) for c in (False, True))
        print(f"| {'reversible' if reversible else 'plain'} | {eager:.0f} | {compiled:.0f} | {eager / compiled:.2f} |")

