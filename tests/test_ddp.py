"""Reversible columns under DistributedDataParallel (gloo, 2 processes) equal one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import rel_error
from torch.nn.parallel import DistributedDataParallel

from revcol import isotropic_columns

pytestmark = pytest.mark.slow  # spawns processes

BATCH, TOKENS, DIM = 8, 5, 16


def make_model():
    torch.manual_seed(0)
    return isotropic_columns(DIM, [1, 1, 1, 1], 3, 4, drop_path_rate=0.0).double()


def batch_loss(states):
    """Mean over samples, so averaging over ranks equals the loss on the combined batch."""
    weights = [torch.linspace(-1, 1, s[0].numel(), dtype=s.dtype).view_as(s[0]) for s in states]
    return sum((s * w).flatten(1).sum(1).mean() for s, w in zip(states, weights))


def data():
    return torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def worker(rank, world_size, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = DistributedDataParallel(make_model())
    shard = data().chunk(world_size)[rank]
    micro = shard.chunk(2)  # gradient accumulation: two micro-batches, gradients reduced on the second only
    with model.no_sync():
        (batch_loss(model(micro[0])) / 2).backward()
    (batch_loss(model(micro[1])) / 2).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_file)
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    out_file = tmp_path / "grads.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    ddp_grads = torch.load(out_file)

    model = make_model()
    model.reversible = False  # the reference is plain autograd on the combined batch
    batch_loss(model(data())).backward()
    for name, p in model.named_parameters():
        err = rel_error(ddp_grads[name], p.grad)
        assert err < 1e-10, (name, err)
