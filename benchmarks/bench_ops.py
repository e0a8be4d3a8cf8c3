"""``benchmark.py ops``: ATen ops dispatched by one training step (forward + backward): the host-side cost
of eager PyTorch.

When a GPU step is launch-bound (small batches, narrow layers), its time is the number of ops times the
host's cost per op, whatever the batch. This count is the same on any device, so it needs no GPU. The ViT
models run on the meta device (no data, no compute; attention decomposes into its math ops there, where a
GPU runs one fused kernel). fairseq's models read values back from tensors, so they run on CPU with a
tiny batch. View ops (view, transpose, expand, detach, ...) are counted too: they launch no kernel but cost
host time.

Generation (beam 4, 8 sources of 30 tokens, output length pinned to 30) is launch-bound on a GPU too. Besides
its ops, and those of the encoder alone, it is timed on CPU at width 64 with one thread: there the compute is
negligible, so the time is the host's, what a launch-bound GPU waits for.
"""
import torch
from common import VIEW_OPS, VIT_MODELS, OpCounter, create_vit, median_seconds

FAIRSEQ_ARCHS = ["transformer_wmt_en_de_big", "revcol_transformer"]


def count(step):
    step()  # the first run allocates gradients and warms up
    with OpCounter() as counter:
        step()
    total = sum(counter.ops.values())
    views = sum(n for name, n in counter.ops.items() if name in VIEW_OPS)
    return total, total - views


def vit_step(label):
    with torch.device("meta"):
        model = create_vit(label, num_classes=1000).train()
    if hasattr(model, "revcol"):
        # Which columns to keep is read from the gammas' values, which meta tensors lack; at gamma_init 0.5 the
        # registered models keep none, so this instance answers that without reading them.
        model.revcol._kept_columns = set
    x = torch.empty(64, 3, 224, 224, device="meta")
    y = torch.zeros(64, dtype=torch.long, device="meta")
    return lambda: torch.nn.functional.cross_entropy(model(x), y).backward()


def fairseq_model(arch, flags=(), dict_size=32768):
    import types

    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    import revcol_fairseq  # noqa: F401  (registers revcol_transformer)
    dictionary = Dictionary()
    for i in range(dict_size - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       ["unused", "--arch", arch, "--share-all-embeddings", *flags])
    task = types.SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    torch.manual_seed(0)
    return ARCH_MODEL_REGISTRY[arch].build_model(args, task), dictionary


def fairseq_step(arch):
    model = fairseq_model(arch)[0].train()
    src, prev = torch.randint(4, 32768, (2, 8, 30))
    lengths = torch.full((8,), 30)
    return lambda: model(src, lengths, prev)[0].float().mean().backward()


WIDTH_64 = ["--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
            "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"]


def generation(arch, flags=(), dict_size=32768):
    """Beam search and the encoder alone, as functions of no arguments, for 8 sources of 30 tokens."""
    from fairseq.sequence_generator import SequenceGenerator
    model, dictionary = fairseq_model(arch, flags, dict_size)
    model.eval()
    generator = SequenceGenerator([model], dictionary, beam_size=4, max_len_a=0, max_len_b=30, min_len=30)
    src = torch.randint(dictionary.nspecial, len(dictionary), (8, 30))
    src[:, -1] = dictionary.eos()
    lengths = torch.full((8,), 30)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    return lambda: generator.generate([model], sample), lambda: model.encoder(src, lengths)


def host_ms(fn, repeats=7):
    return 1e3 * median_seconds(fn, torch.device("cpu"), repeats, warmup=1)


def generation_table():
    print("\n| model | generation ops | without views | encoder ops | without views | "
          "host ms at width 64: generation | encoder |\n|---|---|---|---|---|---|---|")
    host = {}
    with torch.no_grad():
        for arch in FAIRSEQ_ARCHS:
            ops = [count(fn) for fn in generation(arch)]
            host[arch] = [host_ms(fn) for fn in generation(arch, WIDTH_64, dict_size=1000)]
            print(f"| {arch} | {ops[0][0]} | {ops[0][1]} | {ops[1][0]} | {ops[1][1]} | "
                  f"{host[arch][0]:.1f} | {host[arch][1]:.1f} |", flush=True)
    # The decoders dispatch the same ops, so the encoders' host times make the difference; the totals vary more.
    (generate_big, encoder_big), (_, encoder_rev) = (host[arch] for arch in FAIRSEQ_ARCHS)
    print(f"revcol_transformer's encoder adds {encoder_rev - encoder_big:.1f} ms of host time per batch: launch-bound, "
          f"it generates at {generate_big / (generate_big + encoder_rev - encoder_big):.2f}x transformer_wmt_en_de_big")


def run(args, device, title):
    print("ATen ops per training step\n")
    print("| model | ops | ops without views |\n|---|---|---|")
    rows = {}
    for label in VIT_MODELS:
        rows[label] = count(vit_step(label))
        print(f"| {label} | {rows[label][0]} | {rows[label][1]} |", flush=True)
    try:
        for arch in FAIRSEQ_ARCHS:
            rows[arch] = count(fairseq_step(arch))
            print(f"| {arch} | {rows[arch][0]} | {rows[arch][1]} |", flush=True)
    except ImportError:
        print("(fairseq not installed: its models are left out)")
    for a, b in [("revcol_vit_s", "vit_small_patch16_224"), ("revcol_vit_s", "revcol_vit_s plain"),
                 ("revcol_vit_b", "vit_base_patch16_224"), ("revcol_transformer", "transformer_wmt_en_de_big")]:
        if a in rows and b in rows:
            print(f"{a} / {b}: {rows[a][0] / rows[b][0]:.2f}x the ops ({rows[a][1] / rows[b][1]:.2f}x without views)")
    if all(arch in rows for arch in FAIRSEQ_ARCHS):
        generation_table()
