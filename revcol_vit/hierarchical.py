"""Hierarchical RevCol (Cai et al., ICLR 2023, Sections 2.2-2.3): reversible columns of ConvNeXt levels.

A 4x4 patchify stem feeds every column. Each column has four levels at strides 4/8/16/32; level l fuses
its own column's level l-1 (downsampled) with the previous column's level l+1 (upsampled), then runs
ConvNeXt blocks. The reversible connections (the paper's alpha, the core's gamma) join level l of
consecutive columns. The last column's top level is pooled, normalized and classified.

Intermediate supervision (Section 2.3): heads on the top level of every (columns/4)-th column, each but the
last with a decoder that rebuilds the input image; :func:`intermediate_supervision_loss` combines them.

Variants (``VARIANTS``): RevCol-T/S/B/L/XL of Table 1 and RevCol-H, whose level 0 also reads the previous
column's top level. Official checkpoints load through
:func:`checkpoint_filter_fn`.
"""
import re
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # not re-exported; timm's own models import it so
from torch import Tensor, nn

from revcol import GAMMA_INIT, DropPath, ReversibleColumns

__all__ = ["RevCol", "VARIANTS", "checkpoint_filter_fn", "intermediate_supervision_loss"]

VARIANTS: Dict[str, Dict] = {
    "revcol_tiny": dict(dims=(64, 128, 256, 512), depths=(2, 2, 4, 2), num_columns=4, drop_path_rate=0.1),
    "revcol_small": dict(dims=(64, 128, 256, 512), depths=(2, 2, 4, 2), num_columns=8, drop_path_rate=0.3),
    "revcol_base": dict(dims=(72, 144, 288, 576), depths=(1, 1, 3, 2), num_columns=16, drop_path_rate=0.4),
    "revcol_large": dict(dims=(128, 256, 512, 1024), depths=(1, 2, 6, 2), num_columns=8, drop_path_rate=0.5),
    "revcol_xlarge": dict(dims=(224, 448, 896, 1792), depths=(1, 2, 6, 2), num_columns=8, drop_path_rate=0.5),
    "revcol_huge": dict(dims=(360, 720, 1440, 2880), depths=(1, 2, 6, 2), num_columns=8, drop_path_rate=0.5,
                        bottom_reads_top=True),
}
NUM_HEADS = 4  # classifier heads under intermediate supervision; all but the last also decode the image


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm, Linear(C, hidden), GELU, Linear(hidden, C), layer scale, drop path, residual."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3, drop_path_rate: float = 0.0,
                 layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class UpSample(nn.Module):
    """Linear(C_in, C_out) and LayerNorm over channels, then nearest upsampling by ``scale``."""

    def __init__(self, in_dim: int, out_dim: int, scale: int):
        super().__init__()
        self.channel_reschedule = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim, eps=1e-6))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


class Fusion(nn.Module):
    """The input of level ``level``: down(this column's level below) + up(previous column's level above).

    ``down`` is a 2x2 stride-2 conv and LayerNorm (absent at level 0, whose input is the stem output), ``up``
    a channel mix and 2x upsampling (absent in the first column and at the top level). With ``reads_top``
    (RevCol-H's level 0 after the first column), ``up2`` adds the previous column's top level, 8x upsampled.
    """

    def __init__(self, level: int, dims: Sequence[int], reads_high: bool, reads_top: bool = False):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(dims[level - 1], dims[level], 2, stride=2),
                                  LayerNorm2d(dims[level], eps=1e-6)) if level > 0 else nn.Identity()
        self.up = UpSample(dims[level + 1], dims[level], 2) if reads_high else None
        self.up2 = UpSample(dims[-1], dims[level], 2 ** (len(dims) - 1 - level)) if reads_top else None

    def forward(self, low: Tensor, high: Optional[Tensor], top: Optional[Tensor] = None) -> Tensor:
        x = self.down(low)
        if high is not None:
            x = x + self.up(high)
        return x if top is None else x + self.up2(top)


