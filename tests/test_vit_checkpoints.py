"""The checkpoint saver of a training run's folder, and RevCol-ViT weights loaded at another image size."""
import csv
import os

import pytest
import timm
import torch

import revcol_vit  # noqa: F401  (registers the models)
from revcol_vit.checkpoints import CheckpointSaver
from revcol_vit.model import checkpoint_filter_fn
from revcol_vit.runtime import CHECKPOINT_KEYS, compile_model, load_checkpoint, reversible_columns

TINY = dict(patch_size=8, embed_dim=32, num_heads=2, depths=(1, 1, 1, 1), num_columns=2)


def epoch_state(epoch: int, top1s):
    """A stand-in checkpoint after ``epoch``, whose log rows have the val top-1 ``top1s``."""
    return dict(dict.fromkeys(CHECKPOINT_KEYS), epoch=epoch,
                history=[dict(epoch=e + 1, val_top1=top1) for e, top1 in enumerate(top1s[:epoch])])


def checkpoints(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".pth"))


def saved_epoch(folder, name):
    return load_checkpoint(os.path.join(folder, name))["epoch"]


def test_the_saver_keeps_the_last_the_best_and_the_last_n_epochs(tmp_path):
    top1s = [10.0, 30.0, 20.0, 30.0]  # epoch 4 ties epoch 2: the best stays the earlier one
    saver = CheckpointSaver(str(tmp_path), best_by="val_top1", keep_last=2)
    for epoch in range(1, 5):
        saver.save(epoch_state(epoch, top1s), metric=top1s[epoch - 1])
    assert checkpoints(tmp_path) == ["checkpoint.pth", "checkpoint_best.pth", "checkpoint_epoch3.pth",
                                     "checkpoint_epoch4.pth"]
    assert saved_epoch(tmp_path, "checkpoint.pth") == 4 and saved_epoch(tmp_path, "checkpoint_best.pth") == 2
    assert saved_epoch(tmp_path, "checkpoint_epoch3.pth") == 3 and saver.latest_epoch() == 4


def test_resuming_an_earlier_epoch_removes_the_later_files_and_keeps_its_best(tmp_path, caplog):
    top1s = [10.0, 30.0, 20.0]
    saver = CheckpointSaver(str(tmp_path), best_by="val_top1", keep_last=3)
    for epoch in range(1, 4):
        saver.save(epoch_state(epoch, top1s), metric=top1s[epoch - 1])
    (tmp_path / "log.csv").write_text("epoch,val_top1\n1,10.0\n2,30.0\n3,20.0\n")

    resumed = CheckpointSaver(str(tmp_path), best_by="val_top1", keep_last=3)
    epoch1 = str(tmp_path / "checkpoint_epoch1.pth")
    resumed.resume_from(load_checkpoint(epoch1), epoch1)
    assert checkpoints(tmp_path) == ["checkpoint.pth", "checkpoint_epoch1.pth"]
    assert saved_epoch(tmp_path, "checkpoint.pth") == 1 and resumed.latest_epoch() == 1
    with open(tmp_path / "log.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]
    assert [r.getMessage() for r in caplog.records if "rewinding" in r.getMessage()] == [
        f"rewinding {tmp_path} to epoch 1 (--rewind): removed checkpoint_epoch2.pth, checkpoint_epoch3.pth, "
        f"checkpoint_best.pth; checkpoint.pth is now epoch 1's; log.csv cut to 1 rows"]
    resumed.save(epoch_state(2, [10.0, 5.0]), metric=5.0)  # worse than epoch 1, the best of the resumed log
    assert saved_epoch(tmp_path, "checkpoint.pth") == 2 and not (tmp_path / "checkpoint_best.pth").exists()


def test_timm_loads_revcol_vit_weights_at_another_image_size(tmp_path):
    """timm's pretrained path (a file) goes through the model's checkpoint_filter_fn: the 4x4 grid of position
    embeddings is resampled to 6x6 (bicubic), every other weight is the file's."""
    torch.manual_seed(0)
    source = timm.create_model("revcol_vit_s", img_size=32, num_classes=1000, **TINY).state_dict()
    torch.save(dict(model=source), tmp_path / "weights.pth")
    model = timm.create_model("revcol_vit_s", img_size=48, num_classes=1000, **TINY, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "weights.pth")))
    loaded = model.state_dict()
    grid = source["pos_embed"].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    resampled = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True)
    assert torch.allclose(loaded["pos_embed"], resampled.permute(0, 2, 3, 1).reshape(1, 36, 32), atol=1e-6)
    for name, weight in source.items():
        if name != "pos_embed":
            assert torch.equal(loaded[name], weight), name


@pytest.mark.parametrize("grid_size", [None, (4, 4)])
def test_the_filter_passes_weights_of_the_same_grid_through(grid_size):
    model = timm.create_model("revcol_vit_s", img_size=32, num_classes=10, **TINY)
    state = model.state_dict()
    assert torch.equal(checkpoint_filter_fn(state, model, grid_size=grid_size)["pos_embed"], state["pos_embed"])


def test_the_trainer_finds_reversible_columns_under_any_name():
    """Columns held under another attribute (in a wrapper, say) are found, as the trainer finds the gauges it reads,
    and compiled level by level, as a RevCol-ViT's own; the wrapper itself is not compiled whole."""
    inner = timm.create_model("revcol_vit_s", img_size=32, num_classes=10, **TINY)
    wrapper = torch.nn.ModuleDict(dict(backbone=inner))
    assert reversible_columns(wrapper) == [inner.revcol]
    compile_model(wrapper)
    assert inner.revcol.levels_compiled and wrapper._compiled_call_impl is None
