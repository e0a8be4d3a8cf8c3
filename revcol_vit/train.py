"""Train a timm classifier (RevCol-ViT) on an ImageNet-layout folder with the recipe of Table 11.

One process:    python -m revcol_vit.train --data /imagenet --model revcol_vit_b --amp bf16
Several GPUs:   torchrun --nproc_per_node 8 -m revcol_vit.train --data /imagenet --model revcol_vit_b --amp bf16

``--batch-size`` is the global batch: it is split over ranks and ``--accum-steps`` micro-steps. Every epoch ends
with a checkpoint (model, optimizer, scheduler, EMA, grad scaler, RNG states of every rank) that ``--resume``
continues from exactly: the data order of an epoch depends only on the seed and the epoch.
"""
import argparse
import csv
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.distributed as dist
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_dataset, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, natural_key
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from revcol import load_plain_checkpoint, write_atomically

from .config import IMAGENET_1K, UsageError, load_yaml_recipe

_logger = logging.getLogger("revcol_vit.train")

CHECKPOINT_NAME = "checkpoint.pth"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "ema", "step", "epoch", "args", "model_kwargs",
                   "classes", "history", "rng")  # what train() writes, and validate() and --resume read
LOG_NAME = "log.csv"
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)  # data loading processes per rank
IMAGE_EXTENSIONS = get_img_extensions(as_set=True)  # what timm's folder reader loads
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
MODEL_KWARGS = ("embed_dim", "num_heads", "patch_size", "columns", "depths", "reversible")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog="Unset options take the ImageNet-1K recipe of Table 11 "
                                       "(revcol_vit/config.py, docs/vit_training.md).")
    p.add_argument("--config", help="YAML recipe file; flags on the command line override it")
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--output", default="runs/revcol_vit", help="checkpoint, log.csv and tensorboard folder")
    p.add_argument("--resume", help="checkpoint to continue from")
    p.add_argument("--seed", type=int, default=0)

    m = p.add_argument_group("model (unset sizes keep the model's own)")
    m.add_argument("--model", default="revcol_vit_s")
    m.add_argument("--img-size", type=int)
    m.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the model's)")
    m.add_argument("--embed-dim", type=int)
    m.add_argument("--num-heads", type=int)
    m.add_argument("--patch-size", type=int)
    m.add_argument("--columns", type=int)
    m.add_argument("--depths", type=int, nargs="+", help="blocks per level of a column")
    m.add_argument("--reversible", action=argparse.BooleanOptionalAction, default=None,
                   help="reversible backward (activation memory flat in the number of columns)")

    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int)
    o.add_argument("--warmup-epochs", type=float)
    o.add_argument("--batch-size", type=int, help="global batch over all ranks and accumulation steps")
    o.add_argument("--accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    o.add_argument("--lr", type=float, help="peak lr at --lr-base-batch, scaled linearly to --batch-size")
    o.add_argument("--lr-base-batch", type=int)
    o.add_argument("--min-lr", type=float)
    o.add_argument("--warmup-lr", type=float)
    o.add_argument("--opt")
    o.add_argument("--opt-betas", type=float, nargs=2)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--clip-grad", type=float, help="max gradient norm (default: no clipping)")
    o.add_argument("--ema-decay", type=float, help="0 turns the EMA of the weights off")
    o.add_argument("--amp", choices=("bf16", "fp16", "none"), default="none")

    a = p.add_argument_group("augmentation and regularization")
    a.add_argument("--smoothing", type=float)
    a.add_argument("--aa", help="timm auto-augment policy, 'none' for none")
    a.add_argument("--mixup", type=float)
    a.add_argument("--cutmix", type=float)
    a.add_argument("--reprob", type=float, help="random erase probability")
    a.add_argument("--scale", type=float, nargs=2, help="random resized crop area range")
    a.add_argument("--ratio", type=float, nargs=2, help="random resized crop aspect ratio range")
    a.add_argument("--hflip", type=float)
    a.add_argument("--interpolation")
    a.add_argument("--crop-pct", type=float, help="eval: resize to img_size / crop_pct, center crop")

    r = p.add_argument_group("runtime")
    r.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="data loading processes per rank (default: 8, or fewer CPU cores)")
    r.add_argument("--device", help="default: cuda (this rank's GPU) if available, else cpu")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the model (a RevCol model: each level function, the reversible backward "
                        "stays eager); the first steps are slow while it compiles")
    p.set_defaults(**IMAGENET_1K)
    return p


