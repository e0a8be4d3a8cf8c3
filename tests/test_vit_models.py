"""RevCol-ViT through timm: every variant builds and trains, reversible equals plain, timm's model API works, and
the column sweep's GFLOPs and memory figures are right."""
import math
import re

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torch import nn

import revcol_vit
from revcol.memory import PeakBytes, count_saved_bytes
from revcol.testing import assert_reversible_matches_plain
from revcol_vit.sweep import SWEEP_VARIANTS, gflops, peak_mb_per_sample

TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)


def tiny(name="revcol_vit_b_4x8", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(TINY, **kwargs))


def expected_params(embed_dim, depths, columns, num_heads, num_classes, in_chans=3, patch_size=16, tokens=196):
    """Parameter count implied by Appendix B.1: ViT blocks, linear + LayerNorm fusions, channel-wise gammas."""
    C, L = embed_dim, len(depths)
    attention = (3 * C * C + 3 * C) + num_heads + (C * C + C)       # qkv, per-head logit scale, proj
    mlp = (4 * C * C + 4 * C) + (4 * C * C + C)                      # fc1, fc2
    block = attention + mlp + 2 * (2 * C)                            # and two post-LayerNorms
    fusions = columns * L + (columns - 1) * (L - 1)     # a lower input everywhere, a higher one below the top
    return (in_chans * patch_size ** 2 * C + C + tokens * C + columns * sum(depths) * block
            + fusions * (C * C + 3 * C) + (columns - 1) * L * C + 2 * C + C * num_classes + num_classes)


def expected_macs(embed_dim, depths, columns, num_classes, in_chans=3, patch_size=16, tokens=196):
    """Multiply-adds of one image (the closed form of docs/vit.md): 12C^2 T + 2T^2 C per block (qkv, proj, MLP;
    QK^T and AV), C^2 T per fusion projection, the patch embedding and the head."""
    C, T, L = embed_dim, tokens, len(depths)
    fusions = columns * L + (columns - 1) * (L - 1)
    return (columns * sum(depths) * (12 * C * C * T + 2 * T * T * C) + fusions * C * C * T
            + in_chans * patch_size ** 2 * C * T + C * num_classes)


def test_registered_names():
    assert sorted(timm.list_models("revcol_vit*")) == sorted(revcol_vit.VARIANTS)


@pytest.mark.parametrize("name", ["revcol_vit_s", "revcol_vit_b"])
def test_full_size_parameter_count(name):
    cfg = revcol_vit.VARIANTS[name]
    model = timm.create_model(name)
    expected = expected_params(cfg["embed_dim"], cfg["depths"], cfg["num_columns"], cfg["num_heads"], 1000)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", list(revcol_vit.VARIANTS))
def test_variant_builds_and_runs_forward_and_backward(name):
    cfg = revcol_vit.VARIANTS[name]
    model = tiny(name)
    assert len(model.revcol.columns) == cfg["num_columns"]
    assert [len(level.blocks) for level in model.revcol.columns[-1].levels] == list(cfg["depths"])
    assert model.revcol.columns[0].levels[-1].blocks[-1].drop_path.p == pytest.approx(cfg["drop_path_rate"])
    assert sum(p.numel() for p in model.parameters()) == expected_params(
        32, cfg["depths"], cfg["num_columns"], 2, 5, patch_size=8, tokens=16)

    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_a_toy_scale_model_gives_its_img_size_to_the_data_config():
    model = timm.create_model("revcol_vit_b_4x8", embed_dim=64, num_heads=4, patch_size=4, img_size=32,
                              num_classes=10)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # what timm's data config will resize to


