"""RevCol-ViT against timm's ViT: training throughput, activation memory and the largest batch that fits.

One training step is forward + backward + AdamW step under autocast, on 224x224 inputs. For each batch size:
  img/s    median over timed steps,
  act MiB  peak CUDA memory above what the step starts with (parameters, gradients, optimizer state).
Then, at a fixed memory budget, the largest batch each model of --budget-models trains with (doubling, then
bisection to a multiple of 8), counting everything the step allocates.

    python benchmarks/vit_throughput.py                     # needs CUDA
"""
import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from common import header, write_csv

import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)

CANDIDATES = {  # label -> (timm name, kwargs); "compiled" ones run with their levels compiled
    "revcol_vit_s": ("revcol_vit_s", {"reversible": True}),
    "revcol_vit_s compiled": ("revcol_vit_s", {"reversible": True}),
    "revcol_vit_s plain": ("revcol_vit_s", {"reversible": False}),
    "vit_small_patch16_224": ("vit_small_patch16_224", {}),
    "revcol_vit_b": ("revcol_vit_b", {"reversible": True}),
    "revcol_vit_b compiled": ("revcol_vit_b", {"reversible": True}),
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="revcol_vit_s,revcol_vit_s compiled,revcol_vit_s plain,vit_small_patch16_224")
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--amp", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--budget-models", default="revcol_vit_b,revcol_vit_b compiled,vit_base_patch16_224")
    p.add_argument("--budget-gib", type=float, default=16.0)
    p.add_argument("--out", default="benchmarks/results/vit_throughput")
    return p.parse_args()


class Trainer:
    def __init__(self, label, amp):
        name, kwargs = CANDIDATES[label]
        torch.manual_seed(0)
        self.model = timm.create_model(name, num_classes=1000, **kwargs).cuda().train()
        if label.endswith("compiled"):
            self.model.revcol.compile_levels()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(enabled=amp == "fp16")
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, x, y):
        with torch.autocast("cuda", dtype=self.dtype):
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=False)


def batch(n):
    return torch.randn(n, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (n,), device="cuda")


def throughput(trainer, n, steps):
    x, y = batch(n)
    for _ in range(3):  # warm-up: kernels chosen (and compiled), gradients and optimizer state allocated
        trainer.step(x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    trainer.step(x, y)
    torch.cuda.synchronize()
    act = (torch.cuda.max_memory_allocated() - start) / 2**20
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step(x, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times), act


def fits(label, n, amp, budget):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer = Trainer(label, amp)
        x, y = batch(n)
        trainer.step(x, y)
        trainer.step(x, y)
        torch.cuda.synchronize()
        ok = torch.cuda.max_memory_allocated() <= budget
    except torch.OutOfMemoryError:
        ok = False
    trainer = x = y = None
    torch.cuda.empty_cache()
    return ok


def largest_batch(label, amp, budget):
    lo, hi = 0, 8
    while fits(label, hi, amp, budget):
        lo, hi = hi, hi * 2
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if fits(label, mid, amp, budget) else (lo, mid)
    return lo


def main():
    args = parse_args()
    assert torch.cuda.is_available(), "this benchmark measures CUDA memory and time"
    title = header(torch.cuda.get_device_name(), f"timm {timm.__version__}", f"amp {args.amp}")
    print(f"# {title}")
    rows = []
    for label in args.models.split(","):
        trainer = Trainer(label, args.amp)
        for n in map(int, args.batches.split(",")):
            ips, act = throughput(trainer, n, args.steps)
            rows.append({"model": label, "params_M": trainer.params / 1e6, "batch": n, "img_per_s": ips,
                         "act_MiB": act})
            print(rows[-1], flush=True)
        del trainer
        torch.cuda.empty_cache()
    print("\n| model | params (M) | batch | img/s | activation MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_M']:.1f} | {r['batch']} | {r['img_per_s']:.0f} | {r['act_MiB']:.0f} |")
    by = {(r["model"], r["batch"]): r for r in rows}
    labels = args.models.split(",")
    for n in map(int, args.batches.split(",")):
        if {"revcol_vit_s", "revcol_vit_s plain", "vit_small_patch16_224"} <= set(labels):
            plain, vit = by["revcol_vit_s plain", n], by["vit_small_patch16_224", n]
            for label in ("revcol_vit_s", "revcol_vit_s compiled"):
                if label in labels:
                    rev = by[label, n]
                    print(f"batch {n}, {label}: step time vs plain {plain['img_per_s'] / rev['img_per_s']:.2f}; "
                          f"against vit_small: throughput {rev['img_per_s'] / vit['img_per_s']:.2f}, "
                          f"activation memory {rev['act_MiB'] / vit['act_MiB']:.2f}")
    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    plot(rows, labels, out.with_suffix(".png"), title)
    budget = int(args.budget_gib * 2**30)
    for label in filter(None, args.budget_models.split(",")):
        print(f"largest batch within {args.budget_gib} GiB: {label} {largest_batch(label, args.amp, budget)}",
              flush=True)


def plot(rows, labels, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in labels:
        pts = [(r["batch"], r["img_per_s"], r["act_MiB"]) for r in rows if r["model"] == label]
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        b.plot([p[0] for p in pts], [p[2] / 1024 for p in pts], marker="o", label=label)
    a.set(xlabel="batch", ylabel="training img/s", xscale="log")
    b.set(xlabel="batch", ylabel="activation GiB", xscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
