"""Reversible columns: the multi-level reversible unit of RevCol (Cai et al., ICLR 2023, Eq. 3).

Column c, level l (1-based in the paper, 0-based here):

    x_l^c = F_l^c(x_{l-1}^c, x_{l+1}^{c-1}) + gamma_l^c * x_l^{c-1}

x_0^c is the stem output (the same for every column), the top level takes no x_{L+1}, and the first
column starts from zero state: its levels see only their lower input and have no shortcut.
The inverse, top level first, rebuilds column c-1 from column c:

    x_l^{c-1} = (x_l^c - F_l^c(x_{l-1}^c, x_{l+1}^{c-1})) / gamma_l^c

so backward needs only the stem output and the last column's levels: memory does not grow with the
number of columns.

The level states (the "stream") are carried in float64 while the level functions compute in the stem
output's dtype, on copies of their inputs in that dtype. The float64 sum ``F + gamma * x`` keeps the bits
that a float32 sum would round away, so the inverse gives back the forward's states to far below float32's
resolution, the recompute sees the same inputs as the forward, and reversible gradients equal plain
autograd's. Where a rebuilt state still casts one ulp from the forward's cast (a value that close to a
rounding boundary), a bit kept from the forward's cast turns it back (``_ForwardCast``). Each inverse step
still divides the stream's own rounding by gamma; where that could add up to more than 2**rebuild_budget_bits
since the last exact state, a column's states are kept for backward.
"""
import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .memory import note_kept_for_backward

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a build of torch without torch.distributed
    FSDPModule = ()

GAMMA_MIN = 1e-3
GAMMA_INIT = 0.5  # the official code's starting gamma
# Each column multiplies the stream by gamma: at most 2**32 over all columns keeps the float32 copies the levels
# compute on (and the squares their LayerNorms take) far from float32's 3.4e38.
GAMMA_GROWTH_MAX_BITS = 32
STREAM_DTYPE = torch.float64
REBUILD_BUDGET_BITS = 12
# The kept columns are decided from a copy of the gammas that reaches the host without waiting: on a GPU, the one
# copied in an earlier forward (the gammas move by one optimizer step or more since). Such a decision is taken
# with this many bits less budget, so it stays within the budget unless the product of 1/|gamma| over a rebuilt
# stretch doubled since the copy.
STALE_GAMMAS_MARGIN_BITS = 1.0
RECONSTRUCTION_WARN = 1e-4
PROBE_SIZE = 1024
RUNS_ONCE = "reversible columns: backward through a reversible forward runs once (retain_graph is not supported)"
NO_PARAMETER_GRADIENTS = ("reversible columns: level {level} of column {column} received a gradient, but none of its "
                          "parameters did: the recompute did not run on the parameters being trained")
NO_DOUBLE_BACKWARD = ("reversible columns: double backward (create_graph=True) is not supported; "
                      "use reversible=False for gradients of gradients")


def clamp_gamma(gamma: Tensor) -> Tensor:
    """Keep gamma's sign and |gamma| >= 1e-3: a tiny gamma makes the inverse numerically useless (Sec. 2.2.2).
    A zero gamma becomes +1e-3."""
    magnitude = gamma.abs().clamp_min(GAMMA_MIN)
    return torch.where(gamma < 0, -magnitude, magnitude)  # not copysign, which ONNX has no operator for


def check_gamma_init(value: float, num_columns: int) -> None:
    """Raise a one-line ValueError unless ``value`` is a usable gamma_init for ``num_columns`` columns: finite,
    |value| >= GAMMA_MIN (the inverse divides by it) and |value|^(num_columns - 1) <= 2**GAMMA_GROWTH_MAX_BITS.
    Either sign works: the inverse needs |gamma| only."""
    upper = 2.0 ** (GAMMA_GROWTH_MAX_BITS / (num_columns - 1)) if num_columns > 1 else math.inf
    if not (math.isfinite(value) and GAMMA_MIN <= abs(value) <= upper):
        bounds = f"{GAMMA_MIN:g} <= |gamma_init| <= {upper:.4g} at {num_columns} columns" if num_columns > 1 \
            else f"|gamma_init| >= {GAMMA_MIN:g}"
        raise ValueError(f"gamma_init {value!r} is out of range: it must be finite, with {bounds} (the inverse "
                         f"divides by gamma; each column multiplies the float32 stream by it)")


def takes_high(column: int, level: int, num_levels: int) -> bool:
    """Whether level ``level`` of column ``column`` reads the previous column's next level up."""
    return column > 0 and level < num_levels - 1


