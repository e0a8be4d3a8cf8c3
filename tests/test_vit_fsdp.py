"""``revcol_vit.train --fsdp``: FSDP2 under torchrun (2 CPU ranks, gloo) trains as DDP does, writes the checkpoints an
unsharded run writes, resumes them, and refuses in one line what it does not support."""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_digits

from revcol_vit.config import UsageError
from revcol_vit.runtime import Dist, load_checkpoint
from revcol_vit.train import check_fsdp, main, parse_args

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 120

VIT = ["--model", "revcol_vit_s", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--num-heads", "2",
       "--depths", "1", "1", "--num-columns", "2"]
# 4 steps of 10 images an epoch; every random augmentation off, so both runs see the same images.
RECIPE = ["--workers", "0", "--warmup-epochs", "0", "--batch-size", "10", "--lr", "1e-3", "--lr-base-batch", "10",
          "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--scale", "1", "1",
          "--ratio", "1", "1", "--hflip", "0", "--drop-path-rate", "0", "--ema-decay", "0", "--log-interval", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """40 training images; 11 validation images, so that rank 0 evaluates 2 batches of 5 and rank 1 only 1."""
    root = write_digits(tmp_path_factory.mktemp("digits"), per_class=5)
    image = next((root / "val" / "digit9").iterdir())
    shutil.copyfile(image, image.with_name("copy.png"))
    return root


def torchrun(data: Path, output: Path, *flags: str) -> str:
    """``torchrun --nproc-per-node 2 -m revcol_vit.train``; its output (it must exit 0)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "revcol_vit.train", "--data", str(data), "--output", str(output), *RECIPE, *flags]
    log = output.parent / f"{output.name}.log"
    with open(log, "w") as f:  # a file, not a pipe: a rank blocked on a full pipe would stall the other
        proc = subprocess.Popen(command, cwd=output.parent, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code == 0, log.read_text()[-3000:]
    return log.read_text()


def logged_losses(output: str):
    return re.findall(r"\((\d+) in all\): loss (\S+),", output)


def assert_same_checkpoint(ckpt, reference, atol: float = 0.0) -> None:
    """The same keys, plain (unsharded) tensors, and model, optimizer state and losses equal within ``atol``."""
    assert ckpt.keys() == reference.keys()
    assert list(ckpt["model"]) == list(reference["model"])
    for name, weight in ckpt["model"].items():
        assert type(weight) is torch.Tensor, name  # not a DTensor shard
        torch.testing.assert_close(weight, reference["model"][name], rtol=0, atol=atol, msg=name)
    assert ckpt["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    assert ckpt["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for i, state in ckpt["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, reference["optimizer"]["state"][i][key], rtol=0, atol=atol,
                                       msg=f"{i} {key}")
    for row, reference_row in zip(ckpt["history"], reference["history"], strict=True):
        for key in ("step", "train_loss", "val_loss", "val_top1"):
            assert row[key] == pytest.approx(reference_row[key], rel=atol, abs=0), key


@pytest.mark.slow
def test_fsdp_trains_as_ddp_to_the_bit_and_resumes(digits, tmp_path):
    """2 epochs of DDP and of --fsdp, then --fsdp --resume of the --fsdp run's epoch-1 checkpoint: the checkpoints
    of every epoch are those of DDP, bit for bit (model, Adam moments, losses), and so are the logged losses."""
    ddp_log = torchrun(digits, tmp_path / "ddp", *VIT, "--epochs", "2", "--keep-last", "2")
    fsdp_log = torchrun(digits, tmp_path / "fsdp", *VIT, "--epochs", "2", "--keep-last", "2", "--fsdp")
    assert logged_losses(fsdp_log) == logged_losses(ddp_log)
    for name in ("checkpoint_epoch1.pth", "checkpoint.pth"):
        ddp = load_checkpoint(str(tmp_path / "ddp" / name))
        fsdp = load_checkpoint(str(tmp_path / "fsdp" / name))  # as validate and --resume read it
        assert fsdp["args"]["fsdp"] and not ddp["args"]["fsdp"]
        fsdp["args"] = ddp["args"] = None
        assert_same_checkpoint(fsdp, ddp)

    resumed_log = torchrun(digits, tmp_path / "fsdp", *VIT, "--epochs", "2", "--fsdp", "--rewind",
                           "--resume", str(tmp_path / "fsdp" / "checkpoint_epoch1.pth"))
    assert logged_losses(resumed_log) == logged_losses(ddp_log)[4:]
    resumed = load_checkpoint(str(tmp_path / "fsdp" / "checkpoint.pth"))
    resumed["args"] = ddp["args"] = None
    assert_same_checkpoint(resumed, ddp)


@pytest.mark.slow
def test_fsdp_with_accumulation_clipping_and_compiled_levels_matches_ddp_to_rounding(digits, tmp_path):
    """Under --fsdp each accumulation micro-step reduce-scatters its gradients (DDP sums them locally first) and the
    gradient norm is summed over shards: float32 rounding apart, the same training. The compiled levels run on the
    gathered parameters in the forward and in the reversible recompute alike."""
    flags = [*VIT, "--epochs", "1", "--batch-size", "8", "--lr-base-batch", "8", "--accum-steps", "2",
             "--clip-grad", "0.5", "--compile"]
    ddp_log = torchrun(digits, tmp_path / "ddp", *flags)
    fsdp_log = torchrun(digits, tmp_path / "fsdp", *flags, "--fsdp")
    ckpt, reference = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=False) for run in ("fsdp", "ddp"))
    ckpt["args"] = reference["args"] = None
    assert_same_checkpoint(ckpt, reference, atol=1e-6)  # measured: 7e-7 on the weights (Adam, lr 1e-3, 5 steps)
    assert logged_losses(fsdp_log) == logged_losses(ddp_log)


@pytest.mark.slow
def test_fsdp_trains_a_hierarchical_model_with_intermediate_supervision_as_ddp_to_the_bit(digits, tmp_path):
    """revcol_tiny's columns are sharded as RevCol-ViT's are; its heads and decoders on the tapped columns (the
    Section 2.3 loss, on from scratch) go with the root."""
    flags = ["--model", "revcol_tiny", "--dims", "8", "16", "16", "16", "--depths", "1", "1", "1", "1",
             "--num-columns", "4", "--epochs", "1"]
    ddp_log = torchrun(digits, tmp_path / "ddp", *flags)
    fsdp_log = torchrun(digits, tmp_path / "fsdp", *flags, "--fsdp")
    assert logged_losses(fsdp_log) == logged_losses(ddp_log)
    ckpt, reference = (load_checkpoint(str(tmp_path / run / "checkpoint.pth")) for run in ("fsdp", "ddp"))
    assert any(name.startswith("aux_heads.") for name in reference["model"])
    ckpt["args"] = reference["args"] = None
    assert_same_checkpoint(ckpt, reference)


def test_fsdp_without_torchrun_is_one_line(digits, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(digits), "--output", str(tmp_path / "run"), *VIT, *RECIPE, "--epochs", "1", "--fsdp"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --fsdp shards over the ranks of a torchrun launch (2 or more processes); one process "
                      "trains unsharded without it"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, error", [
    (["--ema-decay", "0.9999"], "--fsdp keeps no EMA of the weights"),
    (["--amp", "fp16"], "--fsdp with --amp fp16 is not supported"),
])
def test_fsdp_refuses_what_it_does_not_support(digits, flags, error):
    args = parse_args(["--data", str(digits), *VIT, *RECIPE, "--fsdp", *flags])
    with pytest.raises(UsageError, match=re.escape(error)):
        check_fsdp(args, Dist(rank=0, world_size=2, device=torch.device("cpu")))
