"""``benchmark.py params``: parameters and multiply-adds of every RevCol-ViT and hierarchical RevCol variant at
224x224, beside the paper's figures; prints the markdown tables of docs/vit.md and docs/hierarchical.md (the
hierarchical models are built on the meta device: no weights are allocated).

Multiply-adds (what papers call FLOPs) are counted as the column sweep counts them (``revcol_vit.sweep.gflops``:
torch's FlopCounterMode on the meta device, halved).
"""
import timm
import torch

import revcol_vit
from revcol_vit import hierarchical
from revcol_vit.sweep import gflops

# Table 9 (params, FLOPs); Appendix B.3 states only "FLOPs about 18G" for its 32-block family.
PAPER = {
    "revcol_vit_s": ("16M", "4.6G"),
    "revcol_vit_b": ("67M", "18.8G"),
    "revcol_vit_b_1x32": ("-", "~18G"),
    "revcol_vit_b_2x16": ("-", "~18G"),
    "revcol_vit_b_4x8": ("-", "~18G"),
    "revcol_vit_b_8x4": ("-", "~18G"),
}

# Table 1 and the official README (params, FLOPs at 224); XL is released only at 384 px, H only at 640 px.
PAPER_HIERARCHICAL = {
    "revcol_tiny": ("30M", "4.5G"),
    "revcol_small": ("60M", "9.0G"),
    "revcol_base": ("138M", "16.6G"),
    "revcol_large": ("273M", "39G"),
    "revcol_xlarge": ("-", "-"),
    "revcol_huge": ("2.1B", "-"),
}


def measure(name: str, **kwargs):
    """(parameters, multiply-adds) of one 224x224 image through ``name``."""
    model = timm.create_model(name, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    return params, round(gflops(model, 224) * 1e9)


def run(args, device, title):
    print("| model | columns | blocks per level | blocks in all | params | MACs | paper params | paper FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in revcol_vit.VARIANTS.items():
        params, macs = measure(name, mlp_ratio=args.mlp_ratio)
        blocks = cfg["num_columns"] * sum(cfg["depths"])
        paper_params, paper_flops = PAPER[name]
        print(f"| `{name}` | {cfg['num_columns']} | {cfg['depths']} | {blocks} | {params / 1e6:.1f}M "
              f"| {macs / 1e9:.2f}G | {paper_params} | {paper_flops} |", flush=True)

    print()
    print("| model | channels | blocks per level | columns | params | MACs | paper params | paper FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in hierarchical.VARIANTS.items():
        with torch.device("meta"):
            params, macs = measure(name)
        paper_params, paper_flops = PAPER_HIERARCHICAL[name]
        print(f"| `{name}` | {'/'.join(map(str, cfg['dims']))} | {cfg['depths']} | {cfg['num_columns']} "
              f"| {params / 1e6:.1f}M | {macs / 1e9:.2f}G | {paper_params} | {paper_flops} |", flush=True)