class Column(nn.Module):
    """Column ``index``: L level functions F_l and, after the first column, a channel-wise gamma per level.

    A level function is called as ``F(low, high, **context)`` with ``high=None`` where
    :func:`takes_high` says so; it returns a tensor shaped like its level's state.
    """

    def __init__(self, levels: Sequence[nn.Module], gamma_shapes: Sequence[Sequence[int]], gamma_init: float,
                 index: int):
        super().__init__()
        self.index = index
        self.levels = nn.ModuleList(levels)
        self.reads_top = False  # level 0 also reads the previous column's top level (bottom_reads_top)
        self.gammas = None if index == 0 else nn.ParameterList(
            nn.Parameter(torch.full(tuple(shape), float(gamma_init))) for shape in gamma_shapes)

    def inputs(self, l: int, x0: Tensor, states: List[Tensor],
               prev: Optional[List[Tensor]]) -> Tuple[Tensor, Optional[Tensor]]:
        """The inputs of level l: this column's level below (the stem output for l = 0), and the previous
        column's level above. ``states`` holds at least this column's levels below l, ``prev`` the previous
        column's levels above l."""
        low = x0 if l == 0 else states[l - 1]
        high = prev[l + 1] if takes_high(self.index, l, len(self.levels)) else None
        return low, high

    def top_input(self, l: int, prev: Optional[List[Tensor]]) -> Optional[Tensor]:
        """The previous column's top level where level l reads it too (level 0, with ``reads_top``), else None."""
        return prev[-1] if self.reads_top and l == 0 and prev is not None else None

    def f(self, l: int, low: Tensor, high: Optional[Tensor], context: Dict, dtype: torch.dtype,
          top: Optional[Tensor] = None) -> Tensor:
        """F_l on copies of its inputs in the levels' compute ``dtype``; the result in the stream's dtype. A
        ``top`` input reaches the level function as the keyword ``top``."""
        extra = {} if top is None else {"top": top.to(dtype)}
        y = self.levels[l](low.to(dtype), None if high is None else high.to(dtype), **extra, **context)
        return y.to(STREAM_DTYPE)

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
        return torch.addcmul(y, clamp_gamma(gamma).to(STREAM_DTYPE), prev[l])  # y + gamma * x_prev, one kernel

    def forward(self, x0: Tensor, prev: Optional[List[Tensor]], context: Dict,
                reversible: Optional["_ReversibleRun"] = None) -> List[Tensor]:
        if reversible is not None:
            # Run through the module call, so that what hooks into it runs around the column: FSDP gathers its
            # parameters for the forward, and again, when its outputs get their gradients, for the recompute.
            params = [p for p in self.parameters() if p.requires_grad]
            return list(_ReversibleColumn.apply(self, reversible, x0, *(context[k] for k in reversible.context_keys),
                                                *(prev or ()), *params))
        states: List[Tensor] = []
        for l in range(len(self.levels)):
            y = self.f(l, *self.inputs(l, x0, states, prev), context, x0.dtype, self.top_input(l, prev))
            states.append(self.shortcut(l, y, prev))
        return states

    def amplification(self) -> Tensor:
        """How much one inverse step through this column can magnify an error: max over levels of 1/|gamma|."""
        return torch.stack([1.0 / clamp_gamma(_full(g.detach())).abs().min() for g in self.gammas]).max()


class ReconstructionError(NamedTuple):
    """The worst rebuilt state of a backward: relative error ``error`` at ``column``, ``level``."""
    error: float
    column: int
    level: int


