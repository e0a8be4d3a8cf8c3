"""Train a timm classifier (RevCol-ViT) on an ImageNet-layout folder with the recipe of Table 11.

One process:    python -m revcol_vit.train --data /imagenet --model revcol_vit_b --amp bf16
Several GPUs:   torchrun --nproc_per_node 8 -m revcol_vit.train --data /imagenet --model revcol_vit_b --amp bf16

``--batch-size`` is the global batch: it is split over ranks and ``--accum-steps`` micro-steps. Every epoch ends
with a checkpoint (model, optimizer, scheduler, EMA, grad scaler, RNG states of every rank) that ``--resume``
continues from exactly: the data order of an epoch depends only on the seed and the epoch.
"""
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Any, Dict, List, Optional

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from revcol import check_gamma_init

from . import hierarchical
from .checkpoints import CheckpointSaver
from .config import MODEL_KWARGS, TRAIN_OPTIONS, Option, Parser, check_options, load_yaml_recipe
from .data import (
    check_augment_policy,
    drop_undecodable,
    eval_loader,
    eval_transform,
    open_splits,
    train_loader,
    train_transform,
)
from .errors import UsageError
from .fine_tuning import InitialWeights
from .model import VARIANTS
from .runtime import (
    AMP_DTYPES,
    CHECKPOINT_NAME,
    LOG_NAME,
    TENSORBOARD_NAME,
    Dist,
    all_reduce_sum,
    all_rng_states,
    broadcast_from_main,
    check_checkpoint_fits,
    compile_model,
    count_parameters,
    create_model,
    evaluate,
    full_state,
    load_checkpoint,
    load_full_state,
    lock_folder,
    make_output_folder,
    reversible_columns,
    run_cli,
    run_files,
    same_path,
    seed_all,
    set_rng_state,
    setup_distributed,
    shard_model,
    tensorboard_writer,
    write_csv,
)

_logger = logging.getLogger("revcol_vit.train")

def build_parser(options: Dict[Optional[str], Dict[str, Option]] = TRAIN_OPTIONS,
                 description: str = __doc__.splitlines()[0]) -> Parser:
    """The flags of ``options`` (the trainer's, or a table composed from them, as the sweep's)."""
    parser = Parser(description=description, allow_abbrev=False,
               epilog="Unset options take the ImageNet-1K recipe of Table 11 (revcol_vit/config.py, "
                      "docs/vit_training.md).")
    for title, group in options.items():
        parser.add_options(title, group)
    return parser


def parse_args(argv: Optional[List[str]] = None, parser: Optional[Parser] = None):
    """Defaults come from the recipe table, then the ``--config`` YAML file, then the command line.

    Every value, from either place, is checked against the options' schema (``config.TRAIN_OPTIONS``).
    """
    parser = parser or build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_yaml_recipe(known.config, parser))
    args = check_options(parser.parse_args(argv), parser.schema)
    if args.data is None:
        raise UsageError("the data folder is missing: give --data (or data: in the --config file)")
    if args.gamma_init is not None:  # the columns' own check, before the data scan
        try:
            check_gamma_init(args.gamma_init, args.num_columns or VARIANTS.get(args.model, {}).get("num_columns", 1))
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.aa != "none":
        check_augment_policy(args.aa)
    return args


def model_kwargs(args, num_classes: int) -> Dict[str, Any]:
    """Keyword arguments for ``timm.create_model``: only the sizes that were set, so the model keeps its own."""
    kwargs = dict(num_classes=num_classes)
    if args.model in hierarchical.VARIANTS:  # convolutional: any image size, intermediate supervision by default
        kwargs["intermediate_supervision"] = not args.initial_checkpoint
    else:
        kwargs["img_size"] = args.img_size
    for name in MODEL_KWARGS:
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return kwargs


def build_transforms(args):
    """(train, eval) transforms of the recipe in ``args``."""
    train = train_transform(args.img_size, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
                            auto_augment_policy=None if args.aa in (None, "none") else args.aa,
                            interpolation=args.interpolation, reprob=args.reprob)
    return train, eval_transform(args.img_size, interpolation=args.interpolation, crop_pct=args.crop_pct)


