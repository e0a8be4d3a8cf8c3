"""``benchmark.py memory --mode MODE``: what a training step keeps and peaks at, one mode per question.

  columns          against the number of columns, identical RevCol-ViT-S columns (dim 224, blocks (2, 2, 2, 2),
                   4 heads) over 196 tokens, reversible and plain: bytes autograd keeps for backward (any
                   device); on CUDA also the peak above what the step starts with and the median step time.
  vit-cpu          the peak of a whole ViT training step (forward, backward, AdamW) on CPU, counted tensor by
                   tensor with CUDA's LayerNorm and ``rms_norm`` (``as_on_cuda``): at two batch sizes, whose slope
                   is the cost per image and whose intercept the batch-independent part; from those, the largest
                   batch in a memory budget next to the model's own state. It sees no allocator rounding or
                   workspaces: at commit b8be557 it estimated the largest-batch ratio at 3.40x where the H200
                   measured 3.25x.
  vit-budget       CUDA: the largest batch each model trains with inside a memory budget, counting everything
                   the step allocates (doubling, then bisection to a multiple of 8).
  fairseq-encoder  the RevCol-Transformer encoder: bytes it keeps for backward (paper width: d 768, ffn 3072,
                   12 heads, blocks 1,1,1,1; 8 x 64 tokens, float32) at 4 and 8 columns, reversible and plain
                   (plain counts include the weights that ops save a reference to); and the peak of one whole
                   training step (encoder, decoder, loss, backward; paper width, 32 x 32 tokens), float32 and
                   under bf16 autocast, above the parameters and their gradients, and in float32 with the
                   encoder's keep_top_graph on, which the encoder leaves off.
  stream           (any device) what the float64 stream costs against a stream in the levels' dtype
                   (``bench_numerics.stream``): bytes kept for backward, the peak of a training step and the
                   median step time of RevCol-ViT-S columns (bf16 autocast), the two streams' steps alternating.
"""
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from common import autocast, create_vit, median_seconds, peak_bytes, plot_lines, print_table, seconds, write_csv

import revcol.columns
from revcol import isotropic_columns
from revcol.memory import count_saved_bytes

PAIRS = [("revcol_vit_s", "vit_small_patch16_224"), ("revcol_vit_s", "revcol_vit_s plain"),
         ("revcol_vit_b", "vit_base_patch16_224")]


# --- columns ---------------------------------------------------------------------------------------------------

def measure_columns(num_columns, reversible, args, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous configuration's blocks
    torch.manual_seed(0)
    model = isotropic_columns(args.dim, [int(d) for d in args.depths.split(",")], num_columns, args.heads,
                              reversible=reversible).to(device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=device, requires_grad=True)

    def step():
        with autocast(device, args.amp):
            loss = model(x)[-1].float().mean()
        loss.backward()

    with count_saved_bytes() as saved, autocast(device, args.amp):
        model(x)[-1].float().mean()
    row = {"columns": num_columns, "mode": "reversible" if reversible else "plain", "saved_MiB": saved.bytes / 2**20}
    if device.type == "cuda":
        row["act_MiB"] = peak_bytes(step, device) / 2**20
        row["step_ms"] = 1e3 * median_seconds(step, device, args.steps)
    return row


def columns(args, device, title):
    rows = []
    for n in map(int, args.columns.split(",")):
        for reversible in (True, False):
            rows.append(measure_columns(n, reversible, args, device))
            print(rows[-1], flush=True)
    print_table(rows)
    by = {(r["columns"], r["mode"]): r for r in rows}
    counts = sorted({r["columns"] for r in rows})
    key = "act_MiB" if device.type == "cuda" else "saved_MiB"
    base = counts[1] if len(counts) > 1 else counts[0]  # the first column count with a previous column to rebuild
    for mode in ("reversible", "plain"):
        print(f"{mode}: {key} at {counts[-1]} columns / at {base} columns = "
              f"{by[counts[-1], mode][key] / by[base, mode][key]:.3f}")
    if device.type == "cuda":
        ratios = [by[n, "reversible"]["step_ms"] / by[n, "plain"]["step_ms"] for n in counts]
        print("step time reversible / plain: " + ", ".join(f"{n} col {r:.2f}" for n, r in zip(counts, ratios)))
    ylabel = "peak activation MiB" if key == "act_MiB" else "saved for backward, MiB"
    title += f"\namp {args.amp}, batch {args.batch}, dim {args.dim}, depths {args.depths}"
    return rows, lambda path: plot_lines(rows, path, title, "columns", "mode", [(key, ylabel, 1)], xbase=2)


# --- vit-cpu ---------------------------------------------------------------------------------------------------

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


def step_peak(model, optimizer, batch, amp, device):
    """(peak bytes of one training step, bytes of the model's state: parameters, gradients, AdamW moments)."""
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))

    def step():
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def state():
        return [*model.parameters(), *(p.grad for p in model.parameters()),
                *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]

    peak = peak_bytes(step, device, keep=lambda: [*state(), x, y])
    return peak, sum(t.untyped_storage().nbytes() for t in state())