def _probe(state: Tensor) -> Tensor:
    """min(numel, PROBE_SIZE) elements of a state, spread over it at a stride coprime with its last dimension (the
    channels of a token state), so that every channel is visited."""
    flat = state.detach().reshape(-1)
    stride = max(1, flat.numel() // PROBE_SIZE)
    while math.gcd(stride, state.shape[-1]) != 1:
        stride -= 1
    return flat[::stride][:PROBE_SIZE].clone()


class _Tape:
    """What the columns of one reversible forward hand each other for backward.

    ``rebuilt[c]``: column c's states and their gradients, put there by column c+1's backward. ``kept[c]``:
    column c's exact states, kept in the forward because rebuilding them could magnify rounding past the
    budget. ``probe``: a fixed sample of each of the first column's states. Backward measures the reconstruction
    error of what it rebuilt (``errors``) where it is largest, at the end of each stretch of rebuilt columns:
    against the kept states, and in the first column against the probe. ``cast_bits[c, l]``: the last bit of each value
    of the forward's cast of state (c, l) to the levels' dtype, for the columns backward rebuilds. Memory stays
    flat in the number of columns but for those bits, 1/64 of a column's float64 states.
    """

    def __init__(self, owner: "ReversibleColumns", kept_columns: Set[int]):
        self.owner = owner
        self.kept_columns = kept_columns
        self.rebuilt: Dict[int, Tuple[List[Tensor], List[Optional[Tensor]]]] = {}
        self.kept: Dict[int, List[Optional[Tensor]]] = {}
        self.probe: List[Optional[Tensor]] = []
        self.errors: Dict[Tuple[int, int], Tensor] = {}
        self.cast_bits: Dict[Tuple[int, int], Tensor] = {}
        self.tapped: Set[int] = set()  # columns whose top level the caller also uses: see forward_with_taps

    def record(self, c: int, states: List[Tensor], dtype: torch.dtype) -> None:
        """In the forward: what backward will check column c's rebuild against, or restart from; and for a
        column it will rebuild, the last bit of each state's cast to the levels' compute ``dtype``."""
        if c in self.kept_columns:
            self.kept[c] = [s.detach() for s in states]
            note_kept_for_backward(self.kept[c])
            return
        if c == 0:
            self.probe = [_probe(s) for s in states]
            note_kept_for_backward(self.probe)
        if dtype != STREAM_DTYPE:
            for l, s in enumerate(states):
                self.cast_bits[c, l] = _pack_bits(_last_bit(s.to(dtype)))
                note_kept_for_backward([self.cast_bits[c, l]])

    def forward_cast(self, c: int, l: int, state: Tensor, dtype: torch.dtype) -> Tensor:
        """The rebuilt state (c, l), requiring grad, as the forward cast it to ``dtype`` (see :class:`_ForwardCast`);
        the state itself where it is exact (kept, or the last column's)."""
        bits = self.cast_bits.get((c, l))
        return state if bits is None else _ForwardCast.apply(state, bits, dtype)

    def check(self, c: int, l: int, rebuilt: Tensor) -> Tensor:
        """Measure rebuilt state (c, l) where there is something to measure it against; return the exact state
        where one was kept, else the rebuilt one."""
        if c in self.kept:
            exact, self.kept[c][l] = self.kept[c][l], None
            self.errors[c, l] = _relative_error(rebuilt, exact)
            return exact
        if c == 0:
            probe, self.probe[l] = self.probe[l], None
            self.errors[c, l] = _relative_error(_probe(rebuilt), probe)
        return rebuilt


_BITS_OF = {2: torch.int16, 4: torch.int32}  # an integer dtype to read a float's bits as, by element size


def _last_bit(cast: Tensor) -> Tensor:
    """The last mantissa bit of every element, flat, as uint8 0 or 1."""
    return (cast.reshape(-1).view(_BITS_OF[cast.element_size()]) & 1).to(torch.uint8)


def _pack_bits(bits: Tensor) -> Tensor:
    """0/1 uint8 values, 8 to a byte."""
    rows = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    return (rows << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, numel: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:numel]


class _ForwardCast(torch.autograd.Function):
    """A rebuilt float64 state cast to the levels' dtype as the forward cast the exact one.

    The rebuilt state is off the forward's by float64 rounding (about 1e-16 relative, times the rebuild's
    growth), so its cast is the forward's or, where the value sits that close to a rounding boundary, the
    neighbouring value one ulp away. The last mantissa bit of the forward's cast tells the two apart; where it
    differs, the forward's cast is the neighbour on the rebuilt value's side (rounding is monotonic). The
    recompute then sees the forward's inputs to the bit. The gradient is the cast's: passed back in float64.
    """

    @staticmethod
    def forward(ctx, state: Tensor, packed_bits: Tensor, dtype: torch.dtype) -> Tensor:
        cast = state.to(dtype)
        off = (_last_bit(cast) != _unpack_bits(packed_bits, cast.numel())).view(cast.shape)
        toward = torch.where(state > cast.to(state.dtype), torch.inf, -torch.inf).to(dtype)
        ctx.state_dtype = state.dtype
        return torch.where(off, torch.nextafter(cast, toward), cast)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.state_dtype), None, None


def _relative_error(rebuilt: Tensor, exact: Tensor) -> Tensor:
    """max |rebuilt - exact| / max |exact|, on the device: reading it is left to whoever wants the number."""
    if exact.numel() == 0:  # an empty batch or sequence: nothing was rebuilt, nothing can be off
        return exact.new_zeros(())
    return (rebuilt - exact).abs().max() / exact.abs().max().clamp_min(torch.finfo(exact.dtype).tiny)


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


class _ReversibleRun(NamedTuple):
    """How :class:`Column` runs reversibly in one forward: the arguments of :class:`_ReversibleColumn` that are
    not tensors, but for the column. The context's tensors are passed to it as tensors, in ``context_keys``'
    order; ``context_plain`` holds the rest of the context."""
    tape: _Tape
    last: bool
    keep_top: bool
    levels_compiled: bool
    context_plain: Dict
    context_keys: List[str]


def _sharded(column: Column) -> bool:
    """Whether FSDP2 shards this column's parameters (the column or its levels wrapped with ``fully_shard``)."""
    return any(isinstance(m, FSDPModule) for m in column.modules())


def _reaches_a_parameter(y: Tensor, inputs: List[Tensor]) -> bool:
    """Whether y's graph reaches a leaf other than ``inputs``: a parameter."""
    inputs_ids = {id(t) for t in inputs}
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node's leaf
        if variable is not None and id(variable) not in inputs_ids:
            return True
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def _leaf(t: Optional[Tensor]) -> Optional[Tensor]:
    """t detached, requiring grad: an input to take a level's gradient at (None stays None)."""
    return None if t is None else t.detach().requires_grad_()