def check_batch(args, dist: Dist) -> int:
    """The batch each rank feeds per micro-step."""
    parts = dist.world_size * args.accum_steps
    if args.batch_size % parts != 0:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by world size {dist.world_size} "
                         f"x --accum-steps {args.accum_steps}")
    micro_batch = args.batch_size // parts
    if (args.mixup > 0 or args.cutmix > 0) and micro_batch % 2 != 0:
        raise UsageError(f"mixup/cutmix need an even batch per rank and micro-step, got {micro_batch}")
    return micro_batch


def check_fsdp(args, dist: Dist) -> None:
    """What --fsdp does not combine with, as one line."""
    if dist.world_size == 1:
        raise UsageError("--fsdp shards over the ranks of a torchrun launch (2 or more processes); one process "
                         "trains unsharded without it")
    if args.ema_decay > 0:
        raise UsageError(f"--fsdp keeps no EMA of the weights (a whole copy on every rank): add --ema-decay 0 "
                         f"(got {args.ema_decay})")
    if args.amp == "fp16":
        raise UsageError("--fsdp with --amp fp16 is not supported (its grad scaler is not checked on sharded "
                         "gradients): use --amp bf16")


@dataclass
class Training:
    """What the optimizer steps change, which is what a checkpoint saves besides the log and RNG states."""
    model: nn.Module  # not wrapped in DDP; sharded in place under --fsdp
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEmaV3]
    num_updates: int = 0

    def state_dict(self) -> Dict[str, Any]:
        """Under --fsdp every rank calls this; the main rank's holds the whole model, the others' is empty."""
        model, optimizer = full_state(self.model, self.optimizer)
        return dict(model=model, optimizer=optimizer,
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                    ema=self.ema.module.state_dict() if self.ema is not None else None, step=self.num_updates)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.num_updates = state["step"]
        # The schedule is this run's (its flags may differ from the checkpoint's), at the resumed step, as timm's
        # train.py does: unchanged flags give the lr the checkpoint's schedule would.
        self.scheduler.step_update(self.num_updates)

    @property
    def lr(self) -> float:
        """The schedule's lr; with --layer-decay that of the head, every other group has it times its lr_scale."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)


def peak_lr(args) -> float:
    """``--lr`` is for a global batch of ``--lr-base-batch``; the lr scales linearly with the batch."""
    return args.lr * args.batch_size / args.lr_base_batch


def build_training(args, model: nn.Module, updates_per_epoch: int, device: torch.device) -> Training:
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=peak_lr(args), weight_decay=args.weight_decay,
                                    betas=tuple(args.opt_betas), layer_decay=args.layer_decay)
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


class IntervalLog:
    """A log line every ``interval`` optimizer steps (counted over the run): loss, lr, images per second over all
    ranks since the previous line, and the peak CUDA memory of this rank ("-" on CPU)."""

    def __init__(self, interval: int, batch_size: int, device: torch.device, desc: str, steps_in_epoch: int):
        self.interval, self.batch_size, self.device = interval, batch_size, device
        self.desc, self.steps_in_epoch = desc, steps_in_epoch
        self.since, self.since_step = time.time(), 0

    def step(self, step: int, epoch_step: int, loss: float, lr: float) -> None:
        if self.interval == 0 or step % self.interval != 0:
            return
        now = time.time()
        images_per_s = (epoch_step - self.since_step) * self.batch_size / max(now - self.since, 1e-9)
        memory = (f"{torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MB" if self.device.type == "cuda"
                  else "-")
        _logger.info("%s, step %d/%d (%d in all): loss %.4f, lr %.3g, %.1f img/s, peak memory %s", self.desc,
                     epoch_step, self.steps_in_epoch, step, loss, lr, images_per_s, memory)
        self.since, self.since_step = now, epoch_step


def worst_error(errors: List[float]) -> float:
    """The largest of ``errors``, a NaN being the worst."""
    return max(errors, key=lambda error: (math.isnan(error), error))


def train_one_epoch(training: Training, ddp_model: nn.Module, micro_batches, num_micro_batches: int, mixup, criterion,
                    args, dist: Dist, writer, desc: str) -> Dict[str, float]:
    """One pass over the epoch's micro-batches; returns the mean loss of its optimizer steps and, for a model with
    reversible columns, the worst relative error of a state rebuilt in backward (this rank's)."""
    amp_dtype = AMP_DTYPES[args.amp]
    training.model.train()
    # Any timm model trains here; only reversible columns rebuild states, wherever the model holds them.
    gauges = reversible_columns(training.model)
    worst_reconstruction = None

    def read_reconstruction_error() -> None:
        # Each gauge stays on the device through the steps; reading it waits for the device, so it is read at the
        # log interval and the epoch's end only. Reading it warns once if reversible gradients drift from plain
        # autograd's.
        nonlocal worst_reconstruction
        errors = [error for error in (gauge.worst_reconstruction_error() for gauge in gauges) if error is not None]
        if errors:
            error = worst_error(errors)
            worst_reconstruction = worst_error([worst_reconstruction or 0.0, error])
            if writer is not None:
                writer.add_scalar("train/reconstruction_error", error, training.num_updates)

    progress = tqdm(micro_batches, total=num_micro_batches, desc=desc, disable=not dist.is_main, dynamic_ncols=True)
    loss_sum, micro_loss = 0.0, torch.zeros((), device=dist.device)
    log = IntervalLog(args.log_interval if dist.is_main else 0, args.batch_size, dist.device, desc,
                      num_micro_batches // args.accum_steps)
    for i, (images, targets) in enumerate(progress):
        images, targets = images.to(dist.device, non_blocking=True), targets.to(dist.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        update = (i + 1) % args.accum_steps == 0
        # Gradients of the accumulation micro-steps stay local; the last one all-reduces their sum.
        # Under --fsdp each micro-step reduce-scatters into the sharded gradients: no whole gradients are kept.
        with ddp_model.no_sync() if dist.world_size > 1 and not update and not args.fsdp else nullcontext():
            with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if getattr(training.model, "aux_heads", None) is not None:  # a hierarchical model's Section 2.3 loss
                    logits, decoded = ddp_model(images, supervised=True)
                    loss = hierarchical.intermediate_supervision_loss(logits, decoded, hierarchical.denormalize(images),
                                                                      targets, criterion)
                else:
                    loss = criterion(ddp_model(images), targets)
            training.scaler.scale(loss / args.accum_steps).backward()
        micro_loss += loss.detach() / args.accum_steps
        if not update:
            continue
        if args.clip_grad is not None:
            training.scaler.unscale_(training.optimizer)
            nn.utils.clip_grad_norm_(training.model.parameters(), args.clip_grad)
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.optimizer.zero_grad(set_to_none=True)
        training.num_updates += 1
        training.scheduler.step_update(training.num_updates)
        if training.ema is not None:
            training.ema.update(training.model, step=training.num_updates)
        step_loss = all_reduce_sum([micro_loss.item()], dist)[0] / dist.world_size
        micro_loss.zero_()
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss is {step_loss} at step {training.num_updates}; lower --lr or use --amp bf16")
        loss_sum += step_loss
        if args.log_interval > 0 and training.num_updates % args.log_interval == 0:
            read_reconstruction_error()
        if writer is not None:
            writer.add_scalar("train/loss", step_loss, training.num_updates)
            writer.add_scalar("train/lr", training.lr, training.num_updates)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{training.lr:.3g}")
        log.step(training.num_updates, (i + 1) // args.accum_steps, step_loss, training.lr)
    read_reconstruction_error()
    metrics = dict(train_loss=loss_sum / (num_micro_batches // args.accum_steps))
    if worst_reconstruction is not None:
        metrics["reconstruction_error"] = worst_reconstruction
    return metrics


SCHEDULE_FLAGS = ("epochs", "warmup_epochs", "lr", "lr_base_batch", "batch_size", "min_lr", "warmup_lr")


def check_output_run(args) -> None:
    """The output folder holds no run files, or those of the run ``--resume`` continues (a checkpoint in it)."""
    files = run_files(args.output)
    if not files:
        return
    if not args.resume:
        latest = os.path.join(args.output, CHECKPOINT_NAME)
        hint = f"continue it with --resume {latest}" if CHECKPOINT_NAME in files else "remove them to start afresh"
        raise UsageError(f"{args.output} already holds a run ({', '.join(files)}): {hint}, or train into another "
                         f"--output")
    if not same_path(os.path.dirname(args.resume) or ".", args.output):
        raise UsageError(f"--output {args.output} holds another run ({', '.join(files)}) than --resume "
                         f"{args.resume}: resume from a checkpoint in {args.output}, or train into another --output")


def check_resume(args, ckpt: Dict[str, Any], classes: List[str], saver: CheckpointSaver) -> None:
    """The checkpoint ``--resume`` names is of this model and these classes, and (in the output folder) not an earlier
    epoch than the run reached, unless ``--rewind``."""
    model_args = {name: getattr(args, name) for name in ("img_size", *MODEL_KWARGS)}
    check_checkpoint_fits(ckpt, args.resume, args.model, model_args, classes)
    if not same_path(os.path.dirname(args.resume) or ".", args.output):
        return
    latest = saver.latest_epoch()
    if latest > ckpt["epoch"] and not args.rewind:
        raise UsageError(f"--resume {args.resume} is epoch {ckpt['epoch']} of the run in {args.output}, which has "
                         f"reached epoch {latest}: give --rewind to remove epochs {ckpt['epoch'] + 1}-{latest} "
                         f"and continue from epoch {ckpt['epoch']}")


def log_schedule_changes(args, ckpt: Dict[str, Any]) -> None:
    trained = ckpt["args"]
    changed = [f"--{name.replace('_', '-')} {trained.get(name)} -> {getattr(args, name)}" for name in SCHEDULE_FLAGS
               if trained.get(name) != getattr(args, name)]
    if changed:
        _logger.warning("the lr schedule follows this run's flags from step %d on, not the checkpoint's: %s",
                        ckpt["step"], ", ".join(changed))


def train(args) -> List[Dict[str, Any]]:
    """Runs (or continues) training; returns one row per finished epoch, as written to log.csv.

    The main rank checks and locks the output folder before anything is read; a run that fails before it wrote
    anything leaves no folder it created behind."""
    dist = setup_distributed(args.device)
    if args.amp == "fp16" and dist.device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    micro_batch = check_batch(args, dist)
    if args.fsdp:
        check_fsdp(args, dist)
    created, lock, error = False, None, None
    try:
        if dist.is_main:
            try:
                created = make_output_folder(args.output)
                lock = lock_folder(args.output, _logger)
                check_output_run(args)
            except UsageError as e:
                error = str(e)
        error = broadcast_from_main(error, dist)  # every rank stops on the main rank's error, none waits for it
        if error is not None:
            raise UsageError(error)
        return run_training(args, dist, micro_batch)
    finally:
        if lock is not None and os.path.exists(lock):
            os.remove(lock)
        if created and not os.listdir(args.output):
            os.rmdir(args.output)


def run_training(args, dist: Dist, micro_batch: int) -> List[Dict[str, Any]]:
    # The best epoch is the EMA's when there is an EMA (build_training keeps one for a positive --ema-decay).
    saver = CheckpointSaver(args.output, best_by="ema_top1" if args.ema_decay > 0 else "val_top1",
                            keep_last=args.keep_last)
    train_tf, eval_tf = build_transforms(args)
    initial = InitialWeights(args.initial_checkpoint, args.model) if args.initial_checkpoint else None

    def run_model_kwargs(num_classes: int) -> Dict[str, Any]:
        kwargs = model_kwargs(args, num_classes)
        return initial.model_kwargs(kwargs) if initial else kwargs

    with torch.device("meta"):  # sizes that do not fit together are an error before the data is read
        create_model(args.model, **run_model_kwargs(1))
    splits, classes = open_splits(args.dataset, args.data, {"train": train_tf, "val": eval_tf})
    resumed = load_checkpoint(args.resume) if args.resume else None
    if resumed is not None:
        check_resume(args, resumed, classes, saver)
    kwargs = run_model_kwargs(len(classes))
    seed_all(args.seed + dist.rank)  # ranks draw different augmentations
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = create_model(args.model, **kwargs)
    if initial:  # weights only: optimizer, schedule and EMA start afresh (--resume restores a whole run instead)
        initial.load_into(model)
    model.to(dist.device)
    torch.manual_seed(args.seed + dist.rank)

    splits, bad = drop_undecodable(splits, classes, skip=args.skip_bad_images, threads=args.workers)
    if bad and dist.is_main:
        _logger.warning("left out %d image%s that cannot be decoded (--skip-bad-images)", len(bad),
                        "s" if len(bad) > 1 else "")
    train_set = splits["train"]
    pin_memory = dist.device.type == "cuda"
    loader = train_loader(train_set, seed=args.seed, rank=dist.rank, world_size=dist.world_size, batch_size=micro_batch,
                          workers=args.workers, pin_memory=pin_memory)
    updates_per_epoch = len(loader) // args.accum_steps
    if updates_per_epoch == 0:
        raise UsageError(f"{len(train_set)} training images do not fill one batch of {args.batch_size}")
    val_loader = eval_loader(splits["val"], rank=dist.rank, world_size=dist.world_size,
                             batch_size=micro_batch, workers=args.workers, pin_memory=pin_memory)
    if args.fsdp:
        if len(splits["val"]) < dist.world_size:  # every rank takes part in each forward
            raise UsageError(f"--fsdp needs a validation image per rank: {len(splits['val'])} for {dist.world_size}")
        shard_model(model, dist)  # before the optimizer is built on the (then sharded) parameters
    training = build_training(args, model, updates_per_epoch, dist.device)
    if args.compile:  # after the EMA copy is taken: that copy stays eager
        compile_model(model)
    mixup, criterion = build_loss(args, len(classes))

    start_epoch, history = 0, []
    if resumed is not None:
        ckpt = resumed
        if dist.is_main:
            saver.resume_from(ckpt, args.resume)
        log_schedule_changes(args, ckpt)
        training.load_state_dict(ckpt)
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        if len(ckpt["rng"]) == dist.world_size:
            set_rng_state(ckpt["rng"][dist.rank], dist.device)
        else:
            _logger.warning("checkpoint has RNG states of %d ranks, this run has %d: augmentation is not replayed",
                            len(ckpt["rng"]), dist.world_size)
        _logger.info("resumed from %s at epoch %d, step %d", args.resume, start_epoch, training.num_updates)

    ddp_model = DistributedDataParallel(model) if dist.world_size > 1 and not args.fsdp else model
    writer = None
    if dist.is_main:
        os.makedirs(args.output, exist_ok=True)
        writer = tensorboard_writer(os.path.join(args.output, TENSORBOARD_NAME),
                                    purge_step=training.num_updates or None)
        _logger.info("%s: %.2fM parameters, %d classes, peak lr %.3g for batch %d (%d ranks x %d accumulation x %d)",
                     args.model, count_parameters(model) / 1e6, len(classes), peak_lr(args), args.batch_size,
                     dist.world_size, args.accum_steps, micro_batch)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)

    amp_dtype = AMP_DTYPES[args.amp]
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        loader.sampler.set_epoch(epoch)
        num_micro_batches = updates_per_epoch * args.accum_steps
        epoch_metrics = train_one_epoch(training, ddp_model, islice(loader, num_micro_batches), num_micro_batches,
                                        mixup, criterion, args, dist, writer, desc=f"epoch {epoch + 1}/{args.epochs}")
        val = evaluate(model, val_loader, dist, amp_dtype)
        row = dict(epoch=epoch + 1, step=training.num_updates, lr=training.lr, **epoch_metrics, val_loss=val["loss"],
                   val_top1=val["top1"], val_top5=val["top5"])
        if training.ema is not None:
            ema_val = evaluate(training.ema.module, val_loader, dist, amp_dtype)
            row.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"])
        if dist.device.type == "cuda":
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(dist.device) / 2**20
        row["epoch_time_s"] = time.time() - start
        history.append(row)

        rng = all_rng_states(dist)  # after the epoch's last random draw: the next epoch starts from here
        state = training.state_dict()  # under --fsdp every rank takes part in gathering it
        if dist.is_main:
            saver.save(dict(state, epoch=epoch + 1, args=vars(args), model_kwargs=kwargs, classes=classes,
                            history=history, rng=rng), metric=row[saver.best_by])
            write_csv(history, os.path.join(args.output, LOG_NAME))
            for key in ("val_loss", "val_top1", "val_top5", "ema_top1", "ema_top5"):
                if key in row:
                    writer.add_scalar(key.replace("_", "/", 1), row[key], epoch + 1)
            writer.flush()
            _logger.info("epoch %d: train loss %.4f, val top-1 %.2f top-5 %.2f%s%s (%.0f s)", epoch + 1,
                         row["train_loss"], row["val_top1"], row["val_top5"],
                         f", EMA top-1 {row['ema_top1']:.2f}" if training.ema is not None else "",
                         f", reconstruction error {row['reconstruction_error']:.1e}"
                         if "reconstruction_error" in row else "",
                         row["epoch_time_s"])
    if writer is not None:
        writer.close()
    return history


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda argv: train(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
