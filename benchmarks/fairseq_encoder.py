"""RevCol-Transformer encoder: memory kept for backward, and what half precision does to reversible gradients.

1. Bytes autograd saves in the encoder's forward (paper width: d 768, ffn 3072, 12 heads, blocks 1,1,1,1) on
   8 x 64 tokens in float32, reversible and plain, at 4 and 8 columns. Plain counts include the weights that
   ops save a reference to.
2. The tiny architecture cast wholly to float16 / bfloat16 (what fairseq's --fp16 does): relative gradient
   error of reversible against plain, worst over the encoder's parameters.
3. Peak memory of one whole training step (encoder, decoder, loss, backward; paper width, 32 x 32 tokens),
   float32 and under bf16 autocast (what --amp does on GPU), above the parameters and their gradients; and
   in float32 with the encoder's keep_top_graph on, which the encoder leaves off.

    python benchmarks/fairseq_encoder.py
"""
import torch
from common import header
from fairseq import options, tasks

from revcol.memory import PeakBytes, count_saved_bytes


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
        model.encoder.revcol.reversible = reversible
        model.zero_grad()
        logits, _ = model(src, torch.full((3,), 8), prev)
        logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad.float() for n, p in model.encoder.named_parameters() if p.grad is not None}

    rev, plain = grads(True), grads(False)
    return max(((rev[n] - plain[n]).norm() / plain[n].norm()).item() for n in plain)


def step_peak_mib(autocast, keep_top_graph=False):
    model = build("revcol_transformer").train()
    model.encoder.revcol.keep_top_graph = keep_top_graph
    src, prev = torch.randint(4, 1000, (2, 32, 32), generator=torch.Generator().manual_seed(1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = model(src, torch.full((32,), 32), prev)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), prev.flatten())
        loss.backward()

    step()  # allocates the gradients, which the measured step starts with
    with PeakBytes(ignore=[*model.parameters(), *(p.grad for p in model.parameters())]) as peak:
        step()
    return peak.peak / 2**20


def main():
    print(f"# {header('CPU')}")
    print("| columns | reversible MiB | plain MiB |\n|---|---|---|")
    for columns in (4, 8):
        print(f"| {columns} | {saved_mib(columns, True):.1f} | {saved_mib(columns, False):.0f} |")
    print("\n| cast | columns | gamma | worst relative gradient error |\n|---|---|---|---|")
    for dtype, columns, gamma in [(torch.float16, 2, 0.5), (torch.float16, 4, 1.0), (torch.float16, 4, 0.5),
                                  (torch.bfloat16, 4, 0.5)]:
        error = half_precision_error(dtype, columns, gamma)
        print(f"| {str(dtype).split('.')[1]} | {columns} | {gamma} | {error:.1%} |")
    print("\n| training step | peak MiB |\n|---|---|")
    print(f"| float32 | {step_peak_mib(False):.1f} |")
    print(f"| float32, keep_top_graph | {step_peak_mib(False, keep_top_graph=True):.1f} |")
    print(f"| bf16 autocast | {step_peak_mib(True):.1f} |")


if __name__ == "__main__":
    main()
