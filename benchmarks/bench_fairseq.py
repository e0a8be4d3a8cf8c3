"""``benchmark.py fairseq --mode MODE``: the RevCol-Transformer against fairseq's Transformer-big.

  exactness   (CPU) the tiny architecture cast wholly to float16 / bfloat16 (what fairseq's --fp16 does):
              relative gradient error of reversible against plain, worst over the encoder's parameters.
  throughput  (CUDA) training words/s and generation sentences/s.

Training runs the real ``fairseq-train`` on ``--task dummy_mt`` (dictionary 32768, 30-token sentences,
shared embeddings, Adam, label smoothing, --fp16) and reads words/s from fairseq's JSON log, skipping the
first log interval (warm-up). Generation builds both models in one process (RevCol also with compiled encoder
levels) and times beam search (beam 4) on random 30-token sources with the output length pinned, so both
decoders produce the same number of tokens. The encoder's memory is ``benchmark.py memory --mode fairseq-encoder``.
"""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import seconds

GENERATORS = [  # (arch, compiled encoder levels): the checkpoint flag --revcol-compile compiles them in generation
    ("transformer_wmt_en_de_big", False),
    ("revcol_transformer", False),
    ("revcol_transformer", True),
]
RUNS = [  # (arch, precision, extra flags)
    ("transformer_wmt_en_de_big", "fp16", ()),
    ("revcol_transformer", "fp16", ()),
    ("revcol_transformer", "fp16", ("--revcol-compile",)),
    ("revcol_transformer", "amp", ()),
]
DICT_SIZE, SENT_LEN = 32768, 30


def build(arch, *flags):
    """A model of ``arch`` for ``--task dummy_mt`` (dictionary 1000), built from seed 0."""
    from fairseq import options, tasks
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["--task", "dummy_mt", "--dict-size", "1000", "--arch", arch,
                                                "--user-dir", "revcol_fairseq", *flags])
    torch.manual_seed(0)
    return tasks.setup_task(args).build_model(args)


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


def exactness():
    print("| cast | columns | gamma | worst relative gradient error |\n|---|---|---|---|")
    for dtype, columns, gamma in [(torch.float16, 2, 0.5), (torch.float16, 4, 1.0), (torch.float16, 4, 0.5),
                                  (torch.bfloat16, 4, 0.5)]:
        error = half_precision_error(dtype, columns, gamma)
        print(f"| {str(dtype).split('.')[1]} | {columns} | {gamma} | {error:.1%} |", flush=True)


def train_wps(arch, precision, extra, max_tokens, args):
    cmd = [sys.executable, "-m", "fairseq_cli.train", "--user-dir", "revcol_fairseq", "--task", "dummy_mt",
           "--dict-size", str(DICT_SIZE),
           "--src-len", str(SENT_LEN), "--tgt-len", str(SENT_LEN), "--dataset-size", "1000000",
           "--arch", arch, "--share-all-embeddings", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
           "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000",
           "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", f"--{precision}",
           "--max-tokens", str(max_tokens), "--max-update", str(args.updates), "--disable-validation",
           "--no-save", "--log-format", "json", "--log-interval", str(args.log_interval), "--num-workers", "0", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if args.log_dir:
        name = "_".join([arch, precision, *(flag.strip("-") for flag in extra), str(max_tokens)])
        Path(args.log_dir, f"{name}.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"fairseq-train failed for {arch}:\n{out.stderr[-3000:]}")
    params = None
    wps = []
    for line in (out.stdout + out.stderr).splitlines():
        if "num. shared model params:" in line:
            params = int(line.split("num. shared model params:")[1].split()[0].replace(",", ""))
        if "{" in line and '"wps"' in line:
            stats = json.loads(line[line.index("{"):])
            if "train_wps" not in stats and "wps" in stats:
                wps.append(float(stats["wps"]))
    return params, statistics.median(wps[1:]) if len(wps) > 1 else float("nan")


def generation_speed(arch, compiled, args):
    from fairseq import options, tasks
    from fairseq.sequence_generator import SequenceGenerator

    import revcol_fairseq  # noqa: F401  (registers revcol_transformer)
    parser = options.get_training_parser()
    a = options.parse_args_and_arch(parser, ["--task", "dummy_mt", "--dict-size", str(DICT_SIZE), "--arch", arch,
                                             "--share-all-embeddings", "--user-dir", "revcol_fairseq"])
    task = tasks.setup_task(a)
    torch.manual_seed(0)
    model = task.build_model(a).cuda().half().eval()
    if compiled:
        model.encoder.revcol.compile_levels()
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=4, max_len_a=0, max_len_b=SENT_LEN,
                                  min_len=SENT_LEN)
    d = task.source_dictionary
    src = torch.randint(d.nspecial, len(d), (args.gen_batch, SENT_LEN), device="cuda")
    src[:, -1] = d.eos()
    sample = {"net_input": {"src_tokens": src,
                            "src_lengths": torch.full((args.gen_batch,), SENT_LEN, device="cuda")}}

    def generate_batches():
        for _ in range(args.gen_batches):
            generator.generate([model], sample)

    with torch.no_grad():
        generator.generate([model], sample)  # warm-up (and compilation)
        torch.cuda.synchronize()
        return args.gen_batch * args.gen_batches / seconds(generate_batches, torch.device("cuda"))


def run(args, device, title):
    if args.mode == "exactness":
        return exactness()
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    print(f"fp16, dummy_mt dict {DICT_SIZE}, {SENT_LEN}-token sentences\n")
    print("| arch | precision | flags | params | max tokens | train words/s |\n|---|---|---|---|---|---|")
    train = {}
    for max_tokens in map(int, args.max_tokens.split(",")):
        for arch, precision, extra in RUNS:
            params, wps = train_wps(arch, precision, extra, max_tokens, args)
            train[arch, precision, extra, max_tokens] = wps
            print(f"| {arch} | {precision} | {' '.join(extra)} | {params / 1e6:.1f}M | {max_tokens} | {wps:.0f} |",
                  flush=True)
    for max_tokens in map(int, args.max_tokens.split(",")):
        big = train[RUNS[0] + (max_tokens,)]
        print(f"max tokens {max_tokens}: training words/s against {RUNS[0][0]} --fp16: " + ", ".join(
            f"{arch} --{precision} {' '.join(extra)} {train[arch, precision, extra, max_tokens] / big:.2f}"
            for arch, precision, extra in RUNS[1:]))
    gen = {(arch, compiled): generation_speed(arch, compiled, args) for arch, compiled in GENERATORS}
    for (arch, compiled), speed in gen.items():
        print(f"generation, beam 4, batch {args.gen_batch}: {arch}{' compiled' * compiled} {speed:.1f} sentences/s "
              f"({speed / gen[GENERATORS[0]]:.2f}x {GENERATORS[0][0]})", flush=True)

