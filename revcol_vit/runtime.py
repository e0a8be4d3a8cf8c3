"""What the CLIs share around the loop: device and ranks, RNG states, models, checkpoints, logs and evaluation."""
import csv
import errno
import logging
import os
import random
import shutil
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.utils import accuracy
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader

from revcol import ReversibleColumns
from revcol.checkpoint import load_plain_checkpoint, write_atomically

from .errors import UsageError

CHECKPOINT_NAME = "checkpoint.pth"  # the latest epoch's, which --resume continues
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "ema", "step", "epoch", "args", "model_kwargs",
                   "classes", "history", "rng")  # what train() writes, and validate() and --resume read
LOG_NAME = "log.csv"
TENSORBOARD_NAME = "tensorboard"
LOCK_NAME = "train.lock"  # held by the run that writes the folder: its process id and host
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# --- device and ranks -----------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str]) -> Dist:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = parse_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world_size > 1 else 0, world_size, device)


def parse_device(name: str, local_rank: int) -> torch.device:
    """``--device``: "cuda" without an index is this rank's GPU (cuda:LOCAL_RANK)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:<index>, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: no GPU {device.index} here ({torch.cuda.device_count()} visible)")
    return device


def broadcast_from_main(value: Any, d: Dist) -> Any:
    """The main rank's ``value`` (any picklable object), on every rank."""
    if d.world_size == 1:
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def all_reduce_sum(values: List[float], d: Dist) -> List[float]:
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, d: Dist) -> int:
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# --- random number generators ---------------------------------------------------------------------------------------

def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy takes 32 bits; a seed near 2**32 - 1 plus the rank goes past them
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> Dict[str, Any]:
    # NumPy's state as plain types, so that checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian))
    state = dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(d: Dist) -> List[Dict[str, Any]]:
    """Every rank's RNG states (ranks draw different augmentations), gathered for rank 0's checkpoint."""
    state = rng_state(d.device)
    if d.world_size == 1:
        return [state]
    states = [None] * d.world_size
    dist.all_gather_object(states, state)
    return states


# --- models ---------------------------------------------------------------------------------------------------------

def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model``, with an unknown name or sizes that do not fit together as a UsageError."""
    if not timm.is_model(name):
        revcol = ", ".join(timm.list_models("revcol_vit*"))
        raise UsageError(f"unknown model '{name}' (RevCol-ViT models: {revcol or 'none registered'})")
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:  # sizes that do not fit together, or an option the model does not take
        raise UsageError(f"model {name} cannot be built with {kwargs}: {e}") from None


def reversible_columns(model: nn.Module) -> List[ReversibleColumns]:
    """The reversible columns a model holds, wherever it holds them (none in a model without)."""
    return [module for module in model.modules() if isinstance(module, ReversibleColumns)]


def compile_model(model: nn.Module) -> None:
    """torch.compile in place: a RevCol model's level functions (its reversible backward stays eager)."""
    columns = reversible_columns(model)
    for each in columns:
        each.compile_levels()
    if not columns:
        model.compile()


