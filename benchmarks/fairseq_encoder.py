"""RevCol-Transformer encoder: memory kept for backward, and what half precision does to reversible gradients.

1. Bytes autograd saves in the encoder's forward (paper width: d 768, ffn 3072, 12 heads, blocks 1,1,1,1) on
   8 x 64 tokens in float32, reversible and plain, at 4 and 8 columns. Plain counts include the weights that
   ops save a reference to.
2. The tiny architecture cast wholly to float16 / bfloat16 (what fairseq's --fp16 does): relative gradient
   error of reversible against plain, worst over the encoder's parameters.

    python benchmarks/fairseq_encoder.py
"""
from datetime import date

import torch
from fairseq import options, tasks

from revcol import count_saved_bytes


def build(arch, *flags):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["--task", "dummy_mt", "--dict-size", "1000", "--arch", arch,
                                                "--user-dir", "revcol_fairseq", *flags])
    torch.manual_seed(0)
    return tasks.setup_task(args).build_model(args)


def saved_mib(columns, reversible):
    flags = ["--revcol-columns", str(columns)] + ([] if reversible else ["--no-revcol-reversible"])
    encoder = build("revcol_transformer", *flags).encoder
    src = torch.randint(4, 1000, (8, 64))
    with count_saved_bytes() as saved:
        encoder(src, torch.full((8,), 64))
    return saved.bytes / 2**20


def half_precision_error(dtype, columns, gamma):
    model = build("revcol_transformer_tiny", "--dropout", "0", "--revcol-columns", str(columns),
                  "--revcol-gamma-init", str(gamma)).to(dtype)
    src = torch.randint(4, 1000, (3, 8), generator=torch.Generator().manual_seed(1))
    prev = torch.randint(4, 1000, (3, 4), generator=torch.Generator().manual_seed(2))

    def grads(reversible):
        model.encoder.columns.reversible = reversible
        model.zero_grad()
        logits, _ = model(src, torch.full((3,), 8), prev)
        logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad.float() for n, p in model.encoder.named_parameters() if p.grad is not None}

    rev, plain = grads(True), grads(False)
    return max(((rev[n] - plain[n]).norm() / plain[n].norm()).item() for n in plain)


def main():
    print(f"# CPU, {date.today()}, torch {torch.__version__}")
    print("| columns | reversible MiB | plain MiB |\n|---|---|---|")
    for columns in (4, 8):
        print(f"| {columns} | {saved_mib(columns, True):.1f} | {saved_mib(columns, False):.0f} |")
    print("\n| cast | columns | gamma | worst relative gradient error |\n|---|---|---|---|")
    for dtype, columns, gamma in [(torch.float16, 2, 0.5), (torch.float16, 4, 1.0), (torch.float16, 4, 0.5),
                                  (torch.bfloat16, 4, 0.5)]:
        error = half_precision_error(dtype, columns, gamma)
        print(f"| {str(dtype).split('.')[1]} | {columns} | {gamma} | {error:.1%} |")


if __name__ == "__main__":
    main()
