"""RevCol-ViT for inference and sharing: eval and captured forwards run the columns plain, so torch.export,
torch.jit.trace and the ONNX exporter work with grad mode on; timm's model checks; timm's pretrained path
(a file overlay, save_for_hf and local-dir:) loads the weights."""
import json

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.models import save_for_hf
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import revcol_vit  # noqa: F401  registers the models

MODELS = ["revcol_vit_s", "revcol_vit_b"]  # the registered models of Table 9
TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)


def tiny(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(TINY, **kwargs))


def test_eval_forward_under_grad_mode_runs_plain():
    """An eval model with grad mode on (input gradients, say) takes the plain path: no rebuild happens in backward."""
    model = tiny("revcol_vit_s").eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model.revcol.reconstruction_error is None
    model.train()(x).sum().backward()  # training: the reversible path, which measures its rebuild
    assert model.revcol.reconstruction_error is not None


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_jit_trace_equals_eager(name, train):
    """With grad mode on; in training mode (no drop path, which a trace would freeze) the trace is taken plain."""
    model = tiny(name, drop_path_rate=0.0).train(train)
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    x2 = torch.randn(2, 3, 32, 32)
    assert torch.equal(traced(x2), model(x2))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_export_static_and_dynamic_batch_equals_eager(name):
    model = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(torch.export.export(model, (x,)).module()(x), model(x))
    dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        assert torch.equal(dynamic(x), model(x))


@pytest.mark.slow
def test_export_at_registered_defaults():
    torch.manual_seed(0)
    model = timm.create_model("revcol_vit_s").eval()
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(torch.export.export(model, (x,)).module()(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnx_dynamo_export_runs_in_onnxruntime(name, tmp_path):
    """At the registered sizes; onnxruntime's kernels differ from torch's, so outputs agree to float32 rounding."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    program = torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        x = torch.randn(batch, 3, 224, 224)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            expected = model(x)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_torchscript_is_refused():
    """Not scriptable (docs/vit.md says why): the columns take keyword arguments and the reversible autograd
    Function, which TorchScript has no support for. torch.jit.trace and torch.export are the ways out."""
    with pytest.raises(Exception, match="context"):
        torch.jit.script(tiny("revcol_vit_s"))


# timm's tests/test_models.py checks, for every registered RevCol-ViT model (forward and backward of every variant:
# test_vit_models.py::test_variant_builds_and_runs_forward_and_backward)

@pytest.mark.parametrize("name", MODELS)
def test_default_cfg(name):
    model = tiny(name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 1000
    assert cfg["first_conv"] + ".weight" in model.state_dict()
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_match_features_and_forward(name):
    model = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32)
    top, levels = model.forward_intermediates(x)
    assert torch.equal(top, model.forward_features(x))
    assert [tuple(y.shape) for y in levels] == [(2, 32, 4, 4)] * 4
    features = timm.create_model(name, features_only=True, **{k: v for k, v in TINY.items() if k != "num_classes"})
    assert features.feature_info.channels() == [32] * 4 and features.feature_info.reduction() == [8] * 4


def fx_model(model, train):
    """As timm's tests build it: the last node as output, timm's leaf modules (the columns) not traced into."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions()))
    node = train_nodes[-1] if train else eval_nodes[-1]
    return create_feature_extractor(model.train(train), return_nodes=[node], tracer_kwargs=dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())), node


def assert_fx_trains_as_eager(model, x, unused=()):
    """The training-mode FX graph calls the columns as a leaf, so it trains reversibly: every gradient equals
    eager's to the bit. Parameters named under ``unused`` (intermediate heads) get none in either."""
    fx, node = fx_model(model, train=True)
    grads = []
    for run in (lambda: fx(x)[node], lambda: model(x)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same drop path masks
        run().logsumexp(-1).sum().backward()
        assert model.revcol.reconstruction_error is not None  # rebuilt in backward: reversible
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, g in grads[1].items():
        if name.startswith(unused):
            assert g is None and grads[0][name] is None, name
        else:
            assert g is not None and torch.equal(grads[0][name], g), name


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_and_backward(name):
    """The FX graph calls the columns as a leaf, so it trains reversibly: gradients equal eager's to the bit."""
    model = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32)
    fx, node = fx_model(model, train=False)
    assert torch.equal(fx(x)[node], model(x))
    assert_fx_trains_as_eager(model, x)


# Sharing weights the timm way

def trained_like(name, **kwargs):
    """A model whose every parameter is off its initial value, as after training."""
    model = tiny(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_pretrained_without_weights_is_timms_error():
    with pytest.raises(RuntimeError, match="No pretrained weights exist for revcol_vit_s"):
        tiny("revcol_vit_s", pretrained=True)


def test_pretrained_file_overlay_loads_the_weights(tmp_path):
    model = trained_like("revcol_vit_s")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    # num_classes in the overlay: the checkpoint's head size (else timm drops a head that differs from 1000)
    loaded = timm.create_model("revcol_vit_s", pretrained=True, **TINY, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "weights.pth"), num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_save_for_hf_round_trips_through_local_dir(name, tmp_path):
    """safetensors and config.json; a non-default img_size comes back from the config's model_args."""
    model = trained_like(name, img_size=64)
    save_for_hf(model, tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["img_size"] == [64, 64]
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.img_size == (64, 64) and loaded.pretrained_cfg["input_size"] == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.slow  # about 4 s
def test_hierarchical_model_exports_traces_and_fx_traces_as_eager():
    """RevCol-T at small width: torch.export (static and dynamic batch), jit.trace and FX give eager's outputs, and
    the FX graph trains reversibly with eager's gradients."""
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", dims=(8, 16, 24, 32), num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    assert torch.equal(dynamic(x), expected) and torch.equal(dynamic(x[:1]), model(x[:1]))
    assert torch.equal(torch.jit.trace(model, (x,), check_trace=False)(x), expected)
    fx, node = fx_model(model, train=False)
    assert torch.equal(fx(x)[node], expected)
    assert_fx_trains_as_eager(model, x, unused=("aux_heads", "decoders"))
