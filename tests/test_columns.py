"""The reversible column core: exact gradients, reconstruction, flat memory, RNG replay, autocast, errors."""
import copy
import math
import re

import pytest
import torch
from helpers import rel_error
from torch import nn

import revcol.columns
from revcol import ReversibleColumns, check_gamma_init, clamp_gamma, isotropic_columns
from revcol.memory import PeakBytes, count_saved_bytes, note_kept_for_backward
from revcol.testing import assert_reversible_matches_plain, weighted_sum

WIDTHS = (6, 8, 10, 12)  # a different width per level: the unit does not need equal shapes across levels


class MixLevel(nn.Module):
    """A small non-isotropic level: low input of one width, high input of another, with dropout."""

    def __init__(self, low_dim, high_dim, dim, dropout):
        super().__init__()
        self.low = nn.Linear(low_dim, dim)
        self.high = nn.Linear(high_dim, dim) if high_dim else None
        self.drop = nn.Dropout(dropout)

    def forward(self, low, high, scale=1.0):
        x = self.low(low)
        if high is not None:
            x = x + self.high(high)
        return self.drop(torch.tanh(x)) * scale


def mix_columns(num_columns, dropout=0.0, gamma_init=0.5, reversible=True, stem_dim=5, keep_top_graph=False):
    columns = []
    for c in range(num_columns):
        levels = []
        for l, dim in enumerate(WIDTHS):
            low_dim = stem_dim if l == 0 else WIDTHS[l - 1]
            high_dim = WIDTHS[l + 1] if c > 0 and l < len(WIDTHS) - 1 else 0
            levels.append(MixLevel(low_dim, high_dim, dim, dropout))
        columns.append(levels)
    return ReversibleColumns(columns, [(w,) for w in WIDTHS], gamma_init=gamma_init, reversible=reversible,
                             keep_top_graph=keep_top_graph)


