"""RevCol-ViT training, validation and column sweep CLIs on a real image folder: scikit-learn's digits at 32x32."""
import argparse
import csv
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import write_digits
from PIL import Image
from timm.data import create_dataset
from torch._dynamo.testing import CompileCounterWithBackend

import revcol_vit.train as train_module
from revcol import ReversibleColumns
from revcol_vit.data import eval_loader, eval_transform, image_folder
from revcol_vit.errors import UsageError
from revcol_vit.runtime import Dist, create_model, evaluate, load_checkpoint
from revcol_vit.sweep import main as sweep_main
from revcol_vit.train import parse_args, train
from revcol_vit.validate import build_parser as validate_parser
from revcol_vit.validate import main as validate_main
from revcol_vit.validate import validate

REPO = Path(__file__).resolve().parents[1]

TOY_MODEL = ["--model", "revcol_vit_s", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32",
             "--num-heads", "2", "--depths", "1", "1", "1", "1", "--num-columns", "2", "--workers", "0"]
# Every random augmentation off (and no stochastic depth), for runs that must match each other step for step.
NO_AUGMENTATION = ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0",
                   "--scale", "1", "1", "--ratio", "1", "1", "--hflip", "0", "--drop-path-rate", "0",
                   "--ema-decay", "0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """20 images per class: 16 train, 4 val."""
    return write_digits(tmp_path_factory.mktemp("small_digits"), per_class=20)


def run_train(data: Path, output: Path, *flags: str):
    return train(parse_args(["--data", str(data), "--output", str(output), *TOY_MODEL, *flags]))


def read_csv(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """8 epochs on the 1433 training digits; small learning rates train these tiny post-norm models fastest."""
    output = tmp_path_factory.mktemp("trained")
    history = run_train(digits, output, *NO_AUGMENTATION, "--scale", "0.8", "1", "--epochs", "8",
                        "--warmup-epochs", "0.5", "--batch-size", "32", "--lr", "1e-4", "--lr-base-batch", "32")
    return output, history


@pytest.mark.slow
def test_short_training_learns_digits(trained):
    output, history = trained
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert history[-1]["val_top1"] > 50.0  # chance is 10%
    log = read_csv(output / "log.csv")
    assert [int(row["epoch"]) for row in log] == list(range(1, 9))
    assert float(log[-1]["val_top1"]) == pytest.approx(history[-1]["val_top1"])
    assert {"train_loss", "val_top5", "lr", "epoch_time_s"} <= set(log[0])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(output / "tensorboard"))
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]


@pytest.mark.slow
def test_reconstruction_error_is_logged_per_log_interval_and_per_epoch(trained):
    # The worst state the reversible backward rebuilt, relative to the forward's: with the float64 stream it is
    # far below float32's resolution; the epoch's worst goes to log.csv, the worst since the last read to
    # TensorBoard at each log interval (100 steps) and epoch end (44 steps an epoch).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, history = trained
    log = read_csv(output / "log.csv")
    errors = [float(row["reconstruction_error"]) for row in log]
    assert len(errors) == 8 and all(0.0 <= e < 1e-12 for e in errors), errors
    events = EventAccumulator(str(output / "tensorboard")).Reload()
    steps = events.Scalars("train/reconstruction_error")
    assert [s.step for s in steps] == sorted({*range(100, 353, 100), *range(44, 353, 44)})
    assert max(s.value for s in steps) == pytest.approx(max(errors), rel=1e-6)  # TensorBoard keeps float32


def test_a_nan_reconstruction_error_is_the_epochs_worst(small_digits, tmp_path, monkeypatch):
    """A NaN among the reconstruction errors read at the log intervals reaches log.csv as nan, not as the largest finite
    one."""
    errors = iter([1e-9, math.nan] + [2e-9] * 10)  # 160 images in batches of 16: 10 steps, read every 2nd
    monkeypatch.setattr(ReversibleColumns, "worst_reconstruction_error", lambda self: next(errors))
    history = run_train(small_digits, tmp_path, *NO_AUGMENTATION, "--epochs", "1", "--warmup-epochs", "0",
                        "--batch-size", "16", "--lr", "1e-4", "--lr-base-batch", "16", "--log-interval", "2")
    assert math.isnan(history[0]["reconstruction_error"])
    assert read_csv(tmp_path / "log.csv")[0]["reconstruction_error"] == "nan"


@pytest.mark.slow
def test_validate_cli_prints_the_logged_accuracy(trained, digits, capsys):
    output, history = trained
    validate_main(["--model", "revcol_vit_s", "--checkpoint", str(output / "checkpoint.pth"), "--data", str(digits),
                   "--workers", "0", "--batch-size", "50"])
    top1 = re.search(r"top-1 (\d+\.\d+)", capsys.readouterr().out).group(1)
    assert top1 == f"{history[-1]['val_top1']:.2f}"


@pytest.fixture(scope="module")
def ema_run(small_digits, tmp_path_factory):
    """4 epochs of one update each (a batch of all 160 training digits), EMA decay 0.5, label smoothing 0.3.

    Returns the output folder, the log rows and every epoch's checkpoint.
    """
    output = tmp_path_factory.mktemp("ema_run")
    checkpoints = []
    write_csv = train_module.write_csv

    def write_csv_and_keep_the_checkpoint(rows, path):
        write_csv(rows, path)
        checkpoints.append(load_checkpoint(str(output / "checkpoint.pth")))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "write_csv", write_csv_and_keep_the_checkpoint)
        history = run_train(small_digits, output, *NO_AUGMENTATION, "--epochs", "4", "--warmup-epochs", "0",
                            "--batch-size", "160", "--lr", "1e-3", "--lr-base-batch", "160", "--ema-decay", "0.5",
                            "--smoothing", "0.3")
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    return output, history, checkpoints


def checkpoint_model(ckpt, weights: str) -> torch.nn.Module:
    """The checkpoint's model with its "model" or "ema" weights."""
    model = create_model(ckpt["args"]["model"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt[weights])
    return model


def evaluate_weights(ckpt, weights: str):
    """Loss, top-1 and top-5 of the checkpoint's "model" or "ema" weights on the val/ split it trained with."""
    args = ckpt["args"]
    transform = eval_transform(args["img_size"], interpolation=args["interpolation"], crop_pct=args["crop_pct"])
    loader = eval_loader(image_folder(args["data"], "val", transform), rank=0, world_size=1, batch_size=64, workers=0,
                         pin_memory=False)
    return evaluate(checkpoint_model(ckpt, weights), loader, Dist(0, 1, torch.device("cpu")), amp_dtype=None)


def test_ema_is_timm_v3_average_of_the_weights_after_each_update(ema_run):
    """timm's ModelEmaV3 takes decay 0 at update 1 (the EMA becomes the model), then --ema-decay (0.5 here)."""
    _, _, checkpoints = ema_run
    expected = checkpoints[0]["model"]
    for epoch, ckpt in enumerate(checkpoints, 1):
        model = ckpt["model"]
        if epoch > 1:
            expected = {name: 0.5 * ema + 0.5 * model[name] for name, ema in expected.items()}
            assert max((ema - model[name]).abs().max() for name, ema in expected.items()) > 1e-4, "EMA lags"
        for name, ema in expected.items():
            assert torch.allclose(ckpt["ema"][name], ema, rtol=0, atol=1e-6), (epoch, name)


def test_logged_ema_accuracy_is_that_of_the_ema_weights(ema_run):
    _, history, checkpoints = ema_run
    ema = [evaluate_weights(ckpt, "ema") for ckpt in checkpoints]
    assert [(row["ema_top1"], row["ema_top5"]) for row in history] == [(m["top1"], m["top5"]) for m in ema]
    # The EMA's accuracies are not the model's here, so the model's logged as the EMA's would fail the above.
    assert [(row["ema_top1"], row["ema_top5"]) for row in history] != [(row["val_top1"], row["val_top5"])
                                                                        for row in history]


def test_validate_ema_reports_the_ema_weights(ema_run, small_digits):
    output, _, checkpoints = ema_run

    def run_validate(*flags):
        return validate(validate_parser().parse_args(["--model", "revcol_vit_s", "--checkpoint",
                                                      str(output / "checkpoint.pth"), "--data", str(small_digits),
                                                      "--workers", "0", *flags]))

    ema, model = run_validate("--ema"), run_validate()
    assert ema == pytest.approx(evaluate_weights(checkpoints[-1], "ema"), rel=1e-6)
    assert model == pytest.approx(evaluate_weights(checkpoints[-1], "model"), rel=1e-6)
    assert abs(ema["loss"] - model["loss"]) > 1e-4


def test_smoothing_trains_on_label_smoothed_cross_entropy(ema_run):
    """Without mixup, --smoothing 0.3 is 0.7 x the target's NLL + 0.3 x the mean NLL of all classes.

    The last epoch's one step feeds all 160 training images (deterministic with augmentation off) to the weights
    of the epoch before; its logged loss is that step's.
    """
    _, history, checkpoints = ema_run
    ckpt = checkpoints[-2]
    model = checkpoint_model(ckpt, "model").train()
    train_set = create_dataset("", root=os.path.join(ckpt["args"]["data"], "train"), search_split=False,
                               transform=train_module.build_transforms(argparse.Namespace(**ckpt["args"]))[0])
    images, targets = zip(*train_set)
    with torch.no_grad():
        log_probs = model(torch.stack(images)).log_softmax(-1)
    target_nll = -log_probs.gather(1, torch.tensor(targets)[:, None]).mean().item()
    uniform_nll = -log_probs.mean().item()
    assert history[-1]["train_loss"] == pytest.approx(0.7 * target_nll + 0.3 * uniform_nll, rel=1e-5)
    assert abs(target_nll - uniform_nll) > 5e-3  # far enough apart that another smoothing would not pass


def test_accumulated_micro_batches_make_the_update_of_the_whole_batch(small_digits, tmp_path):
    """One update of 160 images, or of 2 accumulated micro-batches of 80. With SGD, whose step is linear in the
    gradient (Adam's first step is lr x its sign), a summed instead of averaged gradient moves the weights elsewhere.
    """
    flags = [*NO_AUGMENTATION, "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "160", "--opt", "sgd",
             "--lr", "0.1", "--lr-base-batch", "160"]
    whole = run_train(small_digits, tmp_path / "whole", *flags)
    accumulated = run_train(small_digits, tmp_path / "accumulated", *flags, "--accum-steps", "2")
    assert whole[0]["step"] == accumulated[0]["step"] == 1
    assert accumulated[0]["train_loss"] == pytest.approx(whole[0]["train_loss"], rel=1e-6)
    a, b = (load_checkpoint(str(tmp_path / run / "checkpoint.pth")) for run in ("whole", "accumulated"))
    for name, weight in a["model"].items():
        assert torch.allclose(b["model"][name], weight, rtol=0, atol=1e-6), name


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(small_digits, tmp_path, monkeypatch):
    """With the full recipe's randomness (RandAugment, mixup/cutmix, random erasing, drop path, EMA)."""
    flags = ["--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16", "--lr", "1e-4", "--lr-base-batch", "16",
             "--ema-decay", "0.9"]
    uninterrupted = run_train(small_digits, tmp_path / "a", *flags)

    class Crash(Exception):
        pass

    write_csv = train_module.write_csv

    def crash_after_epoch_2(rows, path):
        write_csv(rows, path)
        if len(rows) == 2:
            raise Crash

    monkeypatch.setattr(train_module, "write_csv", crash_after_epoch_2)
    with pytest.raises(Crash):
        run_train(small_digits, tmp_path / "b", *flags)
    monkeypatch.undo()
    resumed = run_train(small_digits, tmp_path / "b", *flags, "--resume", str(tmp_path / "b" / "checkpoint.pth"))

    for key in ("step", "train_loss", "val_loss", "val_top1", "ema_top1", "lr"):
        assert resumed[2][key] == pytest.approx(uninterrupted[2][key], rel=1e-6, abs=1e-9), key
    a, b = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=False) for run in ("a", "b"))
    for name, weight in a["model"].items():
        assert torch.allclose(weight, b["model"][name], rtol=0, atol=1e-6), name
    assert [int(row["epoch"]) for row in read_csv(tmp_path / "b" / "log.csv")] == [1, 2, 3]