class _ReversibleColumn(torch.autograd.Function):
    """One column run without a graph; its backward rebuilds the previous column and differentiates this one.

    Only the last column keeps its outputs (and, with ``keep_top``, its top level's graph). Every other
    column finds its outputs on the ``tape``, where the next column's backward put them after rebuilding
    them, together with their gradients; autograd runs the backwards last column first, because each
    column's output gradients come from the next column's backward. Parameter gradients are returned column
    by column, so they are accumulated (and, under DDP, reduced) as soon as a column is done instead of being
    held to the end.

    Under FSDP2 the parameters a level computes with are gathered copies that exist only around the module
    call: the column's forward, or, per level, each level's call. So backward differentiates whatever the
    recompute ran on, and accumulates the gradients into those copies' ``.grad``, where FSDP reduce-scatters
    them; the Function returns no parameter gradients then.
    """

    @staticmethod
    def forward(ctx, column: Column, run: _ReversibleRun, x0: Tensor, *tensors: Tensor):
        n_ctx, L, c = len(run.context_keys), len(column.levels), column.index
        context = dict(run.context_plain, **dict(zip(run.context_keys, tensors[:n_ctx])))
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
        keep_top = run.keep_top and any(ctx.needs_input_grad)  # with nothing to differentiate, no backward runs
        states: List[Tensor] = []
        with ctx.autocast:
            for l in range(L):
                rng = _RngState(x0.device)
                low, high = column.inputs(l, x0, states, prev)
                top_in = column.top_input(l, prev)
                top = keep_top and l == L - 1
                if run.levels_compiled or top:
                    # As the recompute calls it: with grad, on inputs that require it. A compiled level then runs
                    # the same kernels in both passes, so the recompute gives back the forward's F exactly.
                    low, high, top_in = _leaf(low), _leaf(high), _leaf(top_in)
                    with torch.enable_grad():
                        y = column.f(l, low, high, context, x0.dtype, top_in)
                    if top:  # the last column's top level keeps its graph: see ReversibleColumns.keep_top_graph
                        ctx.top = low, y
                    y = y.detach()
                else:
                    y = column.f(l, low, high, context, x0.dtype, top_in)
                states.append(column.shortcut(l, y, prev))
                if rng.consumed():
                    ctx.rng[l] = rng
        ctx.column, ctx.run, ctx.sharded = column, run, _sharded(column)
        ctx.params = list(tensors[n_ctx + (L if c > 0 else 0):])
        ctx.save_for_backward(x0, *tensors[:n_ctx])
        # The last column's outputs are kept as detached aliases, not saved tensors: a saved tensor lives at
        # least until backward returns, an alias can be dropped once its level is rebuilt. An alias shares its
        # output's version counter, which backward checks as autograd does for saved tensors.
        ctx.outputs = None
        if run.last:
            ctx.outputs = [(s.detach(), s._version) for s in states]
            note_kept_for_backward(states)  # count_saved_bytes counts them as it would saved tensors
        else:
            run.tape.record(c, states, x0.dtype)
        ctx.set_materialize_grads(False)  # a level nothing differentiates gets None, not a state-sized zero
        return tuple(states)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        if torch.is_grad_enabled():  # autograd enables grad mode in backward only for create_graph=True
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        step = _ColumnBackward(ctx, grads)
        with torch.enable_grad():
            for l in reversed(range(len(ctx.column.levels))):
                step.level(l)
        prev_grads = step.hand_down()
        # One gradient per input of forward after ctx: none for the column, the run and the context tensors.
        return (None, None, step.grad_x0) + (None,) * len(ctx.run.context_keys) + prev_grads \
            + tuple(step.param_grads)


