"""Peak activation memory of a training step, counted tensor by tensor: runs on CPU, no GPU needed.

For each model, one training step (forward, backward, AdamW step, under autocast unless ``--amp none``) runs
inside :class:`revcol.memory.PeakBytes`, which adds up the tensors the step creates until each is freed, leaving out
what the step starts with (parameters, gradients, optimizer state, the batch). Two batch sizes give the cost
per image (the slope) and the batch-independent part (the intercept: autocast's weight copies, parameter
gradients in flight). From those, the largest batch that fits a memory budget next to the model's own
state (parameters, gradients and AdamW moments).

This is the CPU stand-in for the CUDA figures of ``vit_throughput.py``. Two ops run differently on CPU, and
the step runs them as CUDA does (:func:`as_on_cuda`): CUDA autocast runs LayerNorm in float32, where CPU
autocast keeps it in bf16, and CUDA's ``rms_norm`` is one kernel that keeps its input and the inverse RMS,
where CPU's is a chain of float32 ops whose pieces autograd keeps. It sees no allocator rounding or
workspaces: at commit b8be557 it estimated the largest-batch ratio at 3.40x where the H200 measured 3.25x.

    python benchmarks/activation_memory.py                  # about 10 minutes on 2 CPU cores
"""
import argparse
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from common import VIT_MODELS, header, print_table, write_csv

import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)
from revcol.memory import PeakBytes

PAIRS = [("revcol_vit_s", "vit_small_patch16_224"), ("revcol_vit_s", "revcol_vit_s plain"),
         ("revcol_vit_b", "vit_base_patch16_224")]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(VIT_MODELS))
    p.add_argument("--batches", default="8,16", help="two batch sizes: the slope gives the cost per image")
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    p.add_argument("--budget-gib", type=float, default=16.0)
    p.add_argument("--out", default="benchmarks/results/activation_memory_cpu")
    return p.parse_args()


class _FusedRmsNorm(torch.autograd.Function):
    """``rms_norm`` without weight as CUDA's kernel runs it: computed in float32, returned in the input's dtype,
    keeping the input and the float32 inverse RMS for backward."""

    @staticmethod
    def forward(ctx, x, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd)
        return (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd = ctx.saved_tensors
        y, grad = x.float() * rstd, grad.float()
        return (rstd * (grad - y * (grad * y).mean(-1, keepdim=True))).to(x.dtype), None


@contextmanager
def as_on_cuda():
    """LayerNorm and rms_norm run, and keep for backward, what they would on CUDA under autocast."""
    layer_norm, rms_norm = F.layer_norm, F.rms_norm

    def layer_norm_float32(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled("cpu"):
            return layer_norm(x, shape, weight, bias, eps)
        with torch.autocast("cpu", enabled=False):  # CUDA autocast casts all three to float32
            return layer_norm(x.float(), shape, *(None if t is None else t.float() for t in (weight, bias)), eps)

    def fused_rms_norm(x, shape, weight=None, eps=None):
        assert weight is None and len(shape) == 1, "only the weightless last-dim rms_norm of the cosine attention"
        with torch.autocast("cpu", enabled=False):
            return _FusedRmsNorm.apply(x, torch.finfo(x.dtype).eps if eps is None else eps)

    F.layer_norm, F.rms_norm = layer_norm_float32, fused_rms_norm
    try:
        yield
    finally:
        F.layer_norm, F.rms_norm = layer_norm, rms_norm


def step_peak(model, optimizer, batch, amp):
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()  # allocates the gradients and the optimizer state, which the measured step starts with
    state = [*model.parameters(), *(p.grad for p in model.parameters()),
             *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
    with PeakBytes(ignore=[*state, x, y]) as peak:
        step()
    return peak.peak, sum(t.untyped_storage().nbytes() for t in state)


def main():
    args = parse_args()
    small, large = map(int, args.batches.split(","))
    budget = args.budget_gib * 2**30
    rows = []
    for label in args.models.split(","):
        name, kwargs = VIT_MODELS[label]
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=1000, **kwargs).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with as_on_cuda():
            (peak_small, state), (peak_large, _) = (step_peak(model, optimizer, n, args.amp) for n in (small, large))
        per_image = (peak_large - peak_small) / (large - small)
        fixed = peak_small - small * per_image
        rows.append({"model": label, f"peak_MiB_b{small}": peak_small / 2**20, f"peak_MiB_b{large}": peak_large / 2**20,
                     "MiB_per_image": per_image / 2**20, "intercept_MiB": fixed / 2**20, "state_MiB": state / 2**20,
                     "largest_batch": int((budget - state - fixed) // per_image)})
        print(rows[-1], flush=True)
    print(f"\n# {header('CPU with CUDA LayerNorm and rms_norm', f'timm {timm.__version__}', f'amp {args.amp}')}")
    print_table(rows)
    by = {r["model"]: r for r in rows}
    for a, b in PAIRS:
        if a in by and b in by:
            print(f"{a} / {b}: activation per image {by[a]['MiB_per_image'] / by[b]['MiB_per_image']:.3f}, "
                  f"peak at batch {large} {by[a][f'peak_MiB_b{large}'] / by[b][f'peak_MiB_b{large}']:.3f}, "
                  f"largest batch in {args.budget_gib:g} GiB {by[a]['largest_batch'] / by[b]['largest_batch']:.2f}x")
    out = Path(args.out).with_suffix(".csv")
    write_csv(rows, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
