"""What autograd keeps for backward on CUDA, op by op: RevCol-ViT-S against timm's ViT-S. No GPU needed.

The models run on fake CUDA tensors under bf16 autocast, so every op picks its CUDA kernel and dtype (float32
LayerNorm, fused rms_norm) and nothing is computed. Attention is the exception: choosing a fused attention
kernel needs a real device, so ``scaled_dot_product_attention`` is routed to the flash kernel, which is what a
GPU runs for these bf16 heads without a mask (head dims 56 and 64).

  kept after the forward   per image, for whole models under plain autograd (the reversible forward keeps
                           the stem output and the last column's states, ``memory.py``'s "saved", and in
                           RevCol-ViT the graph of the last column's top level, one level's worth)
  kept by op               per image, for one RevCol-ViT-S level (fusion + 2 blocks, what the backward
                           recomputes at a time) and one ViT-S block, grouped by the autograd node that
                           keeps it; a storage several nodes keep counts once, under the first one met
                           walking back from the output

What a step holds at its peak is more than this (gradients, the backward's temporaries, in reversible mode the
rebuilt states): that needs a GPU (``vit_throughput.py``, ``memory.py``).

    python benchmarks/saved_by_op.py      # a few seconds on CPU
"""
from collections import Counter
from datetime import date

import timm
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)
from revcol import count_saved_bytes

BATCH = 64
TOKENS = 196


def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    assert attn_mask is None and dropout_p == 0.0, "only the maskless, dropout-free attention of these models"
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, scale=scale)[0]


def kept_by_node(output: torch.Tensor) -> Counter:
    """Bytes of the distinct storages each autograd node of ``output``'s graph keeps, by node name."""
    kept, nodes, storages = Counter(), set(), set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in storages:
                    storages.add(t.untyped_storage()._cdata)
                    kept[node.name()] += t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return kept


def main():
    torch.manual_seed(0)
    print(f"# {date.today()}, torch {torch.__version__}, timm {timm.__version__}: what autograd keeps for backward, "
          f"fake CUDA tensors, bf16 autocast, batch {BATCH}, MiB per image")
    # Built on CPU (their initialization reads values), then moved to fake CUDA.
    vit = timm.create_model("vit_small_patch16_224", num_classes=1000).train()
    revcol = timm.create_model("revcol_vit_s", num_classes=1000, reversible=False).train()
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_attention
    # torch.autocast("cuda") turns itself off on a machine without CUDA; the fake tensors need it on.
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.set_autocast_enabled("cuda", True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
            vit.to("cuda")
            revcol.to("cuda")
            images = torch.randn(BATCH, 3, 224, 224)
            print("\n| model | kept after the forward |\n|---|---|")
            for name, model in [("vit_small_patch16_224", vit), ("revcol_vit_s plain", revcol)]:
                with count_saved_bytes() as saved:
                    model(images)
                print(f"| {name} | {saved.bytes / 2**20 / BATCH:.2f} |")

            level = revcol.revcol.columns[1].levels[0]  # with both inputs, as 12 of the 16 levels
            low, high = (torch.randn(BATCH, TOKENS, 224, requires_grad=True) for _ in range(2))
            tokens = torch.randn(BATCH, TOKENS + 1, 384, requires_grad=True)  # with the class token
            parts = {"RevCol-ViT-S level": kept_by_node(level(low, high)),
                     "ViT-S block": kept_by_node(vit.blocks[0](tokens))}
    finally:
        torch.set_autocast_enabled("cuda", False)
        F.scaled_dot_product_attention = sdpa
    names = sorted(set().union(*parts.values()), key=lambda n: -max(p[n] for p in parts.values()))
    print("\n| kept by | " + " | ".join(parts) + " |\n|---|" + "---|" * len(parts))
    for name in names + ["total"]:
        cells = [sum(p.values()) if name == "total" else p[name] for p in parts.values()]
        print(f"| {name} | " + " | ".join(f"{c / 2**20 / BATCH:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