def vary_gammas_(model, seed=0):
    """Per-channel gammas of both signs, 0.3 <= |gamma| <= 1.5, instead of one constant: the inverse divides by
    each channel's own gamma, which a constant gamma cannot tell from a wrong one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gammas" in name:
                magnitude = 0.3 + 1.2 * torch.rand(p.shape, generator=generator, dtype=p.dtype)
                sign = torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
                p.copy_(magnitude * sign)
    return model


def weighted_loss(states):
    # Different weights per element so that every state's gradient is informative.
    return sum((s * torch.linspace(-1, 1, s.numel(), dtype=s.dtype).view_as(s)).sum() for s in states)


def grads_of(model, x, reversible, seed=0, **context):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    states = model(x, **context)
    weighted_loss(states).backward()
    return [s.detach() for s in states], x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_same_grads(model, x, tol, **context):
    out_r, gx_r, gp_r = grads_of(model, x, True, **context)
    out_p, gx_p, gp_p = grads_of(model, x, False, **context)
    for a, b in zip(out_r, out_p):
        assert torch.equal(a, b), "switching mode must not change the forward output"
    assert rel_error(gx_r, gx_p) < tol
    assert set(gp_r) == set(gp_p)
    for name in gp_p:
        assert gp_r[name] is not None, name
        assert rel_error(gp_r[name], gp_p[name]) < tol, (name, rel_error(gp_r[name], gp_p[name]))
    assert any("gammas" in name for name in gp_p)


@pytest.mark.parametrize("keep_top_graph", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float64_gradients_equal_plain_autograd(dropout, keep_top_graph):
    torch.manual_seed(0)
    model = vary_gammas_(mix_columns(4, dropout=dropout, keep_top_graph=keep_top_graph).double())
    assert_same_grads(model, torch.randn(3, 5, dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("keep_top_graph", [False, True])
def test_float64_isotropic_levels_with_dropout_drop_path_and_padding_mask(keep_top_graph):
    torch.manual_seed(0)
    model = isotropic_columns(16, [1, 2, 1, 1], 3, 4, drop_path_rate=0.3, dropout=0.1, attn_dropout=0.1,
                              keep_top_graph=keep_top_graph).double()
    vary_gammas_(model)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    assert_same_grads(model, torch.randn(2, 6, 16, dtype=torch.float64), 1e-10, key_padding_mask=mask)


def test_float32_gradients_equal_plain_autograd():
    # At the default gamma and with dropout: the float64 stream gives back the forward's float32 inputs.
    torch.manual_seed(0)
    model = mix_columns(4, dropout=0.2)
    x = torch.randn(3, 5, requires_grad=True)
    assert_reversible_matches_plain(model, lambda: weighted_sum(model(x)), [x])
    torch.manual_seed(0)
    model = isotropic_columns(16, [1, 1, 1, 1], 4, 2, drop_path_rate=0.2, dropout=0.1)
    x = torch.randn(2, 6, 16, requires_grad=True)
    assert_reversible_matches_plain(model, lambda: weighted_sum(model(x)), [x])


@pytest.mark.parametrize("keep_top_graph", [False, True])
@pytest.mark.parametrize("used", [(3,), (1,), (0, 2)])
def test_gradients_when_the_loss_uses_only_some_levels(used, keep_top_graph):
    # A classifier reads only the top level: the other levels of the last column get no gradient at all.
    torch.manual_seed(0)
    model = mix_columns(3, dropout=0.3, keep_top_graph=keep_top_graph).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    results = []
    for reversible in (True, False):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        torch.manual_seed(1)
        states = model(xr)
        weighted_loss([states[l] for l in used]).backward()
        results.append((xr.grad, {n: p.grad for n, p in model.named_parameters()}))
    (gx_r, gp_r), (gx_p, gp_p) = results
    assert rel_error(gx_r, gx_p) < 1e-10
    for name, g in gp_p.items():
        if g is None:  # levels above the highest used one, in the last column
            assert gp_r[name] is None, name
        else:
            assert rel_error(gp_r[name], g) < 1e-10, name
    assert any(g is None for g in gp_p.values()) == (max(used) < 3)


def test_dropout_actually_fires_and_is_replayed():
    # Without replay the recompute would draw new masks and the gradients would differ grossly.
    torch.manual_seed(0)
    model = mix_columns(3, dropout=0.5).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    out_a, _, _ = grads_of(model, x, True, seed=1)
    out_b, _, _ = grads_of(model, x, True, seed=2)
    assert not torch.equal(out_a[0], out_b[0]), "dropout must be active in training mode"
    assert_same_grads(model, x, 1e-10)


@pytest.mark.parametrize("keep_top_graph", [False, True])
def test_a_reversible_step_leaves_the_generator_where_plain_autograd_does(keep_top_graph):
    # The recompute replays the forward's masks on a fork of the generator: whatever draws come after the step
    # (the next step's masks, data shuffling) must not depend on the mode.
    torch.manual_seed(0)
    model = mix_columns(3, dropout=0.5, keep_top_graph=keep_top_graph).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    after = []
    for reversible in (True, False):
        grads_of(model, x, reversible, seed=1)
        after.append(torch.get_rng_state())
    assert torch.equal(*after)


@pytest.mark.parametrize("rebuild_budget_bits", [12, 0])  # none kept; every column kept
@pytest.mark.parametrize("shape", [(0, 6, 16), (2, 0, 16)], ids=["empty batch", "empty sequence"])
def test_an_empty_batch_or_sequence_gives_the_plain_outputs_and_gradients(shape, rebuild_budget_bits):
    torch.manual_seed(0)
    model = isotropic_columns(16, [1, 1, 1], 3, 4, keep_top_graph=True)
    model.rebuild_budget_bits = rebuild_budget_bits
    mask = torch.zeros(shape[:2], dtype=torch.bool)
    out_r, gx_r, gp_r = grads_of(model, torch.randn(shape), True, key_padding_mask=mask)
    out_p, gx_p, gp_p = grads_of(model, torch.randn(shape), False, key_padding_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(out_r, out_p)) and torch.equal(gx_r, gx_p)
    assert set(gp_r) == set(gp_p) and all(torch.equal(gp_r[n], gp_p[n]) for n in gp_p)
    assert model.reconstruction_error.error == 0.0


def test_negative_and_tiny_gammas_are_clamped_keeping_sign():
    g = torch.tensor([2.0, -0.5, 1e-5, -1e-5, 0.0])
    assert torch.equal(clamp_gamma(g), torch.tensor([2.0, -0.5, 1e-3, -1e-3, 1e-3]))
    torch.manual_seed(0)
    model = mix_columns(3).double()
    with torch.no_grad():
        model.columns[1].gammas[0].copy_(torch.linspace(-2, 2, WIDTHS[0]))
        model.columns[2].gammas[3].fill_(-1e-6)  # clamped to -1e-3: gradient through the clamp is zero
    assert_same_grads(model, torch.randn(3, 5, dtype=torch.float64), 1e-7)
    _, _, grads = grads_of(model, torch.randn(3, 5, dtype=torch.float64), True)
    assert torch.all(grads["columns.2.gammas.3"] == 0)


class Recorder(nn.Module):
    """Wraps a level and records the inputs of every call: forward calls, then the backward recompute."""

    def __init__(self, level, log):
        super().__init__()
        self.level, self.log = level, log

    def forward(self, low, high, **context):
        self.log.append((torch.is_grad_enabled(), low.detach().clone(),
                         None if high is None else high.detach().clone()))
        return self.level(low, high, **context)


def recorded_inputs(model, x):
    """For each level, the inputs seen in forward and those rebuilt for the backward recompute."""
    logs = {}
    for c, column in enumerate(model.columns):
        for l in range(len(column.levels)):
            logs[c, l] = []
            column.levels[l] = Recorder(column.levels[l], logs[c, l])
    model.reversible = True
    weighted_loss(model(x)).backward()
    return logs


@pytest.mark.parametrize("make,input_shape,dtype,tol", [
    # The paper's gamma (0.5): each inverse step divides rounding error by gamma, so it grows per column.
    (lambda: mix_columns(4), (3, 5), torch.float64, 1e-12),
    (lambda: isotropic_columns(16, [1, 1, 1, 1], 4, 4), (2, 7, 16), torch.float64, 1e-11),
    (lambda: isotropic_columns(16, [1, 1, 1, 1], 4, 4, keep_top_graph=True), (2, 7, 16), torch.float64, 1e-11),
    # gamma = 1: float32 stays accurate through 16 columns.
    (lambda: isotropic_columns(16, [1, 1, 1, 1], 16, 4, gamma_init=1.0), (2, 7, 16), torch.float32, 1e-4),
])
def test_reconstruction_matches_forward_activations(make, input_shape, dtype, tol):
    torch.manual_seed(0)
    model = make().to(dtype)
    logs = recorded_inputs(model, torch.randn(*input_shape, dtype=dtype))
    if model.keep_top_graph:
        top = (len(model.columns) - 1, model.num_levels - 1)
        assert [grad for grad, _, _ in logs.pop(top)] == [True], "the last column's top level keeps its graph"
    worst = 0.0
    for (c, l), calls in logs.items():
        assert [grad for grad, _, _ in calls] == [False, True], "one forward call, one recompute per level"
        (_, low_f, high_f), (_, low_b, high_b) = calls
        worst = max(worst, rel_error(low_b, low_f))
        if high_f is not None:
            worst = max(worst, rel_error(high_b, high_f))
    assert worst < tol


@pytest.mark.parametrize("keep_top_graph", [False, True])
@pytest.mark.parametrize("make,input_shape", [
    (lambda n, rev, keep: mix_columns(n, reversible=rev, keep_top_graph=keep), (2, 5)),
    (lambda n, rev, keep: isotropic_columns(16, [1, 1, 1, 1], n, 4, reversible=rev, keep_top_graph=keep), (2, 6, 16)),
])
def test_saved_memory_is_flat_in_columns_when_reversible_and_linear_when_plain(make, input_shape, keep_top_graph):
    def saved(n, rev):
        torch.manual_seed(0)
        model = make(n, rev, keep_top_graph)
        x = torch.randn(*input_shape)
        with count_saved_bytes() as counter:
            states = model(x)
        # The stem output, the last column's states in float64 (and those of each column kept for the rebuild),
        # a probe of PROBE_SIZE float64 values (or the whole state) of each of the first column's states, for
        # each rebuilt column one bit per element of its states (their casts' last bits), and with
        # keep_top_graph the graph of the top level.
        state64 = [s.double() for s in states]
        probe = [s.flatten()[:revcol.columns.PROBE_SIZE].clone() for s in state64]
        kept_columns = [[s.clone() for s in state64] for _ in (model._kept_columns() if rev else ())]
        rebuilt_columns = n - 1 - len(kept_columns) if rev else 0
        bits = [torch.zeros(-(-s.numel() // 8), dtype=torch.uint8) for _ in range(rebuilt_columns) for s in states]
        with count_saved_bytes() as expected:
            note_kept_for_backward([x, *state64, *probe, *sum(kept_columns, [])])
            if keep_top_graph:
                model.columns[-1].levels[-1](states[-2].detach().requires_grad_(), None)
        with count_saved_bytes() as bits_bytes:
            note_kept_for_backward(bits)
        float64_bytes = sum(s.numel() for s in states) * 8
        return counter.bytes - bits_bytes.bytes, expected.bytes, len(model._kept_columns()), bits_bytes.bytes, \
            float64_bytes

    rev = [saved(n, True) for n in (2, 4, 8, 16)]
    assert all(kept == expected for kept, expected, *_ in rev), rev
    # gamma 0.5 doubles the rebuild's error per column: 15 columns to rebuild pass the 12 bits of the budget.
    assert [n_kept for _, _, n_kept, _, _ in rev] == [0, 0, 0, 1]
    assert rev[0][0] == rev[1][0] == rev[2][0], rev
    # All that grows with the columns: per rebuilt column, 1/64 of its float64 states (up to a byte per state).
    num_levels, float64_bytes = len(WIDTHS), rev[0][4]
    for (_, _, _, bits, _), rebuilt in zip(rev, (1, 3, 7, 14)):
        assert float64_bytes / 64 <= bits / rebuilt < float64_bytes / 64 + num_levels, rev
    rev = [kept + bits for kept, _, _, bits, _ in rev]
    plain = [saved(n, False)[0] for n in (2, 4, 8, 16)]
    step = plain[1] - plain[0]  # two more columns
    assert step > 0
    assert plain[2] - plain[1] == 2 * step and plain[3] - plain[2] == 4 * step, plain
    assert rev[0] < plain[0]


def test_frozen_columns_keep_nothing_for_backward():
    # A frozen backbone under grad mode (training only a head, say): no backward will run, so nothing is kept
    # for it (keep_top_graph's top level, the last column's states, the probe).
    torch.manual_seed(0)
    model = mix_columns(3, keep_top_graph=True).requires_grad_(False)
    with count_saved_bytes() as saved:
        model(torch.randn(3, 5))
    assert saved.bytes == 0


def test_a_closed_saved_bytes_counter_stops_counting():
    torch.manual_seed(0)
    model = mix_columns(3)
    with count_saved_bytes() as saved:
        model(torch.randn(3, 5))
    counted = saved.bytes
    assert counted > 0
    model(torch.randn(3, 5))  # another reversible forward notes its outputs to the counters still open
    assert saved.bytes == counted


def test_reversible_forward_under_autocast_keeps_no_weight_copies():
    # Autocast caches the half-precision copy of every weight until its region ends. The reversible forward
    # runs without that cache: a decoder running after the columns (still inside the region) would
    # otherwise have every column's weight copies beside its own activations.
    torch.manual_seed(0)
    model = isotropic_columns(64, [1, 1], 3, 4)  # the weights dwarf the states
    x = torch.randn(2, 4, 64)
    with PeakBytes(ignore=[x, *model.parameters()]) as peak:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = model(x)
            live = peak.current
    # The outputs, the float64 states they were cast from (kept for backward), the first column's probe, and a
    # bit per element of the two rebuilt columns' states.
    outputs = sum(s.untyped_storage().nbytes() for s in states)
    assert live == outputs + 2 * outputs + 2 * outputs + 2 * outputs // 32, (live, outputs)


def test_backward_peak_memory_is_flat_in_columns_when_reversible():
    # The peak of live tensors over a whole training step (forward and backward), not only what is saved.
    def step_peak(num_columns, reversible):
        torch.manual_seed(0)
        model = isotropic_columns(32, [1, 2, 1, 1], num_columns, 4, drop_path_rate=0.2, reversible=reversible)
        x = torch.randn(2, 40, 32, requires_grad=True)
        model(x)[-1].sum().backward()  # allocates the gradients, which the measured step starts with
        with PeakBytes(ignore=[x, x.grad, *model.parameters(), *(p.grad for p in model.parameters())]) as peak:
            model(x)[-1].sum().backward()
        return peak.peak

    # From 4 columns on, each backward has the same work; up to 12, no column is kept for the rebuild. Each
    # rebuilt column adds only a bit per element of its states, 4 states of 2 x 40 x 32.
    rev = [step_peak(n, True) for n in (4, 8, 12)]
    plain = [step_peak(n, False) for n in (3, 6, 12)]
    assert rev[1] - rev[0] == rev[2] - rev[1] == 4 * 4 * 2 * 40 * 32 // 8, rev
    assert plain[2] > 3.5 * plain[0], plain
    assert rev[2] < plain[0], (rev, plain)


@pytest.mark.parametrize("autocast", [False, True])
def test_backward_holds_about_two_columns_of_states(autocast):
    # At the start of each level's recompute, the backward needs this column's states (rebuilt in place into
    # the previous column's), the previous column's gradients made so far, and a few more state-sized
    # tensors: the incoming gradient, the input's gradient and the output. It held up to 16 states here
    # (18.6 under autocast) while autograd kept every gradient it had handed a column until that column's
    # backward returned, and autocast's cache kept every recomputed level's inputs and their bf16 copies.
    # The states and their gradients are float64: each counts as two float32 states here.
    L = 4
    torch.manual_seed(0)
    model = isotropic_columns(8, [1] * L, 4, 2)
    x = torch.randn(16, 256, 8, requires_grad=True)  # states dwarf the parameters
    state_bytes = x.numel() * x.element_size()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)[-1]
        out.float().sum().backward()

    step()  # allocates the gradients, which the measured step starts with
    held = []
    with PeakBytes(ignore=[x, x.grad, *model.parameters(), *(p.grad for p in model.parameters())]) as peak:
        for column in model.columns:
            for level in column.levels:
                level.register_forward_pre_hook(
                    lambda *_: held.append(peak.current / state_bytes) if torch.is_grad_enabled() else None)
        step()
    assert len(held) == 4 * L
    assert max(held) < 2 * (2 * L + 4.5), held


@pytest.mark.parametrize("keep_top_graph", [False, True])
def test_backward_refuses_outputs_modified_in_place_and_a_second_run(keep_top_graph):
    # A float64 model's outputs are the stream states themselves, which backward rebuilds the columns from.
    torch.manual_seed(0)
    model = mix_columns(3, keep_top_graph=keep_top_graph).double()
    states = model(torch.randn(3, 5, dtype=torch.float64))
    with torch.no_grad():
        states[1].mul_(2)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        weighted_loss(states).backward()
    # A float32 model's outputs are copies: changing them changes nothing backward reads.
    model.float()
    x = torch.randn(3, 5)
    expected = grads_of(model, x, False)
    model.reversible = True
    model.zero_grad(set_to_none=True)
    states = model(x.clone().requires_grad_())
    with torch.no_grad():
        states[1].mul_(2)  # the loss is linear: its gradients do not depend on the values
    weighted_loss(states).backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[2][name]), name
    states = model(torch.randn(3, 5))
    weighted_loss(states).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        weighted_loss(states).backward()


def test_gradient_accumulation_sums_micro_batches():
    torch.manual_seed(0)
    model = mix_columns(3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    model.zero_grad()
    weighted_loss(model(x)).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in (x[:3], x[3:]):
        weighted_loss(model(part)).backward()
    # weighted_loss depends on the batch layout, so compare against the sum of the same two parts, plainly.
    plain = copy.deepcopy(model)
    plain.reversible = False
    plain.zero_grad()
    for part in (x[:3], x[3:]):
        weighted_loss(plain(part)).backward()
    for p, q, f in zip(model.parameters(), plain.parameters(), full):
        assert rel_error(p.grad, q.grad) < 1e-10
        assert not torch.equal(p.grad, f)


def test_context_reaches_every_level_in_forward_and_recompute():
    torch.manual_seed(0)
    model = mix_columns(3).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    assert_same_grads(model, x, 1e-10, scale=0.5)
    out_half, _, _ = grads_of(model, x, True, scale=0.5)
    out_one, _, _ = grads_of(model, x, True, scale=1.0)
    assert not torch.equal(out_half[0], out_one[0])


def test_context_that_requires_grad_is_refused_in_reversible_mode():
    # The reversible backward returns no gradient for keyword arguments: it would be silently missing.
    model = mix_columns(2).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="keyword argument 'scale' requires grad, but reversible columns give"):
        model(x, scale=scale)
    model.reversible = False
    weighted_loss(model(x, scale=scale)).backward()
    assert scale.grad is not None


@pytest.mark.parametrize("keep_top_graph", [False, True])
def test_double_backward_is_refused(keep_top_graph):
    # create_graph=True would otherwise return first gradients with no graph: a gradient penalty would then fail
    # far from the cause, or silently contribute nothing.
    model = mix_columns(2, keep_top_graph=keep_top_graph)
    x = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(weighted_loss(model(x)), x, create_graph=True)


def test_eval_without_grad_runs_plain_and_matches(monkeypatch):
    # Without grad there is no backward to rebuild for: no RNG capture, no tape, no kept outputs.
    torch.manual_seed(0)
    model = mix_columns(4, reversible=False).eval()
    x = torch.randn(3, 5)
    expected = model(x)
    model.reversible = True
    monkeypatch.setattr(revcol.columns._ReversibleColumn, "apply", None)  # calling it would raise
    with torch.no_grad():
        got = model(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_cpu_bf16_autocast_is_finite_and_costs_no_accuracy_beyond_bf16_itself():
    torch.manual_seed(0)
    model = isotropic_columns(32, [1, 1, 1, 1], 4, 2, gamma_init=1.0)  # heads of 16: 8 make bf16 chaotic here
    x = torch.randn(4, 8, 32)

    def grads(reversible, bf16):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            states = model(xr)
        assert states[-1].dtype == torch.float32  # the outputs come back in the stem output's dtype
        weighted_loss(states).backward()
        return torch.cat([xr.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])

    fp32, plain_bf16, rev_bf16 = grads(False, False), grads(False, True), grads(True, True)
    assert torch.isfinite(rev_bf16).all()
    # bf16 itself moves this small cosine-attention model's gradients by about 8%; reversible adds nothing.
    assert rel_error(rev_bf16, fp32) < 0.12
    assert rel_error(rev_bf16, plain_bf16) < 0.02, "the recompute must run under the forward's autocast state"


@pytest.mark.parametrize("build,message", [
    (lambda: ReversibleColumns([], [(4,)] * 2), "at least 1 column"),
    (lambda: ReversibleColumns([[nn.Identity()]], [(4,)]), "at least 2 levels"),
    (lambda: ReversibleColumns([[nn.Identity()] * 2, [nn.Identity()] * 3], [(4,)] * 2), "column 1 has 3 levels"),
    (lambda: ReversibleColumns([[nn.Identity()] * 2], [(4,)]), "1 gamma shapes for 2 levels"),
    (lambda: ReversibleColumns([[nn.Identity()] * 2], [(4,)] * 2, gamma_init=0.0), "gamma_init 0.0 is out of range"),
    (lambda: ReversibleColumns([[nn.Identity()] * 2], [(4,)] * 2, gamma_init=-9e-4), "gamma_init -0.0009 is out of"),
    (lambda: isotropic_columns(0, [1, 1], 2, 1), "^dim must be at least 1, got 0$"),
    (lambda: isotropic_columns(4, [1, 1], 2, 1, mlp_ratio=0.2), r"^mlp_ratio 0.2 at dim 4 leaves the MLP no hidden"),
    (lambda: isotropic_columns(30, [1, 1], 2, 4), "not divisible by num_heads"),
    (lambda: isotropic_columns(32, [1], 2, 4), "at least 2 levels"),
    (lambda: isotropic_columns(32, [1, 1], 0, 4), "at least 1 column"),
])
def test_impossible_configurations_raise_one_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


GAMMA_MAX_4_COLUMNS = 2.0 ** (32 / 3)  # |gamma|^(columns - 1) <= 2^32


@pytest.mark.parametrize("gamma_init, columns, bounds", [
    (math.nan, 4, "0.001 <= |gamma_init| <= 1625 at 4 columns"),
    (math.inf, 4, "0.001 <= |gamma_init| <= 1625 at 4 columns"),
    (-math.inf, 1, "|gamma_init| >= 0.001"),
    (0.0, 2, "0.001 <= |gamma_init| <= 4.295e+09 at 2 columns"),
    (-9e-4, 4, "0.001 <= |gamma_init| <= 1625 at 4 columns"),
    (1e6, 4, "0.001 <= |gamma_init| <= 1625 at 4 columns"),
    (-1700.0, 4, "0.001 <= |gamma_init| <= 1625 at 4 columns"),
    (25.0, 8, "0.001 <= |gamma_init| <= 23.78 at 8 columns"),
])
def test_gamma_init_out_of_range_is_the_same_one_line_error_from_both_builders(gamma_init, columns, bounds):
    message = (f"gamma_init {gamma_init!r} is out of range: it must be finite, with {bounds} (the inverse divides by "
               f"gamma; each column multiplies the float32 stream by it)")
    with pytest.raises(ValueError) as from_check:
        check_gamma_init(gamma_init, columns)
    with pytest.raises(ValueError) as from_columns:
        ReversibleColumns([[nn.Identity()] * 2] * columns, [(4,)] * 2, gamma_init=gamma_init)
    with pytest.raises(ValueError) as from_isotropic:
        isotropic_columns(8, [1, 1], columns, 2, gamma_init=gamma_init)
    assert str(from_check.value) == str(from_columns.value) == str(from_isotropic.value) == message


@pytest.mark.parametrize("gamma_init", [GAMMA_MAX_4_COLUMNS, -GAMMA_MAX_4_COLUMNS, -0.5, 1e-3])
def test_gamma_init_in_range_of_either_sign_keeps_float32_finite(gamma_init):
    """At the largest gamma allowed, the top states grow by 2^32 over the columns: outputs and gradients stay
    finite in float32 (at 2^64 the LayerNorms' squares overflow)."""
    check_gamma_init(gamma_init, 4)
    torch.manual_seed(0)
    model = isotropic_columns(32, [1, 1], 4, 2, gamma_init=gamma_init)
    x = torch.randn(2, 5, 32, requires_grad=True)
    top = model(x)[-1]
    nn.functional.layer_norm(top, (32,)).square().sum().backward()
    assert torch.isfinite(top).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class Slice(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, low, high):
        return low[..., :self.width]


@pytest.mark.parametrize("reversible", [True, False])
def test_level_output_shape_must_match_its_shortcut(reversible):
    levels = [[Slice(3), Slice(3)], [Slice(2), Slice(2)]]  # the second column narrows its states
    model = ReversibleColumns(levels, [(3,), (3,)], reversible=reversible)
    with pytest.raises(ValueError, match=r"level 0 returned shape \(2, 2\), but the previous column's level 0 "
                                         r"returned \(2, 3\): level 0 must return the same shape in every column"):
        model(torch.randn(2, 5, requires_grad=True))


@pytest.mark.parametrize("gamma_shape", [(5, 1, 1), (1, 2, 5)])  # NCHW gamma on tokens; a dim too many
def test_gamma_shape_must_broadcast_to_the_state(gamma_shape):
    levels = [[Slice(5), Slice(5)], [Slice(5), Slice(5)]]
    model = ReversibleColumns(levels, [gamma_shape, gamma_shape])
    message = (rf"gamma of level 0 has shape {re.escape(str(gamma_shape))}, which does not broadcast to the level's "
               r"state \(2, 5\): gamma_shapes\[0\] is \(C,\) for channels-last states")
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 5, requires_grad=True))


