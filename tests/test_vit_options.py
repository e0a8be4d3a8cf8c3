"""The typed schema of every CLI option: YAML and flags are checked alike, and bad values are one clear line."""
import inspect
import re
from pathlib import Path

import pytest
import timm
import yaml

from revcol import check_gamma_init
from revcol_vit.config import MODEL_KWARGS, TRAIN_OPTIONS, VALIDATE_OPTIONS
from revcol_vit.errors import UsageError
from revcol_vit.hierarchical import RevCol
from revcol_vit.model import RevColViT
from revcol_vit.sweep import sweep, sweep_parser
from revcol_vit.train import build_parser as train_parser
from revcol_vit.train import main as train_main
from revcol_vit.train import model_kwargs, parse_args
from revcol_vit.validate import build_parser as validate_parser
from revcol_vit.validate import parse_args as validate_parse_args

# option: (a valid value, a value of the wrong type, a value out of range or not a choice; None where the option
# has no range, as a path or a free-form string). Every option of the CLIs must have a row.
TRAIN_TABLE = {
    "config": (None, None, None),  # a recipe naming another is refused: test_vit_cli_guards.py
    "data": ("d", 5, None),
    "dataset": ("hfds/beans", 5, None),
    "output": ("out", ["a"], None),
    "resume": ("c.pth", 5, None),
    "seed": (3, "x", 2**32),
    "rewind": (True, "yes please", None),
    "keep_last": (2, "all", -1),
    "initial_checkpoint": ("c.pth", 5, None),
    "model": ("revcol_vit_b", 5, None),
    "img_size": (64, "big", 0),
    "drop_path_rate": (0.2, "some", 1.0),
    "embed_dim": (64, "wide", 0),
    "num_heads": (4, 2.5, 0),
    "patch_size": (8, "8px", -8),
    "num_columns": (2, "two", 0),
    "depths": ([1, 2], ["one"], [1, 0]),
    "gamma_init": (0.1, "half", None),  # its range depends on the columns: see the gamma_init test below
    "mlp_ratio": (2.0, "double", 0),
    "drop_rate": (0.1, "some", 1),
    "reversible": (False, "no", None),
    "dims": ([8, 16, 24, 32], ["a", "b", "c", "d"], [8, 16, 24, 0]),
    "intermediate_supervision": (False, "no", None),
    "head_init_scale": (0.001, "small", 0),
    "epochs": (5, 5.5, 0),
    "warmup_epochs": (0.5, "half", -1),
    "batch_size": (64, 16.7, 0),
    "accum_steps": (2, "2x", 0),
    "lr": (1e-3, "fast", 0),
    "lr_base_batch": (256, 256.5, 0),
    "min_lr": (1e-6, "low", -1e-6),
    "warmup_lr": (1e-6, "low", -1),
    "opt": ("sgd", 5, "adamx"),
    "opt_betas": ([0.9, 0.95], ["a", "b"], [0.9, 1.0]),
    "weight_decay": (0.1, "much", -0.1),
    "layer_decay": (0.75, "steep", 1.5),
    "clip_grad": (1.0, "max", 0),
    "ema_decay": (0.99, "slow", 1.0),
    "amp": ("bf16", 16, "fp32"),
    "smoothing": (0.2, "some", 1.0),
    "aa": ("rand-m7", 7, None),
    "mixup": (0.2, "a bit", -0.2),
    "cutmix": (0.5, "a bit", -1),
    "reprob": (0.5, "half", 1.5),
    "scale": ([0.5, 1.0], ["small", "all"], [0.5, 1.5]),
    "ratio": ([0.5, 2.0], ["wide", "tall"], [2.0, 0.5]),
    "hflip": (0.0, "yes", 2),
    "interpolation": ("bilinear", 3, "cubic"),
    "crop_pct": (0.9, "most", 0),
    "workers": (2, "many", -1),
    "log_interval": (10, "often", -1),
    "device": ("cpu", 0, None),
    "compile": (True, "yes", None),
    "fsdp": (True, "yes", None),
    "skip_bad_images": (True, 1, None),
    "variants": (["2x16"], "2x16x", ["3x11"]),  # the sweep's own
}
VALIDATE_TABLE = {
    "model": ("revcol_vit_b", None, None),
    "checkpoint": ("c.pth", None, None),
    "data": ("d", None, None),
    "split": ("test", None, None),
    "ema": (True, None, None),
    "batch_size": (64, 16.7, 0),
    "workers": (0, "some", -1),
    "amp": ("fp16", None, "fp32"),
    "device": ("cuda:1", None, None),
    "skip_bad_images": (True, None, None),
}


def words(values):
    return [str(v) for v in values]


