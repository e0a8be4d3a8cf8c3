"""Parameters and multiply-adds of every RevCol-ViT and hierarchical RevCol variant at 224x224, beside the paper's
figures.

    PYTHONPATH=. python benchmarks/vit_params_flops.py [--mlp-ratio 4.0]

Prints the markdown tables of docs/vit.md and docs/hierarchical.md (the hierarchical models are counted on the
meta device: no weights are allocated). Multiply-adds (what papers call FLOPs) are torch's FlopCounterMode
count halved. On CPU, scaled_dot_product_attention runs as one fused op the counter has no formula for, so
the script supplies torch's own attention formula for it; otherwise QK^T and AV would go uncounted.
"""
import argparse

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import revcol_vit
from revcol_vit import hierarchical

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


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def measure(name: str, **kwargs):
    """(parameters, multiply-adds) of one 224x224 image through ``name``."""
    model = timm.create_model(name, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 224, 224))
    return params, counter.get_total_flops() // 2


def measure_hierarchical(name: str):
    """(parameters, multiply-adds) of one 224x224 image through ``name``, on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.randn(1, 3, 224, 224))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--mlp-ratio", type=float, default=4.0,
                        help="MLP width over C: 4 is the vanilla ViT block of Appendix B.1; other values only probe "
                             "which configuration Table 9's parameter counts imply")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("| model | columns | blocks per level | blocks in all | params | MACs | paper params | paper FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in revcol_vit.VARIANTS.items():
        params, macs = measure(name, mlp_ratio=args.mlp_ratio)
        blocks = cfg["num_columns"] * sum(cfg["depths"])
        paper_params, paper_flops = PAPER[name]
        print(f"| `{name}` | {cfg['num_columns']} | {cfg['depths']} | {blocks} | {params / 1e6:.1f}M "
              f"| {macs / 1e9:.2f}G | {paper_params} | {paper_flops} |")

    print()
    print("| model | channels | blocks per level | columns | params | MACs | paper params | paper FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in hierarchical.VARIANTS.items():
        params, macs = measure_hierarchical(name)
        paper_params, paper_flops = PAPER_HIERARCHICAL[name]
        print(f"| `{name}` | {'/'.join(map(str, cfg['dims']))} | {cfg['depths']} | {cfg['num_columns']} "
              f"| {params / 1e6:.1f}M | {macs / 1e9:.2f}G | {paper_params} | {paper_flops} |")


if __name__ == "__main__":
    main()
