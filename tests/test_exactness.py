"""Reversible gradients equal plain autograd's to the bit (the float64 stream and the kept columns), and the
live gauge of reconstruction error."""
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from helpers import rel_error
from torch import nn

import revcol.columns
from revcol import ReversibleColumns, isotropic_columns
from revcol.testing import assert_reversible_matches_plain, gradients, set_gammas_, weighted_sum

DROPOUTS = dict(drop_path_rate=0.2, dropout=0.1, attn_dropout=0.1, activation_dropout=0.1)


def assert_bit_identical(model, stem, x, autocast=False):
    """Reversible and plain steps with dropout on give the same gradients (inputs, stem, columns, gammas) to the
    bit. The stem makes the columns' input a non-leaf, as in the products: autocast caches its cast of a leaf,
    and sums that leaf's gradients in bf16."""
    x = x.clone().requires_grad_()

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            states = model(stem(x))
        return weighted_sum(states)

    assert_reversible_matches_plain(nn.ModuleDict(dict(stem=stem, columns=model)), loss, [x])


def test_a_leaf_input_under_autocast_gets_a_slightly_different_gradient_and_a_stem_avoids_it():
    """Plain autograd under autocast sums a leaf input's gradient from its cached bf16 copy (in bf16); reversible
    mode sums it in float32. Every parameter's gradient still equals plain autograd's, and with a stem in front
    of the columns (as in both products) the input's too."""
    torch.manual_seed(0)
    model = isotropic_columns(16, [1, 1, 1, 1], 4, 2, **DROPOUTS)
    x = torch.randn(3, 8, 16)
    leaf = x.clone().requires_grad_()

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return weighted_sum(model(leaf))

    grads_r, grads_p = (gradients(model, loss, mode, [leaf]) for mode in (True, False))
    assert all(torch.equal(grads_r[name], g) for name, g in grads_p.items() if name != "input0")
    differs = rel_error(grads_r["input0"], grads_p["input0"])
    print(f"leaf input under bf16 autocast: relative difference of its gradient {differs:.2e}")
    assert 0 < differs < 1e-2
    assert_bit_identical(model, nn.Linear(16, 16), x, autocast=True)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("gammas", ["default", "driven_down"])
@pytest.mark.parametrize("num_columns", [2, 4, 8, 16, 20])
def test_reversible_gradients_are_bit_identical_to_plain_autograd(num_columns, gammas, autocast):
    torch.manual_seed(0)
    model = isotropic_columns(16, [1, 1, 1, 1], num_columns, 2, **DROPOUTS)  # gamma_init 0.5, the default
    if gammas == "driven_down":
        set_gammas_(model)
    stem = nn.Linear(16, 16)
    assert_bit_identical(model, stem, torch.randn(3, 8, 16), autocast)
    kept = model._kept_columns()
    if gammas == "default":  # 1 bit a rebuild: the 13th passes the 12 bits of the budget
        assert len(kept) == (1 if num_columns > 13 else 0), kept
    else:  # about 3.3 bits a rebuild at the smallest gammas: 3 rebuilds stay within the budget, 7 do not
        assert bool(kept) == (num_columns >= 8), kept
    assert model.reconstruction_error.error < 1e-12


@pytest.mark.slow  # compiles 16 levels: about 30 s on 2 cores
def test_compiled_levels_keep_the_rebuild_exact():
    # The reversible forward runs compiled levels as the recompute does, so both passes run the same kernels:
    # what the backward rebuilds is the forward's state, at 8 columns with gammas of 0.1 to 0.2.
    torch.manual_seed(0)
    compiled = set_gammas_(isotropic_columns(16, [1, 1, 1, 1], 8, 2, **DROPOUTS)).compile_levels()
    assert_bit_identical(compiled, nn.Linear(16, 16), torch.randn(3, 8, 16))
    assert compiled.reconstruction_error.error < 1e-12


class Perturbed(nn.Module):
    """A level whose recompute differs from its forward by a relative ``eps``, like a kernel that is not
    deterministic; it ignores its higher input, so each level's rebuild error stands alone."""

    def __init__(self, dim, eps):
        super().__init__()
        self.linear, self.eps = nn.Linear(dim, dim), eps

    def forward(self, low, high):
        y = torch.tanh(self.linear(low))
        return y * (1 + self.eps) if torch.is_grad_enabled() else y


def perturbed_columns(num_columns, eps, **kwargs):
    return ReversibleColumns([[Perturbed(8, eps) for _ in range(3)] for _ in range(num_columns)], [(8,)] * 3,
                             **kwargs)


def test_reconstruction_error_agrees_with_a_direct_computation():
    torch.manual_seed(0)
    model = perturbed_columns(2, 1e-6)
    x = torch.randn(4, 8)
    assert model.reconstruction_error is None
    model(x)[-1].sum().backward()
    got = model.reconstruction_error
    # Column 1 is the last (kept exact): its recompute y' = (1 + eps) y rebuilds column 0 as (x^1 - y') / gamma.
    with torch.no_grad():
        col0 = model.columns[0](x, None, {})
        col1 = model.columns[1](x, col0, {})
        errors = []
        for l in range(3):
            low, high = model.columns[1].inputs(l, x, col1, col0)
            with torch.enable_grad():  # perturbed as in the recompute, in float32
                y = model.columns[1].f(l, low, high, {}, x.dtype)
            rebuilt = (col1[l] - y) / model.columns[1].gammas[l].double()
            errors.append(((rebuilt - col0[l]).abs().max() / col0[l].abs().max()).item())
    level = max(range(3), key=errors.__getitem__)
    assert (got.column, got.level) == (0, level)
    assert got.error == pytest.approx(errors[level], rel=1e-6)
    assert got.error > 1e-7