@pytest.mark.parametrize("variant", SWEEP_VARIANTS)
def test_sweep_gflops_are_multiply_adds_of_the_closed_form(variant):
    """The sweep's GFLOPs are multiply-adds (papers' "FLOPs"), QK^T and AV included: half the FlopCounter count.
    Across the sweep the blocks' count is the same; only the fusion projections grow with the columns."""
    cfg = revcol_vit.VARIANTS[f"revcol_vit_b_{variant}"]
    expected = expected_macs(32, cfg["depths"], cfg["num_columns"], 5, patch_size=8, tokens=16)
    assert gflops(tiny(f"revcol_vit_b_{variant}"), 32) == pytest.approx(expected / 1e9, rel=1e-9)


@pytest.mark.parametrize("name, paper_gflops", [("revcol_vit_s", 4.6), ("revcol_vit_b", 18.8)])
def test_sweep_gflops_match_table_9(name, paper_gflops):
    with torch.device("meta"):  # no weights needed to count
        model = timm.create_model(name)
    cfg = revcol_vit.VARIANTS[name]
    counted = gflops(model, 224)
    assert counted == pytest.approx(expected_macs(cfg["embed_dim"], cfg["depths"], cfg["num_columns"], 1000) / 1e9,
                                    rel=1e-9)
    assert counted == pytest.approx(paper_gflops, rel=0.005)


def training_peak(model, batch):
    """Peak bytes of the tensors a training step on ``batch`` images creates, the gradients already allocated."""
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    x = torch.zeros(batch, 3, 32, 32)
    with PeakBytes(ignore=[*model.parameters(), *(p.grad for p in model.parameters())]) as peak:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return peak.peak


@pytest.mark.parametrize("patch_size", [8, 4])
def test_sweep_memory_is_what_each_image_adds_to_the_training_peak(patch_size):
    """peak_mb_per_sample cancels everything that does not grow with the batch (weight-gradient temporaries and the
    like; parameters and gradients are not counted at all), leaving MiB per image."""
    model = tiny(patch_size=patch_size).train()
    # Without reversible recomputation every activation is kept until backward: per image the peak then grows by
    # what autograd saves per image, an independent count.
    model.reversible = False
    saved = []
    for batch in (1, 2):
        with count_saved_bytes() as counter:
            loss = model(torch.zeros(batch, 3, 32, 32)).sum()
        saved.append(counter.bytes)
        del loss
    plain = peak_mb_per_sample(model, 32)
    assert plain == pytest.approx((saved[1] - saved[0]) / 2**20, rel=0.02)
    # Reversible: the per-image figure extends the batch-2 peak to the batch-8 one. At 16 tokens (patch 8) the
    # batch-1 peak falls elsewhere in the step (weight-gradient temporaries), so it is no base to extend from.
    model.reversible = True
    per_image = peak_mb_per_sample(model, 32)
    peak_2, peak_8 = training_peak(model, 2), training_peak(model, 8)
    assert peak_2 + 6 * per_image * 2**20 == pytest.approx(peak_8, rel=1e-3)
    assert per_image < plain / 4  # what the sweep compares: reversible columns keep far less


@pytest.mark.parametrize("kwargs, input_size", [
    (dict(TINY, in_chans=1), (1, 32, 32)),
    (dict(in_chans=4, embed_dim=32, num_heads=2, num_classes=5), (4, 224, 224)),  # no img_size: 224, patch 16
])
def test_in_chans_sets_the_patch_embedding_and_the_data_config(kwargs, input_size):
    in_chans, patch = input_size[0], kwargs.get("patch_size", 16)
    torch.manual_seed(0)
    model = timm.create_model("revcol_vit_b_4x8", **kwargs).eval()
    assert model.patch_embed.weight.shape == (32, in_chans, patch, patch)
    assert model.pretrained_cfg["input_size"] == model.default_cfg["input_size"] == input_size
    assert resolve_data_config(model=model)["input_size"] == input_size  # what timm's loaders resize to
    # The same model over one channel more, whose patch weights for it are zero, ignores that channel: every one of
    # the in_chans channels goes through the patch embedding.
    wider = timm.create_model("revcol_vit_b_4x8", **dict(kwargs, in_chans=in_chans + 1)).eval()
    state = model.state_dict()
    wider.load_state_dict({**state, "patch_embed.weight": nn.functional.pad(state["patch_embed.weight"],
                                                                            (0, 0, 0, 0, 0, 1))})
    x = torch.randn(2, *input_size)
    logits = model(x)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(wider(torch.cat([x, torch.randn(2, 1, *input_size[1:])], 1)), logits)


