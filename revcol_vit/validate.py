"""Top-1 / top-5 accuracy of a checkpoint written by ``revcol_vit.train`` on an ImageNet-layout folder.

    python -m revcol_vit.validate --model revcol_vit_b --checkpoint runs/revcol_vit_b/checkpoint.pth \
        --data /imagenet --ema

The model is rebuilt with the sizes stored in the checkpoint; the eval transform (image size, crop, interpolation)
is the one the run trained with.
"""
import argparse
from typing import Dict, List, Optional

from .config import UsageError
from .data import DEFAULT_WORKERS, eval_loader, eval_transform, image_folder, list_classes
from .runtime import AMP_DTYPES, create_model, evaluate, load_checkpoint, run_cli, setup_distributed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", required=True, help="must be the checkpoint's model")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="folder with <split>/<class>/* (the classes of the training run)")
    p.add_argument("--split", default="val")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="none")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    return p


def validate(args) -> Dict[str, float]:
    ckpt = load_checkpoint(args.checkpoint)
    trained = ckpt["args"]
    if args.model != trained["model"]:
        raise UsageError(f"checkpoint {args.checkpoint} holds {trained['model']}, not {args.model}")
    if args.ema and ckpt["ema"] is None:
        raise UsageError(f"checkpoint {args.checkpoint} has no EMA weights (trained with --ema-decay 0)")
    classes = list_classes(args.data, splits=(args.split,))
    if classes != ckpt["classes"]:
        raise UsageError(f"classes of {args.data} differ from the {len(ckpt['classes'])} the checkpoint was "
                         f"trained on")
    d = setup_distributed(args.device)
    model = create_model(args.model, **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema"] if args.ema else ckpt["model"])
    model.to(d.device)
    transform = eval_transform(trained["img_size"], interpolation=trained["interpolation"],
                               crop_pct=trained["crop_pct"])
    loader = eval_loader(image_folder(args.data, args.split, transform), rank=d.rank, world_size=d.world_size,
                         batch_size=args.batch_size, workers=args.workers, pin_memory=d.device.type == "cuda")
    metrics = evaluate(model, loader, d, AMP_DTYPES[args.amp])
    if d.is_main:
        weights = "EMA" if args.ema else "model"
        print(f"{args.model} ({weights} weights, epoch {ckpt['epoch']}) on {args.split}: "
              f"top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} loss {metrics['loss']:.4f}")
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda argv: validate(build_parser().parse_args(argv)), argv)


if __name__ == "__main__":
    main()