def shard_model(model: nn.Module, d: Dist) -> nn.Module:
    """FSDP2 (``fully_shard``) in place, over all ranks: each reversible column of a RevCol model, then the root
    (embedding, head and whatever no column holds). A column's parameters are gathered for its forward and, in a
    reversible backward, again for its recompute; its gradients are reduce-scattered once its backward is done.
    Build the optimizer after this: sharding replaces the parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for each in reversible_columns(model):
        for column in each.columns:
            fully_shard(column, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The model's and the optimizer's state dicts, in the format of an unsharded model's on every rank.

    Under FSDP2 every rank must call this: the whole tensors are gathered onto the main rank's CPU, and the other
    ranks get empty dicts. The optimizer state is numbered as ``optimizer.state_dict()`` numbers it, so that a
    checkpoint of a sharded run loads into an unsharded one and the other way round."""
    if not isinstance(model, FSDPModule):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    named = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter names
    if not named:
        return model_state, named
    # Optimizer.state_dict numbers the parameters in the order of its groups, which the named dict keeps.
    number = {name: i for i, name in enumerate(name for group in named["param_groups"] for name in group["params"])}
    return model_state, dict(state={number[name]: value for name, value in named["state"].items()},
                             param_groups=[dict(group, params=[number[name] for name in group["params"]])
                                           for group in named["param_groups"]])


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: Dict[str, Any],
                    optimizer_state: Dict[str, Any]) -> None:
    """Loads what ``full_state`` returned (a sharded run's or an unsharded one's) into ``model`` and ``optimizer``,
    sharded or not; under FSDP2 every rank passes the whole state and keeps its shards of it."""
    if not isinstance(model, FSDPModule):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    names = {param: name for name, param in model.named_parameters()}
    ours = [names[param] for group in optimizer.param_groups for param in group["params"]]
    theirs = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if sizes != [len(group["params"]) for group in optimizer_state["param_groups"]] or sorted(theirs) != list(
            range(len(ours))):
        raise ValueError("the optimizer state does not fit this model's parameter groups")
    name = dict(zip(theirs, ours))
    named = dict(state={name[i]: value for i, value in optimizer_state["state"].items()},
                 param_groups=[dict(group, params=[name[i] for i in group["params"]])
                               for group in optimizer_state["param_groups"]])
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, named, options=options)
    for group, saved in zip(optimizer.param_groups, optimizer_state["param_groups"]):  # as saved (betas a tuple)
        group.update((key, value) for key, value in saved.items() if key != "params")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate(model: nn.Module, loader: DataLoader, d: Dist, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
    """Cross-entropy, top-1 and top-5 (%) over the whole split, summed across ranks, and the number of images."""
    model.eval()
    loss_sum = top1_sum = top5_sum = count = 0.0
    # Under FSDP2 each forward gathers the parameters with every rank: a rank whose share of the split has fewer
    # batches repeats its last one, uncounted, as often as the rank with the most needs.
    repeats = all_reduce_max(len(loader), d) - len(loader) if isinstance(model, FSDPModule) else 0
    with torch.no_grad():
        for images, targets in loader:
            images, targets = images.to(d.device), targets.to(d.device)
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            logits = logits.float()
            top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
            n = images.shape[0]
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            top1_sum += top1.item() * n
            top5_sum += top5.item() * n
            count += n
        for _ in range(repeats):
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(images)
    loss_sum, top1_sum, top5_sum, count = all_reduce_sum([loss_sum, top1_sum, top5_sum, count], d)
    return dict(loss=loss_sum / count, top1=top1_sum / count, top5=top5_sum / count, images=int(count))


# --- checkpoints and logs -------------------------------------------------------------------------------------------

def write_run_file(write: Callable[[str], Any], path: str) -> None:
    """``write_atomically``, with a full disk as one line naming the file (the file keeps what it held before)."""
    try:
        write_atomically(write, path)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UsageError(f"no space left on the device to write {path} ({e.strerror})") from None
    except RuntimeError as e:  # torch.save reports a failed write as an "enforce fail" of its zip writer
        if "write" not in str(e) and "unexpected pos" not in str(e):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise UsageError(f"no space left on the device to write {path} ({free / 2**20:.0f} MiB free; torch: "
                         f"{str(e).splitlines()[0]})") from None


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    write_run_file(lambda tmp: torch.save(state, tmp), path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    try:
        ckpt = load_plain_checkpoint(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise UsageError(f"checkpoint {path} was not written by revcol_vit.train (it lacks {', '.join(missing)})")
    return ckpt


def write_csv(rows: List[Dict[str, Any]], path: str) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    write_run_file(write, path)


def tensorboard_writer(folder: str, purge_step: Optional[int]):
    from torch.utils.tensorboard import SummaryWriter  # slow import, only where it is used
    return SummaryWriter(folder, purge_step=purge_step)


# --- output folders -------------------------------------------------------------------------------------------------

def make_output_folder(path: str) -> bool:
    """Creates the ``--output`` folder (and its parents) if needed; returns whether it was created. Any way it cannot
    be is one line, before the data is read."""
    if not path:
        raise UsageError("--output is empty: give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output {path} is a file, not a folder")
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output {path} cannot be created ({e.strerror})") from None
    return created


def run_files(folder: str) -> List[str]:
    """The files a training run leaves in ``folder``: checkpoints, the log and the TensorBoard folder."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [name for name in names
            if (name.startswith("checkpoint") and name.endswith(".pth")) or name in (LOG_NAME, TENSORBOARD_NAME)]


def _lock_owner_is_running(owner: str) -> bool:
    """Whether the process a lock file names ("<pid> <host>") runs; a lock of another host, or one not (yet)
    readable, counts as held."""
    try:
        pid, host = owner.split()
        pid = int(pid)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_folder(folder: str, logger: logging.Logger) -> str:
    """Takes the folder's exclusive lock file (created with O_EXCL, so only one run gets it); returns its path.

    Another running process's lock is one line. A lock whose process no longer runs (a killed run) is taken over.
    """
    path = os.path.join(folder, LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = f.read().strip()
            except FileNotFoundError:  # its run just ended
                continue
            if _lock_owner_is_running(owner):
                raise UsageError(f"--output {folder} is in use by another run (process and host in {path}: "
                                 f"{owner or 'none yet'}); remove {path} if no run uses the folder") from None
            logger.warning("taking over %s from process %s, which no longer runs", path, owner.split()[0])
            os.remove(path)
            continue
        except OSError as e:
            raise UsageError(f"--output {folder} is not writable ({e.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return path
    raise UsageError(f"--output {folder} is in use by another run (it took over {path} at the same time)")


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file or folder (links resolved)."""
    return os.path.realpath(a) == os.path.realpath(b)


def check_checkpoint_fits(ckpt: Dict[str, Any], path: str, model: str, model_args: Optional[Dict[str, Any]] = None,
                          classes: Optional[List[str]] = None) -> None:
    """One line naming what differs between a checkpoint and this run: the model, the model flags ``model_args``
    (flag name -> value, as the checkpoint's args hold them) and the class names, of those given."""
    trained = ckpt["args"]
    differ = [f"model {trained['model']}, not {model}"] if trained["model"] != model else []
    for name, value in (model_args or {}).items():
        if trained.get(name) != value:
            differ.append(f"--{name.replace('_', '-')} {_flag_value(trained.get(name))}, not {_flag_value(value)}")
    if classes is not None and classes != ckpt["classes"]:
        differ.append(f"classes {_names(ckpt['classes'])}, not the data's {_names(classes)}")
    if differ:
        raise UsageError(f"checkpoint {path} holds {'; '.join(differ)}")


def _names(names: List[str]) -> str:
    return ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")


def _flag_value(value: Any) -> str:
    if value is None:
        return "unset"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# --- command line ---------------------------------------------------------------------------------------------------

def run_cli(main_fn: Callable[[Optional[List[str]]], Any], argv: Optional[List[str]]) -> None:
    """Runs a CLI body, printing bad input as one ``error:`` line (exit status 2) instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        main_fn(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
