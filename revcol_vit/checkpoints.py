"""The checkpoints of a training run's output folder, kept by one object: the last, the best and the epochs'."""
import csv
import logging
import math
import os
import re
import shutil
from typing import Any, Dict, List, Tuple

from .runtime import CHECKPOINT_NAME, LOG_NAME, load_checkpoint, same_path, save_checkpoint, write_csv, write_run_file

BEST_CHECKPOINT_NAME = "checkpoint_best.pth"  # the epoch of the best val top-1 (the EMA's when there is an EMA)
EPOCH_CHECKPOINT = re.compile(r"checkpoint_epoch(\d+)\.pth")  # --keep-last N keeps the last N of these

_logger = logging.getLogger(__name__)


def copy_checkpoint(src: str, dst: str) -> None:
    """An atomic copy of a written checkpoint: a hard link where the file system has them (no bytes copied; when
    ``src`` is replaced by the next epoch's, the link keeps this one), else a copy of the bytes."""
    def link(tmp: str) -> None:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this file system, or a temporary file that a crash left
            shutil.copyfile(src, tmp)

    write_run_file(link, dst)


class CheckpointSaver:
    """Writes a run's checkpoints into ``folder``, each atomically (a crash keeps the previous file):

    - ``checkpoint.pth``, the last epoch's, which ``--resume`` continues;
    - ``checkpoint_best.pth``, the epoch of the highest ``best_by`` (a column of the log) so far;
    - with ``keep_last`` N > 0, ``checkpoint_epoch<E>.pth`` of the last N epochs.

    The best so far is that of the log rows a checkpoint holds, so that a resumed run keeps the same best."""

    def __init__(self, folder: str, best_by: str, keep_last: int = 0):
        self.folder, self.best_by, self.keep_last = folder, best_by, keep_last
        self.last = os.path.join(folder, CHECKPOINT_NAME)
        self.best_metric = -math.inf

    def epoch_path(self, epoch: int) -> str:
        return os.path.join(self.folder, f"checkpoint_epoch{epoch}.pth")

    def save(self, state: Dict[str, Any], metric: float) -> None:
        """Writes ``state`` (a whole checkpoint, its ``epoch`` included) as the last, and as the best if ``metric``
        beats every earlier epoch's; keeps the last ``keep_last`` epochs' files and removes older ones."""
        epoch = state["epoch"]
        save_checkpoint(state, self.last)
        if metric > self.best_metric:
            self.best_metric = metric
            copy_checkpoint(self.last, os.path.join(self.folder, BEST_CHECKPOINT_NAME))
            _logger.info("epoch %d has the best %s so far: %s", epoch, self.best_by, BEST_CHECKPOINT_NAME)
        if self.keep_last > 0:
            copy_checkpoint(self.last, self.epoch_path(epoch))
            for kept, name in self._epoch_files():
                if kept <= epoch - self.keep_last:
                    os.remove(os.path.join(self.folder, name))

    def latest_epoch(self) -> int:
        """The last epoch the run in the folder finished: its log's, or its kept epoch checkpoints' (0 if none)."""
        epochs = [epoch for epoch, _ in self._epoch_files()]
        log = os.path.join(self.folder, LOG_NAME)
        if os.path.isfile(log):
            with open(log, newline="") as f:
                epochs += [int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch", "").isdigit()]
        return max(epochs, default=0)

    def resume_from(self, ckpt: Dict[str, Any], path: str) -> None:
        """Continues from the checkpoint ``ckpt`` read from ``path``: its log rows give the best so far. If the
        folder's run went past its epoch (``--rewind``), what it wrote after is removed: later epoch checkpoints, a
        later best checkpoint and log rows; ``checkpoint.pth`` becomes ``path``'s. One log line says what went."""
        self.best_metric = max((row.get(self.best_by, -math.inf) for row in ckpt["history"]), default=-math.inf)
        if self.latest_epoch() > ckpt["epoch"]:
            self._rewind_to(ckpt, path)

    def _rewind_to(self, ckpt: Dict[str, Any], path: str) -> None:
        epoch = ckpt["epoch"]
        removed = [name for kept, name in self._epoch_files() if kept > epoch]
        for name in removed:
            os.remove(os.path.join(self.folder, name))
        best = os.path.join(self.folder, BEST_CHECKPOINT_NAME)
        if os.path.isfile(best) and not same_path(best, path) and load_checkpoint(best)["epoch"] > epoch:
            os.remove(best)
            removed.append(BEST_CHECKPOINT_NAME)
        if not (os.path.isfile(self.last) and same_path(self.last, path)):
            copy_checkpoint(path, self.last)
        write_csv(ckpt["history"], os.path.join(self.folder, LOG_NAME))
        _logger.warning("rewinding %s to epoch %d (--rewind): removed %s; %s is now epoch %d's; log.csv cut to %d "
                        "rows", self.folder, epoch, ", ".join(removed) or "no later checkpoint", CHECKPOINT_NAME,
                        epoch, len(ckpt["history"]))

    def _epoch_files(self) -> List[Tuple[int, str]]:
        """(epoch, file name) of the folder's ``checkpoint_epoch<E>.pth``, by name."""
        matches = map(EPOCH_CHECKPOINT.fullmatch, sorted(os.listdir(self.folder)))
        return [(int(match.group(1)), match.group(0)) for match in matches if match]
