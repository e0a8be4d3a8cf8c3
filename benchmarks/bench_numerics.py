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
import statistics
import time
from contextlib import contextmanager

import timm
import torch
from torch import nn

import revcol.columns
import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)
from revcol import isotropic_columns
from revcol.memory import count_saved_bytes

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


@contextmanager
def cast_bits(on):
    """With the last bit of each rebuilt state's cast kept (the core as it is), or without: the forward records
    the states as if the levels computed in float64, so that the recompute casts the rebuilt states as they are."""
    record = revcol.columns._Tape.record
    if not on:
        revcol.columns._Tape.record = lambda tape, c, states, dtype: record(tape, c, states, torch.float64)
    try:
        yield
    finally:
        revcol.columns._Tape.record = record


def imagenet_steps(steps, batch, bf16):
    """Training steps of RevCol-ViT-S at 224 px with gammas off powers of two: each step's gradients in plain
    mode and reversibly with and without the cast bits, compared with torch.equal; then an SGD step with the
    plain gradients, so that every step sees new weights."""
    torch.manual_seed(0)
    model = timm.create_model("revcol_vit_s")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gammas" in name:
                p.copy_(0.4 + 0.5 * torch.rand(p.shape, generator=generator))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    runs = {"plain": (False, True), "cast bits kept": (True, True), "no cast bits": (True, False)}
    rows = {name: dict(equal=0, worst=0.0, worst_tensor=0.0, gauge=0.0, times=[], saved=0) for name in runs}
    for i in range(steps):
        x = torch.randn(batch, 3, 224, 224, generator=generator)
        target = torch.randint(0, 1000, (batch,), generator=generator)
        grads = {}
        for name, (reversible, bits) in runs.items():
            model.reversible = reversible
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            torch.manual_seed(i)  # the same drop path masks in every run
            start = time.perf_counter()
            with cast_bits(bits), count_saved_bytes() as saved:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(xi)
                loss = nn.functional.cross_entropy(logits.float(), target)
            with cast_bits(bits):
                loss.backward()
            rows[name]["times"].append(time.perf_counter() - start)
            rows[name]["saved"] = saved.bytes
            grads[name] = [xi.grad] + [p.grad for p in model.parameters()]
            if reversible:
                rows[name]["gauge"] = max(rows[name]["gauge"], model.revcol.reconstruction_error.error)
        for name in ("cast bits kept", "no cast bits"):
            pairs = list(zip(grads[name], grads["plain"]))
            if all(torch.equal(a, b) for a, b in pairs):
                rows[name]["equal"] += 1
                continue
            diff = torch.cat([(a - b).flatten() for a, b in pairs]).norm()
            rows[name]["worst"] = max(rows[name]["worst"],
                                      (diff / torch.cat([b.flatten() for _, b in pairs]).norm()).item())
            rows[name]["worst_tensor"] = max(rows[name]["worst_tensor"], max(
                ((a - b).abs().max() / b.abs().max()).item() for a, b in pairs))
        for p, g in zip(model.parameters(), grads["plain"][1:]):
            p.grad = g
        optimizer.step()
    for name in ("cast bits kept", "no cast bits"):
        r = rows[name]
        print(f"| {'bf16' if bf16 else 'none'} | {name} | {r['equal']}/{steps} | {r['worst']:.1e} | "
              f"{r['worst_tensor']:.1e} | {r['gauge']:.1e} | {r['saved'] / 2**20:.2f} | "
              f"{statistics.median(r['times']):.2f} |", flush=True)
    print(f"| {'bf16' if bf16 else 'none'} | plain | - | - | - | - | {rows['plain']['saved'] / 2**20:.2f} | "
          f"{statistics.median(rows['plain']['times']):.2f} |", flush=True)


def imagenet(steps, batch, autocasts):
    print(f"## Exactness at ImageNet shapes: RevCol-ViT-S, 224 px, batch {batch}, {steps} SGD steps (lr 1e-3) "
          f"from gammas drawn in [0.4, 0.9], cross-entropy\n")
    print("Bit-identical steps: torch.equal on the input's and every parameter's gradient, reversible against "
          "plain. Relative error: ||g_rev - g_plain|| / ||g_plain|| over all gradients, worst of the other steps; "
          "worst tensor: max |g_rev - g_plain| / max |g_plain| of the worst tensor. Gauge: the largest "
          "reconstruction_error. Saved: bytes kept for backward by the forward. Step: median forward and "
          "backward.\n")
    print("| autocast | run | bit-identical steps | relative error | worst tensor | gauge | saved MiB | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for bf16 in autocasts:
        imagenet_steps(steps, batch, bf16)


def run(args, device, title):
    if args.part == "exactness":
        exactness([int(n) for n in args.columns.split(",")])
    else:
        autocasts = [name == "bf16" for name in args.imagenet_autocast.split(",")]
        imagenet(args.imagenet_steps, args.imagenet_batch, autocasts)