def test_reversible_matches_plain_in_full_model():
    """Same outputs and gradients (input and every parameter) with drop path active, in float64."""
    model = tiny(drop_path_rate=0.3, gamma_init=0.5).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def run(reversible):
        model.reversible = reversible
        model.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # same drop path masks in both modes
        out = model(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out_rev, gx_rev, grads_rev = run(True)
    out_plain, gx_plain, grads_plain = run(False)
    torch.testing.assert_close(out_rev, out_plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx_rev, gx_plain, rtol=1e-8, atol=1e-10)
    for name in grads_plain:
        torch.testing.assert_close(grads_rev[name], grads_plain[name], rtol=1e-8, atol=1e-10, msg=name)
    assert grads_plain["revcol.columns.3.gammas.0"].abs().sum() > 0


def colour_images(n, generator):
    """Noise images whose class (0-2) is the channel shifted up: learnable, not memorizable."""
    y = torch.randint(0, 3, (n,), generator=generator)
    x = torch.randn(n, 3, 32, 32, generator=generator)
    x[torch.arange(n), y] += 0.5
    return x, y


def test_reversible_training_learns_held_out_task():
    model = tiny(num_classes=3)
    assert model.reversible
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(40):
        x, y = colour_images(32, generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    x, y = colour_images(256, generator)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.9  # chance is 1/3


def test_features_only_returns_last_column_levels_as_maps():
    torch.manual_seed(0)
    features = timm.create_model("revcol_vit_b_4x8", features_only=True, **dict(TINY, patch_size=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = features(x)
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 4
    assert features.feature_info.channels() == [32] * 4 and features.feature_info.reduction() == [4] * 4
    assert isinstance(features.model.head, nn.Identity)  # pruned: a feature extractor has no classifier
    levels = []  # the last column's 4 levels, as the columns return them
    features.model.revcol.register_forward_hook(lambda module, args, out: levels.extend(out))
    tokens = features.model.forward_features(x)
    assert len(levels) == 4 and levels[-1] is tokens
    for got, level in zip(maps, levels):
        torch.testing.assert_close(got, level.transpose(1, 2).reshape(2, 32, 8, 8))

    picked = timm.create_model("revcol_vit_b_4x8", features_only=True, out_indices=(0, 2), **dict(TINY, patch_size=4))
    picked.load_state_dict(features.state_dict())
    picked_maps = picked.eval()(x)
    assert len(picked_maps) == 2 and picked.feature_info.channels() == [32, 32]
    torch.testing.assert_close(picked_maps[0], maps[0])
    torch.testing.assert_close(picked_maps[1], maps[2])


def test_forward_intermediates_and_head():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    final, levels = model.forward_intermediates(x, output_fmt="NLC")
    assert len(levels) == 4 and all(level.shape == (2, 16, 32) for level in levels)
    torch.testing.assert_close(final, levels[-1])
    pooled = model.forward_head(final, pre_logits=True)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(model(x), model.head(pooled))


@pytest.mark.parametrize("output_fmt", ["NLC", "NCHW"])
def test_forward_intermediates_norm_applies_the_final_norm_to_each_level(output_fmt):
    model = tiny().eval()
    with torch.no_grad():  # an affine that is not the identity of the init, so the norm's own weights must be used
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    final, levels = model.forward_intermediates(x, output_fmt="NLC")
    normed_final, normed = model.forward_intermediates(x, norm=True, output_fmt=output_fmt)
    torch.testing.assert_close(normed_final, final)  # the top level stays as forward_head takes it
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(normed) == 4
    for level, got in zip(levels, normed):
        mean, var = level.mean(-1, keepdim=True), level.var(-1, unbiased=False, keepdim=True)
        expected = (level - mean) / torch.sqrt(var + model.norm.eps) * model.norm.weight + model.norm.bias
        if output_fmt == "NCHW":
            expected = expected.transpose(1, 2).reshape(2, 32, 4, 4)
            level = level.transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(got, expected)
        assert (got - level).abs().mean() > 0.1  # norm=False returns the raw levels


def test_reset_classifier_and_get_classifier():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (2, 32)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 16, 32)


def test_reset_classifier_initializes_the_new_head_like_the_model():
    """Truncated normal weights of std 0.02 and zero biases (not nn.Linear's default uniform), in the model's dtype."""
    model = tiny().double()
    model.reset_classifier(200)
    head = model.get_classifier()
    assert model.num_classes == 200 and head.weight.shape == (200, 32) and head.bias.shape == (200,)
    assert head.weight.dtype == head.bias.dtype == torch.float64
    assert torch.count_nonzero(head.bias) == 0
    assert head.weight.mean().abs() < 0.001 and 0.019 < head.weight.std() < 0.021  # 6400 draws: over 4 sigma
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model.eval()(x), model.forward_head(model.forward_features(x), pre_logits=True)
                               @ head.weight.T)

    model.reset_classifier(0)  # features: the pooled, normalized tokens
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    torch.testing.assert_close(model(x), model.norm(model.forward_features(x).mean(1)))


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_orders_every_parameter_once(coarse):
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    grouped = [n for lid in sorted(groups) for n in groups[lid]]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))

    layer = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
    last = max(layer.values())
    assert {layer[n] for n in names if n.startswith(("patch_embed", "pos_embed"))} == {0}
    assert {n for n in names if layer[n] == last} == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    if coarse:  # stem, one group per column, head
        per_column = [{layer[n] for n in names if n.startswith(f"revcol.columns.{c}.")} for c in range(4)]
        assert per_column == [{1}, {2}, {3}, {4}] and last == 5
    else:  # by depth in the column grid: 8 blocks per column and 4 columns give depths 1 to 11
        assert last == 8 + 4
        assert layer["revcol.columns.2.gammas.1"] == layer["revcol.columns.2.levels.1.blocks.1.norm2.bias"]
        level = "revcol.columns.2.levels.1"
        assert layer[f"{level}.fusion.low.0.weight"] == layer[f"{level}.blocks.0.norm2.bias"]


