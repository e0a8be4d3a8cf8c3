"""RevCol-ViT: isotropic reversible columns of ViT blocks (Cai et al., ICLR 2023, Appendix B.1 and B.3).

A 16x16 patch embedding plus a learnable absolute position embedding (no class token) feeds every column.
Each column has 4 levels of equal width built by :func:`revcol.isotropic_columns` (post-LN blocks with
scaled cosine attention, linear + LayerNorm fusions). The last column's top level is average pooled over
tokens, normalized and classified.

Variants (``VARIANTS``): ``revcol_vit_s`` and ``revcol_vit_b`` of Table 9, and the Appendix B.3 family at
ViT-B width with 32 blocks in all, ``revcol_vit_b_{columns}x{blocks per column}``.
"""
import re
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module, resample_abs_pos_embed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # not re-exported; timm's own models import it so
from torch import Tensor, nn

from revcol import GAMMA_INIT, ReversibleColumns, isotropic_columns

__all__ = ["RevColViT", "VARIANTS"]

VARIANTS: Dict[str, Dict] = {
    "revcol_vit_s": dict(embed_dim=224, depths=(2, 2, 2, 2), num_heads=4, num_columns=4, drop_path_rate=0.1),
    "revcol_vit_b": dict(embed_dim=384, depths=(3, 3, 3, 3), num_heads=6, num_columns=4, drop_path_rate=0.2),
    "revcol_vit_b_1x32": dict(embed_dim=384, depths=(8, 8, 8, 8), num_heads=6, num_columns=1, drop_path_rate=0.2),
    "revcol_vit_b_2x16": dict(embed_dim=384, depths=(4, 4, 4, 4), num_heads=6, num_columns=2, drop_path_rate=0.2),
    "revcol_vit_b_4x8": dict(embed_dim=384, depths=(2, 2, 2, 2), num_heads=6, num_columns=4, drop_path_rate=0.2),
    "revcol_vit_b_8x4": dict(embed_dim=384, depths=(1, 1, 1, 1), num_heads=6, num_columns=8, drop_path_rate=0.2),
}

# timm's FX feature extraction and tracing keep the columns as one call: traced through, they would be recorded
# plain, and the traced model would train without rebuilding activations. As a leaf they run as in eager mode.
register_notrace_module(ReversibleColumns)


