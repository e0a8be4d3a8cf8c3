"""The options of the CLIs, each described once (type, range, default, help), and YAML recipe files that set them.

The training defaults are the ImageNet-1K recipe of Table 11 (Appendix D.2).
"""
import argparse
import copy
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import yaml

from .errors import UsageError

# --- the typed schema of every option -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One option's type, count, range, choices, default and help: its flag, its YAML key and its default all come
    from here.

    ``kind`` is int, float, str or bool. ``count`` is None for one value, n for exactly n, "+" for one or more.
    Bounds apply to every value; ``ordered`` asks a pair to be (low, high). ``optional`` allows None (unset).
    """
    kind: type = str
    count: Union[None, int, str] = None
    at_least: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    at_most: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None
    ordered: bool = False
    optional: bool = False
    required: bool = False  # a flag the command line must give (validate's; train's --data may come from YAML)
    help: Optional[str] = None
    choices_are: Optional[str] = None  # the choices in words, where they are too many to list
    default: Any = None

    def describe(self) -> str:
        """What a valid value is, in words: 'an integer >= 1', 'a list of 2 numbers in (0, 1], low <= high'."""
        many = None if self.count is None else "one or more" if self.count == "+" else str(self.count)
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            what = self.choices_are or ", ".join(self.choices)
            return f"one of {what}" if many is None else f"a list of {many} of {what}"
        noun = {int: "integer", float: "number", str: "string"}[self.kind]
        bounds = ""
        lower = f"[{self.at_least:g}" if self.at_least is not None else None
        lower = f"({self.above:g}" if self.above is not None else lower
        upper = f"{self.below:g})" if self.below is not None else None
        upper = f"{self.at_most:g}]" if self.at_most is not None else upper
        if lower and upper:
            bounds = f" in {lower}, {upper}"
        elif lower:
            bounds = f" {'>=' if lower[0] == '[' else '>'} {lower[1:]}"
        elif upper:
            bounds = f" {'<=' if upper[-1] == ']' else '<'} {upper[:-1]}"
        if many is None:
            return f"{'an' if noun == 'integer' else 'a'} {noun}{bounds}"
        return f"a list of {many} {noun}s{bounds}" + (", low <= high" if self.ordered else "")

    def convert_one(self, value: Any) -> Any:
        """One value, from a flag (a string) or YAML (a string, number or bool), converted and range-checked.

        A flag's text and the same text in YAML give the same value: 16.7 is no integer in either place, and YAML's
        ``yes`` (a bool) is no number.
        """
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is str:
            ok = isinstance(value, str)
        elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
            ok = False
        elif self.kind is int:
            ok = isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()))
            value = int(value) if ok else value
        else:
            try:
                value, ok = float(value), True
            except ValueError:
                ok = False
            ok = ok and math.isfinite(value)
        if not ok or not self._in_range(value):
            raise ValueError(value)
        return value

    def _in_range(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return ((self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                and (self.below is None or value < self.below) and (self.at_most is None or value <= self.at_most))

    def convert(self, value: Any) -> Any:
        """A whole value (a list where ``count`` asks for one); ValueError if it is not what the option takes."""
        if value is None:
            if not self.optional:
                raise ValueError(value)
            return None
        if self.count is None:
            return self.convert_one(value)
        if not isinstance(value, (list, tuple)) or (len(value) == 0 if self.count == "+" else len(value) != self.count):
            raise ValueError(value)
        values = [self.convert_one(v) for v in value]
        if self.ordered and values != sorted(values):
            raise ValueError(value)
        return values

    def argparse_type(self, value: str) -> Any:
        """``type=`` of the flag: one command-line word."""
        try:
            return self.convert_one(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {value!r}") from None


class Parser(argparse.ArgumentParser):
    """Bad flags raise UsageError, which the CLIs print as one line (argparse prints its usage block too)."""

    def error(self, message: str):
        raise UsageError(message)

    def add_options(self, title: Optional[str], options: Dict[str, Option]) -> None:
        """Adds ``--name`` flags for the schema's ``options`` (a group if ``title``), with the options' defaults."""
        group = self.add_argument_group(title) if title else self
        for name, option in options.items():
            flag = "--" + name.replace("_", "-")
            kwargs = dict(help=option.help, default=copy.deepcopy(option.default), required=option.required)
            if option.default is not None and "default" not in (option.help or ""):
                kwargs["help"] = " ".join(filter(None, [option.help, f"(default: {_in_words(option.default)})"]))
            if option.kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs.update(type=option.argparse_type, metavar=name.upper())
                if option.count is not None:
                    kwargs["nargs"] = option.count
            group.add_argument(flag, **kwargs)
        self.schema = {**getattr(self, "schema", {}), **options}


def check_options(args: argparse.Namespace, schema: Dict[str, Option]) -> argparse.Namespace:
    """Whole-value checks a flag's ``type=`` cannot make (an ordered pair); each flag's words are checked already."""
    for name, option in schema.items():
        value = getattr(args, name)
        try:
            option.convert(value)
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"argument {flag}: expected {option.describe()}, got {_show(value)}") from None
    return args


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else repr(value)


def _in_words(value: Any) -> str:
    """A default as the help shows it: as flags are written, numbers short (4/3 as 1.33333)."""
    values = value if isinstance(value, list) else [value]
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, with a key given twice in one mapping as an error (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = str(self.construct_object(key_node, deep=deep)).replace("-", "_")
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"{key} is given twice "
                                                                    f"(line {key_node.start_mark.line + 1})",
                                                        key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_recipe(path: str, parser: Parser) -> Dict[str, Any]:
    """Reads a flat YAML mapping of option names (``batch_size`` or ``batch-size``) to values.

    Unknown names are an error rather than ignored, so a typo cannot silently fall back to a default; every value
    is checked against the option's schema, as its flag is.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        recipe = yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"config {path} is not UTF-8 text (line {line})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"config {path} must be a mapping of option names to values")
    recipe = {str(key).replace("-", "_"): value for key, value in recipe.items()}
    if "config" in recipe:
        raise UsageError(f"config {path} names another config file; recipes do not nest: give one --config")
    unknown = sorted(set(recipe) - set(parser.schema))
    if unknown:
        raise UsageError(f"config {path} has unknown options: {', '.join(unknown)}")
    checked = {}
    for name, value in recipe.items():
        option = parser.schema[name]
        try:
            checked[name] = option.convert(value)
        except ValueError:
            hint = " (YAML reads yes, no, on and off as true or false)" if isinstance(value, bool) else ""
            raise UsageError(f"config {path}: {name}: expected {option.describe()}, got {value!r}{hint}") from None
    return checked