def test_lr_scales_with_the_batch_warms_up_linearly_then_follows_the_cosine():
    # The paper's recipe at batch 1024: peak 4e-3 x 1024 / 4096. timm's cosine runs over all steps, warmup included.
    args = parse_args(["--data", "unused", "--output", "unused", "--lr", "4e-3", "--lr-base-batch", "4096",
                       "--batch-size", "1024", "--epochs", "10", "--warmup-epochs", "2", "--warmup-lr", "1e-6",
                       "--min-lr", "1e-5"])
    t = train_module.build_training(args, torch.nn.Linear(2, 2), updates_per_epoch=10, device=torch.device("cpu"))
    peak, steps, warmup = 1e-3, 100, 20
    for step in (0, 1, 10, 19, 20, 21, 60, 99, 100):
        t.scheduler.step_update(step)
        if step < warmup:
            expected = 1e-6 + step * (peak - 1e-6) / warmup
        else:
            expected = 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * step / steps))
        assert t.lr == pytest.approx(expected, rel=1e-9), step


def test_a_checkpoint_save_killed_midway_keeps_the_previous_epoch(small_digits, tmp_path, monkeypatch):
    flags = [*NO_AUGMENTATION, "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16", "--lr", "1e-4",
             "--lr-base-batch", "16"]
    save = torch.save

    def save_epoch_2_halfway_then_die(state, path):
        save(state, path)
        if state["epoch"] == 2:
            os.truncate(path, os.path.getsize(path) // 2)
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_epoch_2_halfway_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(small_digits, tmp_path, *flags)
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 1
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    resumed = run_train(small_digits, tmp_path, *flags, "--resume", str(tmp_path / "checkpoint.pth"))
    assert [row["epoch"] for row in resumed] == [1, 2]


@pytest.mark.slow
def test_best_and_last_checkpoints_validate_and_resume(small_digits, tmp_path, capsys):
    """--keep-last 2 keeps epochs 3 and 4 of 4; checkpoint_best.pth is the epoch of the best EMA top-1 (the EMA is
    on); both are whole checkpoints that validate reads and --resume (--rewind: an earlier epoch) continues exactly."""
    flags = [*NO_AUGMENTATION, "--epochs", "4", "--warmup-epochs", "0", "--batch-size", "32", "--lr", "1e-3",
             "--lr-base-batch", "32", "--ema-decay", "0.5", "--keep-last", "2"]
    history = run_train(small_digits, tmp_path / "run", *flags)
    names = sorted(name for name in os.listdir(tmp_path / "run") if name.endswith(".pth"))
    assert names == ["checkpoint.pth", "checkpoint_best.pth", "checkpoint_epoch3.pth", "checkpoint_epoch4.pth"]
    best_top1 = max(row["ema_top1"] for row in history)
    best_epoch = next(row["epoch"] for row in history if row["ema_top1"] == best_top1)
    best = load_checkpoint(str(tmp_path / "run" / "checkpoint_best.pth"))
    assert best["epoch"] == best_epoch and best["history"] == history[:best_epoch]
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint_epoch3.pth"))["epoch"] == 3

    validate_main(["--model", "revcol_vit_s", "--checkpoint", str(tmp_path / "run" / "checkpoint_best.pth"),
                   "--data", str(small_digits), "--workers", "0", "--ema"])
    assert f"epoch {best_epoch}) on val (40 images): top-1 {best_top1:.2f}" in capsys.readouterr().out

    resumed = run_train(small_digits, tmp_path / "run", *flags, "--rewind", "--resume",
                        str(tmp_path / "run" / "checkpoint_epoch3.pth"))
    assert resumed[3]["val_top1"] == history[3]["val_top1"]
    assert resumed[3]["train_loss"] == pytest.approx(history[3]["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_fine_tuning_at_another_resolution_on_other_classes(trained, small_digits, tmp_path, capsys):
    """Train (the 32 px, 10-class run), then fine-tune at 48 px on 5 classes: one epoch at an lr of 1e-12, so the
    fine-tuned weights are the loaded ones. The backbone is the trained one, the position embedding its 4x4 grid
    resampled to 6x6, the head new; optimizer, schedule and step start afresh."""
    source_dir, _ = trained
    data = tmp_path / "five"
    for split in ("train", "val"):
        for digit in range(5):
            shutil.copytree(small_digits / split / f"digit{digit}", data / split / f"digit{digit}")
    source = load_checkpoint(str(source_dir / "checkpoint.pth"))
    train_module.main(["--data", str(data), "--output", str(tmp_path / "tuned"), *TOY_MODEL, *NO_AUGMENTATION,
                       "--img-size", "48", "--initial-checkpoint", str(source_dir / "checkpoint.pth"),
                       "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--lr", "1e-12",
                       "--lr-base-batch", "16", "--min-lr", "0", "--weight-decay", "0"])
    tuned = load_checkpoint(str(tmp_path / "tuned" / "checkpoint.pth"))
    assert tuned["model_kwargs"]["img_size"] == 48 and tuned["model_kwargs"]["num_classes"] == 5
    assert tuned["step"] == 5 and tuned["epoch"] == 1  # 80 images in batches of 16, counted from 0
    assert {state["step"].item() for state in tuned["optimizer"]["state"].values()} == {5.0}
    before, after = source["model"], tuned["model"]
    assert before["pos_embed"].shape == (1, 16, 32) and after["pos_embed"].shape == (1, 36, 32)
    grid = before["pos_embed"].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    resampled = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True)
    assert torch.allclose(after["pos_embed"], resampled.permute(0, 2, 3, 1).reshape(1, 36, 32), atol=1e-6)
    assert after["head.weight"].shape == (5, 32)
    for name, weight in before.items():
        if not name.startswith(("head.", "pos_embed")):
            assert torch.allclose(after[name], weight, rtol=0, atol=1e-6), name

    validate_main(["--model", "revcol_vit_s", "--checkpoint", str(tmp_path / "tuned" / "checkpoint.pth"), "--data",
                   str(data), "--workers", "0"])
    assert "on val (20 images): top-1 " in capsys.readouterr().out
    with pytest.raises(UsageError, match="checkpoint .* holds model revcol_vit_s, not revcol_vit_b$"):
        run_train(data, tmp_path / "b", "--model", "revcol_vit_b", "--initial-checkpoint",
                  str(source_dir / "checkpoint.pth"))


def expected_layer(name: str, levels: int, columns: int = 2) -> int:
    """The layer-decay depth of a parameter of the toy model (one block per level): the stem is 0, the block of level
    l in column c (with the level's fusion and gamma) sits l + c + 1 deep, its shortest path from the stem through
    the column grid; norm and head last."""
    if name.startswith(("patch_embed", "pos_embed")):
        return 0
    if name.startswith(("norm", "head")):
        return levels + columns
    column, level = re.match(r"revcol\.columns\.(\d+)\.(?:levels|gammas)\.(\d+)", name).groups()
    return int(level) + int(column) + 1


def test_layer_decay_and_model_options(small_digits, tmp_path):
    """One AdamW step (no weight decay) moves each weight by at most its group's lr (the first step is lr x the
    gradient's sign): with --layer-decay 0.8 that is 0.8^(depth from the head) x the lr. --gamma-init, --mlp-ratio
    and --drop-rate reach timm.create_model."""
    run_train(small_digits, tmp_path, *NO_AUGMENTATION, "--epochs", "1", "--warmup-epochs", "0", "--batch-size",
              "160", "--lr", "1e-3", "--lr-base-batch", "160", "--weight-decay", "0", "--layer-decay", "0.8",
              "--gamma-init", "0.25", "--mlp-ratio", "2", "--drop-rate", "0.1")
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert {k: ckpt["model_kwargs"][k] for k in ("gamma_init", "mlp_ratio", "drop_rate")} == dict(
        gamma_init=0.25, mlp_ratio=2.0, drop_rate=0.1)
    torch.manual_seed(0)  # train() builds the model from --seed 0
    initial = create_model("revcol_vit_s", **ckpt["model_kwargs"]).state_dict()
    assert all((initial[name] == 0.25).all() for name in initial if ".gammas." in name)
    assert initial["revcol.columns.0.levels.0.blocks.0.mlp.fc1.weight"].shape == (64, 32)
    top = expected_layer("head.weight", levels=4)
    for name, weight in ckpt["model"].items():
        moved = (weight - initial[name]).abs().max().item()
        assert moved == pytest.approx(1e-3 * 0.8 ** (top - expected_layer(name, levels=4)), rel=2e-2), name


def test_tar_per_split_trains_like_the_folder(small_digits, tmp_path, capsys):
    """train.tar and val.tar of <class>/<image>, made from the toy folders, go through timm's tar reader: the same
    samples in the same order, so the same run as from the folders."""
    data = tmp_path / "tars"
    data.mkdir()
    for split in ("train", "val"):
        with tarfile.open(data / f"{split}.tar", "w") as tar:
            for folder in sorted((small_digits / split).iterdir()):
                tar.add(folder, arcname=folder.name)
    flags = [*NO_AUGMENTATION, "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--lr", "1e-3",
             "--lr-base-batch", "16"]
    from_tars = run_train(data, tmp_path / "tar_run", *flags)
    from_folders = run_train(small_digits, tmp_path / "folder_run", *flags)
    for key in ("step", "train_loss", "val_loss", "val_top1"):
        assert from_tars[0][key] == pytest.approx(from_folders[0][key], rel=1e-6), key
    validate_main(["--model", "revcol_vit_s", "--checkpoint", str(tmp_path / "tar_run" / "checkpoint.pth"), "--data",
                   str(data), "--workers", "0"])
    assert f"on val (40 images): top-1 {from_tars[0]['val_top1']:.2f}" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--dataset 'wds/digits' cannot open split train"):
        run_train(data, tmp_path / "wds", "--dataset", "wds/digits")


def test_log_interval_logs_throughput_and_memory_every_n_steps(small_digits, tmp_path, caplog):
    """160 images in batches of 16 for 2 epochs: 20 steps, a line at steps 6, 12 and 18."""
    with caplog.at_level("INFO", logger="revcol_vit.train"):
        run_train(small_digits, tmp_path, *NO_AUGMENTATION, "--epochs", "2", "--warmup-epochs", "0", "--batch-size",
                  "16", "--lr", "1e-4", "--lr-base-batch", "16", "--log-interval", "6")
    lines = [record.getMessage() for record in caplog.records if "img/s" in record.getMessage()]
    pattern = (r"epoch (\d)/2, step (\d+)/10 \((\d+) in all\): loss \d\.\d{4}, lr [\d.e-]+, ([\d.]+) img/s, "
               r"peak memory -$")
    matches = [re.match(pattern, line) for line in lines]
    assert all(matches), lines
    assert [tuple(int(g) for g in m.groups()[:3]) for m in matches] == [(1, 6, 6), (2, 2, 12), (2, 8, 18)]
    assert all(float(m.group(4)) > 0 for m in matches)


@pytest.mark.slow
def test_compiled_training_matches_eager(small_digits, tmp_path, monkeypatch):
    """``--compile``, with drop path on: the compiled levels replay the same masks as eager ones."""
    flags = [*NO_AUGMENTATION, "--drop-path-rate", "0.3", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
             "--lr", "1e-4", "--lr-base-batch", "16"]
    eager = run_train(small_digits, tmp_path / "eager", *flags)
    counter = CompileCounterWithBackend("inductor")  # what the trainer's compile_levels() compiles goes through it
    compile_levels = ReversibleColumns.compile_levels
    monkeypatch.setattr(ReversibleColumns, "compile_levels", lambda self: compile_levels(self, backend=counter))
    compiled = run_train(small_digits, tmp_path / "compiled", *flags, "--compile")
    assert counter.frame_count >= 2, "the levels must run compiled, in the forward and in the recompute"
    for key in ("train_loss", "val_loss", "val_top1"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-4), key
    a, b = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=False) for run in ("eager", "compiled"))
    for name, weight in a["model"].items():
        assert torch.allclose(weight, b["model"][name], rtol=0, atol=1e-5), name


