"""Reversible columns under FSDP2 (``fully_shard``), 2 ranks on gloo: the gradients and parameters of the plain run
of the same sharded model, wrapped per column and per level."""
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)

pytestmark = pytest.mark.slow


def sharded_model(wrap: str, reversible: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same weights on every rank and in both modes
    model = timm.create_model("revcol_vit_s", img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=10,
                              depths=(1, 1, 1, 1), num_columns=3, reversible=reversible)
    for column in model.revcol.columns:
        for module in (column.levels if wrap == "level" else [column]):
            fully_shard(module)
    return fully_shard(model)


def train_and_collect(wrap: str, reversible: bool, rank: int):
    """Two SGD steps on this rank's data; every gradient and parameter after them, gathered whole."""
    model = sharded_model(wrap, reversible)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        images, targets = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,),
                                                                                           generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), targets).backward()
        grads = {name: None if p.grad is None else p.grad.full_tensor() for name, p in model.named_parameters()}
        optimizer.step()
    params = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
    return grads, params


def compare_on_ranks(rank: int, world_size: int, init_file: str, wrap: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        grads_p, params_p = train_and_collect(wrap, False, rank)
        grads_r, params_r = train_and_collect(wrap, True, rank)
        for name, g in grads_p.items():
            assert g is not None and grads_r[name] is not None, f"{name}: no gradient"
            assert torch.equal(grads_r[name], g), (name, (grads_r[name] - g).abs().max().item())
        for name, p in params_p.items():
            assert torch.equal(params_r[name], p), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["column", "level"])
def test_reversible_fsdp2_matches_plain_fsdp2_to_the_bit(wrap, tmp_path):
    mp.spawn(compare_on_ranks, args=(2, str(tmp_path / "init"), wrap), nprocs=2)
