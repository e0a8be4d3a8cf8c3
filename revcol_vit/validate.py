"""Top-1 / top-5 accuracy of a checkpoint written by ``revcol_vit.train`` on an ImageNet-layout folder.

    python -m revcol_vit.validate --model revcol_vit_b --checkpoint runs/revcol_vit_b/checkpoint.pth \
        --data /imagenet --ema

The model is rebuilt with the sizes stored in the checkpoint; the eval transform (image size, crop, interpolation)
is the one the run trained with.
"""
from typing import Dict, List, Optional

from .config import VALIDATE_OPTIONS, Parser, check_options
from .data import drop_undecodable, eval_loader, eval_transform, open_splits
from .errors import UsageError
from .runtime import (
    AMP_DTYPES,
    check_checkpoint_fits,
    create_model,
    evaluate,
    load_checkpoint,
    run_cli,
    setup_distributed,
)


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_options(None, VALIDATE_OPTIONS)
    return p


def parse_args(argv: Optional[List[str]] = None):
    parser = build_parser()
    return check_options(parser.parse_args(argv), parser.schema)


def validate(args) -> Dict[str, float]:
    d = setup_distributed(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    trained = ckpt["args"]
    if args.ema and ckpt["ema"] is None:
        raise UsageError(f"checkpoint {args.checkpoint} has no EMA weights (trained with --ema-decay 0)")
    transform = eval_transform(trained["img_size"], interpolation=trained["interpolation"],
                               crop_pct=trained["crop_pct"])
    splits, classes = open_splits(trained.get("dataset", ""), args.data, {args.split: transform})
    check_checkpoint_fits(ckpt, args.checkpoint, args.model, classes=classes)
    model = create_model(args.model, **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema"] if args.ema else ckpt["model"])
    model.to(d.device)
    splits, bad = drop_undecodable(splits, classes, skip=args.skip_bad_images, threads=args.workers)
    loader = eval_loader(splits[args.split], rank=d.rank, world_size=d.world_size,
                         batch_size=args.batch_size, workers=args.workers, pin_memory=d.device.type == "cuda")
    metrics = evaluate(model, loader, d, AMP_DTYPES[args.amp])
    if d.is_main:
        weights = "EMA" if args.ema else "model"
        left_out = f", {len(bad)} undecodable left out" if bad else ""
        print(f"{args.model} ({weights} weights, epoch {ckpt['epoch']}) on {args.split} ({metrics['images']} "
              f"images{left_out}): "
              f"top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} loss {metrics['loss']:.4f}")
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda argv: validate(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
