"""Isotropic RevCol columns with transformer blocks (Appendix B): shared by RevCol-ViT and RevCol-Transformer.

Every level keeps the token shape (B, T, C). A level is a fusion (Linear + post-LayerNorm for each of its
two inputs, summed: the isotropic stand-in for down- and up-sampling) followed by post-LN blocks
(``x + LN(attn(x))``, ``x + LN(mlp(x))``) with normalized (scaled cosine) attention as in Swin V2.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .columns import GAMMA_INIT, ReversibleColumns, check_gamma_init, takes_high

LOGIT_SCALE_MAX = math.log(100.0)  # Swin V2 clamps the learnable attention temperature at 100


# Random ops run eagerly, outside any torch.compile graph. The reversible backward replays a level's random
# numbers by restoring the generator state before recomputing it, which reproduces the masks only if they are
# drawn from the global generator in the same order both times. Inductor's own random kernels are not: the
# no-grad forward graph and the training graph of the recompute draw differently. Keeping the few random ops
# eager (a graph break each) makes compiled levels exact; see ReversibleColumns.compile_levels. The modules
# hand themselves over, not their rate, so that a compiled level does not specialize on every block's rate.
@torch.compiler.disable
def _drop_path(x: Tensor, module: "DropPath") -> Tensor:
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - module.p)
    return x * keep.div_(1.0 - module.p)  # the rescale on the mask: one pass over x, not two


@torch.compiler.disable
def _dropout(x: Tensor, module: nn.Dropout) -> Tensor:
    return F.dropout(x, module.p, training=True)


@torch.compiler.disable
def _attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, dropout_p=p)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, with probability ``p`` > 0."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"drop path rate must be in (0, 1), got {p}; use nn.Identity for 0")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return _drop_path(x, self) if self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn eagerly even inside a compiled level (see ``_drop_path``)."""

    def forward(self, x: Tensor) -> Tensor:
        return _dropout(x, self) if self.training else x


def dropout_layer(p: float) -> nn.Module:
    """Dropout with rate ``p``, or nothing at all (no graph break in a compiled level) when ``p`` is 0."""
    return Dropout(p) if p > 0.0 else nn.Identity()


class CosineAttention(nn.Module):
    """Multi-head attention on cosine similarity with a learnable per-head temperature (Swin V2).

    The clamped temperature is folded into the normalized queries, so the product runs through
    ``scaled_dot_product_attention`` (fused kernels on GPU) with scale 1.
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = dropout_layer(dropout)

    def normalize_qk(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """q and k, shaped (B, heads, T, head_dim), rescaled so that q . k = temperature * cos(q, k)."""
        # Through RMS norms: rms_norm(q) . rms_norm(k) = head_dim * cos(q, k), so the temperature is divided
        # by head_dim. On GPU rms_norm is one fused kernel each way, where F.normalize launches three forward
        # and over a dozen backward (docs/benchmarks.md, Cosine attention). rms_norm computes in float32 even for
        # half-precision input, so its eps stays 1e-12 there and an all-zero (padding) vector stays zero.
        # That is also why CUDA autocast is off around it: autocast would first make float32 copies of q and k
        # and keep them for backward. q and k are normalized separately: one call on both breaks the
        # compiled backward once sequence lengths vary (Inductor reuses a stride from the first length).
        head_dim = q.shape[-1]
        scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() / head_dim
        with torch.autocast("cuda", enabled=False):
            q = F.rms_norm(q, (head_dim,), eps=1e-12)
            k = F.rms_norm(k, (head_dim,), eps=1e-12)
        return q * scale.to(q.dtype), k

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, T, C); key_padding_mask: (B, T), True at padded positions, which no query attends to."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.normalize_qk(q, k)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if self.attn_dropout > 0.0 and self.training:
            x = _attention_with_dropout(q, k, v, mask, self.attn_dropout)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = dropout_layer(activation_dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = dropout_layer(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PostNormBlock(nn.Module):
    """Transformer block with the LayerNorm on each residual branch's output (Swin V2 res-post-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 dropout: float = 0.0, attn_dropout: float = 0.0, activation_dropout: float = 0.0):
        super().__init__()
        self.attn = CosineAttention(dim, num_heads, attn_dropout=attn_dropout, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation_dropout=activation_dropout, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.drop_path(self.norm1(self.attn(x, key_padding_mask)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class LevelFusion(nn.Module):
    """Linear + LayerNorm on the lower input of this column and on the higher input of the previous one, summed."""

    def __init__(self, dim: int, has_high: bool):
        super().__init__()
        self.low = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.high = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim)) if has_high else None

    def forward(self, low: Tensor, high: Optional[Tensor]) -> Tensor:
        if (high is None) != (self.high is None):
            raise ValueError("LevelFusion built " + ("with" if self.high is not None else "without")
                             + " a higher input was called " + ("without" if high is None else "with") + " one")
        x = self.low(low)
        return x if high is None else x + self.high(high)


def check_tokens(x: Tensor, dim: int, key_padding_mask: Optional[Tensor]) -> None:
    """A one-line error naming the expected shape or dtype, instead of one from deep inside attention."""
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"isotropic columns take tokens shaped (B, T, {dim}), got shape {tuple(x.shape)}")
    if key_padding_mask is None:
        return
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be a bool tensor (True at padded positions), got "
                         f"{key_padding_mask.dtype}")
    if key_padding_mask.shape != x.shape[:2]:
        raise ValueError(f"key_padding_mask must be shaped (B, T) = {tuple(x.shape[:2])} like the tokens, got "
                         f"{tuple(key_padding_mask.shape)}")