def parse_args(argv: Optional[List[str]] = None, parser: Optional[argparse.ArgumentParser] = None):
    """Defaults come from the recipe table, then the ``--config`` YAML file, then the command line."""
    parser = parser or build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_yaml_recipe(known.config, parser))
    return parser.parse_args(argv)


# --- data ---------------------------------------------------------------------------------------------------------

def _posterize_increasing(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10, which m9 with magnitude noise reaches.
    Pillow >= 12 rejects 0 bits; older Pillow, which the paper's recipe ran on, returned a black image."""
    if bits_to_keep == 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


auto_augment.NAME_TO_OP["PosterizeIncreasing"] = _posterize_increasing


def list_classes(root: str, splits: Sequence[str] = ("train", "val")) -> List[str]:
    """The class folders of each split of ``root``: none empty, and the same in every split.

    timm's folder reader numbers only the classes it finds images for, so an empty class folder would shift every
    later label; it is an error here instead.
    """
    if not os.path.isdir(root):
        raise UsageError(f"data directory {root} does not exist")
    classes = {}
    for split in splits:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UsageError(f"data directory {root} has no {split}/ folder (expected {split}/<class>/<image>)")
        names = sorted((d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))), key=natural_key)
        if not names:
            raise UsageError(f"{folder} has no class folders")
        for name in names:
            files = os.scandir(os.path.join(folder, name))
            if not any(os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS for entry in files):
                raise UsageError(f"class folder {os.path.join(folder, name)} has no images")
        classes[split] = names
    first, *others = splits
    for split in others:
        if classes[split] != classes[first]:
            differ = sorted(set(classes[first]) ^ set(classes[split]))
            raise UsageError(f"{first}/ and {split}/ of {root} have different classes: {', '.join(differ[:5])}")
    return classes[first]


def build_transform(args, is_training: bool):
    aa = None if args.aa in (None, "none") else args.aa
    return create_transform(args.img_size, is_training=is_training, scale=tuple(args.scale), ratio=tuple(args.ratio),
                            hflip=args.hflip, color_jitter=None, auto_augment=aa, interpolation=args.interpolation,
                            re_prob=args.reprob, re_mode="pixel", crop_pct=args.crop_pct,
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_eval_loader(args, split: str, rank: int, world_size: int, batch_size: int) -> DataLoader:
    """Each rank takes every world_size-th image, so the ranks together see every image exactly once."""
    dataset = create_dataset("", root=os.path.join(args.data, split), search_split=False,
                             transform=build_transform(args, False))
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=args.workers,
                      pin_memory=torch.cuda.is_available())


# --- model --------------------------------------------------------------------------------------------------------

def model_kwargs(args, num_classes: int) -> Dict[str, Any]:
    """Keyword arguments for ``timm.create_model``: only the sizes that were set, so the model keeps its own."""
    kwargs = dict(num_classes=num_classes, img_size=args.img_size)
    if args.drop_path is not None:
        kwargs["drop_path_rate"] = args.drop_path
    for name in MODEL_KWARGS:
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return kwargs


