"""Reversible columns: the multi-level reversible unit of RevCol (Cai et al., ICLR 2023, Eq. 3).

Column c, level l (1-based in the paper, 0-based here):

    x_l^c = F_l^c(x_{l-1}^c, x_{l+1}^{c-1}) + gamma_l^c * x_l^{c-1}

x_0^c is the stem output (the same for every column), the top level takes no x_{L+1}, and the first
column starts from zero state: its levels see only their lower input and have no shortcut.
The inverse, top level first, rebuilds column c-1 from column c:

    x_l^{c-1} = (x_l^c - F_l^c(x_{l-1}^c, x_{l+1}^{c-1})) / gamma_l^c

so backward needs only the stem output and the last column's levels: memory does not grow with the
number of columns.
"""
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .memory import note_kept_for_backward

GAMMA_MIN = 1e-3
GAMMA_INIT = 0.5
RUNS_ONCE = "reversible columns: backward through a reversible forward runs once (retain_graph is not supported)"
NO_DOUBLE_BACKWARD = ("reversible columns: double backward (create_graph=True) is not supported; "
                      "use reversible=False for gradients of gradients")


def clamp_gamma(gamma: Tensor) -> Tensor:
    """Keep gamma's sign and |gamma| >= 1e-3: a tiny gamma makes the inverse numerically useless (Sec. 2.2.2)."""
    return torch.copysign(gamma.abs().clamp_min(GAMMA_MIN), gamma)


class Column(nn.Module):
    """One column: L level functions F_l and, after the first column, a channel-wise gamma per level.

    A level function is called as ``F(low, high, **context)`` with ``high=None`` at the top level and in
    the first column; it returns a tensor shaped like its level's state.
    """

    def __init__(self, levels: Sequence[nn.Module], gamma_shapes: Sequence[Sequence[int]], gamma_init: float,
                 first: bool):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.gammas = None if first else nn.ParameterList(
            nn.Parameter(torch.full(tuple(shape), float(gamma_init))) for shape in gamma_shapes)

    def level(self, l: int, x0: Tensor, states: List[Tensor], prev: Optional[List[Tensor]],
              context: Dict) -> Tensor:
        """x_l of this column, given this column's levels below l (``states``) and the previous column."""
        low = x0 if l == 0 else states[l - 1]
        high = None if prev is None or l == len(self.levels) - 1 else prev[l + 1]
        return self.shortcut(l, self.levels[l](low, high, **context), prev)

    def shortcut(self, l: int, y: Tensor, prev: Optional[List[Tensor]]) -> Tensor:
        """x_l = F_l(...) + gamma_l * x_l^prev, given y = F_l(...); just y in the first column."""
        if prev is None:
            return y
        if y.shape != prev[l].shape:
            raise ValueError(f"level {l} returned shape {tuple(y.shape)}, but the previous column's level {l} "
                             f"returned {tuple(prev[l].shape)}: level {l} must return the same shape in every column")
        gamma = self.gammas[l]
        if not _broadcasts_to(gamma.shape, y.shape):
            raise ValueError(f"gamma of level {l} has shape {tuple(gamma.shape)}, which does not broadcast to the "
                             f"level's state {tuple(y.shape)}: gamma_shapes[{l}] is (C,) for channels-last states, "
                             f"(C, 1, 1) for NCHW maps")
        return torch.addcmul(y, clamp_gamma(gamma), prev[l])  # y + gamma * x_prev, one kernel

    def forward(self, x0: Tensor, prev: Optional[List[Tensor]], context: Dict) -> List[Tensor]:
        states: List[Tensor] = []
        for l in range(len(self.levels)):
            states.append(self.level(l, x0, states, prev, context))
        return states


class _RngState:
    """Generator state taken before a level runs, so that its backward recompute draws the same masks."""

    def __init__(self, device: torch.device):
        self.cuda_device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    def consumed(self) -> bool:
        """Whether anything drew random numbers since the state was taken (if not, no replay is needed)."""
        if not torch.equal(self.cpu, torch.get_rng_state()):
            return True
        return self.cuda is not None and not torch.equal(self.cuda, torch.cuda.get_rng_state(self.cuda_device))

    @contextmanager
    def replayed(self):
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


