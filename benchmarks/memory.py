"""Training memory and step time against the number of columns, reversible vs plain autograd.

Every column is the same RevCol-ViT-S column (dim 224, blocks (2, 2, 2, 2), 4 heads) over 196 tokens; a
run adds columns and measures, for one training step (forward + backward):
  saved    bytes autograd keeps for backward (any device),
  act      peak CUDA memory above what the step starts with (parameters and gradients), in MiB,
  step     median step time in ms (CUDA only).

    python benchmarks/memory.py                          # CPU: saved bytes only, small batch
    python benchmarks/memory.py --batch 64 --amp bf16    # GPU: all three, plus a PNG
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from common import header, print_table, write_csv

from revcol import isotropic_columns
from revcol.memory import count_saved_bytes


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--columns", default="1,2,4,8,16")
    p.add_argument("--dim", type=int, default=224)
    p.add_argument("--depths", default="2,2,2,2")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokens", type=int, default=196)
    p.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 2 on CPU")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (CUDA)")
    p.add_argument("--out", default="benchmarks/results/memory", help="prefix for the .csv and .png")
    return p.parse_args()


def measure(num_columns, reversible, args, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous configuration's blocks
    torch.manual_seed(0)
    model = isotropic_columns(args.dim, [int(d) for d in args.depths.split(",")], num_columns, args.heads,
                              reversible=reversible).to(device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp),
                              enabled=args.amp != "none")

    def step():
        with autocast:
            loss = model(x)[-1].float().mean()
        loss.backward()

    with count_saved_bytes() as saved, autocast:
        model(x)[-1].float().mean()
    row = {"columns": num_columns, "mode": "reversible" if reversible else "plain", "saved_MiB": saved.bytes / 2**20}
    if device.type == "cuda":
        step()  # warm-up; allocates the gradients, which the measured step then starts with
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["act_MiB"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row["step_ms"] = 1e3 * statistics.median(times)
    return row


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "act_MiB" if "act_MiB" in rows[0] else "saved_MiB"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mode in ("plain", "reversible"):
        pts = [(r["columns"], r[key]) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("columns")
    ax.set_ylabel("peak activation MiB" if key == "act_MiB" else "saved for backward, MiB")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (64 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = [measure(n, rev, args, device) for n in map(int, args.columns.split(",")) for rev in (True, False)]
    title = header(name) + f"\namp {args.amp}, batch {args.batch}, dim {args.dim}, depths {args.depths}"
    print("# " + title.replace("\n", ", "))
    print_table(rows)
    by = {(r["columns"], r["mode"]): r for r in rows}
    counts = sorted({r["columns"] for r in rows})
    key = "act_MiB" if device.type == "cuda" else "saved_MiB"
    for mode in ("reversible", "plain"):
        print(f"{mode}: {key} at {counts[-1]} columns / at {counts[1]} columns = "
              f"{by[counts[-1], mode][key] / by[counts[1], mode][key]:.3f}")
    if device.type == "cuda":
        ratios = [by[n, "reversible"]["step_ms"] / by[n, "plain"]["step_ms"] for n in counts]
        print("step time reversible / plain: " + ", ".join(f"{n} col {r:.2f}" for n, r in zip(counts, ratios)))
    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    plot(rows, out.with_suffix(".png"), title)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
