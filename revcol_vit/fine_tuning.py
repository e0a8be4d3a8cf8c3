"""``--initial-checkpoint``: the weights a new training run starts from, read and loaded in one place.

Only the weights are taken (the EMA's, if the file has one, as timm does): optimizer, schedule and EMA start
afresh, where ``--resume`` restores a whole run instead. A head of another number of classes stays freshly
initialized.
"""
import logging
from typing import Any, Dict, Set

from timm.layers import to_2tuple
from torch import nn

from revcol.checkpoint import load_plain_checkpoint

from . import hierarchical, model
from .errors import UsageError
from .runtime import check_checkpoint_fits, load_checkpoint

_logger = logging.getLogger(__name__)


class InitialWeights:
    """The file ``path`` for a run of ``model_name``, read and checked before the data is.

    A RevCol-ViT run takes a revcol_vit.train checkpoint of the same model, at any image size and number of
    classes. A hierarchical run also takes an official RevCol file (through ``hierarchical.checkpoint_filter_fn``).
    """

    def __init__(self, path: str, model_name: str):
        self.path, self.hierarchical = path, model_name in hierarchical.VARIANTS
        if not self.hierarchical:
            self.ckpt = load_checkpoint(path)
            check_checkpoint_fits(self.ckpt, path, model_name)
            return
        try:
            self.ckpt = load_plain_checkpoint(path)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if isinstance(self.ckpt, dict) and "args" in self.ckpt and self.ckpt["args"]["model"] != model_name:
            raise UsageError(f"--initial-checkpoint {path} holds {self.ckpt['args']['model']}, not {model_name}")

    def model_kwargs(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The keyword arguments of the model to fine-tune: a RevCol-ViT's sizes are the checkpoint's, except those
        this run sets in ``kwargs`` (its classes and image size at least)."""
        return kwargs if self.hierarchical else {**self.ckpt["model_kwargs"], **kwargs}

    def load_into(self, net: nn.Module) -> None:
        """Loads the weights into the freshly built ``net`` and logs which were loaded."""
        if self.hierarchical:
            weights = self._load_hierarchical(net)
            _logger.info("fine-tuning the %s weights of %s", weights, self.path)
        else:
            weights = self._load_isotropic(net)
            _logger.info("fine-tuning the %s weights of %s (epoch %d)", weights, self.path, self.ckpt["epoch"])

    def _load_isotropic(self, net: nn.Module) -> str:
        """The position embedding is resampled to the new image size (``model.checkpoint_filter_fn``)."""
        weights = "ema" if self.ckpt["ema"] is not None else "model"
        trained_grid = [size // net.patch_embed.stride[0] for size in to_2tuple(self.ckpt["model_kwargs"]["img_size"])]
        state = model.checkpoint_filter_fn(self.ckpt[weights], net, grid_size=trained_grid)
        head = {name for name in state if name.startswith("head.")}
        if state["head.weight"].shape != net.head.weight.shape:
            state = {name: value for name, value in state.items() if name not in head}
        self._check_fits(net, state, fresh=head)
        net.load_state_dict(state, strict=False)
        return weights

    def _load_hierarchical(self, net: nn.Module) -> str:
        """Heads and decoders the file lacks stay freshly initialized; those ``net`` lacks are left out."""
        if isinstance(self.ckpt, dict) and "args" in self.ckpt:
            weights = "ema" if self.ckpt.get("ema") is not None else "model"
            state = self.ckpt[weights]
        else:
            weights = "official"
            try:
                state = hierarchical.checkpoint_filter_fn(self.ckpt, net)
            except (ValueError, AttributeError) as e:
                raise UsageError(f"--initial-checkpoint {self.path}: {e}") from None
        own = net.state_dict()
        if "head.fc.weight" in state and state["head.fc.weight"].shape != own["head.fc.weight"].shape:
            state = {name: value for name, value in state.items() if not name.startswith("head.fc.")}
        optional = ("aux_heads.", "decoders.")
        state = {name: value for name, value in state.items() if name in own or not name.startswith(optional)}
        self._check_fits(net, state, fresh={name for name in own if name.startswith(("head.fc.", *optional))})
        net.load_state_dict(state, strict=False)
        return weights

    def _check_fits(self, net: nn.Module, state: Dict[str, Any], fresh: Set[str]) -> None:
        """One line naming the first misfit: a shape, then a missing name (other than ``fresh``), then an extra one."""
        own = net.state_dict()
        misfits = [f"{name} {tuple(value.shape)} vs {tuple(own[name].shape)}" for name, value in state.items()
                   if name in own and value.shape != own[name].shape]
        missing, unexpected = set(own) - set(state) - fresh, set(state) - set(own)
        if misfits or missing or unexpected:
            raise UsageError(f"--initial-checkpoint {self.path} does not fit this model: "
                             f"{', '.join(misfits or sorted(missing) or sorted(unexpected))}")
