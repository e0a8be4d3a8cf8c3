"""The isotropic level's building blocks against their textbook formulas, and its initialization."""
import math

import pytest
import torch
import torch.nn.functional as F

from revcol import isotropic_columns
from revcol.isotropic import CosineAttention, DropPath, LevelFusion, PostNormBlock


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


def test_attention_temperature_starts_at_10_in_every_head():
    # Swin V2's init: softmax(10 cos(q, k)) until the per-head logit scale is learned.
    attn = CosineAttention(24, 3)
    assert attn.logit_scale.shape == (3, 1, 1)
    torch.testing.assert_close(attn.logit_scale.exp(), torch.full((3, 1, 1), 10.0))


def test_attention_dropout_fires_in_training_only():
    torch.manual_seed(0)
    attn = CosineAttention(24, 3, attn_dropout=0.5).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    ref = reference_cosine_attention(attn, x, pad)
    assert (attn.eval()(x, pad) - ref).abs().max() < 1e-10
    assert (attn.train()(x, pad) - ref).abs().max() > 1e-2


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


def test_post_norm_block_normalizes_each_branch_output_and_drops_each_branch_per_sample():
    # Res-post-norm: h = x + LN1(attn(x)), out = h + LN2(mlp(h)). Drop path drops each of the two branches of a
    # sample on its own and scales a kept one by 1 / (1 - p): four outcomes per sample, and each must occur.
    torch.manual_seed(0)
    block = PostNormBlock(16, 2, mlp_ratio=2.0, drop_path_rate=0.5).double()
    with torch.no_grad():  # LayerNorms away from their identity init, so that each one's place shows
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(64, 5, 16, dtype=torch.float64)
    pad = torch.zeros(64, 5, dtype=torch.bool)
    pad[::2, 3:] = True

    def attn_branch(y):
        return block.norm1(block.attn(y, pad))

    def mlp_branch(y):
        return block.norm2(block.mlp(y))

    with torch.no_grad():
        h = x + attn_branch(x)
        assert (block.eval()(x, pad) - (h + mlp_branch(h))).abs().max() < 1e-12
        h_kept = x + 2 * attn_branch(x)
        outcomes = torch.stack([x, x + 2 * mlp_branch(x), h_kept, h_kept + 2 * mlp_branch(h_kept)])
        out = block.train()(x, pad)
    matches = (outcomes - out).flatten(2).abs().amax(-1) < 1e-12  # (outcome, sample)
    assert torch.all(matches.sum(0) == 1), "every sample is one of the four outcomes"
    assert torch.all(matches.sum(1) > 0), matches.sum(1)


def test_level_fusion_sums_the_normalized_projections_of_its_two_inputs():
    torch.manual_seed(0)
    fusion = LevelFusion(8, has_high=True)
    with torch.no_grad():
        for norm in (fusion.low[1], fusion.high[1]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    low, high = torch.randn(2, 3, 8), torch.randn(2, 3, 8)

    def linear_then_norm(branch, x):
        linear, norm = branch
        return F.layer_norm(x @ linear.weight.T + linear.bias, (8,), norm.weight, norm.bias)

    expected = linear_then_norm(fusion.low, low) + linear_then_norm(fusion.high, high)
    torch.testing.assert_close(fusion(low, high), expected)
    with pytest.raises(ValueError, match="^LevelFusion built with a higher input was called without one$"):
        fusion(low, None)
    with pytest.raises(ValueError, match="^LevelFusion built without a higher input was called with one$"):
        LevelFusion(8, has_high=False)(low, high)


def test_ffn_output_projections_are_scaled_down_by_depth_through_each_column():
    # BEiT init: fc2 of the i-th block of a column (counted through its levels) starts at std 0.02 / sqrt(2 i).
    torch.manual_seed(0)
    model = isotropic_columns(256, [2, 1], 2, 4, mlp_ratio=4.0)
    for column in model.columns:
        blocks = [block for level in column.levels for block in level.blocks]
        stds = [block.mlp.fc2.weight.std().item() for block in blocks]
        for i, std in enumerate(stds, start=1):
            assert abs(std / (0.02 / math.sqrt(2 * i)) - 1) < 0.05, (i, stds)


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("x, mask, message", [
    (torch.randn(5, 16), None, "isotropic columns take tokens shaped (B, T, 16), got shape (5, 16)"),
    (torch.randn(2, 3, 4, 16), None, "isotropic columns take tokens shaped (B, T, 16), got shape (2, 3, 4, 16)"),
    (torch.randn(2, 16, 4, 4), None, "isotropic columns take tokens shaped (B, T, 16), got shape (2, 16, 4, 4)"),
    (torch.randn(2, 5, 16), torch.zeros(2, 4, dtype=torch.bool),
     "key_padding_mask must be shaped (B, T) = (2, 5) like the tokens, got (2, 4)"),
    (torch.randn(2, 5, 16), torch.zeros(2, 5),
     "key_padding_mask must be a bool tensor (True at padded positions), got torch.float32"),
], ids=["2-D", "4-D", "NCHW", "mask shape", "float mask"])
def test_wrong_input_or_mask_is_one_error_naming_the_expected_shape_or_dtype(reversible, x, mask, message):
    model = isotropic_columns(16, [1, 1], 2, 2, reversible=reversible)
    with pytest.raises(ValueError) as error:
        model(x.clone().requires_grad_(), key_padding_mask=mask)
    assert str(error.value) == message
