"""Cosine attention's q/k normalization: the textbook ``F.normalize`` against ``rms_norm`` (ours).

q and k of one RevCol-ViT-S attention (batch 64, 4 heads, 196 tokens, head dim 56), bf16 autocast:
  CUDA fwd kernels  non-view ATen ops dispatched for CUDA tensors (fake tensors: no GPU needed)
  CUDA saved MiB    what autograd keeps for backward, counted the same way
  CPU bwd ops       non-view ATen ops of the backward on CPU (on CUDA, rms_norm's backward is one kernel)
  CPU ms            forward + backward on this machine's CPU, median of 20
  CPU saved MiB     what autograd keeps on CPU, where rms_norm is not fused and keeps float32 pieces
  logit error       max |q . k - temperature * cos(q, k)| in float32, against float64
The CUDA backward cannot be dispatched without a GPU (the autograd engine needs the device); the script
prints whether the installed torch has one CUDA kernel for rms_norm's backward.

    python benchmarks/cosine_attention.py     # half a minute on CPU
"""
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F
from op_counts import VIEW_OPS, OpCounter  # the ATen op counter of the script beside this one
from torch._subclasses.fake_tensor import FakeTensorMode

from revcol import count_saved_bytes
from revcol.isotropic import LOGIT_SCALE_MAX, CosineAttention

SHAPE = (64, 4, 196, 56)


def textbook(attn, q, k):
    scale = attn.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    return F.normalize(q, dim=-1, eps=1e-6) * scale.to(q.dtype), F.normalize(k, dim=-1, eps=1e-6)


VARIANTS = {"F.normalize": textbook, "rms_norm (ours)": lambda attn, q, k: attn.normalize_qk(q, k)}


def inputs(device, dtype=torch.bfloat16, shape=SHAPE):
    torch.manual_seed(0)
    with torch.device(device):
        attn = CosineAttention(shape[1] * shape[3], shape[1])
        q, k = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(2))
    return attn, q, k


def cuda_forward(variant):
    with FakeTensorMode(allow_non_fake_inputs=True):
        attn, q, k = inputs("cuda")
        # torch.autocast("cuda") turns itself off on a machine without CUDA; the fake tensors need it on.
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.set_autocast_enabled("cuda", True)
        try:
            with OpCounter() as counter, count_saved_bytes() as saved:
                variant(attn, q, k)
        finally:
            torch.set_autocast_enabled("cuda", False)
    # "device" is a query the fake tensors answer, not an op a GPU runs.
    kernels = sum(n for name, n in counter.ops.items() if name not in VIEW_OPS and name != "device")
    return kernels, saved.bytes / 2**20


def cpu_step(variant):
    attn, q, k = inputs("cpu")
    grads = torch.randn_like(q), torch.randn_like(k)
    times = []
    for _ in range(23):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16), count_saved_bytes() as saved:
            out = variant(attn, q, k)
        with OpCounter() as counter:
            torch.autograd.backward(out, grads)
        times.append(time.perf_counter() - start)
    backward_ops = sum(n for name, n in counter.ops.items() if name not in VIEW_OPS)
    return backward_ops, 1000 * statistics.median(times[3:]), saved.bytes / 2**20


def logit_error(variant):
    attn, q, k = inputs("cpu", torch.float32, (4, 4, 196, 56))
    with torch.no_grad():
        qn, kn = variant(attn, q, k)
        cos = F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).transpose(-2, -1)
        want = cos * attn.logit_scale.double().clamp(max=LOGIT_SCALE_MAX).exp()
        return ((qn @ kn.transpose(-2, -1)).double() - want).abs().max().item()


def main():
    torch.set_num_threads(2)
    print(f"# {date.today()}, torch {torch.__version__}: q/k normalization of cosine attention, "
          f"shape {SHAPE}, bf16 autocast")
    print("| normalization | CUDA fwd kernels | CUDA saved MiB | CPU bwd ops | CPU ms | CPU saved MiB | logit error |")
    print("|---|---|---|---|---|---|---|")
    for name, variant in VARIANTS.items():
        kernels, cuda_saved = cuda_forward(variant)
        backward_ops, ms, cpu_saved = cpu_step(variant)
        print(f"| {name} | {kernels} | {cuda_saved:.1f} | {backward_ops} | {ms:.1f} | {cpu_saved:.1f} "
              f"| {logit_error(variant):.1e} |")
    fused = torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_rms_norm_backward", "CUDA")
    print(f"one CUDA kernel for rms_norm's backward in this torch: {fused}")


if __name__ == "__main__":
    main()
