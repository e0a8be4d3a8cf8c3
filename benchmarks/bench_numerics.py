"""``benchmark.py numerics``: reversible against plain autograd, gradient exactness per stream.

The core carries the level states in float64 (``revcol.columns.STREAM_DTYPE``) and keeps a column's states
where the rebuild could magnify rounding past ``2**rebuild_budget_bits``. Every table compares that stream
with a stream in the levels' own dtype, the core as it was before, and with the float64 stream alone (no kept
columns), in one run on one machine: max |g_rev - g_plain| over all gradients (0 means bit-identical) and the
relative norm, for bare isotropic columns (dim 32, blocks (1, 1, 1, 1), 4 heads, drop path and dropout on) on
(4, 16, 32) tokens behind a Linear stem, 2 to 20 columns, gamma 0.5 (the default) and gammas driven to 0.1-0.2,
float32 and CPU bf16 autocast; then for the registered RevCol-ViT models at 224 px, batch 2.

``stream`` is the one place that patches the core's constants to get the other streams; the stream's cost
(``benchmark.py memory --mode stream``) uses it too.
"""
from contextlib import contextmanager

import timm
import torch
from torch import nn

import revcol.columns
import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)
from revcol import isotropic_columns

STREAMS = {  # name -> (stream dtype, rebuild budget in bits)
    "float64 (default)": (torch.float64, revcol.columns.REBUILD_BUDGET_BITS),
    "float64, no kept columns": (torch.float64, 10 ** 9),
    "float32 (before)": (torch.float32, 10 ** 9),
}
COST_STREAMS = ("float64 (default)", "float32 (before)")


@contextmanager
def stream(name):
    """The core as it is (float64 stream, kept columns), without kept columns, or as it was (a stream in the
    levels' dtype). Models built under it must take ``rebuild_budget_bits`` from the module's constant, which it
    patches."""
    saved = revcol.columns.STREAM_DTYPE, revcol.columns.REBUILD_BUDGET_BITS
    revcol.columns.STREAM_DTYPE, revcol.columns.REBUILD_BUDGET_BITS = STREAMS[name]
    try:
        yield
    finally:
        revcol.columns.STREAM_DTYPE, revcol.columns.REBUILD_BUDGET_BITS = saved


def drive_gammas_down_(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gammas" in name:
                sign = torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
                p.copy_(sign * (0.1 + 0.1 * torch.rand(p.shape, generator=generator)))


def gradients(model, run, reversible, bf16):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = run()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def difference(model, run, bf16):
    rev, plain = gradients(model, run, True, bf16), gradients(model, run, False, bf16)
    return (rev - plain).abs().max().item(), ((rev - plain).norm() / plain.norm()).item()


def exactness(columns):
    print("\n## Exactness: max |g_rev - g_plain| (relative norm), bare columns\n")
    print("| stream | autocast | gammas | " + " | ".join(f"{n} columns" for n in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for name in STREAMS:
        with stream(name):
            for bf16 in (False, True):
                for gammas in ("0.5", "0.1-0.2"):
                    cells = []
                    for n in columns:
                        torch.manual_seed(0)
                        model = nn.Sequential(nn.Linear(32, 32), isotropic_columns(
                            32, [1, 1, 1, 1], n, 4, drop_path_rate=0.1, dropout=0.1))
                        if gammas != "0.5":
                            drive_gammas_down_(model)
                        x = torch.randn(4, 16, 32)
                        cols = model[1]
                        cols.rebuild_budget_bits = revcol.columns.REBUILD_BUDGET_BITS

                        def run():
                            states = cols(model[0](x))
                            return sum((s.float() * torch.linspace(-1, 1, s.numel()).view_as(s)).sum()
                                       for s in states)

                        cells.append("{:.1e} ({:.1e})".format(*difference(cols, run, bf16)))
                    print(f"| {name} | {'bf16' if bf16 else 'none'} | {gammas} | " + " | ".join(cells) + " |")
    print("\n## Exactness: registered models at 224 px, batch 2, bf16 autocast, loss logsumexp(logits)\n")
    print("| stream | model | columns | gamma 0.5 | gammas 0.1-0.2 |\n|---|---|---|---|---|")
    for name in STREAMS:
        with stream(name):
            for variant in ("revcol_vit_s", "revcol_vit_b_8x4"):
                cells = []
                for gammas in ("0.5", "0.1-0.2"):
                    torch.manual_seed(0)
                    model = timm.create_model(variant, num_classes=10)
                    if gammas != "0.5":
                        drive_gammas_down_(model)
                    model.revcol.rebuild_budget_bits = revcol.columns.REBUILD_BUDGET_BITS
                    x = torch.randn(2, 3, 224, 224)
                    cells.append("{:.1e} ({:.1e})".format(
                        *difference(model, lambda: model(x).float().logsumexp(-1).sum(), True)))
                print(f"| {name} | {variant} | {len(model.revcol.columns)} | " + " | ".join(cells) + " |")


def run(args, device, title):
    exactness([int(n) for n in args.columns.split(",")])
