"""The ViT training CLI never trains the wrong thing silently: resume, output folders, class folders, and bad input
as one line (exit 2) before the data is read."""
import csv
import errno
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import revcol_vit.runtime as runtime
import revcol_vit.train as train_module
from revcol.checkpoint import write_atomically
from revcol_vit.data import open_splits
from revcol_vit.errors import UsageError
from revcol_vit.runtime import LOCK_NAME, load_checkpoint, parse_device, seed_all
from revcol_vit.sweep import main as sweep_main
from revcol_vit.train import parse_args, train
from revcol_vit.validate import main as validate_main

TINY_MODEL = ["--model", "revcol_vit_s", "--img-size", "32", "--patch-size", "16", "--embed-dim", "32",
              "--num-heads", "2", "--depths", "1", "1", "--num-columns", "2", "--workers", "0"]
# 8 training images in batches of 4: 2 steps per epoch; no randomness beyond the data order.
RECIPE = ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--ema-decay", "0",
          "--batch-size", "4", "--lr-base-batch", "4", "--lr", "1e-3", "--min-lr", "1e-6", "--warmup-epochs", "0"]


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{seed}_{i}.png")


def make_data(root: Path, classes=("a", "b")) -> Path:
    """4 training and 2 validation images per class."""
    for k, name in enumerate(classes):
        write_images(root / "train" / name, 4, seed=k)
        write_images(root / "val" / name, 2, seed=10 + k)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def argv(data: Path, output: Path, *flags: str):
    return ["--data", str(data), "--output", str(output), *TINY_MODEL, *RECIPE, *flags]


def run_train(data: Path, output: Path, *flags: str):
    return train(parse_args(argv(data, output, *flags)))


