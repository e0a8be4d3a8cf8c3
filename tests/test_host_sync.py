"""A reversible training step reads nothing back from the device: the kept columns are decided from a copy of the
gammas that needs no wait, and the reconstruction gauge stays on the device until someone reads it."""
import pytest
import timm
import torch
from torch import nn

import revcol_vit  # noqa: F401  (registers the RevCol-ViT models with timm)

# On the CPU these stand for the reads that wait for a GPU. Tensor.numpy is left alone: it works on host tensors
# only, so it can never wait for a device.
HOST_READS = ("item", "tolist", "cpu", "__bool__")


def tiny_model(device="cpu"):
    torch.manual_seed(0)
    return timm.create_model("revcol_vit_s", img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=10,
                             drop_path_rate=0.1).to(device)


def training_step(model, optimizer, images, targets):
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_a_reversible_training_step_reads_nothing_back(monkeypatch):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, targets = torch.randn(4, 3, 32, 32), torch.arange(4)
    training_step(model, optimizer, images, targets)  # warm-up: the optimizer's state is created
    gammas = [p.detach().clone() for name, p in model.named_parameters() if "gammas" in name]

    def refuse(self, *args, **kwargs):
        raise AssertionError("a training step read a tensor back to the host")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):
        training_step(model, optimizer, images, targets)
    monkeypatch.undo()

    moved = [p for name, p in model.named_parameters() if "gammas" in name]
    assert not all(torch.equal(a, b) for a, b in zip(gammas, moved))  # the steps trained the gammas
    # The gauge kept the worst of the three backwards on the device; reading it empties it.
    assert 0.0 <= model.revcol.worst_reconstruction_error() < 1e-12
    assert model.revcol.worst_reconstruction_error() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_kept_columns_follow_loaded_gammas_at_once():
    model = tiny_model("cuda").revcol
    assert model._kept_columns() == set()
    state = model.state_dict()
    for name in state:
        if "gammas" in name:
            state[name] = torch.full_like(state[name], 1e-3)  # each inverse step multiplies errors by 1000
    model.load_state_dict(state)
    assert model._kept_columns() == {1}  # not the decision from the gammas before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_reversible_training_step_does_not_synchronize_the_gpu():
    model = tiny_model("cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, targets = torch.randn(4, 3, 32, 32, device="cuda"), torch.arange(4, device="cuda")
    training_step(model, optimizer, images, targets)  # warm-up: the first forward waits for the gammas once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            training_step(model, optimizer, images, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0.0 <= model.revcol.worst_reconstruction_error() < 1e-12