def flag_args(name, value):
    """``value`` as the command line gives it: ``--name=word`` (a word may start with '-'), ``--name word...``,
    or ``--name`` / ``--no-name`` for a bool."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{flag}" if value else f"--no-{flag}"]
    if isinstance(value, list):
        return [f"--{flag}", *words(value)]
    return [f"--{flag}={value}"]


def parse_train(tmp_path: Path, recipe=None, flags=()):
    argv = ["--data", "d", *flags]
    if recipe is not None:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        argv += ["--config", str(path)]
    return parse_args(argv, sweep_parser())


def test_every_option_has_a_row():
    assert set(TRAIN_TABLE) == set(sweep_parser().schema)
    assert set(VALIDATE_TABLE) == set(validate_parser().schema)


def test_the_sweep_composes_its_options_from_the_trainers_and_leaves_them_as_they_are():
    sweep_defaults = sweep_parser().parse_args(["--data", "d"])
    train_defaults = train_parser().parse_args(["--data", "d"])
    assert (sweep_defaults.model, sweep_defaults.output) == (None, "runs/column_sweep")
    assert (train_defaults.model, train_defaults.output) == ("revcol_vit_s", "runs/revcol_vit")
    assert set(sweep_parser().schema) - set(train_parser().schema) == {"variants"}


# The config file cannot name itself, and --data is given in parse_train.
@pytest.mark.parametrize("name", sorted(set(TRAIN_TABLE) - {"config", "data"}))
def test_a_value_means_the_same_as_a_flag_or_in_yaml(tmp_path, name):
    value = TRAIN_TABLE[name][0]
    from_yaml = getattr(parse_train(tmp_path, {name: value}), name)
    from_flag = getattr(parse_train(tmp_path, flags=flag_args(name, value)), name)
    assert from_yaml == from_flag == value


# A path or a free-form string has no bad value: any string is one.
@pytest.mark.parametrize("name, column", [(name, column) for name, row in sorted(TRAIN_TABLE.items())
                                          for column, bad in zip(["wrong type", "out of range"], row[1:])
                                          if bad is not None])
def test_a_bad_value_is_refused_in_yaml_and_as_a_flag(tmp_path, name, column):
    bad = TRAIN_TABLE[name][1 if column == "wrong type" else 2]
    option = sweep_parser().schema[name]
    expected = re.escape(option.describe())
    with pytest.raises(UsageError, match=rf"^config .*recipe.yaml: {name}: expected {expected}, got ") as error:
        parse_train(tmp_path, {name: bad})
    assert "\n" not in str(error.value)
    if option.kind is bool or (option.kind is str and option.choices is None):
        return  # on the command line a bool flag takes no value, and every word is a string
    with pytest.raises(UsageError, match=rf"^argument --{name.replace('_', '-')}: expected {expected}, got "):
        parse_train(tmp_path, flags=flag_args(name, bad))


def test_model_options_are_named_as_the_model_constructors_keyword_arguments():
    """The CLI hands each model option to the model under the option's own name: renaming a constructor argument
    must rename its option (flag and YAML key) too, or this fails."""
    vit = inspect.signature(RevColViT.__init__).parameters
    convolutional = inspect.signature(RevCol.__init__).parameters
    assert set(MODEL_KWARGS) <= set(vit) | set(convolutional)
    assert "img_size" in vit  # passed to RevColViT only; a hierarchical model takes any image size


# Small valid values of every model option each family takes.
MODEL_FLAGS = {
    "revcol_vit_s": ["--img-size", "32", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "8",
                     "--num-columns", "2", "--depths", "1", "1", "--mlp-ratio", "2", "--drop-rate", "0.1",
                     "--drop-path-rate", "0.1", "--gamma-init", "0.25", "--no-reversible"],
    "revcol_tiny": ["--dims", "8", "16", "24", "32", "--depths", "1", "1", "1", "1", "--num-columns", "4",
                    "--intermediate-supervision", "--head-init-scale", "0.001", "--drop-rate", "0.1",
                    "--drop-path-rate", "0.1", "--gamma-init", "0.25", "--no-reversible"],
}


@pytest.mark.parametrize("model", sorted(MODEL_FLAGS))
def test_every_model_option_reaches_the_model_under_its_name(model):
    args = parse_args(["--data", "d", "--model", model, *MODEL_FLAGS[model]])
    kwargs = model_kwargs(args, num_classes=3)
    constructor = RevColViT if model.startswith("revcol_vit") else RevCol
    takes = set(inspect.signature(constructor.__init__).parameters) & set(MODEL_KWARGS)
    assert {name for name in takes if getattr(args, name) is not None} == takes  # the flags above set them all
    for name in takes:
        value = getattr(args, name)
        assert kwargs[name] == (tuple(value) if isinstance(value, list) else value)
    built = timm.create_model(model, **kwargs)
    assert len(built.revcol.columns) == args.num_columns


@pytest.mark.parametrize("old, new, value", [("columns", "num_columns", 2), ("drop", "drop_rate", 0.1),
                                             ("drop_path", "drop_path_rate", 0.1)])
def test_the_former_spellings_of_model_options_are_unknown(tmp_path, old, new, value):
    flag = "--" + old.replace("_", "-")
    with pytest.raises(UsageError, match=f"^unrecognized arguments: {flag} {value}$"):
        parse_args(["--data", "d", flag, str(value)])
    with pytest.raises(UsageError, match=f"recipe.yaml has unknown options: {old}$"):
        parse_train(tmp_path, {old: value})
    assert getattr(parse_train(tmp_path, {new: value}), new) == value


def test_the_defaults_are_the_option_tables():
    """Every default comes from its option's row (one place), is a value the option accepts, and is in the help."""
    options = {name: option for group in TRAIN_OPTIONS.values() for name, option in group.items()}
    assert vars(parse_args(["--data", "d"])) == {name: option.default for name, option in options.items()} | {
        "data": "d"}
    required = ["--model", "m", "--checkpoint", "c", "--data", "d"]
    assert vars(validate_parse_args(required)) == {name: option.default for name, option in VALIDATE_OPTIONS.items()
                                                   } | dict(model="m", checkpoint="c", data="d")
    for name, option in [*options.items(), *VALIDATE_OPTIONS.items()]:
        if not option.required:
            assert option.convert(option.default) == option.default, name
    help_text = " ".join(train_parser().format_help().split())
    assert "--lr LR peak lr at --lr-base-batch, scaled linearly to --batch-size (default: 0.004)" in help_text
    assert "--ratio RATIO RATIO random resized crop aspect ratio range (default: 0.75 1.33333)" in help_text


