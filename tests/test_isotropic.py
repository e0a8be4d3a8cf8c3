"""The isotropic level's building blocks against their textbook formulas, and its initialization."""
import math

import torch
import torch.nn.functional as F

from revcol import isotropic_columns
from revcol.isotropic import CosineAttention, DropPath


def reference_cosine_attention(attn: CosineAttention, x, key_padding_mask):
    """softmax(tau_h * cos(q_i, k_j)) v, tau_h = exp(min(logit_scale_h, log 100)), padded keys left out (Swin V2)."""
    B, T, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
    cos = F.cosine_similarity(q[:, :, :, None, :], k[:, :, None, :, :], dim=-1)
    logits = cos * attn.logit_scale.clamp(max=math.log(100.0)).exp()
    logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


def test_cosine_attention_is_a_softmax_over_scaled_cosine_similarities():
    torch.manual_seed(0)
    attn = CosineAttention(24, 3).double()
    with torch.no_grad():  # the last head's temperature is above the clamp at 100
        attn.logit_scale.copy_(torch.tensor([0.5, 2.0, 6.0]).view(3, 1, 1))
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = attn(x, pad)
    ref = reference_cosine_attention(attn, x, pad)
    assert (out - ref).abs().max() < 1e-10
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, attn.logit_scale, attn.qkv.weight], grad)
    want = torch.autograd.grad(ref, [x, attn.logit_scale, attn.qkv.weight], grad)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-10 * w.abs().max()
    assert got[1][2].abs().max() == 0  # the clamped temperature gets no gradient


def test_half_precision_zero_vectors_stay_finite():
    """Padding tokens can be all-zero; their queries and keys must not turn into NaN in float16."""
    attn = CosineAttention(16, 2).half()
    with torch.no_grad():
        attn.qkv.bias.zero_()
    x = torch.randn(1, 4, 16).half()
    x[0, 2:] = 0  # zero input and zero bias: zero q, k and v at positions 2 and 3
    out = attn(x, torch.tensor([[False, False, True, True]]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, :2].float(), reference_cosine_attention(attn.float(), x.float(),
                          torch.tensor([[False, False, True, True]]))[0, :2], atol=2e-3)


def test_drop_path_zeroes_whole_samples_and_rescales_the_kept_ones():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.rand(4000, 3, 5) + 1.0  # no zeros of its own
    y = drop(x)
    kept = (y != 0).flatten(1)
    assert (kept.all(1) | ~kept.any(1)).all(), "a sample is dropped or kept whole"
    kept = kept.all(1)
    assert torch.allclose(y[kept], x[kept] / 0.75)  # so that the expected value is x
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(drop.eval()(x), x)


def test_ffn_output_projections_are_scaled_down_by_depth_through_each_column():
    # BEiT init: fc2 of the i-th block of a column (counted through its levels) starts at std 0.02 / sqrt(2 i).
    torch.manual_seed(0)
    model = isotropic_columns(256, [2, 1], 2, 4, mlp_ratio=4.0)
    for column in model.columns:
        blocks = [block for level in column.levels for block in level.blocks]
        stds = [block.mlp.fc2.weight.std().item() for block in blocks]
        for i, std in enumerate(stds, start=1):
            assert abs(std / (0.02 / math.sqrt(2 * i)) - 1) < 0.05, (i, stds)
