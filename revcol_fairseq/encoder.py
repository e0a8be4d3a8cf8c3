"""RevCol encoder for fairseq (paper Appendix B.2): token + position stem, then isotropic reversible columns."""
import math
from typing import Dict, List, Optional, Sequence

import torch
from fairseq.models import FairseqEncoder
from fairseq.modules import FairseqDropout, LayerNorm, PositionalEmbedding
from torch import Tensor, nn

from revcol import GAMMA_INIT, isotropic_columns


class RevColEncoder(FairseqEncoder):
    """Embeds source tokens the way fairseq's Transformer encoder does, runs the RevCol columns over (B, T, C)
    and returns the last column's top level, layer-normalized, in fairseq's ``encoder_out`` format.

    The top level adds up residual streams across columns (``F(x) + gamma * x_prev``), so its scale grows
    with the number of columns; the final LayerNorm hands the decoder's cross-attention a normalized memory,
    as the final LayerNorm of fairseq's pre-norm encoder does.
    """

    def __init__(self, dictionary, embed_tokens: nn.Embedding, *, depths: Sequence[int], num_columns: int,
                 num_heads: int, ffn_dim: int, max_source_positions: int, learned_pos: bool = False,
                 no_token_positional_embeddings: bool = False, no_scale_embedding: bool = False,
                 layernorm_embedding: bool = False, dropout: float = 0.0, attn_dropout: float = 0.0,
                 activation_dropout: float = 0.0, drop_path_rate: float = 0.0, gamma_init: float = GAMMA_INIT,
                 reversible: bool = True):
        super().__init__(dictionary)
        dim = embed_tokens.embedding_dim
        self.padding_idx = embed_tokens.padding_idx
        self.max_source_positions = max_source_positions
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if no_scale_embedding else math.sqrt(dim)
        self.embed_positions = None if no_token_positional_embeddings else PositionalEmbedding(
            max_source_positions, dim, self.padding_idx, learned=learned_pos)
        self.layernorm_embedding = LayerNorm(dim) if layernorm_embedding else None
        self.dropout_module = FairseqDropout(dropout, module_name=self.__class__.__name__)
        # No keep_top_graph: the decoder runs between the encoder's forward and backward, and the kept graph
        # would add one level's activations to the decoder's peak.
        self.revcol = isotropic_columns(dim, depths, num_columns, num_heads, mlp_ratio=ffn_dim / dim,
                                        drop_path_rate=drop_path_rate, dropout=dropout, attn_dropout=attn_dropout,
                                        activation_dropout=activation_dropout, gamma_init=gamma_init,
                                        reversible=reversible)
        self.layer_norm = LayerNorm(dim)

    def forward_embedding(self, src_tokens: Tensor):
        embed = self.embed_scale * self.embed_tokens(src_tokens)
        x = embed if self.embed_positions is None else embed + self.embed_positions(src_tokens)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x), embed

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, return_all_hiddens: bool = False):
        """src_tokens: (B, T). Returns fairseq's encoder_out dict; ``encoder_states`` holds the last column's
        level states (T x B x C, lowest level first) when ``return_all_hiddens``."""
        padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = bool(padding_mask.any())
        x, embed = self.forward_embedding(src_tokens)
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        levels = self.revcol(x, key_padding_mask=padding_mask if has_pads else None)
        x = self.layer_norm(levels[-1]).masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return {
            "encoder_out": [x.transpose(0, 1)],  # T x B x C
            "encoder_padding_mask": [padding_mask],  # B x T
            "encoder_embedding": [embed],  # B x T x C
            "encoder_states": [s.transpose(0, 1) for s in levels] if return_all_hiddens else [],
            "src_tokens": [],
            "src_lengths": [src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1)],
        }

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor):
        """Select (and repeat) sentences for beam search: dim 1 of T x B x C tensors, dim 0 of the others."""
        time_major = {"encoder_out", "encoder_states"}
        return {key: [t.index_select(1 if key in time_major else 0, new_order) for t in tensors]
                for key, tensors in encoder_out.items()}

    def max_positions(self) -> int:
        if self.embed_positions is None:
            return self.max_source_positions
        return min(self.max_source_positions, self.embed_positions.max_positions)