@pytest.mark.parametrize("flags, gamma_init, columns", [
    (["--gamma-init=1e6"], 1e6, 4),  # revcol_vit_s has 4 columns
    (["--gamma-init=0"], 0.0, 4),
    (["--gamma-init=-0.0001"], -0.0001, 4),
    (["--gamma-init=25", "--num-columns", "8"], 25.0, 8),
    (["--gamma-init=30", "--model", "revcol_vit_b_8x4"], 30.0, 8),
])
def test_gamma_init_out_of_range_is_the_cores_one_line_error(tmp_path, flags, gamma_init, columns):
    with pytest.raises(ValueError) as core:
        check_gamma_init(gamma_init, columns)
    with pytest.raises(UsageError) as from_flag:
        parse_args(["--data", "d", *flags])
    assert str(from_flag.value) == str(core.value)


def test_sweep_checks_gamma_init_at_its_most_columns_before_training(tmp_path):
    with pytest.raises(ValueError) as core:
        check_gamma_init(25.0, 8)  # the 8x4 variant
    with pytest.raises(UsageError) as from_sweep:
        sweep(parse_train(tmp_path, flags=["--gamma-init=25"]))
    assert str(from_sweep.value) == str(core.value)


def test_gamma_init_of_either_sign_is_accepted(tmp_path):
    assert parse_train(tmp_path, flags=["--gamma-init=-0.5"]).gamma_init == -0.5
    assert parse_train(tmp_path, {"gamma_init": 1000.0}).gamma_init == 1000.0


@pytest.mark.parametrize("name", sorted(VALIDATE_TABLE))
def test_validate_checks_its_flags_with_the_same_schema(name):
    required = ["--model", "m", "--checkpoint", "c", "--data", "d"]
    valid, *bad_values = VALIDATE_TABLE[name]
    assert getattr(validate_parse_args([*required, *flag_args(name, valid)]), name) == valid
    expected = re.escape(validate_parser().schema[name].describe())
    for bad in filter(lambda v: v is not None, bad_values):
        with pytest.raises(UsageError, match=rf"^argument --{name.replace('_', '-')}: expected {expected}, got "):
            validate_parse_args([*required, *flag_args(name, bad)])


@pytest.mark.parametrize("text, message", [
    ("scale: 0.8", "scale: expected a list of 2 numbers in (0, 1], low <= high, got 0.8"),
    ("batch_size: 16.7", "batch_size: expected an integer >= 1, got 16.7"),
    ("hflip: yes", "hflip: expected a number in [0, 1], got True (YAML reads yes, no, on and off as true or false)"),
    ("depths: 2", "depths: expected a list of one or more integers >= 1, got 2"),
])
def test_the_reported_yaml_cases_are_one_line_exit_2_nothing_written(tmp_path, capsys, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text + "\n")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--data", str(tmp_path), "--output", str(tmp_path / "out"), "--config", str(recipe)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: config {recipe}: {message}"]
    assert not (tmp_path / "out").exists()