def _timm_optimizers() -> Tuple[str, ...]:
    from timm.optim import list_optimizers  # timm's registry: what create_optimizer_v2 builds
    return tuple(list_optimizers())


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")  # timm's PIL modes
AMP_CHOICES = ("bf16", "fp16", "none")
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)  # data loading processes per rank
SIZE = Option(int, at_least=1, optional=True)  # a model size; unset keeps the model's own
SKIP_BAD_IMAGES = Option(bool, default=False,
                         help="leave out the images that cannot be decoded (their count is logged) instead of refusing "
                              "to start; every class still needs a decodable image")

# The model options that the CLI passes to the model when set: each is named as the keyword argument of the model
# constructors it sets (RevColViT, and the hierarchical RevCol), so no name is translated on the way.
MODEL_KWARGS: Dict[str, Option] = dict(
    drop_path_rate=Option(float, at_least=0, below=1, optional=True,
                          help="stochastic depth rate (default: the model's)"),
    embed_dim=SIZE,
    num_heads=SIZE,
    patch_size=SIZE,
    num_columns=SIZE,
    depths=Option(int, count="+", at_least=1, optional=True, help="blocks per level of a column"),
    dims=Option(int, count=4, at_least=1, optional=True,
                help="channels of the four levels of a hierarchical model (revcol_tiny ...)"),
    intermediate_supervision=Option(bool, optional=True,
                                    help="a hierarchical model's heads and decoders on every (columns/4)-th column "
                                         "(default: on from scratch, off when fine-tuning)"),
    head_init_scale=Option(float, above=0, optional=True,
                           help="scale of a hierarchical model's initial classifier (fine-tuning: 0.001)"),
    gamma_init=Option(float, optional=True,  # range: revcol.check_gamma_init, at the model's columns
                      help="initial gamma of the reversible connections, of either sign (default: the model's, 0.5)"),
    mlp_ratio=Option(float, above=0, optional=True, help="MLP hidden width over the embedding width"),
    drop_rate=Option(float, at_least=0, below=1, optional=True, help="dropout rate before the head"),
    reversible=Option(bool, optional=True,
                      help="reversible backward (activation memory flat in the number of columns)"),
)