def shortest_path_depths(blocks_per_column: int, columns: int):
    """depth[i][j] of the block at position i of column j: min(depth(i-1, j), depth(i, j-1)) + 1, where the stem
    (depth 0) comes before the first block of column 0 and nothing else lies outside the grid."""
    depth = [[math.inf] * columns for _ in range(blocks_per_column)]
    for i in range(blocks_per_column):
        for j in range(columns):
            above = depth[i - 1][j] if i > 0 else (0 if j == 0 else math.inf)
            left = depth[i][j - 1] if j > 0 else math.inf
            depth[i][j] = min(above, left) + 1
    return depth


def expected_depth(name: str, depths, columns: int) -> int:
    """A parameter's depth: stem 0; a level's fusion at its first block, its gamma at its last; head last."""
    grid = shortest_path_depths(sum(depths), columns)
    if name.startswith(("patch_embed", "pos_embed")):
        return 0
    if name.startswith(("norm.", "head.")):
        return grid[-1][-1] + 1
    column, kind, level, rest = re.match(r"revcol\.columns\.(\d+)\.(levels|gammas)\.(\d+)(.*)", name).groups()
    column, level = int(column), int(level)
    if kind == "gammas":
        position = sum(depths[:level + 1]) - 1
    elif rest.startswith(".fusion."):
        position = sum(depths[:level])
    else:
        position = sum(depths[:level]) + int(re.match(r"\.blocks\.(\d+)\.", rest).group(1))
    return grid[position][column]


