"""CUDA paths of the core: CUDA dropout replay, fp16/bf16 autocast recompute. Skipped without a GPU.

Compiled levels on CUDA (Inductor and Triton) are tested in test_compile.py, on CPU and CUDA alike."""
import pytest
import torch
from helpers import rel_error

from revcol import isotropic_columns

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def step(model, x, reversible, seed, dtype=None, **context):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        states = model(x, **context)
    loss = sum((s.float() * torch.linspace(-1, 1, s.numel(), device=s.device).view_as(s)).sum() for s in states)
    loss.backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("keep_top_graph", [False, True])
def test_cuda_dropout_is_replayed_float64(keep_top_graph):
    torch.manual_seed(0)
    model = isotropic_columns(32, [1, 1, 1, 1], 4, 4, drop_path_rate=0.3, dropout=0.2, attn_dropout=0.2,
                              keep_top_graph=keep_top_graph).cuda().double()
    x = torch.randn(4, 9, 32, device="cuda", dtype=torch.float64)
    mask = torch.zeros(4, 9, dtype=torch.bool, device="cuda")
    mask[2, 6:] = True
    rev, plain = (step(model, x, reversible, 0, key_padding_mask=mask) for reversible in (True, False))
    assert rel_error(rev, plain) < 1e-10
    assert rel_error(step(model, x, True, 0), step(model, x, True, 1)) > 1e-3, "dropout must be active"


@pytest.mark.parametrize("keep_top_graph", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_costs_no_accuracy_beyond_half_precision(dtype, keep_top_graph):
    torch.manual_seed(0)
    model = isotropic_columns(64, [1, 1, 1, 1], 4, 4, dropout=0.1, gamma_init=1.0,
                              keep_top_graph=keep_top_graph).cuda()
    x = torch.randn(8, 16, 64, device="cuda")
    fp32 = step(model, x, False, 0)
    rev, plain = step(model, x, True, 0, dtype), step(model, x, False, 0, dtype)
    assert torch.isfinite(rev).all()
    # Half precision itself moves these gradients by percents (on CPU: fp16 1-2%, bf16 10-17%), so a fixed bound
    # on reversible against plain would test rounding luck. Rebuilding the states must add no error beyond half
    # precision's, and the reversible gradients must stay nearer the plain half-precision ones than those are to
    # float32 (a recompute under another precision would not). On CPU, over 12 seeds and both dtypes, the two
    # ratios were at most 1.03 and 0.46.
    half_error = rel_error(plain, fp32)
    assert rel_error(rev, fp32) < 1.1 * half_error
    assert rel_error(rev, plain) < 0.75 * half_error