# Every option of revcol_vit.train (and the sweep, which adds its own): group title -> name -> schema. The defaults
# of the image size, schedule, optimizer, EMA and augmentation options are the ImageNet-1K column of Table 11
# (Appendix D.2); peak lr 4e-3 is for batch 4096 and scales linearly with the global batch. The table leaves the lr
# floor, the warmup start and the eval crop open: these follow ConvNeXt, whose training code the RevCol release
# builds on.
TRAIN_OPTIONS: Dict[Optional[str], Dict[str, Option]] = {
    None: dict(
        config=Option(optional=True, help="YAML recipe file; flags on the command line override it"),
        data=Option(optional=True, help="folder with train/<class>/* and val/<class>/* (or train.tar and val.tar of "
                                        "<class>/*)"),
        dataset=Option(default="", help="timm dataset name for create_dataset (default '': an image folder or tar per "
                                        "split); map-style datasets only"),
        output=Option(default="runs/revcol_vit", help="checkpoint, log.csv and tensorboard folder"),
        resume=Option(optional=True, help="checkpoint to continue from (checkpoint.pth, checkpoint_best.pth or a "
                                          "kept checkpoint_epoch<E>.pth)"),
        initial_checkpoint=Option(optional=True, help="fine-tune: start from the weights (the EMA's if any) of this "
                                                      "checkpoint; a new head for other classes, the position "
                                                      "embedding resampled to --img-size; no optimizer state"),
        rewind=Option(bool, default=False,
                      help="--resume from an earlier epoch of the run in --output: remove its later epochs' "
                           "checkpoints and log rows, and continue from there"),
        keep_last=Option(int, at_least=0, default=0, help="also keep the checkpoints of the last N epochs, "
                                                          "checkpoint_epoch<E>.pth (default 0: none)"),
        seed=Option(int, at_least=0, at_most=2**32 - 1, default=0),
    ),
    "model (unset sizes keep the model's own)": dict(
        model=Option(default="revcol_vit_s"),
        img_size=Option(int, at_least=1, default=224),
        **MODEL_KWARGS,
    ),
    "optimization": dict(
        epochs=Option(int, at_least=1, default=300),
        warmup_epochs=Option(float, at_least=0, default=20),
        batch_size=Option(int, at_least=1, default=4096, help="global batch over all ranks and accumulation steps"),
        accum_steps=Option(int, at_least=1, default=1, help="micro-steps per optimizer step"),
        lr=Option(float, above=0, default=4e-3, help="peak lr at --lr-base-batch, scaled linearly to --batch-size"),
        lr_base_batch=Option(int, at_least=1, default=4096),
        min_lr=Option(float, at_least=0, default=1e-6),
        warmup_lr=Option(float, at_least=0, default=1e-6),
        opt=Option(choices=_timm_optimizers(), choices_are="the names of timm.optim.list_optimizers()",
                   default="adamw"),
        opt_betas=Option(float, count=2, at_least=0, below=1, default=[0.9, 0.999]),
        weight_decay=Option(float, at_least=0, default=0.05),
        layer_decay=Option(float, above=0, at_most=1, optional=True,
                           help="layer-wise lr decay: each group of the model's group_matcher (stem, then every "
                                "level's fusion and blocks, column by column, then the head) gets this factor "
                                "times the next group's lr; unset: one lr for all"),
        clip_grad=Option(float, above=0, optional=True, help="max gradient norm (default: no clipping, as Table 11)"),
        ema_decay=Option(float, at_least=0, below=1, default=0.9999, help="0 turns the EMA of the weights off"),
        amp=Option(choices=AMP_CHOICES, default="none"),
    ),
    "augmentation and regularization": dict(
        smoothing=Option(float, at_least=0, below=1, default=0.1),
        aa=Option(default="rand-m9-mstd0.5-inc1",  # RandAug(9, 0.5)
                  help="timm auto-augment policy, 'none' for none"),
        mixup=Option(float, at_least=0, default=0.8),
        cutmix=Option(float, at_least=0, default=1.0),
        reprob=Option(float, at_least=0, at_most=1, default=0.25, help="random erase probability"),
        scale=Option(float, count=2, above=0, at_most=1, ordered=True, default=[0.08, 1.0],
                     help="random resized crop area range"),
        ratio=Option(float, count=2, above=0, ordered=True, default=[3 / 4, 4 / 3],
                     help="random resized crop aspect ratio range"),
        hflip=Option(float, at_least=0, at_most=1, default=0.5),
        interpolation=Option(choices=INTERPOLATIONS, default="bicubic"),
        crop_pct=Option(float, above=0, at_most=1, default=0.875,
                        help="eval: resize to img_size / crop_pct, center crop"),
    ),
    "runtime": dict(
        workers=Option(int, at_least=0, default=DEFAULT_WORKERS,
                       help="data loading processes per rank (default: 8, or fewer CPU cores)"),
        skip_bad_images=SKIP_BAD_IMAGES,
        log_interval=Option(int, at_least=0, default=100,
                            help="a log line every N optimizer steps: loss, lr, img/s, peak GPU memory (default 100; "
                                 "0: none)"),
        device=Option(optional=True, help="default: cuda (this rank's GPU) if available, else cpu"),
        compile=Option(bool, default=False,
                       help="torch.compile the model (a RevCol model: each level function, the reversible backward "
                            "stays eager); the first steps are slow while it compiles"),
        fsdp=Option(bool, default=False,
                    help="under torchrun, shard parameters, gradients and optimizer state over the ranks with FSDP2 "
                         "(each column, then the rest of the model) instead of replicating them (DDP)"),
    ),
}

VALIDATE_OPTIONS: Dict[str, Option] = dict(
    model=Option(required=True, help="must be the checkpoint's model"),
    checkpoint=Option(required=True),
    data=Option(required=True, help="folder with <split>/<class>/* (the classes of the training run)"),
    split=Option(default="val"),
    ema=Option(bool, default=False, help="evaluate the EMA weights"),
    batch_size=Option(int, at_least=1, default=256),
    workers=Option(int, at_least=0, default=DEFAULT_WORKERS,
                   help="data loading processes per rank (default: 8, or fewer CPU cores)"),
    amp=Option(choices=AMP_CHOICES, default="none"),
    device=Option(optional=True, help="default: cuda if available, else cpu"),
    skip_bad_images=SKIP_BAD_IMAGES,
)