@pytest.mark.slow
def test_sweep_writes_csv_and_png(small_digits, tmp_path):
    sweep_main(["--data", str(small_digits), "--output", str(tmp_path), "--img-size", "32", "--patch-size", "8",
                "--embed-dim", "16", "--num-heads", "2", "--epochs", "1", "--batch-size", "32", "--lr", "1e-4",
                "--lr-base-batch", "32", "--warmup-epochs", "0", "--workers", "0", *NO_AUGMENTATION])
    rows = read_csv(tmp_path / "sweep.csv")
    assert [row["variant"] for row in rows] == ["1x32", "2x16", "4x8", "8x4"]
    assert [int(row["columns"]) for row in rows] == [1, 2, 4, 8]
    assert [int(row["blocks_per_column"]) for row in rows] == [32, 16, 8, 4]
    for row in rows:
        assert 0 <= float(row["top1"]) <= 100
        assert float(row["params_m"]) > 0 and float(row["gflops"]) > 0 and float(row["memory_mb"]) > 0
        assert row["memory_kind"] == "training peak per image"
        assert (tmp_path / row["variant"] / "checkpoint.pth").is_file()
    # The reversible backward holds one level's activations at a time: the more columns (of the same 32 blocks),
    # the shorter the levels, the less memory (0.17, 0.10, 0.06, 0.04 MB per image here).
    memory = [float(row["memory_mb"]) for row in rows]
    assert all(a > 1.3 * b for a, b in zip(memory, memory[1:])), memory
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_yaml_recipe_overrides_defaults_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 5\nbatch-size: 256\nlr: 1e-3\n")  # YAML reads 1e-3 as a string
    args = parse_args(["--data", "d", "--config", str(recipe), "--batch-size", "64"])
    assert (args.epochs, args.batch_size, args.lr) == (5, 64, 1e-3)
    assert (args.warmup_epochs, args.mixup, args.aa) == (20, 0.8, "rand-m9-mstd0.5-inc1")  # Table 11
    assert (args.scale, args.ratio, args.hflip) == ([0.08, 1.0], [3 / 4, 4 / 3], 0.5)  # ConvNeXt's crop and flip
    recipe.write_text("# nothing to override yet\n")  # an empty recipe keeps every default
    assert vars(parse_args(["--data", "d", "--config", str(recipe)])) == {
        **vars(parse_args(["--data", "d"])), "config": str(recipe)}
    for text, message in [("learning_rate: 1.0\n", "unknown options: learning_rate"),
                          ("amp: fp32\n", "amp: expected one of bf16, fp16, none, got 'fp32'$"),
                          ("epochs: many\n", "epochs: expected an integer >= 1, got 'many'$"),
                          ("- epochs\n- 5\n", "must be a mapping of option names to values"),
                          ("epochs: [5\nlr: 1\n", "is not valid YAML: while parsing a flow sequence$"),
                          (None, "cannot read config .*: No such file or directory$")]:
        if text is None:
            recipe.unlink()
        else:
            recipe.write_text(text)
        with pytest.raises(UsageError, match=message) as error:
            parse_args(["--data", "d", "--config", str(recipe)])
        assert "\n" not in str(error.value)