def one_error_line(capsys, main, args) -> str:
    """Runs a CLI's main that must fail: exit status 2 and one ``error:`` line, which it returns."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def read_log(folder: Path):
    with open(folder / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory) -> Path:
    """A finished 1-epoch run; tests copy it before changing it."""
    output = tmp_path_factory.mktemp("one_epoch") / "run"
    run_train(data, output, "--epochs", "1")
    return output


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture
def no_data_read(monkeypatch):
    """Fails the test if the CLI gets as far as reading the data."""
    def fail(*args, **kwargs):
        raise AssertionError("the data was read before the error")

    monkeypatch.setattr(train_module, "open_splits", fail)


# --- resume -----------------------------------------------------------------------------------------------------------

def test_resume_with_more_epochs_follows_the_schedule_of_the_new_flags(one_epoch, data, tmp_path, caplog):
    run = copy_run(one_epoch, tmp_path)
    history = run_train(data, run, "--epochs", "3", "--resume", str(run / "checkpoint.pth"))
    # timm's cosine over the 6 steps of 3 epochs, at step 4 (the end of epoch 2): not the 1-epoch run's floor.
    expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 4 / 6))
    log = read_log(run)
    assert [int(row["epoch"]) for row in log] == [1, 2, 3]
    assert float(log[1]["lr"]) == pytest.approx(expected, rel=1e-6)
    assert history[1]["lr"] == pytest.approx(expected, rel=1e-6)
    assert "not the checkpoint's: --epochs 1 -> 3" in caplog.text


@pytest.mark.slow
def test_sweep_rerun_merges_its_rows_and_follows_the_new_schedule(data, tmp_path):
    flags = ["--data", str(data), "--output", str(tmp_path), "--img-size", "32", "--patch-size", "16", "--embed-dim",
             "16", "--num-heads", "2", "--workers", "0", *RECIPE]
    sweep_main([*flags, "--epochs", "1", "--variants", "1x32", "4x8"])
    sweep_main([*flags, "--epochs", "3", "--lr", "5e-3", "--variants", "4x8"])
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["variant"], row["epochs"]) for row in rows] == [("1x32", "1"), ("4x8", "3")]
    # The new schedule (peak 5e-3 over 6 steps) at step 4, the end of epoch 2: not the first run's floor of 1e-6.
    expected = 1e-6 + 0.5 * (5e-3 - 1e-6) * (1 + math.cos(math.pi * 4 / 6))
    assert float(read_log(tmp_path / "4x8")[1]["lr"]) == pytest.approx(expected, rel=1e-6)


def test_sweep_output_that_is_a_file_is_one_line(data, tmp_path, capsys):
    output = tmp_path / "file"
    output.write_text("")
    error = one_error_line(capsys, sweep_main, ["--data", str(data), "--output", str(output)])
    assert error == f"error: --output {output} is a file, not a folder"


@pytest.mark.parametrize("case, flags, message", [
    ("another model of the same sizes", ["--model", "revcol_vit_b"], "model revcol_vit_s, not revcol_vit_b"),
    ("another width", ["--embed-dim", "64"], "--embed-dim 32, not 64"),
    ("other classes", [], "classes a, b, not the data's x, y"),
])
def test_resume_refuses_another_model_or_classes_in_one_line(one_epoch, tmp_path, capsys, case, flags, message):
    run = copy_run(one_epoch, tmp_path)
    data = make_data(tmp_path / "data", classes=("x", "y") if case == "other classes" else ("a", "b"))
    before = (run / "checkpoint.pth").read_bytes()
    error = one_error_line(capsys, train_module.main,
                           argv(data, run, "--epochs", "2", "--resume", str(run / "checkpoint.pth"), *flags))
    assert error == f"error: checkpoint {run / 'checkpoint.pth'} holds {message}"
    assert (run / "checkpoint.pth").read_bytes() == before and len(read_log(run)) == 1


def test_validate_names_the_model_and_classes_that_differ(one_epoch, tmp_path, capsys):
    data = make_data(tmp_path / "data", classes=("x", "y"))
    error = one_error_line(capsys, validate_main, ["--model", "revcol_vit_b", "--checkpoint",
                                                   str(one_epoch / "checkpoint.pth"), "--data", str(data)])
    assert error.endswith("holds model revcol_vit_s, not revcol_vit_b; classes a, b, not the data's x, y")


# --- class folders ----------------------------------------------------------------------------------------------------

def test_an_image_belongs_to_its_top_level_class_folder_at_any_depth(tmp_path):
    """train/a/c/*.png is class a (not c, which is another class folder), train/a/sub/*.png too."""
    root = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2)):
        write_images(root / split / "a" / "c", count, seed=1)
        write_images(root / split / "a" / "sub", count, seed=2)
        write_images(root / split / "b", count, seed=3)
        write_images(root / split / "c", count, seed=4)
        write_images(root / split, 1, seed=5)  # directly in the split: no class
    splits, classes = open_splits("", str(root), {"train": None, "val": None})
    assert classes == ["a", "b", "c"]
    for split, dataset in splits.items():
        labels = {os.path.relpath(path, root / split): label for path, label in dataset.reader.samples}
        assert len(labels) == 4 * (4 if split == "train" else 2)
        assert all(label == classes.index(name.split(os.sep)[0]) for name, label in labels.items()), labels
    history = train(parse_args(argv(root, tmp_path / "out", "--epochs", "1")))  # 16 images, 4 steps
    assert history[0]["step"] == 4

    tars = tmp_path / "tars"  # the same splits as tar files
    tars.mkdir()
    for split in ("train", "val"):
        with tarfile.open(tars / f"{split}.tar", "w") as tar:
            tar.add(root / split, arcname=".")
    splits, classes = open_splits("", str(tars), {"train": None, "val": None})
    assert classes == ["a", "b", "c"]
    for split, dataset in splits.items():
        names = [os.path.normpath(dataset.reader.samples[i][0].path) for i in range(len(dataset))]
        assert len(names) == 4 * (4 if split == "train" else 2)
        assert [int(label) for label in dataset.reader.targets] == [classes.index(n.split("/")[0]) for n in names]


# --- output folders ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["checkpoint_best.pth", "checkpoint_epoch3.pth", "log.csv", "tensorboard"])
def test_a_folder_holding_any_run_file_is_not_overwritten(data, tmp_path, capsys, no_data_read, name):
    output = tmp_path / "run"
    output.mkdir()
    if name == "tensorboard":
        (output / name).mkdir()
    else:
        (output / name).write_text("earlier run")
    error = one_error_line(capsys, train_module.main, argv(data, output, "--epochs", "1"))
    assert error == (f"error: {output} already holds a run ({name}): remove them to start afresh, or train into "
                     f"another --output")
    assert sorted(os.listdir(output)) == [name]


def test_resume_into_a_folder_holding_another_run_is_refused(one_epoch, data, tmp_path, capsys, no_data_read):
    other = copy_run(one_epoch, tmp_path)
    log = (other / "log.csv").read_text()
    error = one_error_line(capsys, train_module.main,
                           argv(data, other, "--epochs", "2", "--resume", str(one_epoch / "checkpoint.pth")))
    assert error.startswith(f"error: --output {other} holds another run (checkpoint.pth, checkpoint_best.pth, "
                            f"log.csv, tensorboard) than --resume {one_epoch / 'checkpoint.pth'}")
    assert (other / "log.csv").read_text() == log


def test_resume_from_an_earlier_epoch_needs_rewind_which_removes_the_later_ones(data, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    run_train(data, run, "--epochs", "2", "--keep-last", "2")
    epoch1 = run / "checkpoint_epoch1.pth"
    flags = ["--epochs", "2", "--keep-last", "2", "--resume", str(epoch1)]
    error = one_error_line(capsys, train_module.main, argv(data, run, *flags))
    assert error == (f"error: --resume {epoch1} is epoch 1 of the run in {run}, which has reached epoch 2: give "
                     f"--rewind to remove epochs 2-2 and continue from epoch 1")
    assert len(read_log(run)) == 2 and (run / "checkpoint_epoch2.pth").exists()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:  # stops right after the rewind, before epoch 2 is trained again
        patch.setattr(train_module, "tensorboard_writer", stop)
        with pytest.raises(KeyboardInterrupt):
            run_train(data, run, *flags, "--rewind")
    lines = [r.getMessage() for r in caplog.records if "rewinding" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"rewinding {run} to epoch 1 (--rewind): removed "
                                                   f"checkpoint_epoch2.pth")
    assert lines[0].endswith("checkpoint.pth is now epoch 1's; log.csv cut to 1 rows")
    assert not (run / "checkpoint_epoch2.pth").exists()
    assert [int(row["epoch"]) for row in read_log(run)] == [1]
    assert load_checkpoint(str(run / "checkpoint.pth"))["epoch"] == 1
    if (run / "checkpoint_best.pth").exists():
        assert load_checkpoint(str(run / "checkpoint_best.pth"))["epoch"] == 1


def test_a_second_run_into_a_locked_folder_is_refused(data, tmp_path, capsys, no_data_read):
    output = tmp_path / "run"
    output.mkdir()
    lock = output / LOCK_NAME
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a running process: this one
    error = one_error_line(capsys, train_module.main, argv(data, output, "--epochs", "1"))
    assert error.startswith(f"error: --output {output} is in use by another run (process and host in {lock}: "
                            f"{os.getpid()} ")
    assert sorted(os.listdir(output)) == [LOCK_NAME]


def test_a_stale_lock_is_taken_over_and_the_lock_goes_at_exit(data, tmp_path, caplog):
    output = tmp_path / "run"
    output.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    (output / LOCK_NAME).write_text(f"{dead_pid} {os.uname().nodename}\n")
    history = run_train(data, output, "--epochs", "1")
    assert history[0]["epoch"] == 1
    assert f"taking over {output / LOCK_NAME} from process {dead_pid}, which no longer runs" in caplog.text
    assert not (output / LOCK_NAME).exists()


def test_write_atomically_uses_a_temporary_name_no_other_write_takes(tmp_path):
    """A second write of the same path while the first is under way (another run, before the lock) no longer takes
    the first one's temporary file from under it."""
    path = tmp_path / "file"

    def outer(tmp):
        Path(tmp).write_text("outer")
        write_atomically(lambda inner_tmp: Path(inner_tmp).write_text("inner"), str(path))
        assert Path(tmp).read_text() == "outer"

    write_atomically(outer, str(path))
    assert path.read_text() == "outer"
    assert os.listdir(tmp_path) == ["file"]


# --- one line, exit 2, before the data is read, nothing written -------------------------------------------------------

def output_case(tmp_path: Path, case: str) -> str:
    if case == "a file":
        (tmp_path / "file").write_text("")
        return str(tmp_path / "file")
    if case == "under a file":
        (tmp_path / "file").write_text("")
        return str(tmp_path / "file" / "run")
    if case == "read-only":
        (tmp_path / "ro").mkdir(mode=0o500)
        return str(tmp_path / "ro" / "run")
    return ""


@pytest.mark.parametrize("case, message", [
    ("a file", "--output {} is a file, not a folder"),
    ("under a file", "--output {} cannot be created (Not a directory)"),
    ("read-only", "--output {} cannot be created (Permission denied)"),
    ("empty", "--output is empty: give a folder"),
    ("read-only disk", "--output {} cannot be created (Read-only file system)"),
])
def test_bad_output_is_one_line_before_the_data_is_read(data, tmp_path, capsys, monkeypatch, no_data_read, case,
                                                       message):
    if case == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    output = output_case(tmp_path, case)
    if case == "read-only disk":  # what os.makedirs raises there, which a test cannot mount
        output = str(tmp_path / "run")

        def makedirs_on_a_read_only_disk(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(runtime.os, "makedirs", makedirs_on_a_read_only_disk)
    error = one_error_line(capsys, train_module.main, ["--data", str(data), "--output", output, *TINY_MODEL])
    assert error == "error: " + message.format(output)


@pytest.mark.parametrize("flags, message", [
    (["--device", "foo"], "--device 'foo' is not a torch device (cpu, cuda, cuda:<index>, ...)"),
    (["--mlp-ratio", "0.01"], "mlp_ratio 0.01 x embed_dim 32 leaves the MLP no hidden unit"),
    (["--aa", "foo"], "argument --aa: 'foo' is no timm auto-augment policy"),
    (["--seed", str(2**32)], "argument --seed: expected an integer in [0, 4.29497e+09], got '4294967296'"),
])
def test_bad_flags_are_one_line_before_the_data_is_read(data, tmp_path, capsys, no_data_read, flags, message):
    error = one_error_line(capsys, train_module.main, argv(data, tmp_path / "out", *flags))
    assert error.startswith("error: ") and message in error, error
    assert not (tmp_path / "out").exists()


def test_cuda_device_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert parse_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="^--device cuda:2: no GPU 2 here \\(2 visible\\)$"):
        parse_device("cuda:2", local_rank=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="^--device cuda: CUDA is not available here$"):
        parse_device("cuda", local_rank=0)


def test_the_largest_seed_seeds_every_rank():
    seed_all(2**32 - 1 + 3)  # --seed 2**32 - 1 on rank 3


def test_dangling_symlink_is_listed_with_the_undecodable_images(data, tmp_path, capsys):
    root = Path(shutil.copytree(data, tmp_path / "data"))
    link = root / "train" / "a" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    error = one_error_line(capsys, train_module.main, argv(root, tmp_path / "out"))
    assert error.startswith(f"error: 1 image cannot be decoded: {link} ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("garbage val.tar", "{root}/val.tar is not a readable tar file"),
    ("only train.tar", "data directory {root} has train.tar but no val.tar"),
])
def test_tar_splits_that_cannot_be_read_are_one_line(data, tmp_path, capsys, case, message):
    root = tmp_path / "tars"
    root.mkdir()
    with tarfile.open(root / "train.tar", "w") as tar:
        tar.add(data / "train", arcname=".")
    if case == "garbage val.tar":
        (root / "val.tar").write_bytes(b"not a tar" * 100)
    error = one_error_line(capsys, train_module.main, argv(root, tmp_path / "out"))
    assert error.startswith("error: " + message.format(root=root)), error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    (b"epochs: 5\nlr: 1e-3 \xff\n", "is not UTF-8 text (line 2)"),
    (b"epochs: 5\nlr: 0.1\nepochs: 7\n", "is not valid YAML: epochs is given twice (line 3)"),
    (b"epochs: 5\nbatch-size: 8\nbatch_size: 16\n", "is not valid YAML: batch_size is given twice (line 3)"),
    (b"config: other.yaml\n", "names another config file; recipes do not nest: give one --config"),
])
def test_config_files_that_would_be_misread_are_refused(tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    with pytest.raises(UsageError) as error:
        parse_args(["--data", "d", "--config", str(recipe)])
    assert str(error.value) == f"config {recipe} {message}"


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10816 vs 10752"),
])
def test_a_full_disk_during_a_save_is_one_line_naming_the_file(data, tmp_path, capsys, monkeypatch, failure):
    def save_on_a_full_disk(state, path):
        Path(path).write_bytes(b"part")
        raise failure

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    output = tmp_path / "out"
    error = one_error_line(capsys, train_module.main, argv(data, output, "--epochs", "1"))
    assert error.startswith(f"error: no space left on the device to write {output / 'checkpoint.pth'} (")
    assert not [name for name in os.listdir(output) if name.endswith(".tmp") or name.endswith(".pth")]
