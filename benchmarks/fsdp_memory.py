"""Parameter memory of one rank under FSDP2 (``fully_shard`` per column and on the root), 2 gloo ranks on CPU.

A RevCol-ViT-S with 4 columns trains one step (forward + backward). At every level call, in the forward and in the
backward's recompute, the rank's live parameter bytes are sampled: its shards plus every gathered (unsharded)
parameter that is allocated at that moment. The peak is compared with the whole model and with one column.

    python benchmarks/fsdp_memory.py
"""
import argparse
import os
import sys
import tempfile

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import revcol_vit  # noqa: E402,F401  (registers the RevCol-ViT models with timm)

MiB = 2 ** 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embed-dim", type=int, default=224)
    p.add_argument("--columns", type=int, default=4)
    return p.parse_args()


def live_parameter_bytes(model: nn.Module) -> int:
    """This rank's shards, plus the gathered parameters whose storage is allocated now."""
    total = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                total += fsdp_param.sharded_param._local_tensor.untyped_storage().nbytes()
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    total += unsharded.untyped_storage().nbytes()
    return total


def run(rank: int, init_file: str, args, reversible: bool, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = timm.create_model("revcol_vit_s", img_size=64, embed_dim=args.embed_dim, num_columns=args.columns,
                              num_classes=10, reversible=reversible)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    column = sum(p.numel() * p.element_size() for p in model.revcol.columns[1].parameters())
    for c in model.revcol.columns:
        fully_shard(c)
    fully_shard(model)
    peak = [0]

    def sample(*_):
        peak[0] = max(peak[0], live_parameter_bytes(model))

    for c in model.revcol.columns:
        for level in c.levels:
            level.register_forward_hook(sample)
    images, targets = torch.randn(2, 3, 64, 64), torch.arange(2)
    nn.functional.cross_entropy(model(images), targets).backward()
    if rank == 0:
        results[reversible] = (whole, column, peak[0])
    dist.destroy_process_group()


def main():
    args = parse_args()
    results = mp.Manager().dict()
    for reversible in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(run, args=(os.path.join(tmp, "init"), args, reversible, results), nprocs=2)
    print(f"revcol_vit_s, embed {args.embed_dim}, {args.columns} columns, fully_shard per column + root, 2 ranks")
    print("mode        whole model  one column  peak live params (rank 0)")
    for reversible in (True, False):
        whole, column, peak = results[reversible]
        print(f"{'reversible' if reversible else 'plain':<11} {whole / MiB:8.2f} MiB {column / MiB:7.2f} MiB "
              f"{peak / MiB:8.2f} MiB = shards {whole / 2 / MiB:.2f} + {(peak - whole / 2) / MiB:.2f} MiB")


if __name__ == "__main__":
    main()
