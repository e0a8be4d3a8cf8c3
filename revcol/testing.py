"""Checks for models built on reversible columns: does a reversible step give plain autograd's gradients, and
what does a step cost in memory. The project's tests and benchmarks use them; so can your own levels::

    from revcol.testing import assert_reversible_matches_plain, weighted_sum

    assert_reversible_matches_plain(model, lambda: weighted_sum(model(stem(x))))
"""
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .columns import ReversibleColumns
from .memory import PeakBytes

Gradients = Dict[str, Optional[Tensor]]


def weighted_sum(outputs) -> Tensor:
    """A scalar loss whose gradient is different at every element of every output (a tensor or a sequence of
    them), so that no gradient can be right by symmetry. Computed in float32 at least."""
    outputs = [outputs] if isinstance(outputs, Tensor) else outputs
    total = 0
    for y in outputs:
        y = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
        total = total + (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum()
    return total


def set_gammas_(model: nn.Module, low: float = 0.1, high: float = 0.2, seed: int = 0) -> nn.Module:
    """Every gamma of ``model``'s reversible columns set, per channel, to random magnitudes in [low, high] with
    random signs, as training might leave them: none a power of two, each inverse step dividing by 1/|gamma|."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for columns in _reversible_columns(model):
            for column in columns.columns[1:]:
                for gamma in column.gammas:
                    sign = torch.randint(0, 2, gamma.shape, generator=generator) * 2 - 1
                    magnitude = low + (high - low) * torch.rand(gamma.shape, generator=generator)
                    gamma.copy_((sign * magnitude).to(gamma))
    return model


def gradients(model: nn.Module, loss: Callable[[], Tensor], reversible: bool, inputs: Sequence[Tensor] = (),
              seed: int = 1) -> Gradients:
    """The gradients of one ``loss().backward()`` with every reversible column set of ``model`` in the given
    mode, under the same random seed: by parameter name, and ``input{i}`` for each tensor of ``inputs``."""
    columns = _reversible_columns(model)
    modes = [c.reversible for c in columns]
    try:
        for c in columns:
            c.reversible = reversible
        model.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        torch.manual_seed(seed)
        loss().backward()
    finally:
        for c, mode in zip(columns, modes):
            c.reversible = mode
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    grads.update({f"input{i}": x.grad for i, x in enumerate(inputs)})
    return grads


def assert_reversible_matches_plain(model: nn.Module, loss: Callable[[], Tensor], inputs: Sequence[Tensor] = (),
                                    seed: int = 1, rtol: float = 0.0) -> Gradients:
    """One step reversible, one plain, from the same seed: every gradient must be there in both and equal to
    the bit (``rtol=0``), or within ``rtol`` relative to the largest magnitude of the plain gradient. Returns
    the reversible gradients."""
    rev = gradients(model, loss, True, inputs, seed)
    plain = gradients(model, loss, False, inputs, seed)
    assert rev.keys() == plain.keys()
    for name, expected in plain.items():
        got = rev[name]
        assert expected is not None, f"{name}: no gradient in plain mode"
        assert got is not None, f"{name}: no gradient in reversible mode"
        if rtol == 0:
            assert torch.equal(got, expected), \
                f"{name}: reversible differs from plain by {(got - expected).abs().max().item():.3e} (absolute)"
        else:
            error = (got - expected).abs().max() / expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
            assert error <= rtol, f"{name}: reversible differs from plain by {error.item():.3e} (relative)"
    return rev


def step_peak_bytes(step: Callable[[], None], keep: Iterable[Tensor] = ()) -> int:
    """Peak bytes of the tensors a training step creates (see :class:`PeakBytes`), measured on its second run:
    the first allocates what every later step starts with (gradients, optimizer state). ``keep``: tensors alive
    before the step that are not the step's (model parameters and inputs are found through the first step's
    gradients only if you pass them)."""
    step()
    keep = list(keep)
    grads = [t.grad for t in keep if isinstance(t, Tensor) and t.grad is not None]
    with PeakBytes(ignore=[*keep, *grads]) as peak:
        step()
    return peak.peak


def _reversible_columns(model: nn.Module):
    found = [m for m in model.modules() if isinstance(m, ReversibleColumns)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no ReversibleColumns")
    return found