def create_model(name: str, **kwargs) -> nn.Module:
    if not timm.is_model(name):
        revcol = ", ".join(timm.list_models("revcol_vit*"))
        raise UsageError(f"unknown model '{name}' (RevCol-ViT models: {revcol or 'none registered'})")
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:  # sizes that do not fit together, or an option the model does not take
        raise UsageError(f"model {name} cannot be built with {kwargs}: {e}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- distributed ----------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str]) -> Dist:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world_size > 1 else 0, world_size, device)


def all_reduce_sum(values: List[float], d: Dist) -> List[float]:
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def rng_state(device: torch.device) -> Dict[str, Any]:
    # NumPy's state as plain types, so that checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian))
    state = dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(d: Dist) -> List[Dict[str, Any]]:
    """Every rank's RNG states (ranks draw different augmentations), gathered for rank 0's checkpoint."""
    state = rng_state(d.device)
    if d.world_size == 1:
        return [state]
    states = [None] * d.world_size
    dist.all_gather_object(states, state)
    return states


# --- checkpoints and logs -------------------------------------------------------------------------------------------

def write_csv(rows: List[Dict[str, Any]], path: str) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(write, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    try:
        ckpt = load_plain_checkpoint(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise UsageError(f"checkpoint {path} was not written by revcol_vit.train (it lacks {', '.join(missing)})")
    return ckpt


# --- training -------------------------------------------------------------------------------------------------------

def evaluate(model: nn.Module, loader: DataLoader, d: Dist, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
    """Cross-entropy, top-1 and top-5 (%) over the whole split, summed across ranks."""
    model.eval()
    loss_sum = top1_sum = top5_sum = count = 0.0
    with torch.no_grad():
        for images, targets in loader:
            images, targets = images.to(d.device), targets.to(d.device)
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            logits = logits.float()
            top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
            n = images.shape[0]
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            top1_sum += top1.item() * n
            top5_sum += top5.item() * n
            count += n
    loss_sum, top1_sum, top5_sum, count = all_reduce_sum([loss_sum, top1_sum, top5_sum, count], d)
    return dict(loss=loss_sum / count, top1=top1_sum / count, top5=top5_sum / count)


def check_batch(args, d: Dist) -> int:
    """The batch each rank feeds per micro-step."""
    parts = d.world_size * args.accum_steps
    if args.batch_size % parts != 0:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by world size {d.world_size} "
                         f"x --accum-steps {args.accum_steps}")
    micro_batch = args.batch_size // parts
    if (args.mixup > 0 or args.cutmix > 0) and micro_batch % 2 != 0:
        raise UsageError(f"mixup/cutmix need an even batch per rank and micro-step, got {micro_batch}")
    return micro_batch


@dataclass
class Training:
    """What the optimizer steps change, which is what a checkpoint saves besides the log and RNG states."""
    model: nn.Module  # not wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEmaV3]
    num_updates: int = 0

    def state_dict(self) -> Dict[str, Any]:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                    ema=self.ema.module.state_dict() if self.ema is not None else None, step=self.num_updates)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.num_updates = state["step"]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def peak_lr(args) -> float:
    """``--lr`` is for a global batch of ``--lr-base-batch``; the lr scales linearly with the batch."""
    return args.lr * args.batch_size / args.lr_base_batch


def build_training(args, model: nn.Module, updates_per_epoch: int, device: torch.device) -> Training:
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=peak_lr(args), weight_decay=args.weight_decay,
                                    betas=tuple(args.opt_betas))
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                                       warmup_lr=args.warmup_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema_decay > 0 else None
    return Training(model, optimizer, scheduler, scaler, ema)


def build_loss(args, num_classes: int):
    """(mixup or None, criterion): with mixup/cutmix the targets are soft, and mixup smooths them."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(args.smoothing)
    return None, nn.CrossEntropyLoss()


def train_one_epoch(t: Training, ddp_model: nn.Module, micro_batches, num_micro_batches: int, mixup, criterion,
                    args, d: Dist, writer, desc: str) -> float:
    """One pass over the epoch's micro-batches; returns the mean loss of its optimizer steps."""
    amp_dtype = AMP_DTYPES[args.amp]
    t.model.train()
    progress = tqdm(micro_batches, total=num_micro_batches, desc=desc, disable=not d.is_main, dynamic_ncols=True)
    loss_sum, micro_loss = 0.0, torch.zeros((), device=d.device)
    for i, (images, targets) in enumerate(progress):
        images, targets = images.to(d.device, non_blocking=True), targets.to(d.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        update = (i + 1) % args.accum_steps == 0
        # Gradients of the accumulation micro-steps stay local; the last one all-reduces their sum.
        with ddp_model.no_sync() if d.world_size > 1 and not update else nullcontext():
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(ddp_model(images), targets)
            t.scaler.scale(loss / args.accum_steps).backward()
        micro_loss += loss.detach() / args.accum_steps
        if not update:
            continue
        if args.clip_grad is not None:
            t.scaler.unscale_(t.optimizer)
            nn.utils.clip_grad_norm_(t.model.parameters(), args.clip_grad)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad(set_to_none=True)
        t.num_updates += 1
        t.scheduler.step_update(t.num_updates)
        if t.ema is not None:
            t.ema.update(t.model, step=t.num_updates)
        step_loss = all_reduce_sum([micro_loss.item()], d)[0] / d.world_size
        micro_loss.zero_()
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss is {step_loss} at step {t.num_updates}; lower --lr or use --amp bf16")
        loss_sum += step_loss
        if writer is not None:
            writer.add_scalar("train/loss", step_loss, t.num_updates)
            writer.add_scalar("train/lr", t.lr, t.num_updates)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{t.lr:.3g}")
    return loss_sum / (num_micro_batches // args.accum_steps)


def train(args) -> List[Dict[str, Any]]:
    """Runs (or continues) training; returns one row per finished epoch, as written to log.csv."""
    d = setup_distributed(args.device)
    if args.amp == "fp16" and d.device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    micro_batch = check_batch(args, d)
    checkpoint = os.path.join(args.output, CHECKPOINT_NAME)
    if not args.resume and os.path.exists(checkpoint):
        raise UsageError(f"{args.output} already holds a checkpoint: continue it with --resume {checkpoint}, "
                         f"or train into another --output")
    classes = list_classes(args.data)
    kwargs = model_kwargs(args, len(classes))
    random.seed(args.seed + d.rank)
    np.random.seed(args.seed + d.rank)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = create_model(args.model, **kwargs).to(d.device)
    torch.manual_seed(args.seed + d.rank)

    train_set = create_dataset("", root=os.path.join(args.data, "train"), search_split=False,
                               transform=build_transform(args, True))
    # The sampler's permutation depends only on (seed, epoch), which makes a resumed epoch see the same data.
    sampler = DistributedSampler(train_set, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, num_workers=args.workers,
                              drop_last=True, pin_memory=d.device.type == "cuda")
    updates_per_epoch = len(train_loader) // args.accum_steps
    if updates_per_epoch == 0:
        raise UsageError(f"{len(train_set)} training images do not fill one batch of {args.batch_size}")
    val_loader = build_eval_loader(args, "val", d.rank, d.world_size, micro_batch)
    t = build_training(args, model, updates_per_epoch, d.device)
    if args.compile and hasattr(model, "revcol"):  # after the EMA copy is taken: that copy stays eager
        model.revcol.compile_levels()
    elif args.compile:
        model.compile()
    mixup, criterion = build_loss(args, len(classes))

    start_epoch, history = 0, []
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        t.load_state_dict(ckpt)
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        if len(ckpt["rng"]) == d.world_size:
            set_rng_state(ckpt["rng"][d.rank], d.device)
        else:
            _logger.warning("checkpoint has RNG states of %d ranks, this run has %d: augmentation is not replayed",
                            len(ckpt["rng"]), d.world_size)
        _logger.info("resumed from %s at epoch %d, step %d", args.resume, start_epoch, t.num_updates)

    ddp_model = DistributedDataParallel(model) if d.world_size > 1 else model
    writer = None
    if d.is_main:
        os.makedirs(args.output, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where it is used
        writer = SummaryWriter(os.path.join(args.output, "tensorboard"), purge_step=t.num_updates or None)
        _logger.info("%s: %.2fM parameters, %d classes, peak lr %.3g for batch %d (%d ranks x %d accumulation x %d)",
                     args.model, count_parameters(model) / 1e6, len(classes), peak_lr(args), args.batch_size,
                     d.world_size, args.accum_steps, micro_batch)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        sampler.set_epoch(epoch)
        num_micro_batches = updates_per_epoch * args.accum_steps
        train_loss = train_one_epoch(t, ddp_model, islice(train_loader, num_micro_batches), num_micro_batches,
                                     mixup, criterion, args, d, writer, desc=f"epoch {epoch + 1}/{args.epochs}")
        val = evaluate(model, val_loader, d, AMP_DTYPES[args.amp])
        row = dict(epoch=epoch + 1, step=t.num_updates, lr=t.lr, train_loss=train_loss, val_loss=val["loss"],
                   val_top1=val["top1"], val_top5=val["top5"])
        if t.ema is not None:
            ema_val = evaluate(t.ema.module, val_loader, d, AMP_DTYPES[args.amp])
            row.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"])
        if d.device.type == "cuda":
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(d.device) / 2**20
        row["epoch_time_s"] = time.time() - start
        history.append(row)

        rng = all_rng_states(d)  # after the epoch's last random draw: the next epoch starts from here
        if d.is_main:
            state = dict(t.state_dict(), epoch=epoch + 1, args=vars(args), model_kwargs=kwargs, classes=classes,
                         history=history, rng=rng)
            write_atomically(lambda tmp: torch.save(state, tmp), checkpoint)
            write_csv(history, os.path.join(args.output, LOG_NAME))
            for key in ("val_loss", "val_top1", "val_top5", "ema_top1", "ema_top5"):
                if key in row:
                    writer.add_scalar(key.replace("_", "/", 1), row[key], epoch + 1)
            writer.flush()
            _logger.info("epoch %d: train loss %.4f, val top-1 %.2f top-5 %.2f%s (%.0f s)", epoch + 1,
                         row["train_loss"], row["val_top1"], row["val_top5"],
                         f", EMA top-1 {row['ema_top1']:.2f}" if t.ema is not None else "", row["epoch_time_s"])
    if writer is not None:
        writer.close()
    return history


def run_cli(main_fn, argv: Optional[List[str]]) -> None:
    """Runs a CLI body, printing bad input as one ``error:`` line (exit status 2) instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        main_fn(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda argv: train(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