def test_parameter_gradients_are_released_column_by_column():
    # Holding every column's parameter gradients to the end of backward would grow memory with N.
    torch.manual_seed(0)
    model = mix_columns(3)
    events = []
    for c, column in enumerate(model.columns):
        for p in column.parameters():
            p.register_post_accumulate_grad_hook(lambda p, c=c: events.append(("grad", c)))
        for l, level in enumerate(column.levels):
            level.register_forward_pre_hook(
                lambda m, args, c=c: events.append(("recompute", c)) if torch.is_grad_enabled() else None)
    weighted_loss(model(torch.randn(3, 5))).backward()
    for c in (1, 2):
        last_grad = max(i for i, e in enumerate(events) if e == ("grad", c))
        first_recompute_before = min(i for i, e in enumerate(events) if e == ("recompute", c - 1))
        assert last_grad < first_recompute_before, events


class DetachedWeights(nn.Module):
    """A level computing with detached copies of its parameters: they can get no gradient."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, low, high):
        x = low if high is None else low + high
        return nn.functional.linear(x, self.linear.weight.detach(), self.linear.bias.detach())


def test_a_level_whose_parameters_get_no_gradient_raises_instead_of_leaving_them_none():
    model = ReversibleColumns([[DetachedWeights(), DetachedWeights()] for _ in range(2)], gamma_shapes=[(8,), (8,)])
    states = model(torch.randn(2, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="level 1 of column 1 received a gradient, but none of its parameters"):
        sum(s.sum() for s in states).backward()