class Level(nn.Module):
    """Level function F_l of one column for :class:`revcol.ReversibleColumns`: a fusion, then ConvNeXt blocks."""

    def __init__(self, level: int, dims: Sequence[int], depths: Sequence[int], reads_high: bool,
                 kernel_size: int, drop_path_rates: Sequence[float], reads_top: bool = False):
        super().__init__()
        self.fusion = Fusion(level, dims, reads_high, reads_top)
        first = sum(depths[:level])
        self.blocks = nn.Sequential(*(
            ConvNeXtBlock(dims[level], 4 * dims[level], kernel_size, drop_path_rates[first + j])
            for j in range(depths[level])))

    def forward(self, low: Tensor, high: Optional[Tensor], top: Optional[Tensor] = None) -> Tensor:
        return self.blocks(self.fusion(low, high, top))


class ClassifierHead(nn.Module):
    """Global average pool, LayerNorm, dropout, Linear (none if ``num_classes`` is 0)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.norm(x.mean((2, 3))))
        return x if pre_logits else self.fc(x)


class Decoder(nn.Module):
    """Rebuilds the image from a top-level map: three stages of (1x1 conv, LayerNorm, GELU, bilinear 2x,
    ConvNeXt block of expansion 1), then a 1x1 conv to 48 channels and PixelShuffle(4)."""

    def __init__(self, dims: Sequence[int], kernel_size: int = 3):
        super().__init__()
        dims = list(reversed(dims))
        self.proj_layers = nn.ModuleList(nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 1), LayerNorm2d(dims[i + 1]),
                                                       nn.GELU()) for i in range(3))
        self.normal_layers = nn.ModuleList(
            nn.Sequential(ConvNeXtBlock(dims[i + 1], dims[i + 1], kernel_size)) for i in range(3))
        self.projback = nn.Sequential(nn.Conv2d(dims[-1], 4 ** 2 * 3, 1), nn.PixelShuffle(4))

    def forward(self, x: Tensor) -> Tensor:
        for proj, blocks in zip(self.proj_layers, self.normal_layers):
            x = F.interpolate(proj(x), scale_factor=2, mode="bilinear", align_corners=True)
            x = blocks(x)
        return self.projback(x)


class SimpleDecoder(nn.Module):
    """The decoder for pretraining on more than 1000 classes: LayerNorm, 1x1 conv to 3 * 32**2, PixelShuffle(32)."""

    def __init__(self, dim: int):
        super().__init__()
        self.projback = nn.Sequential(LayerNorm2d(dim), nn.Conv2d(dim, 32 ** 2 * 3, 1), nn.PixelShuffle(32))

    def forward(self, x: Tensor) -> Tensor:
        return self.projback(x)


class RevCol(nn.Module):
    """Hierarchical RevCol over ConvNeXt levels.

    Args:
        num_classes: classifier outputs; 0 leaves the classifier out (``forward`` returns pooled features).
        in_chans: input image channels.
        dims: channels C0..C3 of the four levels.
        depths: ConvNeXt blocks per level, the same in every column.
        num_columns: number of columns.
        kernel_size: the blocks' depthwise kernel (3 in the paper's models).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of a column's last block, ``linspace(0, rate)`` over its blocks.
        intermediate_supervision: add the heads and decoders of Section 2.3 (``aux_heads``, ``decoders``);
            :meth:`forward_supervised` returns their outputs. ``forward`` predicts with the last head either way.
        head_init_scale: scale of the classifier's initial weights and bias (fine-tuning starts at 0.001).
        gamma_init: initial value of the reversible connections' channel-wise gammas.
        reversible: rebuild activations in backward instead of storing them (same outputs and gradients).
        bottom_reads_top: level 0 also reads the previous column's top level (RevCol-H).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dims: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (2, 2, 4, 2), num_columns: int = 4, kernel_size: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, intermediate_supervision: bool = False,
                 head_init_scale: float = 1.0, gamma_init: float = GAMMA_INIT, reversible: bool = True,
                 bottom_reads_top: bool = False):
        super().__init__()
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"dims and depths need 4 entries (one per level), got {len(dims)} and {len(depths)}")
        if intermediate_supervision and num_columns % NUM_HEADS:
            raise ValueError(f"intermediate supervision puts a head on every (columns/{NUM_HEADS})-th column: "
                             f"num_columns must be a multiple of {NUM_HEADS}, got {num_columns}")
        self.num_classes = num_classes
        self.dims, self.depths, self.num_columns = tuple(dims), tuple(depths), num_columns
        self.num_features = self.head_hidden_size = dims[-1]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        columns = [[Level(l, dims, depths, c > 0 and l < 3, kernel_size, rates, bottom_reads_top and c > 0 and l == 0)
                    for l in range(4)] for c in range(num_columns)]
        # Decoders run after the tapped columns, so the top level's graph is not kept (see keep_top_graph).
        self.revcol = ReversibleColumns(columns, [(d, 1, 1) for d in dims], gamma_init=gamma_init,
                                        reversible=reversible, keep_top_graph=not intermediate_supervision,
                                        bottom_reads_top=bottom_reads_top)
        self.head = ClassifierHead(dims[-1], num_classes, drop_rate)
        self.aux_heads = self.decoders = None
        if intermediate_supervision:
            self.aux_heads = nn.ModuleList(ClassifierHead(dims[-1], num_classes) for _ in range(NUM_HEADS - 1))
            self.decoders = nn.ModuleList(
                (Decoder(dims, kernel_size) if num_classes <= 1000 else SimpleDecoder(dims[-1]))
                for _ in range(NUM_HEADS - 1))
        self.feature_info = [dict(module=f"revcol.columns.{num_columns - 1}.levels.{l}", num_chs=dims[l],
                                  reduction=4 * 2 ** l) for l in range(4)]
        self.apply(_init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    @property
    def tap_columns(self) -> List[int]:
        """The columns whose top level feeds a head under intermediate supervision (the last one included)."""
        interval = self.num_columns // NUM_HEADS
        return [interval * (k + 1) - 1 for k in range(NUM_HEADS)]

    @property
    def reversible(self) -> bool:
        return self.revcol.reversible

    @reversible.setter
    def reversible(self, value: bool) -> None:
        self.revcol.reversible = value

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The reversible gammas: scales that weight decay should not shrink."""
        return {name for name, _ in self.named_parameters() if ".gammas." in name}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Union[Dict, Callable[[str], int]]:
        """Per parameter, its depth through the column grid (for layer-wise lr decay), as the official fine-tuning
        recipe counts it: the stem is 0; block j of column c (j counted through the levels) is one deeper than the
        shallower of block j-1 of its column and block j of the previous column, min(depth(j-1, c),
        depth(j, c-1)) + 1, which is j + c + 1; the heads come last. A level's fusion goes with its first block,
        column c's gammas with its first block of all. ``coarse`` groups by column."""
        if coarse:
            return dict(stem=r"^stem", columns=r"^revcol\.columns\.(\d+)", head=r"^head|^aux_heads|^decoders")
        top = sum(self.depths) + self.num_columns

        def depth(name: str) -> int:
            if name.startswith("stem."):
                return 0
            match = re.match(r"revcol\.columns\.(\d+)\.(?:gammas|levels\.(\d+)\.(?:fusion|blocks\.(\d+)))", name)
            if match is None:
                return top
            column, level, block = (int(g) if g is not None else None for g in match.groups())
            j = 0 if level is None else sum(self.depths[:level]) + (block or 0)
            return j + column + 1
        return depth

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Nothing to do: reversible mode (the default) already rebuilds activations in backward."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A freshly initialized classifier with ``num_classes`` outputs (none if 0); only 'avg' pooling exists."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        weight = self.head.norm.weight
        self.head.fc = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.fc.apply(_init_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last column's top level, (B, C3, H/32, W/32)."""
        return self.revcol(self.stem(x))[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor, supervised: bool = False) -> Union[Tensor, Tuple[List[Tensor], List[Tensor]]]:
        """Logits of the last head, or with ``supervised`` what :meth:`forward_supervised` returns (a flag, so
        that a DistributedDataParallel wrapper runs it through its own forward)."""
        if supervised is True:  # FX tracing passes every argument as a Proxy, which cannot be tested for truth
            return self.forward_supervised(x)
        return self.forward_head(self.forward_features(x))

    def forward_supervised(self, x: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        """Under intermediate supervision: the logits of the four heads (the last one is ``forward``'s) and the
        three decoders' image logits (B, 3, H, W), first column's first."""
        if self.aux_heads is None:
            raise RuntimeError("forward_supervised needs a model built with intermediate_supervision=True")
        levels, tops = self.revcol.forward_with_taps(self.stem(x), self.tap_columns[:-1])
        logits = [head(top) for head, top in zip(self.aux_heads, tops)] + [self.forward_head(levels[-1])]
        return logits, [decoder(top) for decoder, top in zip(self.decoders, tops)]

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The last column's levels picked by ``indices`` (last n if an int, all if None): maps of C0..C3
        channels at strides 4/8/16/32. Returns them, or (top level, them) unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if norm:
            raise ValueError("norm=True is not supported: the head's LayerNorm acts on pooled features")
        take_indices, _ = feature_take_indices(4, indices)
        levels = self.revcol(self.stem(x))
        intermediates = [levels[i] for i in take_indices]
        return intermediates if intermediates_only else (levels[-1], intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what a feature extractor does not use: every level feeds the last column's levels, so only the
        heads and decoders can go."""
        take_indices, _ = feature_take_indices(4, indices)
        if prune_head:
            self.reset_classifier(0)
            self.aux_heads = self.decoders = None
        return take_indices


def intermediate_supervision_loss(logits: Sequence[Tensor], reconstructions: Sequence[Tensor], images: Tensor,
                                  target: Tensor, criterion: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The loss of Section 2.3 and Appendix D.1 for :meth:`RevCol.forward_supervised`'s outputs.

    ``images``: the input in [0, 1] (before normalization). For heads i = 0..2: binary cross-entropy of decoder i
    against the images clamped to [0.01, 0.99], weighted 3 (1 - i/3), plus ``criterion`` (the classification
    loss, soft targets under mixup) on head i weighted 0.7 (i + 1) / 4; plus the last head's ``criterion`` at 1.
    """
    images = images.clamp(0.01, 0.99)
    n = len(reconstructions)
    loss = criterion(logits[-1], target)
    for i, (image_logits, class_logits) in enumerate(zip(reconstructions, logits)):
        loss = loss + 3.0 * (1 - i / n) * F.binary_cross_entropy_with_logits(image_logits, images) \
            + 0.7 * (i + 1) / len(logits) * criterion(class_logits, target)
    return loss


def denormalize(images: Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Tensor:
    """Normalized images (B, 3, H, W) back to [0, 1] pixels: the decoders' targets."""
    mean, std = (images.new_tensor(v).view(1, -1, 1, 1) for v in (mean, std))
    return images * std + mean


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


# Official checkpoint import. The official model names its columns subnet{c} and the reversible connections
# subnet{c}.alpha{l}; its levels, fusions and blocks carry the names used here.
_OFFICIAL_LEVEL = re.compile(r"subnet(\d+)\.level(\d+)\.((?:fusion\.(?:down|up2?\.channel_reschedule)\.\d+"
                             r"|blocks\.\d+\.(?:dwconv|norm|pwconv1|pwconv2))\.(?:weight|bias)|blocks\.\d+\.gamma)")
_OFFICIAL_ALPHA = re.compile(r"subnet(\d+)\.alpha(\d+)")


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: RevCol) -> Dict[str, Tensor]:
    """An official RevCol checkpoint (a dict with ``model`` or ``state_dict_ema``, or a raw state dict) as this
    model's state dict; a state dict of this model passes through.

    Every official key is mapped or deliberately dropped, else this raises: the first column's alphas (they
    multiply its zero initial state), and the decoders and intermediate heads when ``model`` was built
    without intermediate supervision. In a file trained with intermediate supervision the last head,
    ``cls_blocks.3``, is the ImageNet classifier.
    """
    for wrapper in ("model", "state_dict_ema", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    if not any(k.startswith("subnet") for k in state_dict):
        return state_dict
    last_head = f"cls_blocks.{NUM_HEADS - 1}."
    out: Dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("stem."):
            out[key] = value
        elif match := _OFFICIAL_ALPHA.fullmatch(key):
            column, level = int(match[1]), int(match[2])
            if column > 0:
                out[f"revcol.columns.{column}.gammas.{level}"] = value.reshape(-1, 1, 1)
        elif match := _OFFICIAL_LEVEL.fullmatch(key):
            out[f"revcol.columns.{match[1]}.levels.{match[2]}.{match[3]}"] = value
        elif key.startswith(("cls.classifier.", last_head)):
            out[_official_head_key(key.split(".classifier.")[1], "head")] = value
        elif match := re.fullmatch(r"cls_blocks\.(\d+)\.classifier\.(.+)", key):
            if model.aux_heads is not None:
                out[_official_head_key(match[2], f"aux_heads.{match[1]}")] = value
        elif match := re.fullmatch(r"decoder_blocks\.(\d+)\.(.+)", key):
            if model.decoders is not None:
                out[f"decoders.{match[1]}.{match[2]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an official RevCol checkpoint: {len(unknown)} unknown keys, e.g. {unknown[0]!r}")
    return out


def _official_head_key(rest: str, prefix: str) -> str:
    """``classifier.0`` is the head's LayerNorm, ``classifier.1`` its Linear."""
    index, param = rest.split(".", 1)
    return f"{prefix}.{'norm' if index == '0' else 'fc'}.{param}"


_RELEASES = "https://github.com/megvii-research/RevCol/releases/download/checkpoint/"


def _cfg(file: str = "", **kwargs) -> Dict:
    return {
        "url": _RELEASES + file if file else "", "num_classes": 1000, "input_size": (3, 224, 224),
        "pool_size": (7, 7), "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.0", "classifier": "head.fc",
        "license": "apache-2.0", "origin_url": "https://github.com/megvii-research/RevCol", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "revcol_tiny.in1k": _cfg("revcol_tiny_1k.pth"),
    "revcol_small.in1k": _cfg("revcol_small_1k.pth"),
    "revcol_base.in1k": _cfg("revcol_base_1k.pth"),
    "revcol_base.in22k_ft_in1k": _cfg("revcol_base_22k_1kft_224.pth"),
    "revcol_base.in22k_ft_in1k_384": _cfg("revcol_base_22k_1kft_384.pth", input_size=(3, 384, 384),
                                          pool_size=(12, 12), crop_pct=1.0),
    "revcol_base.in22k": _cfg("revcol_base_22k.pth", num_classes=21841),
    "revcol_large.in22k_ft_in1k": _cfg("revcol_large_22k_1kft_224.pth"),
    "revcol_large.in22k_ft_in1k_384": _cfg("revcol_large_22k_1kft_384.pth", input_size=(3, 384, 384),
                                           pool_size=(12, 12), crop_pct=1.0),
    "revcol_large.in22k": _cfg("revcol_large_22k.pth", num_classes=21841),
    "revcol_xlarge": _cfg(),  # no released weights
    "revcol_huge.megdata_ft_in1k": _cfg(
        url="https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/classification/"
            "revcol_huge_megdata_in1k.pth", input_size=(3, 640, 640), pool_size=(20, 20), crop_pct=1.0),
})


def _create_revcol(variant: str, pretrained: bool = False, **kwargs) -> RevCol:
    kwargs = dict(VARIANTS[variant.split(".")[0]], **kwargs)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(RevCol, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


@register_model
def revcol_tiny(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-T: C = 64/128/256/512, (2, 2, 4, 2) blocks, 4 columns."""
    return _create_revcol("revcol_tiny", pretrained, **kwargs)


@register_model
def revcol_small(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-S: C = 64/128/256/512, (2, 2, 4, 2) blocks, 8 columns."""
    return _create_revcol("revcol_small", pretrained, **kwargs)


@register_model
def revcol_base(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-B: C = 72/144/288/576, (1, 1, 3, 2) blocks, 16 columns."""
    return _create_revcol("revcol_base", pretrained, **kwargs)


@register_model
def revcol_large(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-L: C = 128/256/512/1024, (1, 2, 6, 2) blocks, 8 columns."""
    return _create_revcol("revcol_large", pretrained, **kwargs)


@register_model
def revcol_xlarge(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-XL: C = 224/448/896/1792, (1, 2, 6, 2) blocks, 8 columns."""
    return _create_revcol("revcol_xlarge", pretrained, **kwargs)


@register_model
def revcol_huge(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-H: C = 360/720/1440/2880, (1, 2, 6, 2) blocks, 8 columns; level 0 also reads the previous column's
    top level."""
    return _create_revcol("revcol_huge", pretrained, **kwargs)
