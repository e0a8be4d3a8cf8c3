"""``benchmark.py throughput``: RevCol-ViT against timm's ViT, training img/s and activation memory (CUDA).

One training step is forward + backward + fused AdamW step under autocast, on 224x224 inputs. For each batch size:
  img/s    median over timed steps,
  act MiB  peak CUDA memory above what the step starts with (parameters, gradients, optimizer state).
The largest batch in a memory budget is ``benchmark.py memory --mode vit-budget``.
"""
from pathlib import Path

import torch
from common import AMP_DTYPES, create_vit, median_seconds, peak_bytes, plot_lines, write_csv


class Trainer:
    def __init__(self, label, amp):
        self.model = create_vit(label, num_classes=1000).cuda().train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.dtype = AMP_DTYPES[amp]
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


def throughput(trainer, n, steps, device):
    """(img/s, activation MiB) at batch ``n``, after warm-up: kernels chosen (and compiled), gradients and
    optimizer state allocated."""
    x, y = batch(n)

    def step():
        trainer.step(x, y)

    step()
    step()
    act = peak_bytes(step, device) / 2**20  # its first run is the third warm-up step
    return n / median_seconds(step, device, steps), act


def run(args, device, title):
    rows = []
    labels = args.models.split(",")
    for label in labels:
        trainer = Trainer(label, args.amp)
        for n in map(int, args.batches.split(",")):
            ips, act = throughput(trainer, n, args.steps, device)
            rows.append({"model": label, "params_M": trainer.params / 1e6, "batch": n, "img_per_s": ips,
                         "act_MiB": act})
            print(rows[-1], flush=True)
        del trainer
        torch.cuda.empty_cache()
    print("\n| model | params (M) | batch | img/s | activation MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_M']:.1f} | {r['batch']} | {r['img_per_s']:.0f} | {r['act_MiB']:.0f} |")
    by = {(r["model"], r["batch"]): r for r in rows}
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
    plot_lines(rows, out.with_suffix(".png"), title, "batch", "model",
               [("img_per_s", "training img/s", 1), ("act_MiB", "activation GiB", 1024)])
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
