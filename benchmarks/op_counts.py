"""ATen ops dispatched by one training step (forward + backward): the host-side cost of eager PyTorch.

When a GPU step is launch-bound (small batches, narrow layers), its time is the number of ops times the
host's cost per op, whatever the batch. This count is the same on any device, so it needs no GPU. The ViT
models run on the meta device (no data, no compute; attention decomposes into its math ops there, where a
GPU runs one fused kernel). fairseq's models read values back from tensors, so they run on CPU with a
tiny batch. View ops (view, transpose, expand, detach, ...) are counted too: they launch no kernel but cost
host time.

    python benchmarks/op_counts.py          # a minute on CPU
"""
from collections import Counter
from datetime import date

import timm
import torch
from activation_memory import MODELS as VIT_MODELS  # the same models, in the script beside this one
from torch.utils._python_dispatch import TorchDispatchMode

FAIRSEQ_ARCHS = ["transformer_wmt_en_de_big", "revcol_transformer"]
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "unbind", "alias", "slice",
            "select", "unsqueeze", "squeeze", "as_strided", "split", "reshape"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(step):
    step()  # the first step allocates gradients
    with OpCounter() as counter:
        step()
    total = sum(counter.ops.values())
    views = sum(n for name, n in counter.ops.items() if name in VIEW_OPS)
    return total, total - views


def vit_step(label):
    name, kwargs = VIT_MODELS[label]
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000, **kwargs).train()
    x = torch.empty(64, 3, 224, 224, device="meta")
    y = torch.zeros(64, dtype=torch.long, device="meta")
    return lambda: torch.nn.functional.cross_entropy(model(x), y).backward()


def fairseq_step(arch):
    import types

    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    import revcol_fairseq  # noqa: F401  (registers revcol_transformer)
    dictionary = Dictionary()
    for i in range(32768 - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       ["unused", "--arch", arch, "--share-all-embeddings"])
    task = types.SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    torch.manual_seed(0)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, task).train()
    src, prev = torch.randint(4, 32768, (2, 8, 30))
    lengths = torch.full((8,), 30)
    return lambda: model(src, lengths, prev)[0].float().mean().backward()


def main():
    torch.set_num_threads(1)
    print(f"# {date.today()}, torch {torch.__version__}, timm {timm.__version__}: ATen ops per training step")
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


if __name__ == "__main__":
    main()