@pytest.mark.parametrize("name", ["revcol_vit_s", "revcol_vit_b"])
def test_layer_decay_scales_each_parameter_by_its_shortest_path_from_the_stem(name):
    """At --layer-decay 0.75 every parameter's lr scale is 0.75^(head's depth - its depth), the depths as the
    official RevCol optimizer counts them (about blocks per column + columns deep, not blocks x columns)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    depths, columns = revcol_vit.VARIANTS[name]["depths"], revcol_vit.VARIANTS[name]["num_columns"]
    head = expected_depth("head.weight", depths, columns)
    assert head == sum(depths) + columns
    scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model, layer_decay=0.75) for p in g["params"]}
    for param_name, param in model.named_parameters():
        want = 0.75 ** (head - expected_depth(param_name, depths, columns))
        assert scale[id(param)] == pytest.approx(want, rel=1e-12), param_name
    assert scale[id(model.patch_embed.weight)] > 1e-3  # revcol_vit_b: 0.75^16 = 1.0e-2


def test_fine_tuning_with_layer_decay_moves_the_stem():
    """One AdamW step moves each weight by about its lr (the first step is lr x the gradient's sign): the stem of a
    revcol_vit_b-shaped model (4 columns of 12 blocks) at --layer-decay 0.75 by 1e-3 x 0.75^16."""
    model = tiny("revcol_vit_b", drop_path_rate=0.0)
    before = model.patch_embed.weight.detach().clone()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.0, layer_decay=0.75)
    for group in optimizer.param_groups:  # as timm's schedulers set it
        group["lr"] = 1e-3 * group["lr_scale"]
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    optimizer.step()
    moved = (model.patch_embed.weight - before).abs().max().item()
    assert moved == pytest.approx(1e-3 * 0.75 ** 16, rel=2e-2)


def test_no_weight_decay_names_reach_timm_optimizer():
    model = tiny()
    skip = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert skip <= params.keys()
    assert "pos_embed" in skip
    assert sum(".gammas." in n for n in skip) == 3 * 4
    assert sum(n.endswith("attn.logit_scale") for n in skip) == 4 * 8
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(params[n]) in no_decay for n in skip)
    assert id(params["head.weight"]) not in no_decay


def test_layer_decay_scales_stem_lowest():
    model = tiny()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scale[id(model.pos_embed)] == min(scale.values())
    assert scale[id(model.head.weight)] == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=30, num_heads=4), "^dim 30 is not divisible by num_heads 4$"),
    (dict(num_heads=0), "^dim 32 is not divisible by num_heads 0$"),
    (dict(img_size=30), "img_size 30x30 is not a multiple of patch_size 8"),
    (dict(patch_size=64), "img_size 32x32 is not a multiple of patch_size 64"),
    (dict(global_pool="max"), "global_pool must be 'avg' or ''"),
    (dict(num_columns=0), "need at least 1 column"),
    (dict(depths=(2,)), "depths must list at least 2 levels"),
])
def test_bad_kwargs_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_wrong_input_size_is_a_clear_error():
    # an AssertionError, as timm's patch embedding raises: the check is a torch._assert, which FX tracing records
    with pytest.raises(AssertionError, match="input is 64x64 but the model was built for img_size 32x32"):
        tiny()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"^input must be a batch of images shaped \(B, in_chans, H, W\), got shape "
                                         r"\(3, 32, 32\)$"):
        tiny()(torch.randn(3, 32, 32))


@pytest.mark.parametrize("name", ["revcol_vit_s", "revcol_vit_b_8x4"])
def test_registered_vit_models_train_with_plain_autograds_gradients(name):
    # The registered variants at their defaults (gamma_init 0.5, their drop path rates), 8 columns included.
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=5)
    x = torch.randn(2, 3, 32, 32)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().logsumexp(-1).sum()

    assert_reversible_matches_plain(model, loss)