@contextmanager
def no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_an_ill_conditioned_model_warns_once_naming_column_and_level_and_the_fixes():
    torch.manual_seed(0)
    model = perturbed_columns(3, 1e-3)
    model(torch.randn(4, 8))[-1].sum().backward()
    with pytest.warns(UserWarning) as record:
        got = model.reconstruction_error
    assert got.error > 1e-4
    message = str(record[0].message)
    assert f"column {got.column}, level {got.level} is {got.error:.1e} off" in message
    for fix in ("deterministic level kernels", "rebuild_budget_bits", "gamma_init", "reversible=False"):
        assert fix in message
    model(torch.randn(4, 8))[-1].sum().backward()
    with no_warning():
        assert model.reconstruction_error.error > 1e-4  # once per model
    torch.manual_seed(0)
    healthy = perturbed_columns(3, 0.0)
    healthy(torch.randn(4, 8))[-1].sum().backward()
    with no_warning():
        assert healthy.reconstruction_error.error == 0.0


class BreaksInRecompute(nn.Module):
    """Doubles its lower input; the recompute (which runs with grad) adds ``offset``, so that the rebuild is off."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, low, high):
        y = 2 * self.weight * low
        return y + self.offset if torch.is_grad_enabled() else y


@pytest.mark.parametrize("offset, error", [(math.nan, "nan"), (math.inf, "inf")])
def test_a_non_finite_rebuild_error_warns_and_is_reported_as_it_is(offset, error):
    model = ReversibleColumns([[BreaksInRecompute(offset) for _ in range(2)] for _ in range(2)], [(4,)] * 2)
    model(torch.randn(3, 4))[-1].sum().backward()
    with pytest.warns(UserWarning, match=rf"column 0, level \d is {error} off the forward's"):
        got = model.reconstruction_error
    assert str(got.error) == error


def test_reconstruction_hooks_run_after_each_backward_until_removed():
    torch.manual_seed(0)
    model = perturbed_columns(3, 1e-6)
    seen = []
    handle = model.register_reconstruction_hook(lambda columns, error: seen.append((columns.reconstruction_error,
                                                                                   error)))
    model(torch.randn(4, 8))[-1].sum().backward()
    model(torch.randn(4, 8))[-1].sum().backward()
    assert len(seen) == 2 and all(0 < r.error < 1e-4 for r, _ in seen)
    assert all(isinstance(error, torch.Tensor) and error.float().item() == r.error for r, error in seen)
    handle.remove()
    model(torch.randn(4, 8))[-1].sum().backward()
    assert len(seen) == 2


@pytest.mark.parametrize("num_columns,gamma,budget,kept", [
    (13, 0.5, 12, set()),      # 12 rebuilds at 1 bit each: within the budget
    (14, 0.5, 12, {0}),        # the 13th rebuild passes it: column 0 is kept
    (20, 0.5, 12, {6}),
    (8, 0.1, 12, {3}),         # log2(10) = 3.3 bits a rebuild: 4 of them pass 12 bits
    (4, 0.5, 0, {0, 1, 2}),    # budget 0: every column is kept
    (4, 2.0, 0, set()),        # |gamma| > 1 shrinks errors: nothing to keep
])
def test_columns_are_kept_where_the_rebuild_would_pass_the_budget(num_columns, gamma, budget, kept):
    model = perturbed_columns(num_columns, 0.0, gamma_init=gamma, rebuild_budget_bits=budget)
    assert model._kept_columns() == kept


def test_kept_columns_restart_the_rebuild_from_exact_states():
    # With the perturbed recompute, the rebuild drifts; a kept column resets it, and backward measures there.
    torch.manual_seed(0)
    errors = {}
    for budget in (12, 0):
        torch.manual_seed(0)
        model = perturbed_columns(4, 1e-6, gamma_init=0.3, rebuild_budget_bits=budget)
        model(torch.randn(4, 8))[-1].sum().backward()
        errors[budget] = model.reconstruction_error
    assert errors[0].error < errors[12].error / 2, errors


def test_the_cast_bits_give_the_recompute_the_forwards_inputs_where_a_rebuilt_state_rounds_the_other_way(
        monkeypatch):
    # Gammas of 0.3-0.4 over 11 rebuilt columns (the budget lifted so that none is kept) magnify the float64
    # rebuild's rounding to about 1e-11: a few rebuilt states then cast to a float32 one ulp off the forward's.
    # Without the last bits of the forward's casts, the recompute computes another F from there and the
    # gradients differ; with them, they are plain autograd's to the bit.
    torch.manual_seed(1)
    model = isotropic_columns(16, [1, 1, 1, 1], 12, 2)
    model.rebuild_budget_bits = 60
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for column in model.columns[1:]:
            for gamma in column.gammas:
                gamma.copy_(0.3 + 0.1 * torch.rand(gamma.shape, generator=generator))
    stem, x = nn.Linear(16, 16), torch.randn(2, 16, 16)
    assert_bit_identical(model, stem, x)

    record = revcol.columns._Tape.record  # as if the levels computed in float64: no bits kept
    monkeypatch.setattr(revcol.columns._Tape, "record",
                        lambda tape, c, states, dtype: record(tape, c, states, torch.float64))
    both = nn.ModuleDict(dict(stem=stem, columns=model))
    x = x.clone().requires_grad_()
    grads_r, grads_p = (gradients(both, lambda: weighted_sum(model(stem(x))), mode, [x]) for mode in (True, False))
    assert not all(torch.equal(grads_r[name], g) for name, g in grads_p.items())
