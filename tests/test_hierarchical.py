"""Hierarchical RevCol (revcol_tiny ... revcol_xlarge): sizes, intermediate supervision through the reversible
core, official checkpoint import, dense features, layer decay through the column grid."""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import rel_error, write_digits
from timm.optim import param_groups_layer_decay

import revcol_vit  # noqa: F401  (registers the models)
from revcol.memory import count_saved_bytes
from revcol_vit.hierarchical import (
    VARIANTS,
    checkpoint_filter_fn,
    intermediate_supervision_loss,
)

TINY = dict(dims=(4, 8, 8, 12), depths=(1, 1, 2, 1), num_classes=5)  # 32x32 images: top level 1x1
OFFICIAL_KEYS = Path(__file__).parent / "fixtures" / "revcol_tiny_official_keys.txt"


def tiny(num_columns=4, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("revcol_tiny", **dict(TINY, num_columns=num_columns, **kwargs))


def randomize_(model, seed=0):
    """Weights away from their initial constants (gammas of both signs, layer scales near 1), so that a
    wrong mapping or a wrong gradient path shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.rand(p.shape, generator=generator, dtype=p.dtype)
            if ".gammas." in name:
                p.copy_((0.4 + noise) * (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1))
            elif name.endswith(".gamma"):
                p.copy_(0.2 + noise)
            else:
                p.add_(0.05 * (noise - 0.5))
    return model


def to_official(state_dict):
    """Our state dict in the official key layout (the inverse of checkpoint_filter_fn), first column's alphas
    included at their initial 0.5."""
    out = {}
    supervised = any(key.startswith("aux_heads.") for key in state_dict)
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("revcol.columns.") and parts[3] == "gammas":
            out[f"subnet{parts[2]}.alpha{parts[4]}"] = value.reshape(1, -1, 1, 1)
        elif key.startswith("revcol.columns."):
            out[f"subnet{parts[2]}.level{parts[4]}.{'.'.join(parts[5:])}"] = value
        elif key.startswith(("head.", "aux_heads.")):
            head = f"cls_blocks.{parts[1]}" if key.startswith("aux_heads.") else "cls_blocks.3" if supervised else "cls"
            index = "0" if parts[-2] == "norm" else "1"
            out[f"{head}.classifier.{index}.{parts[-1]}"] = value
        elif key.startswith("decoders."):
            out["decoder_blocks." + key[len("decoders."):]] = value
        else:
            out[key] = value
    for l, gamma in enumerate(state_dict[k] for k in state_dict if k.startswith("revcol.columns.1.gammas.")):
        out[f"subnet0.alpha{l}"] = torch.full((1, gamma.numel(), 1, 1), 0.5)
    return out


@pytest.mark.slow
def test_registered_variants_have_the_papers_parameter_counts():
    paper = dict(revcol_tiny=30e6, revcol_small=60e6, revcol_base=138e6, revcol_large=273e6)
    for name in VARIANTS:
        with torch.device("meta"):
            model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        if name in paper:
            assert abs(params / paper[name] - 1) < 0.02, (name, params)
        assert len(model.revcol.columns) == VARIANTS[name]["num_columns"]


def supervised_grads(model, x, target, reversible):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    logits, images = model.forward_supervised(x)
    loss = intermediate_supervision_loss(logits, images, x.sigmoid(), target, F.cross_entropy)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("num_columns", [4, 16])
def test_intermediate_supervision_gradients_equal_plain_autograd(num_columns):
    model = randomize_(tiny(num_columns, intermediate_supervision=True, drop_path_rate=0.2).double())
    model.train()
    x, target = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    loss_r, grads_r = supervised_grads(model, x, target, True)
    loss_p, grads_p = supervised_grads(model, x, target, False)
    assert torch.equal(loss_r, loss_p)
    for name, g in grads_p.items():
        assert grads_r[name] is not None, name
        assert rel_error(grads_r[name], g) < 1e-10, (name, rel_error(grads_r[name], g))
    # The tapped columns' heads reach the first column: its gradient depends on them.
    assert grads_r["aux_heads.0.fc.weight"].abs().sum() > 0


def test_intermediate_supervision_keeps_memory_flat_in_columns():
    def saved(num_columns, reversible):
        model = tiny(num_columns, intermediate_supervision=True, reversible=reversible)
        with count_saved_bytes() as counter:
            model.forward_supervised(torch.randn(2, 3, 32, 32))
        return counter.bytes

    reversible = [saved(n, True) for n in (4, 8, 12)]
    plain = [saved(n, False) for n in (4, 8, 12)]
    # All that grows with the columns: per rebuilt column, one bit per element of its states (the last bits of
    # their casts, revcol.columns._ForwardCast). Batch 2 at 32x32: levels (4, 8x8), (8, 4x4), (8, 2x2), (12, 1x1).
    cast_bits = sum(-(-2 * c * hw // 8) for c, hw in [(4, 64), (8, 16), (8, 4), (12, 1)])
    assert reversible[1] - reversible[0] == reversible[2] - reversible[1] == 4 * cast_bits, reversible
    assert plain[2] - plain[1] == plain[1] - plain[0] > 0, plain


def test_taps_must_name_existing_columns():
    model = tiny(4)
    with pytest.raises(ValueError, match=r"tap_columns \[4\] must lie in 0..3"):
        model.revcol.forward_with_taps(torch.randn(1, 4, 8, 8), [4])


def test_intermediate_supervision_needs_a_multiple_of_four_columns():
    with pytest.raises(ValueError, match="num_columns must be a multiple of 4, got 6"):
        tiny(6, intermediate_supervision=True)


def test_loss_weights_follow_the_paper():
    logits = [torch.randn(2, 5) for _ in range(4)]
    images, recon, target = torch.rand(2, 3, 4, 4), [torch.randn(2, 3, 4, 4) for _ in range(3)], torch.tensor([0, 4])
    clamped = images.clamp(0.01, 0.99)
    want = F.cross_entropy(logits[3], target) + sum(
        3 * (1 - i / 3) * F.binary_cross_entropy_with_logits(recon[i], clamped)
        + 0.7 * (i + 1) / 4 * F.cross_entropy(logits[i], target) for i in range(3))
    got = intermediate_supervision_loss(logits, recon, images, target, F.cross_entropy)
    assert torch.allclose(got, want, rtol=1e-6)


def test_official_key_set_of_revcol_tiny_is_mapped_in_full():
    """The official RevCol-T's keys and shapes (extracted once from its model code) are exactly what our
    RevCol-T maps to, and checkpoint_filter_fn maps each of them back into our model."""
    official = dict(line.split() for line in OFFICIAL_KEYS.read_text().splitlines() if not line.startswith("#"))
    with torch.device("meta"):
        model = timm.create_model("revcol_tiny", intermediate_supervision=True)
    ours = to_official(model.state_dict())
    assert {k: ",".join(map(str, v.shape)) for k, v in ours.items()} == official
    mapped = checkpoint_filter_fn({"model": ours}, model)
    assert set(mapped) == set(model.state_dict())


@pytest.mark.parametrize("intermediate_supervision", [False, True])
@pytest.mark.parametrize("wrapper", ["model", "state_dict_ema", None])
def test_official_format_round_trip_gives_the_same_logits(wrapper, intermediate_supervision):
    source = randomize_(tiny(intermediate_supervision=intermediate_supervision)).eval()
    official = to_official(source.state_dict())
    checkpoint = official if wrapper is None else {wrapper: official, "epoch": 3}
    for target_supervised in (False, True):
        target = tiny(intermediate_supervision=target_supervised).eval()
        mapped = checkpoint_filter_fn(checkpoint, target)
        if target_supervised and not intermediate_supervision:
            target.load_state_dict(mapped, strict=False)  # a fine-tuned file has no decoders to give
        else:
            target.load_state_dict(mapped)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(target(x), source(x))


def test_timm_pretrained_file_loads_an_official_checkpoint(tmp_path):
    source = randomize_(tiny(intermediate_supervision=True)).eval()
    path = tmp_path / "revcol_tiny_1k.pth"
    torch.save({"model": to_official(source.state_dict())}, path)
    model = timm.create_model("revcol_tiny", pretrained=True, **TINY,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_unknown_official_keys_are_refused():
    model = tiny()
    official = to_official(model.state_dict())
    official["subnet1.level0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 unknown keys, e.g. 'subnet1.level0.extra.weight'"):
        checkpoint_filter_fn(official, model)


def test_dense_features_are_the_last_columns_levels():
    model = randomize_(tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        levels = model.revcol(model.stem(x))
        top, intermediates = model.forward_intermediates(x)
        features = timm.create_model("revcol_tiny", features_only=True, **TINY)
        missing, _ = features.model.load_state_dict(model.state_dict(), strict=False)
        assert all(key.startswith("head.") for key in missing)
        maps = features.eval()(x)
    assert torch.equal(top, levels[-1])
    for got, want, feature_map, dim, stride in zip(intermediates, levels, maps, TINY["dims"], (4, 8, 16, 32)):
        assert torch.equal(got, want) and torch.equal(feature_map, want)
        assert got.shape == (2, dim, 64 // stride, 64 // stride)
    assert features.feature_info.channels() == list(TINY["dims"])
    assert features.feature_info.reduction() == [4, 8, 16, 32]


def test_layer_decay_follows_the_depth_through_the_column_grid():
    model = tiny(4)
    depth = model.group_matcher()
    last = len(model.revcol.columns) - 1
    assert depth("stem.0.weight") == 0
    assert depth("revcol.columns.0.levels.0.blocks.0.dwconv.weight") == 1
    assert depth("revcol.columns.2.gammas.3") == 3  # with the column's first block
    assert depth("revcol.columns.1.levels.2.fusion.down.0.weight") == 4  # with the level's first block, j = 2
    assert depth(f"revcol.columns.{last}.levels.3.blocks.0.pwconv2.weight") == 8  # j = 4, c = 3
    assert depth("head.fc.weight") == 9
    groups = param_groups_layer_decay(model, layer_decay=0.5)
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) == 0.5 ** 9


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_trains_revcol_tiny_on_digits_with_intermediate_supervision_then_fine_tunes_an_official_file(
        tmp_path, monkeypatch):
    from revcol_vit.train import parse_args, train

    data = write_digits(tmp_path / "digits")
    recipe = ["--config", str(REPO / "examples" / "vit" / "digits_revcol_tiny.yaml"), "--data", str(data)]
    history = train(parse_args([*recipe, "--output", str(tmp_path / "scratch"), "--epochs", "2"]))
    assert history[-1]["val_top1"] >= 80.0  # 89.6 measured (CPU, 2 epochs); chance is 10
    saved = torch.load(tmp_path / "scratch" / "checkpoint.pth", weights_only=True)
    assert any(key.startswith("decoders.") for key in saved["model"])  # intermediate supervision was on

    # The trained weights in the official format, fine-tuned with intermediate supervision off.
    model = timm.create_model("revcol_tiny", dims=(8, 16, 24, 32), num_classes=10, intermediate_supervision=True)
    model.load_state_dict(saved["model"])
    torch.save({"model": to_official(model.state_dict())}, tmp_path / "official.pth")
    history = train(parse_args([*recipe, "--output", str(tmp_path / "finetune"), "--epochs", "1", "--lr", "1e-4",
                                "--initial-checkpoint", str(tmp_path / "official.pth"), "--layer-decay", "0.8"]))
    assert history[-1]["val_top1"] >= 80.0
    tuned = torch.load(tmp_path / "finetune" / "checkpoint.pth", weights_only=True)
    assert not any(key.startswith(("decoders.", "aux_heads.")) for key in tuned["model"])


def test_revcol_huge_level0_reads_the_previous_top_level_with_exact_gradients():
    """RevCol-H: level 0 also takes the previous column's top level (ReversibleColumns(bottom_reads_top)), which the
    reversible backward rebuilds first and differentiates; an official-format round trip keeps fusion.up2."""
    torch.manual_seed(0)
    model = timm.create_model("revcol_huge", **dict(TINY, num_columns=8), intermediate_supervision=True,
                              drop_path_rate=0.2)
    model = randomize_(model.double()).train()
    assert model.revcol.columns[1].levels[0].fusion.up2 is not None
    x, target = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    loss_r, grads_r = supervised_grads(model, x, target, True)
    loss_p, grads_p = supervised_grads(model, x, target, False)
    assert torch.equal(loss_r, loss_p)
    for name, g in grads_p.items():
        assert rel_error(grads_r[name], g) < 1e-10, (name, rel_error(grads_r[name], g))
    assert grads_r["revcol.columns.1.levels.0.fusion.up2.channel_reschedule.0.weight"].abs().sum() > 0
    official = to_official(model.state_dict())
    assert "subnet1.level0.fusion.up2.channel_reschedule.0.weight" in official
    target_model = timm.create_model("revcol_huge", **dict(TINY, num_columns=8)).double().eval()
    target_model.load_state_dict(checkpoint_filter_fn(official, target_model))
    with torch.no_grad():
        assert torch.equal(target_model(x), model.eval()(x))