class _ReversibleColumn(torch.autograd.Function):
    """One column run without a graph; its backward rebuilds the previous column and differentiates this one.

    Only the last column keeps its outputs (and, with ``keep_top``, its top level's graph). Every other
    column finds its outputs on the ``tape``, where the next column's backward put them after rebuilding
    them, together with their gradients; autograd runs the backwards last column first, because each
    column's output gradients come from the next column's backward. Parameter gradients are returned column
    by column, so they are accumulated (and, under DDP, reduced) as soon as a column is done instead of being
    held to the end.
    """

    @staticmethod
    def forward(ctx, column: Column, tape: Dict, c: int, last: bool, keep_top: bool, context_plain: Dict,
                context_keys: List[str], x0: Tensor, *tensors: Tensor):
        n_ctx, L = len(context_keys), len(column.levels)
        context = dict(context_plain, **dict(zip(context_keys, tensors[:n_ctx])))
        prev = list(tensors[n_ctx:n_ctx + L]) if c > 0 else None
        device_type = x0.device.type
        # The levels run, here and in the recompute, under the caller's autocast state (none on devices without
        # autocast, like meta) with autocast's cache off. The cache keeps the cast of every leaf that requires
        # grad until the outermost autocast region ends: here the half-precision copy of every weight, through
        # the whole forward, and in the recompute every level's inputs and their copies, until the column's
        # backward returns. Each weight is cast once per pass either way.
        ctx.autocast = torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                                      enabled=torch.is_autocast_enabled(device_type), cache_enabled=False) \
            if torch.amp.is_autocast_available(device_type) else nullcontext()
        ctx.rng: Dict[int, _RngState] = {}
        ctx.top = None
        keep_top = keep_top and any(ctx.needs_input_grad)  # with nothing to differentiate, no backward runs
        states: List[Tensor] = []
        with ctx.autocast:
            for l in range(L - 1 if keep_top else L):
                rng = _RngState(x0.device)
                states.append(column.level(l, x0, states, prev, context))
                if rng.consumed():
                    ctx.rng[l] = rng
            if keep_top:  # the last column's top level runs with autograd: see ReversibleColumns.keep_top_graph
                low = states[L - 2].detach().requires_grad_()
                with torch.enable_grad():
                    y = column.levels[L - 1](low, None, **context)
                ctx.top = low, y
                states.append(column.shortcut(L - 1, y.detach(), prev))
        ctx.column, ctx.tape, ctx.c, ctx.last = column, tape, c, last
        ctx.context_plain, ctx.context_keys = context_plain, context_keys
        ctx.prev_dtypes = None if prev is None else [p.dtype for p in prev]
        ctx.params = list(tensors[n_ctx + (L if c > 0 else 0):])
        ctx.save_for_backward(x0, *tensors[:n_ctx])
        # The last column's outputs are kept as detached aliases, not saved tensors: a saved tensor lives at
        # least until backward returns, an alias can be dropped once its level is rebuilt. An alias shares its
        # output's version counter, which backward checks as autograd does for saved tensors.
        ctx.outputs = None
        if last:
            ctx.outputs = [(s.detach(), s._version) for s in states]
            note_kept_for_backward(states)  # count_saved_bytes counts them as it would saved tensors
        ctx.set_materialize_grads(False)  # a level nothing differentiates gets None, not a state-sized zero
        return tuple(states)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        if torch.is_grad_enabled():  # autograd enables grad mode in backward only for create_graph=True
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        column: Column = ctx.column
        L, n_ctx = len(column.levels), len(ctx.context_keys)
        saved = ctx.saved_tensors
        x0 = saved[0].detach()
        context = dict(ctx.context_plain, **dict(zip(ctx.context_keys, saved[1:1 + n_ctx])))
        if ctx.last:
            if ctx.outputs is None:
                raise RuntimeError(RUNS_ONCE)
            if any(s._version != version for s, version in ctx.outputs):
                raise RuntimeError("reversible columns: an output was modified in place after the forward, "
                                   "but backward rebuilds the previous columns from it")
            states = [s for s, _ in ctx.outputs]
            top, ctx.top = ctx.top, None
            ctx.outputs = None  # from here on, each state is freed once its level is rebuilt
            grads, own_states = list(grads), False  # the caller may still hold the outputs: not ours to overwrite
        else:
            if ctx.c not in ctx.tape:
                raise RuntimeError(RUNS_ONCE)
            # Rebuilt by the next column, and ours alone: states to overwrite, gradients to free once used.
            # (What autograd hands in here are stand-ins; see the end of this function.)
            (states, grads), own_states, top = ctx.tape.pop(ctx.c), True, None
        index = {p: i for i, p in enumerate(ctx.params)}
        param_grads: List[Optional[Tensor]] = [None] * len(ctx.params)
        prev = None if ctx.c == 0 else [None] * L  # the previous column, rebuilt top level first
        prev_grads: List[Optional[Tensor]] = [None] * L
        grad_x0 = None

        with torch.enable_grad(), ctx.autocast:
            for l in reversed(range(L)):
                if top is not None:  # the last column's top level, its graph kept from the forward
                    (low, y), high, top = top, None, None
                else:
                    low = (x0 if l == 0 else states[l - 1]).detach().requires_grad_()
                    high = None if prev is None or l == L - 1 else prev[l + 1].detach().requires_grad_()
                    with ctx.rng[l].replayed() if l in ctx.rng else nullcontext():
                        y = column.levels[l](low, high, **context)
                grad = grads[l]
                if prev is not None:
                    # The shortcut x_l = y + gamma * x_l^prev is inverted and differentiated by hand: autograd
                    # would keep two more state-sized tensors (gamma * x_l^prev and the sum) for no gain.
                    gamma = clamp_gamma(column.gammas[l])
                    with torch.no_grad():
                        rebuilt = states[l].sub_(y) if own_states else states[l] - y  # x_l is not needed again
                        prev[l] = rebuilt.div_(gamma).to(ctx.prev_dtypes[l])
                    if grad is not None:
                        prev_grads[l] = _add(prev_grads[l], grad * gamma.detach())
                        if column.gammas[l] in index:
                            grad_gamma = (grad * prev[l]).sum_to_size(gamma.shape)
                            i = index[column.gammas[l]]
                            param_grads[i] = _add(param_grads[i],
                                                  torch.autograd.grad(gamma, column.gammas[l], grad_gamma)[0])
                states[l] = grads[l] = None  # release state-sized tensors as soon as they are used up
                if grad is None:  # nothing downstream depends on this level
                    continue
                inputs = [low] + ([high] if high is not None else [])
                level_params = [p for p in column.levels[l].parameters() if p in index]
                got = torch.autograd.grad(y, inputs + level_params, grad.to(y.dtype), allow_unused=True)
                del y, grad
                got_inputs, got_params = got[:len(inputs)], got[len(inputs):]
                if l == 0:
                    grad_x0 = _add(grad_x0, got_inputs[0])
                else:
                    grads[l - 1] = _add(grads[l - 1], got_inputs[0])
                if high is not None:
                    prev_grads[l + 1] = _add(prev_grads[l + 1], got_inputs[1])
                for p, g in zip(level_params, got_params):
                    param_grads[index[p]] = _add(param_grads[index[p]], g)
        if prev is not None:
            # The previous column's gradients go on the tape with its states. Autograd gets zero-size
            # stand-ins (a scalar expanded to the state's shape), which keep the order of the backwards:
            # a gradient autograd passes into a backward stays alive until that backward returns, so the
            # real ones, passed this way, would be held all through the previous column's backward.
            prev_grads = [None if g is None else g.to(dtype) for g, dtype in zip(prev_grads, ctx.prev_dtypes)]
            ctx.tape[ctx.c - 1] = prev, prev_grads
            prev_grads = [None if g is None else g.new_zeros(()).expand(g.shape) for g in prev_grads]
        return (None,) * 7 + (grad_x0,) + (None,) * n_ctx + (tuple(prev_grads) if prev is not None else ()) \
            + tuple(param_grads)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class ReversibleColumns(nn.Module):
    """N columns of L levels joined by reversible connections; returns the last column's L level states.

    Args:
        columns: ``columns[c][l]`` is the level function F_l of column c (see :class:`Column`).
        gamma_shapes: per level, the shape of its channel-wise gamma, broadcastable against the state
            (``(C,)`` for channels-last tokens, ``(C, 1, 1)`` for NCHW feature maps).
        gamma_init: the constant gamma starts at.
        reversible: rebuild activations in backward (memory flat in N) instead of storing them
            (plain autograd). Switching never changes the forward output.
        keep_top_graph: in reversible mode, run the last column's top level with autograd in the forward and
            keep its graph, so that backward starts from it instead of recomputing it: one level's recompute
            fewer (1/(N L) of them). It holds one level's activations from the forward to the backward. That
            is free when little runs after the columns (a classifier head): backward's first step would
            rebuild the same graph next to the same states. It is not free when a large network runs in
            between, such as a decoder, whose peak it adds to.

    Keyword arguments of ``forward`` after the stem output (for example a padding mask) reach every level
    function unchanged; they must not need gradients. Levels with BatchNorm would update running
    statistics twice in reversible mode (once more in the recompute): use LayerNorm.
    """

    def __init__(self, columns: Sequence[Sequence[nn.Module]], gamma_shapes: Sequence[Sequence[int]],
                 gamma_init: float = 0.5, reversible: bool = True, keep_top_graph: bool = False):
        super().__init__()
        if len(columns) < 1:
            raise ValueError(f"need at least 1 column, got {len(columns)}")
        num_levels = len(columns[0])
        if num_levels < 2:
            raise ValueError(f"need at least 2 levels per column, got {num_levels}")
        for c, levels in enumerate(columns):
            if len(levels) != num_levels:
                raise ValueError(f"column {c} has {len(levels)} levels, column 0 has {num_levels}")
        if len(gamma_shapes) != num_levels:
            raise ValueError(f"got {len(gamma_shapes)} gamma shapes for {num_levels} levels")
        if abs(gamma_init) < GAMMA_MIN:
            raise ValueError(f"gamma_init {gamma_init} is below the clamp |gamma| >= {GAMMA_MIN}")
        self.num_levels = num_levels
        self.columns = nn.ModuleList(
            Column(levels, gamma_shapes, gamma_init, first=(c == 0)) for c, levels in enumerate(columns))
        self.reversible = reversible
        self.keep_top_graph = keep_top_graph

    def forward(self, x0: Tensor, **context) -> List[Tensor]:
        if self.reversible and torch.is_grad_enabled():
            return self._forward_reversible(x0, context)
        states = None
        for column in self.columns:
            states = column(x0, states, context)
        return states

    def compile_levels(self, **options) -> "ReversibleColumns":
        """Compile every level function in place with ``torch.compile(**options)``; the reversible machinery
        around them stays eager, so gradients stay exact.

        Random ops inside a level must draw from the global generator outside the compiled graphs, as the
        isotropic levels' DropPath and Dropout do; otherwise the backward's recompute cannot replay them.
        """
        # A level compiles once per variant it meets: with or without a higher input, grad mode (the no-grad
        # forward and the recompute), train or eval, with or without context tensors, static then dynamic
        # shapes. Dynamo's default of 8 per function would silently leave the rest eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for column in self.columns:
            for level in column.levels:
                level.compile(**options)
        return self

    def _forward_reversible(self, x0: Tensor, context: Dict) -> List[Tensor]:
        keys = [k for k, v in context.items() if isinstance(v, Tensor)]
        for k in keys:
            if context[k].requires_grad:  # it would silently get no gradient
                raise ValueError(f"keyword argument '{k}' requires grad, but reversible columns give keyword "
                                 f"arguments no gradient: detach it, or make it a parameter of a level")
        plain = {k: v for k, v in context.items() if not isinstance(v, Tensor)}
        tape: Dict = {}
        states: List[Tensor] = []
        for c, column in enumerate(self.columns):
            params = [p for p in column.parameters() if p.requires_grad]
            last = c == len(self.columns) - 1
            states = list(_ReversibleColumn.apply(column, tape, c, last, last and self.keep_top_graph, plain, keys,
                                                  x0, *(context[k] for k in keys), *states, *params))
        return states