def vit_cpu(args, device, title):
    small, large = map(int, args.batches.split(","))
    budget = args.budget_gib * 2**30
    rows = []
    for label in args.models.split(","):
        model = create_vit(label, num_classes=1000).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with as_on_cuda():
            (peak_small, state), (peak_large, _) = (step_peak(model, optimizer, n, args.amp, device)
                                                    for n in (small, large))
        per_image = (peak_large - peak_small) / (large - small)
        fixed = peak_small - small * per_image
        rows.append({"model": label, f"peak_MiB_b{small}": peak_small / 2**20, f"peak_MiB_b{large}": peak_large / 2**20,
                     "MiB_per_image": per_image / 2**20, "intercept_MiB": fixed / 2**20, "state_MiB": state / 2**20,
                     "largest_batch": int((budget - state - fixed) // per_image)})
        print(rows[-1], flush=True)
    print_table(rows)
    by = {r["model"]: r for r in rows}
    for a, b in PAIRS:
        if a in by and b in by:
            print(f"{a} / {b}: activation per image {by[a]['MiB_per_image'] / by[b]['MiB_per_image']:.3f}, "
                  f"peak at batch {large} {by[a][f'peak_MiB_b{large}'] / by[b][f'peak_MiB_b{large}']:.3f}, "
                  f"largest batch in {args.budget_gib:g} GiB {by[a]['largest_batch'] / by[b]['largest_batch']:.2f}x")
    return rows, None


# --- vit-budget ------------------------------------------------------------------------------------------------

def fits(label, n, amp, budget):
    from bench_throughput import Trainer, batch
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


def vit_budget(args, device, title):
    rows = []
    for label in args.models.split(","):
        rows.append({"model": label, "budget_GiB": args.budget_gib,
                     "largest_batch": largest_batch(label, args.amp, int(args.budget_gib * 2**30))})
        print(f"largest batch within {args.budget_gib} GiB: {label} {rows[-1]['largest_batch']}", flush=True)
    return rows, None


# --- fairseq-encoder -------------------------------------------------------------------------------------------

def encoder_saved_mib(columns, reversible):
    from bench_fairseq import build
    flags = ["--revcol-columns", str(columns)] + ([] if reversible else ["--no-revcol-reversible"])
    encoder = build("revcol_transformer", *flags).encoder
    src = torch.randint(4, 1000, (8, 64))
    with count_saved_bytes() as saved:
        encoder(src, torch.full((8,), 64))
    return saved.bytes / 2**20


def translation_step_peak_mib(amp, device, keep_top_graph=False):
    from bench_fairseq import build
    model = build("revcol_transformer").train()
    model.encoder.revcol.keep_top_graph = keep_top_graph
    src, prev = torch.randint(4, 1000, (2, 32, 32), generator=torch.Generator().manual_seed(1))

    def step():
        with autocast(device, amp):
            logits, _ = model(src, torch.full((32,), 32), prev)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), prev.flatten())
        loss.backward()

    return peak_bytes(step, device, keep=model.parameters) / 2**20


def fairseq_encoder(args, device, title):
    print("| columns | reversible MiB | plain MiB |\n|---|---|---|")
    for n in (4, 8):
        print(f"| {n} | {encoder_saved_mib(n, True):.1f} | {encoder_saved_mib(n, False):.0f} |", flush=True)
    print("\n| training step | peak MiB |\n|---|---|")
    print(f"| float32 | {translation_step_peak_mib('none', device):.1f} |", flush=True)
    print(f"| float32, keep_top_graph | {translation_step_peak_mib('none', device, keep_top_graph=True):.1f} |",
          flush=True)
    print(f"| bf16 autocast | {translation_step_peak_mib('bf16', device):.1f} |")
    return None, None


# --- stream ----------------------------------------------------------------------------------------------------

def stream_cost(args, device, title):
    from bench_numerics import COST_STREAMS, stream
    print(f"RevCol-ViT-S columns (dim 224, blocks (2, 2, 2, 2)), batch {args.batch} x 196 tokens, {args.amp} "
          f"autocast, reversible; steps of the two streams alternate, median of {args.steps} each\n")
    print("| columns | stream | kept columns | saved MiB | peak MiB | step ms |\n|---|---|---|---|---|---|")
    for n in map(int, args.columns.split(",")):
        runs = {}
        for name in COST_STREAMS:
            with stream(name):
                torch.manual_seed(0)
                model = isotropic_columns(224, [2, 2, 2, 2], n, 4, drop_path_rate=0.1).to(device)
                model.rebuild_budget_bits = revcol.columns.REBUILD_BUDGET_BITS
                x = torch.randn(args.batch, 196, 224, requires_grad=True, device=device)

                def step(model=model, x=x):
                    with autocast(device, args.amp):
                        out = model(x)[-1]
                    out.float().mean().backward()

                peak = peak_bytes(step, device, keep=lambda model=model, x=x: [x, *model.parameters()])
                with count_saved_bytes() as saved, autocast(device, args.amp):
                    model(x)
                runs[name] = dict(step=step, kept=len(model._kept_columns()), saved=saved.bytes, peak=peak, times=[])
        for _ in range(args.steps):  # alternating, so that a busy moment of the machine falls on both
            for name in COST_STREAMS:
                with stream(name):
                    runs[name]["times"].append(seconds(runs[name]["step"], device))
        for name, r in runs.items():
            ms = f"{1e3 * statistics.median(r['times']):.0f}" if r["times"] else "-"
            print(f"| {n} | {name} | {r['kept']} | {r['saved'] / 2**20:.1f} | {r['peak'] / 2**20:.1f} | {ms} |",
                  flush=True)
    return None, None


MODES = {"columns": columns, "vit-cpu": vit_cpu, "vit-budget": vit_budget, "fairseq-encoder": fairseq_encoder,
         "stream": stream_cost}
CUDA_ONLY = {"vit-budget"}
CPU_ONLY = {"vit-cpu", "fairseq-encoder"}  # CPU stand-ins for CUDA figures, counted tensor by tensor


def run(args, device, title):
    """Runs the mode; writes ``--out``.csv (and .png) for the modes that return rows."""
    rows, plot = MODES[args.mode](args, device, title)
    if rows and args.out:
        out = Path(args.out)
        write_csv(rows, out.with_suffix(".csv"))
        written = [out.with_suffix(".csv")]
        if plot:
            plot(out.with_suffix(".png"))
            written.append(out.with_suffix(".png"))
        print("wrote " + " and ".join(map(str, written)))

