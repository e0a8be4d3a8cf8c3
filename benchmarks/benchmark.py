"""The project's benchmarks, one subcommand each; run from the repository root:

    python benchmarks/benchmark.py SUBCOMMAND [options]      (--help after a subcommand lists its options)

  memory      what a training step keeps for backward and peaks at (--mode columns, vit-cpu, vit-budget,
              fairseq-encoder, stream)
  throughput  RevCol-ViT against timm's ViT: training img/s and activation memory (CUDA)
  ops         ATen ops per training step and generation's host time (CPU and meta)
  fairseq     RevCol-Transformer against Transformer-big (--mode exactness on CPU, throughput on CUDA)
  numerics    reversible against plain gradients, per stream dtype
  compile     compiled levels: gradient error and step time
  params      parameters and multiply-adds of every RevCol-ViT variant

The first line of every output is the device, date, commit, torch version and the command line.
"""
import argparse
import importlib
import shlex
import sys

import torch
from common import device_label, header

SUBCOMMANDS = {  # subcommand -> (module, one-line description)
    "memory": ("bench_memory", "what a training step keeps for backward and peaks at"),
    "throughput": ("bench_throughput", "RevCol-ViT against timm's ViT: training img/s and activation memory"),
    "ops": ("bench_ops", "ATen ops per training step, and generation's host time"),
    "fairseq": ("bench_fairseq", "RevCol-Transformer against Transformer-big"),
    "numerics": ("bench_numerics", "reversible against plain gradients, per stream dtype"),
    "compile": ("bench_compile", "compiled levels: gradient error and step time"),
    "params": ("bench_params", "parameters and multiply-adds of every RevCol-ViT variant"),
}
RUNS_ON = {  # subcommand, with its --mode where it has one -> the devices it measures on
    "memory columns": ("cpu", "cuda"), "memory vit-cpu": ("cpu",), "memory vit-budget": ("cuda",),
    "memory fairseq-encoder": ("cpu",), "memory stream": ("cpu", "cuda"), "throughput": ("cuda",), "ops": ("cpu",),
    "fairseq exactness": ("cpu",), "fairseq throughput": ("cuda",), "numerics": ("cpu",), "compile": ("cpu", "cuda"),
    "params": ("cpu",),
}
MEMORY_DEFAULTS = {  # --mode -> the defaults of its options
    "columns": dict(columns="1,2,4,8,16", amp="bf16", steps=10, out="benchmarks/results/memory"),
    "vit-cpu": dict(models="revcol_vit_s,revcol_vit_s plain,vit_small_patch16_224,revcol_vit_b,vit_base_patch16_224",
                    batches="8,16", amp="bf16", out="benchmarks/results/activation_memory_cpu"),
    "vit-budget": dict(models="revcol_vit_b,revcol_vit_b compiled,vit_base_patch16_224", amp="bf16",
                       out="benchmarks/results/vit_budget"),
    "fairseq-encoder": dict(),
    "stream": dict(columns="2,4,8,16", batch=4, steps=5, amp="bf16"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when there is a GPU (a CPU-only subcommand runs on CPU)")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="SUBCOMMAND")

    def add(name, **defaults):
        p = sub.add_parser(name, parents=[common], help=SUBCOMMANDS[name][1], description=SUBCOMMANDS[name][1])
        p.set_defaults(**defaults)
        return p

    p = add("memory")
    p.add_argument("--mode", choices=list(MEMORY_DEFAULTS), required=True)
    p.add_argument("--columns", help="column counts (columns: 1,2,4,8,16; stream: 2,4,8,16)")
    p.add_argument("--batch", type=int, help="columns: 64 on CUDA, 2 on CPU; stream: 4")
    p.add_argument("--batches", help="vit-cpu: two batch sizes, whose slope is the cost per image (8,16)")
    p.add_argument("--models", help="vit-cpu, vit-budget: model labels, comma-separated")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"])
    p.add_argument("--steps", type=int, help="timed steps per configuration (columns on CUDA: 10; stream: 5)")
    p.add_argument("--budget-gib", type=float, default=16.0, help="vit-cpu, vit-budget: the memory budget")
    p.add_argument("--dim", type=int, default=224, help="columns: width")
    p.add_argument("--depths", default="2,2,2,2", help="columns: blocks per level")
    p.add_argument("--heads", type=int, default=4, help="columns: attention heads")
    p.add_argument("--tokens", type=int, default=196, help="columns: tokens per sample")
    p.add_argument("--out", help="prefix of the .csv (and .png) the mode writes, if any")

    p = add("throughput")
    p.add_argument("--models", default="revcol_vit_s,revcol_vit_s compiled,revcol_vit_s plain,vit_small_patch16_224")
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--amp", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--out", default="benchmarks/results/vit_throughput", help="prefix of the .csv and .png")

    add("ops", threads=1)

    p = add("fairseq")
    p.add_argument("--mode", choices=["exactness", "throughput"], required=True)
    p.add_argument("--max-tokens", default="4096,8192", help="throughput")
    p.add_argument("--updates", type=int, default=200, help="throughput")
    p.add_argument("--log-interval", type=int, default=40, help="throughput")
    p.add_argument("--log-dir", default=None, help="throughput: keep each fairseq-train log here")
    p.add_argument("--gen-batch", type=int, default=128, help="throughput")
    p.add_argument("--gen-batches", type=int, default=10, help="throughput")

    p = add("numerics")
    p.add_argument("--part", choices=["exactness", "imagenet"], default="exactness",
                   help="bare columns and the registered models, or training steps of RevCol-ViT-S at 224 px")
    p.add_argument("--columns", default="2,4,8,16,20", help="exactness: column counts")
    p.add_argument("--imagenet-steps", type=int, default=20, help="imagenet: training steps")
    p.add_argument("--imagenet-batch", type=int, default=8)
    p.add_argument("--imagenet-autocast", default="none,bf16", help="imagenet: none, bf16 or both, comma-separated")

    p = add("compile")
    p.add_argument("--batch", type=int, default=4, help="of the timed RevCol-ViT-S step")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after a compiling and a warm-up step")

    p = add("params", threads=1)
    p.add_argument("--mlp-ratio", type=float, default=4.0,
                   help="MLP width over C: 4 is the vanilla ViT block of Appendix B.1; other values only probe "
                        "which configuration Table 9's parameter counts imply")
    return parser


def choose_device(parser, name: str, wanted: str) -> torch.device:
    """The device ``--device`` names, or for ``auto`` CUDA where the benchmark measures on it and there is a GPU;
    a one-line usage error where the benchmark does not measure on that device or there is none."""
    devices = RUNS_ON[name]
    if wanted == "auto":
        wanted = "cuda" if "cuda" in devices and (torch.cuda.is_available() or devices == ("cuda",)) else "cpu"
    if wanted not in devices:
        parser.error(f"{name} measures on {' or '.join(devices)}, not {wanted}")
    if wanted == "cuda" and not torch.cuda.is_available():
        parser.error(f"{name} needs CUDA, and there is no CUDA device here")
    return torch.device(wanted)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"{args.bench} {args.mode}" if hasattr(args, "mode") else args.bench
    device = choose_device(parser, name, args.device)
    if args.bench == "memory":
        for key, value in MEMORY_DEFAULTS[args.mode].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.batch is None:
            args.batch = 64 if device.type == "cuda" else 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    title = header(device_label(device), command)
    print(f"# {title}", flush=True)
    importlib.import_module(SUBCOMMANDS[args.bench][0]).run(args, device, title)


if __name__ == "__main__":
    main()