def test_example_imagenet_recipe_is_table_11():
    args = parse_args(["--data", "d", "--config", str(REPO / "examples" / "vit" / "imagenet1k_revcol_vit_b.yaml")])
    assert args.model == "revcol_vit_b" and args.drop_path_rate is None  # the model's 0.2
    assert vars(args) == {**vars(parse_args(["--data", "d", "--model", "revcol_vit_b", "--amp", "bf16",
                                              "--workers", "10"])), "config": args.config}


def make_folder(root: Path, case: str = "") -> Path:
    """Two classes of one black image each; in "empty class" train/b has none, in "undecodable class" an empty file."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            if (split, label) != ("train", "b") or case not in ("empty class", "undecodable class"):
                Image.new("RGB", (32, 32)).save(folder / "0.png")
            elif case == "undecodable class":
                (folder / "0.png").write_bytes(b"")
    return root


@pytest.mark.parametrize("case, flags, message", [
    ("missing data", [], "data directory .*missing does not exist"),
    ("unknown model", ["--model", "revcol_vit_nope"], "unknown model 'revcol_vit_nope'"),
    ("empty class", [], r"class folder .*train[/\\]b has no images"),
    ("undecodable class", ["--skip-bad-images"], "train/ has no decodable image of class b$"),
    ("indivisible batch", ["--batch-size", "30", "--accum-steps", "4"],
     "--batch-size 30 is not divisible by world size 1 x --accum-steps 4"),
    ("sizes that do not fit", ["--embed-dim", "30", "--num-heads", "4"],
     "model revcol_vit_s cannot be built with .*: dim 30 is not divisible by num_heads 4$"),
    ("a model without the options", ["--model", "resnet18"],
     "model resnet18 cannot be built with .*unexpected keyword"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, flags, message):
    data = tmp_path / "missing" if case == "missing data" else make_folder(tmp_path / "data", case)
    with pytest.raises(UsageError, match=message):
        run_train(data, tmp_path / "out", *flags)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


@pytest.mark.slow
def test_an_earlier_run_is_not_overwritten_without_resume(trained, digits):
    output, _ = trained
    before = (output / "checkpoint.pth").read_bytes()
    with pytest.raises(UsageError, match=f"{output} already holds a run (.*): continue it with --resume"):
        run_train(digits, output, "--epochs", "1")
    assert (output / "checkpoint.pth").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [  # every other way a file can be wrong: tests/test_checkpoint.py
    ("truncated", "cannot be read: truncated, or not a torch checkpoint (RuntimeError)"),
    ("another torch file", "was not written by revcol_vit.train (it lacks optimizer, scheduler"),
])
def test_unreadable_checkpoint_is_one_clear_error(trained, small_digits, tmp_path, capsys, case, message):
    path = tmp_path / "x.pth"
    if case == "truncated":
        good = (trained[0] / "checkpoint.pth").read_bytes()
        path.write_bytes(good[:len(good) // 2])
    else:
        torch.save({"model": {}, "epoch": 3}, path)
    with pytest.raises(SystemExit) as exit_info:
        validate_main(["--model", "revcol_vit_s", "--checkpoint", str(path), "--data", str(small_digits)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: checkpoint {path} {message}"), error


@pytest.mark.slow
def test_cli_prints_bad_input_as_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "revcol_vit.train", "--data", str(tmp_path / "missing")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: data directory {tmp_path / 'missing'} does not exist"]


def with_undecodable_images(small_digits: Path, root: Path) -> Path:
    """The small digits plus an undecodable PNG in train/digit3 and a truncated one in val/digit5."""
    shutil.copytree(small_digits, root)
    (root / "train" / "digit3" / "corrupt.png").write_bytes(b"not a png")
    good = (root / "val" / "digit5").iterdir().__next__().read_bytes()
    (root / "val" / "digit5" / "truncated.png").write_bytes(good[:len(good) // 2])
    return root


def test_undecodable_images_are_an_error_that_names_and_counts_them(small_digits, tmp_path, capsys):
    data = with_undecodable_images(small_digits, tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["--data", str(data), "--output", str(tmp_path / "out"), *TOY_MODEL, "--batch-size", "8"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: 2 images cannot be decoded: {data / 'train' / 'digit3' / 'corrupt.png'}, "
                     f"{data / 'val' / 'digit5' / 'truncated.png'} (fix or remove them, or give --skip-bad-images "
                     f"to leave them out)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_skipped_undecodable_images_are_counted_once_and_never_trained_or_evaluated(small_digits, tmp_path, caplog,
                                                                                     capsys):
    data = with_undecodable_images(small_digits, tmp_path / "data")
    # 160 real training images in batches of 7: 22 steps (the corrupt one would make 161, 23 steps).
    history = run_train(data, tmp_path / "out", *NO_AUGMENTATION, "--epochs", "1", "--batch-size", "7",
                        "--skip-bad-images")
    assert history[0]["step"] == 22
    assert caplog.text.count("left out 2 images that cannot be decoded (--skip-bad-images)") == 1
    assert "Skipped sample" not in caplog.text  # timm's stand-in for a sample it cannot load never came up
    assert history[0]["val_top1"] * 40 / 100 == pytest.approx(round(history[0]["val_top1"] * 40 / 100))
    validate_main(["--model", "revcol_vit_s", "--checkpoint", str(tmp_path / "out" / "checkpoint.pth"), "--data",
                   str(data), "--workers", "0", "--skip-bad-images"])
    out = capsys.readouterr().out
    assert "on val (40 images, 1 undecodable left out): top-1 " in out  # 40 real, not 41 with a stand-in
    assert f"top-1 {history[0]['val_top1']:.2f}" in out


class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: stands for any code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_that_pickles_a_callable_is_refused_and_never_runs(small_digits, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"args": {"model": "revcol_vit_s"}, "model": RunsCode(marker)}, hostile)
    with pytest.raises(SystemExit) as exit_info:
        validate_main(["--model", "revcol_vit_s", "--checkpoint", str(hostile), "--data", str(small_digits),
                       "--workers", "0"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: checkpoint {hostile} holds more than plain data")
    assert "Unsupported global" in error[0]
    with pytest.raises(UsageError, match="holds more than plain data and is refused"):
        run_train(small_digits, tmp_path / "out", "--batch-size", "16", "--resume", str(hostile))
    assert not marker.exists()


def test_training_transforms_posterize_0_bits_to_black():
    """RandAugment m9 reaches 0 bits, which Pillow >= 12 rejects; the recipe's Pillow made a black image."""
    from timm.data import auto_augment

    from revcol_vit.data import train_transform
    train_transform(32, scale=(1, 1), ratio=(1, 1), hflip=0.0, auto_augment_policy="rand-m9-mstd0.5-inc1",
                    interpolation="bicubic", reprob=0.0)
    posterize = auto_augment.NAME_TO_OP["PosterizeIncreasing"]
    image = Image.new("RGB", (4, 4), (200, 100, 50))
    assert posterize(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize(image, 8).tobytes() == image.tobytes()