class _ColumnBackward:
    """One column's backward, driven level by level from the top by :meth:`_ReversibleColumn.backward`.

    Each level is recomputed (or its graph taken from the forward), the inverse of its shortcut rebuilds the
    previous column's level, and its gradient is passed on to its inputs and parameters. At the end the
    previous column's states and gradients go on the tape for its own backward.
    """

    def __init__(self, ctx, grads: Tuple[Optional[Tensor], ...]):
        self.column: Column = ctx.column
        self.tape: _Tape = ctx.run.tape
        self.sharded, self.autocast, self.rng = ctx.sharded, ctx.autocast, ctx.rng
        saved = ctx.saved_tensors
        self.x0 = saved[0].detach()
        self.context = dict(ctx.run.context_plain, **dict(zip(ctx.run.context_keys, saved[1:])))
        if ctx.run.last:
            self.states, self.grads, self.own_states, self.top = self._from_outputs(ctx, grads)
        else:
            self.states, self.grads, self.own_states, self.top = self._from_tape(grads)
        self.index = {p: i for i, p in enumerate(ctx.params)}
        self.param_grads: List[Optional[Tensor]] = [None] * len(ctx.params)
        L = len(self.column.levels)
        self.prev = None if self.column.index == 0 else [None] * L  # the previous column, rebuilt top level first
        self.prev_grads: List[Optional[Tensor]] = [None] * L
        self.grad_x0: Optional[Tensor] = None

    @staticmethod
    def _from_outputs(ctx, grads: Tuple[Optional[Tensor], ...]):
        """The last column starts from its outputs, and from its top level's graph where the forward kept it."""
        if ctx.outputs is None:
            raise RuntimeError(RUNS_ONCE)
        if any(s._version != version for s, version in ctx.outputs):
            raise RuntimeError("reversible columns: an output was modified in place after the forward, "
                               "but backward rebuilds the previous columns from it")
        states = [s for s, _ in ctx.outputs]
        top, ctx.top = ctx.top, None
        ctx.outputs = None  # from here on, each state is freed once its level is rebuilt
        return states, list(grads), False, top  # the caller may still hold the outputs: not ours to overwrite

    def _from_tape(self, grads: Tuple[Optional[Tensor], ...]):
        """Any other column starts from its states and gradients as the next column's backward rebuilt them: ours
        alone, states to overwrite and gradients to free once used. (What autograd hands in here are stand-ins;
        see :meth:`hand_down`.)"""
        c, L = self.column.index, len(self.column.levels)
        if c not in self.tape.rebuilt:
            raise RuntimeError(RUNS_ONCE)
        tapped_grad = grads[L - 1] if c in self.tape.tapped else None  # the stand-in plus the caller's gradient
        states, own_grads = self.tape.rebuilt.pop(c)
        own_grads[L - 1] = _add(own_grads[L - 1], tapped_grad)
        return states, own_grads, True, None

    def level(self, l: int) -> None:
        """Level l: recompute it, rebuild the previous column's level l, and pass its gradient on."""
        if self.top is not None:  # the last column's top level, its graph kept from the forward
            (low, y), high, top_in, self.top = self.top, None, None, None
        else:
            low, high, top_in, y = self._recompute(l)
        grad = self.grads[l]
        if self.prev is not None:
            self._invert_shortcut(l, y, grad)
        self.states[l] = self.grads[l] = None  # release state-sized tensors as soon as they are used up
        if grad is None:  # nothing downstream depends on this level
            return
        inputs = [t for t in (low, high, top_in) if t is not None]
        got_inputs, got_params = self._level_grads(l, y, grad, inputs)
        del y, grad  # the level's graph and gradient, before the gradients are added up
        self._add_input_grads(l, got_inputs, high is not None, top_in is not None)
        for p, g in got_params:
            self.param_grads[self.index[p]] = _add(self.param_grads[self.index[p]], g)

    def _recompute(self, l: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
        """F_l again, with grad, on the forward's inputs (cast as the forward cast them) and random numbers: its
        inputs low, high and top (as leaves that require grad) and its result."""
        column, tape, c, dtype = self.column, self.tape, self.column.index, self.x0.dtype
        low, high = column.inputs(l, self.x0, self.states, self.prev)
        low, high = _leaf(low), _leaf(high)
        low_cast = low if l == 0 else tape.forward_cast(c, l - 1, low, dtype)
        high_cast = None if high is None else tape.forward_cast(c - 1, l + 1, high, dtype)
        top_in = _leaf(column.top_input(l, self.prev))  # rebuilt already: the top level comes first
        top_cast = None if top_in is None else tape.forward_cast(c - 1, len(column.levels) - 1, top_in, dtype)
        # Autocast covers the recompute only: the gradients are taken outside it, as autograd takes them in plain
        # mode, so that no backward formula is cast to another precision.
        with self.autocast, self.rng[l].replayed() if l in self.rng else nullcontext():
            y = column.f(l, low_cast, high_cast, self.context, dtype, top_cast)
        return low, high, top_in, y

    def _invert_shortcut(self, l: int, y: Tensor, grad: Optional[Tensor]) -> None:
        """Rebuild the previous column's level l from x_l = y + gamma * x_l^prev, and differentiate the shortcut:
        grad * gamma to x_l^prev, grad * x_l^prev to gamma.

        By hand: autograd would keep two more state-sized tensors (gamma * x_l^prev and the sum) for no gain. The
        ops are those autograd runs for addcmul, so the gradients are the same to the bit."""
        param = self.column.gammas[l]
        gamma = clamp_gamma(param).to(STREAM_DTYPE)
        with torch.no_grad():
            rebuilt = self.states[l].sub_(y) if self.own_states else self.states[l] - y  # x_l is not needed again
            self.prev[l] = self.tape.check(self.column.index - 1, l, rebuilt.div_(gamma))
        if grad is None:
            return
        self.prev_grads[l] = _add(self.prev_grads[l], grad * gamma.detach())
        into_dot_grad = self.sharded and param.requires_grad  # under FSDP: see _ReversibleColumn
        if into_dot_grad or param in self.index:
            grad_gamma = (grad * self.prev[l]).sum_to_size(gamma.shape)
            if into_dot_grad:
                torch.autograd.backward(gamma, grad_gamma)
            else:
                i = self.index[param]
                self.param_grads[i] = _add(self.param_grads[i], torch.autograd.grad(gamma, param, grad_gamma)[0])

    def _level_grads(self, l: int, y: Tensor, grad: Tensor,
                     inputs: List[Tensor]) -> Tuple[List[Optional[Tensor]], List[Tuple[nn.Parameter, Tensor]]]:
        """The gradients of level l's inputs, and its parameters' with them (none under FSDP, where they go into
        the parameters' .grad)."""
        trained = any(p.requires_grad for p in self.column.levels[l].parameters())
        if self.sharded:
            if trained and not _reaches_a_parameter(y, inputs):
                raise RuntimeError(NO_PARAMETER_GRADIENTS.format(level=l, column=self.column.index))
            torch.autograd.backward(y, grad)  # into the inputs' and the parameters' .grad
            return [t.grad for t in inputs], []
        level_params = [p for p in self.column.levels[l].parameters() if p in self.index]
        got = torch.autograd.grad(y, inputs + level_params, grad, allow_unused=True)
        got_params = got[len(inputs):]
        if trained and all(g is None for g in got_params):
            raise RuntimeError(NO_PARAMETER_GRADIENTS.format(level=l, column=self.column.index))
        return list(got[:len(inputs)]), list(zip(level_params, got_params))

    def _add_input_grads(self, l: int, got: List[Optional[Tensor]], high: bool, top: bool) -> None:
        """Add the gradients of level l's inputs (low, then high and top where it has them) to those of the states
        they came from: this column's level below (the stem output for l = 0) and the previous column's."""
        if l == 0:
            self.grad_x0 = _add(self.grad_x0, got[0])
        else:
            self.grads[l - 1] = _add(self.grads[l - 1], got[0])
        if high:
            self.prev_grads[l + 1] = _add(self.prev_grads[l + 1], got[1])
        if top:
            self.prev_grads[-1] = _add(self.prev_grads[-1], got[-1])

    def hand_down(self) -> Tuple[Optional[Tensor], ...]:
        """Put the previous column's states and gradients on the tape; return what autograd gets for them.

        Autograd gets zero-size stand-ins (a scalar expanded to the state's shape), which keep the order of the
        backwards: a gradient autograd passes into a backward stays alive until that backward returns, so the real
        ones, passed this way, would be held all through the previous column's backward."""
        if self.prev is None:
            return ()
        c = self.column.index
        self.tape.rebuilt[c - 1] = self.prev, self.prev_grads
        stand_ins = tuple(None if g is None else g.new_zeros(()).expand(g.shape) for g in self.prev_grads)
        if c == 1:  # column 0 is rebuilt: the last rebuild of this backward
            self.tape.owner._finish_backward(self.tape.errors)
        return stand_ins


def _capturing() -> bool:
    """Whether this forward is being captured into a graph rather than run: torch.export (and the ONNX exporter
    built on it) or torch.jit.trace. (FX symbolic tracing keeps the columns as a leaf: see revcol_vit.model.)"""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded one (a DTensor, as FSDP2 leaves a parameter outside its module's forward)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
        gamma_init: the constant gamma starts at, of either sign (see :func:`check_gamma_init`).
        reversible: rebuild activations in backward (memory flat in N) instead of storing them
            (plain autograd). Switching never changes the forward output, nor the gradients.
        keep_top_graph: in reversible mode, run the last column's top level with autograd in the forward and
            keep its graph, so that backward starts from it instead of recomputing it: one level's recompute
            fewer (1/(N L) of them). It holds one level's activations from the forward to the backward. That
            is free when little runs after the columns (a classifier head): backward's first step would
            rebuild the same graph next to the same states. It is not free when a large network runs in
            between, such as a decoder, whose peak it adds to.
        rebuild_budget_bits: in reversible mode, a column's states are kept for backward (L float64 states)
            wherever rebuilding them from the next exact ones would magnify rounding by more than
            ``2**rebuild_budget_bits`` (the product of 1/|gamma| over the columns in between). With the
            default 12 no state is kept up to 12 columns at |gamma| >= 0.5; 0 keeps every column.

        bottom_reads_top: level 0 of every column after the first also reads the previous column's top level,
            passed to its level function as the keyword ``top`` (RevCol-H); needs 3 levels or more.

    The level functions compute in the stem output's dtype (under the caller's autocast), the states are
    carried in float64 between them, and the outputs are returned in the stem output's dtype.

    Keyword arguments of ``forward`` after the stem output (for example a padding mask) reach every level
    function unchanged; they must not need gradients. Levels with BatchNorm would update running
    statistics twice in reversible mode (once more in the recompute): use LayerNorm.
    """

    def __init__(self, columns: Sequence[Sequence[nn.Module]], gamma_shapes: Sequence[Sequence[int]],
                 gamma_init: float = GAMMA_INIT, reversible: bool = True, keep_top_graph: bool = False,
                 rebuild_budget_bits: int = REBUILD_BUDGET_BITS, bottom_reads_top: bool = False):
        super().__init__()
        if len(columns) < 1:
            raise ValueError(f"need at least 1 column, got {len(columns)}")
        num_levels = len(columns[0])
        if num_levels < 2:
            raise ValueError(f"need at least 2 levels per column, got {num_levels}")
        for c, levels in enumerate(columns):
            if len(levels) != num_levels:
                raise ValueError(f"column {c} has {len(levels)} levels, column 0 has {num_levels}")
        if bottom_reads_top and num_levels < 3:
            raise ValueError(f"bottom_reads_top needs 3 levels or more, got {num_levels}")
        if len(gamma_shapes) != num_levels:
            raise ValueError(f"got {len(gamma_shapes)} gamma shapes for {num_levels} levels")
        check_gamma_init(gamma_init, len(columns))
        if rebuild_budget_bits < 0:
            raise ValueError(f"rebuild_budget_bits must be >= 0, got {rebuild_budget_bits}")
        self.num_levels = num_levels
        self.columns = nn.ModuleList(
            Column(levels, gamma_shapes, gamma_init, index=c) for c, levels in enumerate(columns))
        for column in self.columns[1:]:
            column.reads_top = bottom_reads_top
        self.reversible = reversible
        self.keep_top_graph = keep_top_graph
        self.rebuild_budget_bits = rebuild_budget_bits
        self.levels_compiled = False
        self._errors: Dict[Tuple[int, int], Tensor] = {}
        self._worst_error: Optional[Tensor] = None  # on the device: the worst since worst_reconstruction_error()
        self._warned = False
        self._growth_bits: Optional[List[float]] = None  # log2 of each column's amplification, on the host
        self._growth_copy: Optional[Tuple[Tensor, "torch.cuda.Event"]] = None  # a device-to-host copy under way
        self.register_load_state_dict_post_hook(self._forget_gammas)
        self._reconstruction_hooks: Dict[int, Callable] = OrderedDict()  # RemovableHandle keeps a weak reference

    def forward(self, x0: Tensor, **context) -> List[Tensor]:
        return self.forward_with_taps(x0, (), **context)[0]

    def forward_with_taps(self, x0: Tensor, tap_columns: Sequence[int], **context) -> Tuple[List[Tensor], List[Tensor]]:
        """The last column's level states, and the top-level state of each column in ``tap_columns`` (in
        increasing order), for losses on intermediate columns. Gradients flow back into the tapped states:
        in reversible mode a tapped column's backward adds the caller's gradient to the one its next column
        hands down, so memory stays flat in the number of columns (what the caller keeps aside)."""
        taps = sorted(set(tap_columns))
        if any(not 0 <= c < len(self.columns) for c in taps):
            raise ValueError(f"tap_columns {list(tap_columns)} must lie in 0..{len(self.columns) - 1}")
        # Reversible only where a training backward can follow: a frozen model under grad mode keeps nothing, an
        # eval model runs plain, and so does a forward captured into a graph (torch.export, ONNX, jit.trace),
        # which cannot hold the reversible Function.
        if self.reversible and self.training and not _capturing() and torch.is_grad_enabled() and (
                x0.requires_grad or any(p.requires_grad for p in self.parameters())):
            states, tapped = self._forward_reversible(x0, context, taps)
        else:
            states, tapped = None, []
            for c, column in enumerate(self.columns):
                states = column(x0, states, context)
                if c in taps:
                    tapped.append(states[-1])
        return [s.to(x0.dtype) for s in states], [t.to(x0.dtype) for t in tapped]

    def compile_levels(self, **options) -> "ReversibleColumns":
        """Compile every level function in place with ``torch.compile(**options)``; the reversible machinery
        around them stays eager. The reversible forward then runs the levels as the recompute does (with
        grad, on inputs that require it), so that both passes run the same compiled kernels.

        Random ops inside a level must draw from the global generator outside the compiled graphs, as the
        isotropic levels' DropPath and Dropout do; otherwise the backward's recompute cannot replay them.
        """
        # A level compiles once per variant it meets: with or without a higher input, grad mode (eval and the
        # recompute), train or eval, with or without context tensors, static then dynamic shapes. Dynamo's
        # default of 8 per function would silently leave the rest eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for column in self.columns:
            for level in column.levels:
                level.compile(**options)
        self.levels_compiled = True
        return self

    def worst_reconstruction_error(self) -> Optional[float]:
        """The worst reconstruction error (relative, of a rebuilt state) over the reversible backwards since the
        last call (None if none rebuilt a column). It is kept on the device, so backward reads nothing back; this
        call reads it once, for a training loop's log interval. Warns once above 1e-4, as
        :attr:`reconstruction_error` does."""
        if self._worst_error is None:
            return None
        worst, self._worst_error = float(self._worst_error.cpu()), None
        self._warn_if_drifting(worst, "a rebuilt state")
        return worst

    def _warn_if_drifting(self, error: float, where: str) -> None:
        if not error <= RECONSTRUCTION_WARN and not self._warned:  # a NaN error warns too
            self._warned = True
            warnings.warn(
                f"reversible columns: {where} is {error:.1e} off the forward's (relative), above "
                f"{RECONSTRUCTION_WARN:g}: reversible gradients differ from plain autograd's. Use deterministic "
                f"level kernels, keep more states (a lower rebuild_budget_bits), a larger gamma_init, or "
                f"reversible=False", stacklevel=3)

    @property
    def reconstruction_error(self) -> Optional[ReconstructionError]:
        """The worst rebuilt state of the last reversible backward, relative to the forward's (max norm over a
        fixed sample of each state); None before the first such backward with two columns or more.

        Reading it warns once if the error is above 1e-4 or not finite (a NaN error is the worst): the reversible
        gradients are then no longer those of plain autograd (non-deterministic level kernels, say, or gammas too small
        for the budget).
        """
        if not self._errors:
            return None
        keys = list(self._errors)
        errors = torch.stack([self._errors[k] for k in keys]).float().cpu()
        worst = int(errors.argmax())
        result = ReconstructionError(float(errors[worst]), *keys[worst])
        self._warn_if_drifting(result.error, f"the rebuilt state of column {result.column}, level {result.level}")
        return result

    def register_reconstruction_hook(self, hook: Callable[["ReversibleColumns", Tensor], None]) -> RemovableHandle:
        """``hook(columns, error)`` runs at the end of every reversible backward that rebuilt a column. ``error`` is
        that backward's worst relative error, a 0-dim tensor on the device: a hook can log it without waiting for
        the device (``columns.reconstruction_error`` reads it, with its column and level)."""
        handle = RemovableHandle(self._reconstruction_hooks)
        self._reconstruction_hooks[handle.id] = hook
        return handle

    def _finish_backward(self, errors: Dict[Tuple[int, int], Tensor]) -> None:
        self._errors = errors
        worst = torch.stack(list(errors.values())).max()
        self._worst_error = worst if self._worst_error is None else torch.maximum(self._worst_error, worst)
        for hook in self._reconstruction_hooks.values():
            hook(self, worst)

    def _kept_columns(self) -> Set[int]:
        """The columns whose states backward cannot rebuild within the budget: walking down from the last
        column (kept as the outputs), the bound on the rebuild's error grows by 1/|gamma| per column."""
        if len(self.columns) < 2:
            return set()
        growth, current = self._gamma_growth_bits()
        budget = self.rebuild_budget_bits - (0.0 if current else STALE_GAMMAS_MARGIN_BITS)
        kept, bits = set(), 0.0
        for c in reversed(range(len(self.columns) - 1)):  # column c is rebuilt by column c + 1
            bits += growth[c]
            if bits > budget:
                kept.add(c)
                bits = 0.0
        return kept

    def _gamma_growth_bits(self) -> Tuple[List[float], bool]:
        """log2 of each column's amplification (from column 1 on), without waiting for the device, and whether it
        is from the current gammas. On the CPU it is. On a GPU each forward starts a copy to the host, and
        decides from the newest copy that has arrived; only the first forward, and the first after
        load_state_dict, wait for theirs."""
        growth = torch.stack([column.amplification() for column in self.columns[1:]]).log2()
        if not growth.is_cuda:  # on the CPU nothing to wait for (elsewhere, a blocking copy)
            return (growth if growth.device.type == "cpu" else growth.cpu()).numpy().tolist(), True
        if self._growth_copy is not None and self._growth_copy[1].query():
            self._growth_bits, self._growth_copy = self._growth_copy[0].numpy().tolist(), None
        if self._growth_copy is None:  # one copy under way at a time
            host = torch.empty(growth.shape, dtype=growth.dtype, pin_memory=True)
            host.copy_(growth, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(growth.device))
            self._growth_copy = host, event
        if self._growth_bits is None:
            host, event = self._growth_copy
            event.synchronize()
            self._growth_bits, self._growth_copy = host.numpy().tolist(), None
            return self._growth_bits, True
        return self._growth_bits, False

    def _forget_gammas(self, module: nn.Module, incompatible_keys) -> None:
        """After load_state_dict: the next forward waits for the new gammas' copy, not deciding from the old."""
        self._growth_bits = self._growth_copy = None

    # Opaque to a whole-model torch.compile (one graph break here): Dynamo would compile the levels inside the
    # no-grad forward while the recompute runs them eagerly, and the inverse magnifies the difference. The levels
    # run as they are in both passes, compiled where compile_levels() compiled them.
    @torch._dynamo.disable
    def _forward_reversible(self, x0: Tensor, context: Dict,
                            taps: Sequence[int]) -> Tuple[List[Tensor], List[Tensor]]:
        keys = [k for k, v in context.items() if isinstance(v, Tensor)]
        for k in keys:
            if context[k].requires_grad:  # it would silently get no gradient
                raise ValueError(f"keyword argument '{k}' requires grad, but reversible columns give keyword "
                                 f"arguments no gradient: detach it, or make it a parameter of a level")
        plain = {k: v for k, v in context.items() if not isinstance(v, Tensor)}
        tape = _Tape(self, self._kept_columns())
        tape.tapped = set(taps)
        states = None
        tapped: List[Tensor] = []
        for c, column in enumerate(self.columns):
            last = c == len(self.columns) - 1
            run = _ReversibleRun(tape, last, last and self.keep_top_graph, self.levels_compiled, plain, keys)
            states = column(x0, states, context, reversible=run)
            if c in tape.tapped:
                tapped.append(states[-1])
        return states, tapped
