"""torch.compile of the level functions: reversible gradients stay exact, random ops included."""
import pytest
import torch
from helpers import rel_error
from torch._dynamo.testing import CompileCounterWithBackend

from revcol import isotropic_columns

pytestmark = [pytest.mark.slow,  # torch.compile: up to a minute per test on 2 cores
              pytest.mark.filterwarnings("ignore::UserWarning")]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
DROPOUTS = dict(drop_path_rate=0.3, dropout=0.1, attn_dropout=0.1, activation_dropout=0.1, gamma_init=1.0)


def gradients(model, x, reversible, mask, dtype=None):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(7)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        top = model(x, key_padding_mask=mask)[-1]
    (top.float() * torch.linspace(-1, 1, top.numel(), device=x.device).view_as(top)).sum().backward()
    return top.detach(), torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])


def eager_and_compiled(*args, **kwargs):
    """Two equal models, the second with compiled levels, and a counter of the graphs Inductor compiled for them:
    without it, a compile_levels() that compiled nothing would pass every comparison here."""
    eager = isotropic_columns(*args, **kwargs)
    compiled = isotropic_columns(*args, **kwargs)
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("inductor")
    return eager, compiled.compile_levels(backend=counter), counter


def assert_compiled_forward_and_recompute(counter):
    # The no-grad forward and the recompute under grad are separate graphs.
    assert counter.frame_count >= 2, f"the levels ran compiled {counter.frame_count} times"


def test_compiled_levels_with_dropout_and_drop_path_match_plain_autograd():
    # Inductor's own random kernels draw differently in the no-grad forward and in the recompute: with them
    # the reversible gradients were off by 120% (benchmarks/benchmark.py compile). The isotropic levels keep
    # their random ops eager.
    torch.manual_seed(0)
    eager, compiled, counter = eager_and_compiled(16, [1, 1, 1, 1], 3, 2, **DROPOUTS)
    x = torch.randn(2, 6, 16)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True

    out_plain, plain = gradients(eager, x, False, mask)
    out_rev, rev = gradients(compiled, x, True, mask)
    assert rel_error(rev, plain) < 1e-4
    assert rel_error(out_rev, out_plain) < 1e-5  # measured 1.9e-6: compiled float32
    torch.manual_seed(8)
    assert not torch.allclose(compiled(x, key_padding_mask=mask)[-1], out_rev), "dropout must be active"
    assert_compiled_forward_and_recompute(counter)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_levels_under_bf16_autocast_cost_no_accuracy_beyond_bf16(device):
    # Inductor (and on CUDA Triton) under autocast, across the eager random ops, in the no-grad forward and
    # the recompute. Compiled and eager round differently, so compiled bf16 is compared with float32 through
    # eager bf16's own error: on CPU, over 10 seeds, the ratio was 0.84-1.09 (rounding, not the rebuild), and
    # 7.7-9.0 with the dropout masks not replayed in the recompute.
    torch.manual_seed(0)
    eager, compiled, counter = eager_and_compiled(64, [1, 1, 1, 1], 3, 4, keep_top_graph=True, **DROPOUTS)
    eager, compiled = eager.to(device), compiled.to(device)
    x = torch.randn(4, 16, 64, device=device)
    mask = torch.zeros(4, 16, dtype=torch.bool, device=device)
    mask[2, 11:] = True
    _, fp32 = gradients(eager, x, False, mask)
    assert rel_error(gradients(compiled, x, True, mask)[1], fp32) < 1e-4
    _, eager_bf16 = gradients(eager, x, False, mask, torch.bfloat16)
    _, compiled_bf16 = gradients(compiled, x, True, mask, torch.bfloat16)
    assert torch.isfinite(compiled_bf16).all()
    assert rel_error(compiled_bf16, fp32) < 1.5 * rel_error(eager_bf16, fp32)
    assert_compiled_forward_and_recompute(counter)


def test_compiled_levels_follow_varying_sequence_lengths():
    # fairseq batches change length every step: the levels recompile once with dynamic shapes and must stay
    # right for every later length, in the reversible backward and in plain mode.
    torch.manual_seed(0)
    eager, compiled, counter = eager_and_compiled(16, [1, 1], 2, 2, gamma_init=1.0)
    for length in (8, 9, 11, 14):
        x = torch.randn(3, length, 16)
        mask = torch.zeros(3, length, dtype=torch.bool)
        mask[0, -2:] = True
        _, plain = gradients(eager, x, False, mask)
        for reversible in (True, False):
            _, got = gradients(compiled, x, reversible, mask)
            assert rel_error(got, plain) < 1e-4, (length, reversible)
    assert_compiled_forward_and_recompute(counter)


def test_whole_model_compile_gives_the_gradients_of_the_uncompiled_columns():
    # The reversible machinery is opaque to Dynamo, so both passes run the same levels: eager ones (the first
    # pair), or those compile_levels() compiled (the second); and the gradients are those of the model without
    # torch.compile, to the bit. Before, Dynamo compiled the levels in the no-grad forward only, and the
    # gradients were 24 times further from plain autograd's than the compiler's own rounding.
    torch.manual_seed(0)
    eager, levels_compiled, counter = eager_and_compiled(16, [1, 1, 1, 1], 3, 2, **DROPOUTS)
    x = torch.randn(2, 6, 16)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for model in (eager, levels_compiled):
        out_ref, ref = gradients(model, x, True, mask)
        out_whole, whole = gradients(torch.compile(model), x, True, mask)
        assert torch.equal(out_whole, out_ref) and torch.equal(whole, ref)
    assert_compiled_forward_and_recompute(counter)
    _, plain = gradients(eager, x, False, mask)
    assert rel_error(whole, plain) < 1e-4