class IsotropicLevel(nn.Module):
    """F_l: fusion, then ``depth`` post-LN blocks. Called as ``level(low, high, key_padding_mask=None)``."""

    def __init__(self, dim: int, depth: int, num_heads: int, has_high: bool, mlp_ratio: float = 4.0,
                 drop_path_rates: Sequence[float] = (), dropout: float = 0.0, attn_dropout: float = 0.0,
                 activation_dropout: float = 0.0):
        super().__init__()
        drop_path_rates = list(drop_path_rates) or [0.0] * depth
        self.dim = dim
        self.fusion = LevelFusion(dim, has_high)
        self.blocks = nn.ModuleList(
            PostNormBlock(dim, num_heads, mlp_ratio, drop_path_rates[i], dropout, attn_dropout, activation_dropout)
            for i in range(depth))

    def forward(self, low: Tensor, high: Optional[Tensor], key_padding_mask: Optional[Tensor] = None) -> Tensor:
        check_tokens(low, self.dim, key_padding_mask)
        x = self.fusion(low, high)
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x


def isotropic_columns(dim: int, depths: Sequence[int], num_columns: int, num_heads: int, mlp_ratio: float = 4.0,
                      drop_path_rate: float = 0.0, dropout: float = 0.0, attn_dropout: float = 0.0,
                      activation_dropout: float = 0.0, gamma_init: float = GAMMA_INIT, reversible: bool = True,
                      keep_top_graph: bool = False) -> ReversibleColumns:
    """Reversible columns of :class:`IsotropicLevel` over tokens (B, T, dim).

    Drop path rises linearly over the blocks of a column, the same in every column (as the official code
    does). FFN output projections are scaled down by depth at init (BEiT): fc2 of block i (1-based, counted
    through the column) by 1/sqrt(2 i).
    """
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    if int(dim * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio {mlp_ratio} at dim {dim} leaves the MLP no hidden unit (int(dim * mlp_ratio) "
                         f"must be at least 1)")
    if num_columns < 1:
        raise ValueError(f"need at least 1 column, got {num_columns}")
    if len(depths) < 2 or any(d < 1 for d in depths):
        raise ValueError(f"depths must list at least 2 levels of at least 1 block each, got {tuple(depths)}")
    check_gamma_init(gamma_init, num_columns)
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under a meta device
    starts = [sum(depths[:l]) for l in range(len(depths))]
    columns: List[List[IsotropicLevel]] = []
    for c in range(num_columns):
        levels = []
        for l, depth in enumerate(depths):
            levels.append(IsotropicLevel(dim, depth, num_heads, takes_high(c, l, len(depths)), mlp_ratio,
                                         rates[starts[l]:starts[l] + depth], dropout, attn_dropout,
                                         activation_dropout))
        columns.append(levels)
    model = ReversibleColumns(columns, [(dim,)] * len(depths), gamma_init=gamma_init, reversible=reversible,
                              keep_top_graph=keep_top_graph)
    init_isotropic_(model, depths)
    return model


def init_isotropic_(model: ReversibleColumns, depths: Sequence[int]) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for column in model.columns:
        block_id = 0
        for level in column.levels:
            for block in level.blocks:
                block_id += 1
                block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * block_id))