class RevColViT(nn.Module):
    """Isotropic RevCol over ViT tokens.

    Args:
        img_size: input resolution, an int or (H, W); fixed, since the position embedding is learned per patch.
        patch_size: side of the square patches (and the stride of the patch embedding).
        in_chans: input image channels.
        num_classes: classifier outputs; 0 leaves the head out (``forward`` returns pooled features).
        global_pool: ``'avg'`` pools the tokens before the head, ``''`` keeps them.
        embed_dim: width C of every level.
        depths: blocks per level, the same in every column.
        num_heads: attention heads per block.
        num_columns: number of columns.
        mlp_ratio: MLP hidden width over C.
        drop_rate: dropout on the pooled features before the head.
        drop_path_rate: stochastic depth of a column's last block (rising linearly from 0 within each column).
        gamma_init: initial value of the reversible connections' channel-wise gammas.
        reversible: rebuild activations in backward instead of storing them (same outputs and gradients).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 384,
                 depths: Sequence[int] = (3, 3, 3, 3), num_heads: int = 6, num_columns: int = 4,
                 mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, gamma_init: float = GAMMA_INIT,
                 reversible: bool = True):
        super().__init__()
        img_size = to_2tuple(img_size)
        _check_args(img_size, patch_size, global_pool)
        if int(embed_dim * mlp_ratio) < 1:  # the MLP's hidden width, as the blocks compute it
            raise ValueError(f"mlp_ratio {mlp_ratio} x embed_dim {embed_dim} leaves the MLP no hidden unit")
        self.img_size = img_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        # Only the pooled head runs after the columns, so keeping the top level's graph costs no peak memory.
        self.revcol = isotropic_columns(embed_dim, depths, num_columns, num_heads, mlp_ratio=mlp_ratio,
                                        drop_path_rate=drop_path_rate, gamma_init=gamma_init, reversible=reversible,
                                        keep_top_graph=True)
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"revcol.columns.{num_columns - 1}.levels.{l}", num_chs=embed_dim,
                                  reduction=patch_size) for l in range(len(depths))]

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self._init_head()

    def _init_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @property
    def reversible(self) -> bool:
        return self.revcol.reversible

    @reversible.setter
    def reversible(self, value: bool) -> None:
        self.revcol.reversible = value

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Position embedding, reversible gammas and attention temperatures: scales that decay should not shrink."""
        return {name for name, _ in self.named_parameters()
                if name == "pos_embed" or ".gammas." in name or name.endswith(".logit_scale")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Union[Dict, Callable[[str], int]]:
        """Parameter groups for timm's layer-wise lr decay: by depth (see :meth:`layer_depth`), or, if coarse, the
        stem, one group per column, then the head."""
        if coarse:
            return dict(stem=r"^patch_embed|^pos_embed", columns=r"^revcol\.columns\.(\d+)", head=r"^norm|^head")
        return self.layer_depth

    def layer_depth(self, name: str) -> int:
        """The depth of parameter ``name``: its block's shortest path from the stem through the column grid, as the
        official RevCol optimizer counts it. The stem is 0 and feeds the first block of column 0; the block at
        position i of column j (counted through the column from 0) is one deeper than the shallower of the block
        before it in its column and the same block of the previous column, min(depth(i-1, j), depth(i, j-1)) + 1,
        which is i + j + 1. A level's fusion goes with its first block, its gamma with its last; the head is last.
        """
        if name.startswith(("patch_embed", "pos_embed")):
            return 0
        depths = [len(level.blocks) for level in self.revcol.columns[0].levels]
        match = re.match(r"revcol\.columns\.(\d+)\.(?:levels\.(\d+)\.(?:fusion|blocks\.(\d+))|gammas\.(\d+))", name)
        if match is None:
            return sum(depths) + len(self.revcol.columns)
        column, level, block, gamma_level = match.groups()
        if gamma_level is not None:
            level, block = int(gamma_level), depths[int(gamma_level)] - 1
        position = sum(depths[:int(level)]) + int(block or 0)
        return position + int(column) + 1

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Nothing to do: reversible mode (the default) already rebuilds activations in backward instead of
        storing them, which is what gradient checkpointing would buy."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A freshly initialized head with ``num_classes`` outputs (none if 0); ``global_pool`` 'avg' or ''."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.head = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0 \
            else nn.Identity()
        self._init_head()

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) to position-embedded patch tokens (B, T, C)."""
        if not isinstance(x, torch.fx.Proxy) and x.dim() != 4:  # FX tracing cannot test a shape: see below
            raise ValueError(f"input must be a batch of images shaped (B, in_chans, H, W), got shape {tuple(x.shape)}")
        # torch._assert per side, as timm's patch embedding does: FX tracing cannot branch on a shape, but records
        # these (a shape there is a Proxy, which neither `if` nor `and` can test)
        message = (f"input is {x.shape[-2]}x{x.shape[-1]} but the model was built for img_size "
                   f"{self.img_size[0]}x{self.img_size[1]} (its position embedding is fixed)")
        torch._assert(x.shape[-2] == self.img_size[0], message)
        torch._assert(x.shape[-1] == self.img_size[1], message)
        # contiguous: the sum would keep the transposed layout, which every level's first Linear then copies
        return (self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed).contiguous()

    def forward_features(self, x: Tensor) -> Tensor:
        """The last column's top level, (B, T, C)."""
        return self.revcol(self.embed(x))[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The last column's levels picked by ``indices`` (last n if an int, all if None), as (B, C, H/p, W/p)
        maps (``'NCHW'``) or tokens (``'NLC'``), with ``norm`` applying the head's LayerNorm to each.

        Returns the levels, or (top level tokens, levels) unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        levels = self.revcol(self.embed(x))
        intermediates = [self.norm(levels[i]) if norm else levels[i] for i in take_indices]
        if output_fmt == "NCHW":
            intermediates = [y.transpose(1, 2).reshape(y.shape[0], -1, *self.grid_size) for y in intermediates]
        return intermediates if intermediates_only else (levels[-1], intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what a feature extractor does not use. Every level of every column feeds the last column's
        levels, so only the norm and the head can go."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")


def _check_args(img_size: Tuple[int, int], patch_size: int, global_pool: str) -> None:
    """What the columns do not check themselves (they check depths, columns, heads and gamma_init)."""
    if patch_size < 1 or any(s < patch_size or s % patch_size for s in img_size):
        raise ValueError(f"img_size {img_size[0]}x{img_size[1]} is not a multiple of patch_size {patch_size}")
    _check_global_pool(global_pool)


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: RevColViT,
                         grid_size: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
    """A RevCol-ViT state dict for ``model``, which may take another image size: the position embedding is resampled
    (bicubic) from ``grid_size``, the patch grid it was trained on (square if not given), to the model's. timm's
    pretrained loading applies it, and so does fine-tuning in revcol_vit.train."""
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None or (grid_size is None and pos_embed.shape == model.pos_embed.shape):
        return state_dict
    resampled = resample_abs_pos_embed(pos_embed, new_size=list(model.grid_size),
                                       old_size=None if grid_size is None else list(grid_size), num_prefix_tokens=0)
    return dict(state_dict, pos_embed=resampled)


def _cfg(**kwargs) -> Dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def _create_revcol_vit(variant: str, pretrained: bool = False, **kwargs) -> RevColViT:
    kwargs = dict(VARIANTS[variant], **kwargs)
    out_indices = kwargs.pop("out_indices", len(kwargs["depths"]))
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    if "img_size" in kwargs or "in_chans" in kwargs:
        # timm's data config is read from the pretrained cfg: make it describe the model as built.
        overlay = {"input_size": (kwargs.get("in_chans", 3), *to_2tuple(kwargs.get("img_size", 224))), **overlay}
    return build_model_with_cfg(RevColViT, variant, pretrained, pretrained_cfg_overlay=overlay,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


@register_model
def revcol_vit_s(pretrained: bool = False, **kwargs) -> RevColViT:
    """RevCol-ViT-S (Table 9): C=224, 4 columns of (2, 2, 2, 2) blocks, 4 heads."""
    return _create_revcol_vit("revcol_vit_s", pretrained, **kwargs)


@register_model
def revcol_vit_b(pretrained: bool = False, **kwargs) -> RevColViT:
    """RevCol-ViT-B (Table 9): C=384, 4 columns of (3, 3, 3, 3) blocks, 6 heads."""
    return _create_revcol_vit("revcol_vit_b", pretrained, **kwargs)


@register_model
def revcol_vit_b_1x32(pretrained: bool = False, **kwargs) -> RevColViT:
    """Appendix B.3: one column of 32 blocks at ViT-B width (a plain isotropic ViT with level fusions)."""
    return _create_revcol_vit("revcol_vit_b_1x32", pretrained, **kwargs)


@register_model
def revcol_vit_b_2x16(pretrained: bool = False, **kwargs) -> RevColViT:
    """Appendix B.3: 2 columns of 16 blocks at ViT-B width."""
    return _create_revcol_vit("revcol_vit_b_2x16", pretrained, **kwargs)


@register_model
def revcol_vit_b_4x8(pretrained: bool = False, **kwargs) -> RevColViT:
    """Appendix B.3: 4 columns of 8 blocks at ViT-B width."""
    return _create_revcol_vit("revcol_vit_b_4x8", pretrained, **kwargs)


@register_model
def revcol_vit_b_8x4(pretrained: bool = False, **kwargs) -> RevColViT:
    """Appendix B.3: 8 columns of 4 blocks at ViT-B width."""
    return _create_revcol_vit("revcol_vit_b_8x4", pretrained, **kwargs)
