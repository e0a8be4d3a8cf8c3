"""The ImageNet-1K training recipe of Table 11 (Appendix D.2) and YAML recipe files that override it."""
import argparse
from typing import Any, Dict

import yaml


class UsageError(ValueError):
    """Bad input the user can fix: the CLIs print it as one line and exit."""


# Table 11, ImageNet-1K column. Peak lr 4e-3 is for batch 4096 and scales linearly with the global batch.
# The table leaves the lr floor, the warmup start and the eval crop open: these follow ConvNeXt, whose
# training code the RevCol release builds on.
IMAGENET_1K: Dict[str, Any] = dict(
    img_size=224,
    epochs=300,
    warmup_epochs=20,
    batch_size=4096,
    lr=4e-3,
    lr_base_batch=4096,
    min_lr=1e-6,
    warmup_lr=1e-6,
    opt="adamw",
    opt_betas=[0.9, 0.999],
    weight_decay=0.05,
    clip_grad=None,  # "x" in the table: no clipping
    ema_decay=0.9999,
    smoothing=0.1,
    aa="rand-m9-mstd0.5-inc1",  # RandAug(9, 0.5)
    mixup=0.8,
    cutmix=1.0,
    reprob=0.25,
    scale=[0.08, 1.0],
    ratio=[3 / 4, 4 / 3],
    hflip=0.5,
    interpolation="bicubic",
    crop_pct=0.875,
)


def load_yaml_recipe(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Reads a flat YAML mapping of option names (``batch_size`` or ``batch-size``) to values.

    Unknown names are an error rather than ignored, so a typo cannot silently fall back to a default.
    """
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"config {path} must be a mapping of option names to values")
    actions = {action.dest: action for action in parser._actions if action.dest != "config"}
    recipe = {key.replace("-", "_"): value for key, value in recipe.items()}
    unknown = sorted(set(recipe) - set(actions))
    if unknown:
        raise UsageError(f"config {path} has unknown options: {', '.join(unknown)}")
    return {key: _check_value(path, actions[key], value) for key, value in recipe.items()}


def _check_value(path: str, action: argparse.Action, value: Any) -> Any:
    """Converts like the command line would (YAML reads ``4e-3`` as a string) and checks the choices."""
    if value is None:
        return value
    if action.type is not None:
        try:
            value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
        except (TypeError, ValueError):
            kind = action.type.__name__
            raise UsageError(f"config {path}: {action.dest} = {value!r} is not a valid {kind}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"config {path}: {action.dest} = {value!r} is not one of {', '.join(action.choices)}")
    return value
